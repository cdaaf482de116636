"""TriviaQA readers: the unpacked triviaqa-rc tarball (`read_triviaqa_dir`) or the Hugging Face hub copy
(`read_triviaqa_hf`).

Both return `(documents, qa, report)` and report problems as every reader in readers.py does: warnings in the
`ReadReport`, `DataError` for a source that cannot be read at all. Our own datasets.py shadows Hugging Face
`datasets`; `import_hf_datasets()` gets past it on purpose.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

from readers import (
    DataError,
    ReadReport,
    ReadResult,
    as_list,
    check_limit,
    finish,
    load_json_list,
    one_line,
    read_text,
    stripped,
    unique_answers,
)
from records import Document, QAPair

HF_TRIVIAQA = "mandarjoshi/trivia_qa"  # where the hub's canonical "trivia_qa" now lives
HF_OFFLINE_MESSAGE = (
    "could not load trivia_qa from the Hugging Face hub (offline?); "
    "download the triviaqa-rc tarball and use --data triviaqa --from_dir PATH"
)
TRIVIAQA_DOMAINS = ("wikipedia", "web")
# Evidence lists in a TriviaQA question and the evidence folder / document-id prefix each points into.
_TRIVIAQA_EVIDENCE = (("EntityPages", "wikipedia"), ("SearchResults", "web"))


# ---------------------------------------------------------------------------------------- TriviaQA (dir)


def _triviaqa_base(root: Path, domains: tuple[str, ...]) -> Path:
    """The folder holding qa/ and evidence/ (the root itself or a triviaqa-rc/ inside it)."""
    for d in domains:
        if d not in TRIVIAQA_DOMAINS:
            raise DataError(f"unknown TriviaQA domain {d!r}; expected one of {', '.join(TRIVIAQA_DOMAINS)}")
    if not root.is_dir():
        raise DataError(f"{root}: TriviaQA directory not found (--from_dir)")
    base = next((b for b in (root, root / "triviaqa-rc") if (b / "qa").is_dir()), None)
    if base is None:
        raise DataError(
            f"{root}: not a TriviaQA-rc directory; expected qa/wikipedia-train.json or qa/wikipedia-dev.json "
            "and evidence/wikipedia/*.txt (unpack triviaqa-rc.tar.gz there)"
        )
    for d in domains:
        if not any((base / "qa" / f"{d}-{s}.json").is_file() for s in ("train", "dev")):
            raise DataError(
                f"{base / 'qa'}: not a TriviaQA-rc layout for domain {d!r}; expected {d}-train.json or {d}-dev.json"
            )
    return base


def _evidence_entries(value: Any) -> list[dict]:
    """Rows of an evidence list, accepting both a list of dicts and HF's dict of parallel lists."""
    if isinstance(value, dict):
        keys = list(value)
        columns = [value[k] if isinstance(value[k], list) else [] for k in keys]
        return [dict(zip(keys, row)) for row in zip(*columns)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _safe_relative(filename: str) -> bool:
    p = Path(filename)
    return bool(filename) and not p.is_absolute() and ".." not in p.parts


# TriviaQA's field names: the official JSON files and the Hugging Face copy spell the same fields differently.
_OFFICIAL_KEYS = ("QuestionId", "Question", "Answer", "Value", "Aliases", "NormalizedAliases")
_HF_KEYS = ("question_id", "question", "answer", "value", "aliases", "normalized_aliases")


def _triviaqa_question(item: dict, keys: tuple, where: str, report: "ReadReport"):
    """(id, question, answers with every alias) of one TriviaQA record, or None (counted and reported)."""
    id_key, question_key, answer_key, value_key, aliases_key, normalized_key = keys
    qid, question = stripped(item.get(id_key)), stripped(item.get(question_key))
    if not qid or not question:
        report.malformed += 1
        report.warn(f"{where}: missing {id_key} or {question_key}; skipped")
        return None
    answer = item.get(answer_key) if isinstance(item.get(answer_key), dict) else {}
    answers = unique_answers(
        [answer.get(value_key), *as_list(answer.get(aliases_key)), *as_list(answer.get(normalized_key))]
    )
    if not answers:
        report.empty_answers += 1
        report.warn(f"{where} ({qid}): no answer; skipped")
        return None
    return qid, question, answers


def _add_triviaqa_pair(qa: dict[str, QAPair], pair: QAPair, where: str, report: ReadReport) -> None:
    """Keep `pair` by its id; a question id seen before (TriviaQA repeats some across files) adds its evidence
    documents to the first one's."""
    if pair.id not in qa:
        qa[pair.id] = pair
        return
    report.duplicate_questions += 1
    report.warn(f"{where}: question id {pair.id} seen before; evidence merged")
    qa[pair.id].doc_ids += [d for d in pair.doc_ids if d not in qa[pair.id].doc_ids]


def read_triviaqa_dir(
    root: str | os.PathLike, domains: tuple[str, ...] = ("wikipedia",), max_questions: int | None = None
) -> ReadResult:
    """Read the unpacked triviaqa-rc tarball: qa/<domain>-{train,dev}.json plus evidence/<domain>/ files.

    One Document per evidence file (id "wikipedia/<Filename>" or "web/<Filename>"), read once however many
    questions cite it. Answers are Value, then Aliases, then NormalizedAliases, deduplicated in that order.
    A question seen in several files (the web and wikipedia files share ids) is kept once with merged doc_ids.
    """
    check_limit(max_questions)
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    base = _triviaqa_base(Path(root), domains)
    report = ReadReport(source="triviaqa")
    docs: dict[str, Document] = {}
    absent: set[str] = set()  # evidence ids found missing or empty, so each is reported once
    qa: dict[str, QAPair] = {}
    warned_dirs: set[str] = set()

    def evidence(kind: str, page: dict, where: str) -> str | None:
        filename = page.get("Filename")
        if not isinstance(filename, str) or not _safe_relative(filename):
            report.malformed += 1
            report.warn(f"{where}: bad evidence Filename {filename!r}; skipped")
            return None
        doc_id = f"{kind}/{filename}"
        if doc_id in docs:
            return doc_id
        if doc_id in absent:
            return None
        folder = base / "evidence" / kind
        if not folder.is_dir() and kind not in warned_dirs:
            warned_dirs.add(kind)
            report.warn(f"{folder}: evidence folder not found; every {kind} evidence file counts as missing")
        path = folder / filename
        absent.add(doc_id)
        try:
            text = read_text(path, report)
        except FileNotFoundError:
            report.missing_evidence += 1
            report.warn(f"{path}: evidence file missing")
            return None
        except OSError as e:
            report.unreadable_files += 1
            report.warn(f"{path}: cannot read ({e.strerror or e}); skipped")
            return None
        if not text.strip():
            report.empty_documents += 1
            report.warn(f"{path}: empty evidence file; skipped")
            return None
        absent.discard(doc_id)
        title = stripped(page.get("Title")) or Path(filename).stem.replace("_", " ")
        docs[doc_id] = Document(id=doc_id, title=title, text=text)
        return doc_id

    full = False
    for domain in domains:
        for split in ("train", "dev"):
            path = base / "qa" / f"{domain}-{split}.json"
            if full or not path.is_file():
                continue
            items = load_json_list(path, "Data", "TriviaQA", report)
            for n, item in enumerate(items):
                where = f"{path}: Data[{n}]"
                item = item if isinstance(item, dict) else {}
                parsed = _triviaqa_question(item, _OFFICIAL_KEYS, where, report)
                if parsed is None:
                    continue
                qid, question, answers = parsed
                doc_ids: list[str] = []
                for key, kind in _TRIVIAQA_EVIDENCE:
                    for page in _evidence_entries(item.get(key)):
                        doc_id = evidence(kind, page, where)
                        if doc_id is not None and doc_id not in doc_ids:
                            doc_ids.append(doc_id)
                pair = QAPair(id=qid, question=question, answers=answers, doc_ids=doc_ids)
                _add_triviaqa_pair(qa, pair, where, report)
                if max_questions is not None and len(qa) >= max_questions:
                    full = True
                    break
    return finish(report, list(docs.values()), list(qa.values()))


# ----------------------------------------------------------------------------------------- TriviaQA (HF)


def _shadows_hf(entry: str, project_dir: Path) -> bool:
    """Whether a sys.path entry would hand out a non-HF `datasets` (ours, or any plain datasets.py)."""
    try:
        folder = Path(entry or os.getcwd()).resolve()
        return folder == project_dir or (folder / "datasets.py").is_file()
    except OSError:
        return False


@functools.cache
def import_hf_datasets() -> ModuleType:
    """Import the Hugging Face `datasets` package even though our own datasets.py shadows it.

    The search path is stripped of the project folder, the current folder and any entry holding a
    datasets.py while importing; afterwards sys.path and sys.modules["datasets"] are put back as they were,
    so `import datasets` elsewhere in the project still gets our module. Cached: HF's submodules keep a
    reference to the package object, and a second copy of it breaks HF's fingerprint hashing.
    """
    current = sys.modules.get("datasets")
    if current is not None and callable(getattr(current, "load_dataset", None)):
        return current
    project_dir = Path(__file__).resolve().parent
    saved_path = list(sys.path)
    sys.modules.pop("datasets", None)
    sys.path[:] = [p for p in sys.path if not _shadows_hf(p, project_dir)]
    try:
        module = importlib.import_module("datasets")
    except ImportError as e:
        raise DataError(
            f"the Hugging Face `datasets` package is not importable ({one_line(e)}); pip install datasets"
        ) from None
    finally:
        sys.path[:] = saved_path
        if current is not None:
            sys.modules["datasets"] = current
        else:
            sys.modules.pop("datasets", None)
    if not callable(getattr(module, "load_dataset", None)):
        where = getattr(module, "__file__", "?")
        raise DataError(f"`datasets` imported from {where} is not Hugging Face datasets (no load_dataset)")
    return module


@contextmanager
def _hf_as_datasets(hf: ModuleType) -> Iterator[None]:
    """Let HF resolve its own lazy `datasets.*` imports while it runs; put our module back afterwards."""
    saved = sys.modules.get("datasets")
    sys.modules["datasets"] = hf
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("datasets", None)
        else:
            sys.modules["datasets"] = saved


def read_triviaqa_hf(
    split_names: tuple[str, ...] = ("train", "validation"),
    config: str = "rc.wikipedia",
    cache_dir: str | None = None,
    max_questions: int | None = None,
    load_dataset: Callable[..., Iterable[dict]] | None = None,
) -> ReadResult:
    """Read TriviaQA through Hugging Face `datasets` (mandarjoshi/trivia_qa, default config rc.wikipedia).

    Documents come from entity_pages (id "wikipedia/<filename>", text = wiki_context) and search_results
    (id "web/<filename>", text = search_context), each kept once. `load_dataset(path, config, split=...,
    cache_dir=...)` defaults to HF's own and is injectable for tests. No network and no cache -> DataError.
    """
    check_limit(max_questions)
    split_names = (split_names,) if isinstance(split_names, str) else tuple(split_names)
    hf = import_hf_datasets()
    load = load_dataset if load_dataset is not None else hf.load_dataset
    hub_errors = getattr(getattr(hf, "exceptions", None), "DatasetsError", OSError)
    report = ReadReport(source="triviaqa-hf", unit="splits")
    docs: dict[str, Document] = {}
    absent: set[str] = set()
    qa: dict[str, QAPair] = {}
    sources = (("entity_pages", "wikipedia", "wiki_context"), ("search_results", "web", "search_context"))

    with _hf_as_datasets(hf):
        for split in split_names:
            if max_questions is not None and len(qa) >= max_questions:
                break
            try:
                rows = load(HF_TRIVIAQA, config, split=split, cache_dir=cache_dir)
            except OSError as e:
                raise DataError(f"{HF_OFFLINE_MESSAGE} [{type(e).__name__}: {one_line(e)}]") from None
            except (hub_errors, ValueError) as e:
                raise DataError(
                    f"could not load trivia_qa config {config!r} split {split!r}: {type(e).__name__}: {one_line(e)}"
                ) from None
            report.files_read += 1
            for n, row in enumerate(rows):
                where = f"trivia_qa {config} {split}[{n}]"
                parsed = _triviaqa_question(row, _HF_KEYS, where, report)
                if parsed is None:
                    continue
                qid, question, answers = parsed
                doc_ids: list[str] = []
                for key, kind, text_key in sources:
                    for page in _evidence_entries(row.get(key)):
                        filename = stripped(page.get("filename"))
                        doc_id = f"{kind}/{filename}"
                        if not filename or doc_id in absent:
                            continue
                        if doc_id not in docs:
                            text = page.get(text_key) if isinstance(page.get(text_key), str) else ""
                            if not text.strip():
                                absent.add(doc_id)
                                report.empty_documents += 1
                                report.warn(f"{where}: {key} {filename!r} has no text; skipped")
                                continue
                            title = stripped(page.get("title")) or Path(filename).stem.replace("_", " ")
                            docs[doc_id] = Document(id=doc_id, title=title, text=text)
                        if doc_id not in doc_ids:
                            doc_ids.append(doc_id)
                pair = QAPair(id=qid, question=question, answers=answers, doc_ids=doc_ids)
                _add_triviaqa_pair(qa, pair, where, report)
                if max_questions is not None and len(qa) >= max_questions:
                    break
    return finish(report, list(docs.values()), list(qa.values()))
