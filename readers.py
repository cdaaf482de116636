"""Readers for real QA corpora: TriviaQA (the rc tarball or the Hugging Face hub), SQuAD and a folder of text.

Every reader returns `(documents, qa, report)`. Problems inside a file are warnings collected in the
`ReadReport` (the caller prints them) and the rest is still read; a source that cannot be read at all raises
`DataError` with one line naming the path or flag.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

from records import Document, QAPair

SOURCES = ("triviaqa", "triviaqa-hf", "squad", "folder")
HF_TRIVIAQA = "mandarjoshi/trivia_qa"  # where the hub's canonical "trivia_qa" now lives
HF_OFFLINE_MESSAGE = (
    "could not load trivia_qa from the Hugging Face hub (offline?); "
    "download the triviaqa-rc tarball and use --data triviaqa --from_dir PATH"
)
TRIVIAQA_DOMAINS = ("wikipedia", "web")
# Evidence lists in a TriviaQA question and the evidence folder / document-id prefix each points into.
_TRIVIAQA_EVIDENCE = (("EntityPages", "wikipedia"), ("SearchResults", "web"))
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate, paired or not
_SURROGATE = re.compile("[\ud800-\udfff]")  # left in a str only by a lone escape: a pair decodes to one character


class DataError(ValueError):
    """A source that cannot be read at all; the message is one line naming the path or flag."""


@dataclass
class ReadReport:
    """What a reader skipped or repaired; `messages` holds the first `max_messages` warnings."""

    source: str
    unit: str = "files"
    files_read: int = 0
    documents: int = 0
    questions: int = 0
    malformed: int = 0
    non_utf8_files: int = 0
    unreadable_files: int = 0
    empty_documents: int = 0
    empty_answers: int = 0
    unanswerable: int = 0
    missing_evidence: int = 0
    unknown_doc_ids: int = 0
    duplicate_questions: int = 0
    repaired_text: int = 0
    messages: list[str] = field(default_factory=list)
    messages_dropped: int = 0
    max_messages: int = 50

    def warn(self, message: str) -> None:
        """Keep a warning; past `max_messages` only count it, so a broken corpus cannot flood the log. A path in it
        with bytes that are not UTF-8 is shown with escapes, so that printing the warning cannot fail."""
        if len(self.messages) < self.max_messages:
            self.messages.append(message.encode("utf-8", "backslashreplace").decode("utf-8"))
        else:
            self.messages_dropped += 1

    def summary(self) -> str:
        """One line: what was read, then every non-zero problem counter."""
        line = (
            f"{self.source}: {self.questions} questions, {self.documents} documents from {self.files_read} {self.unit}"
        )
        problems = [
            (self.malformed, "malformed entries skipped"),
            (self.non_utf8_files, "non-UTF-8 files decoded with replacement"),
            (self.unreadable_files, "unreadable files skipped"),
            (self.empty_documents, "empty documents skipped"),
            (self.empty_answers, "questions without answers skipped"),
            (self.unanswerable, "unanswerable questions skipped"),
            (self.missing_evidence, "evidence files missing"),
            (self.unknown_doc_ids, "unknown doc ids dropped"),
            (self.duplicate_questions, "duplicate question ids"),
            (self.repaired_text, "texts with invalid Unicode repaired"),
        ]
        found = [f"{n} {what}" for n, what in problems if n]
        if found:
            line += "; " + ", ".join(found)
        warnings = len(self.messages) + self.messages_dropped
        if warnings:
            line += f" ({warnings} warnings)"
        return line


ReadResult = tuple[list[Document], list[QAPair], ReadReport]


# ----------------------------------------------------------------------------------------------- helpers


def _one_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _read_text(path: Path, report: ReadReport) -> str:
    """Decode a file as UTF-8; undecodable bytes become U+FFFD and the file is counted, not rejected."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        report.non_utf8_files += 1
        report.warn(f"{path}: not valid UTF-8 (byte {e.start}); decoded with replacement characters")
        return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")


def _load_json(path: Path, report: ReadReport) -> Any:
    """A whole JSON file; one that cannot be opened or parsed is a DataError naming it."""
    try:
        text = _read_text(path, report)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return _repair_surrogates(data, text, str(path), report)


def _repair_surrogates(data: Any, text: str, where: str, report: ReadReport) -> Any:
    """`data` parsed from the JSON `text`, with every lone surrogate ("\\ud83d" escaped alone, often half an emoji)
    replaced by U+FFFD. A lone surrogate is not a character: hashing, SentencePiece and printing all fail on it, so
    it is repaired where it enters, as undecodable bytes in a file are; each repaired string is counted."""
    if not _SURROGATE_ESCAPE.search(text):  # the only way a surrogate gets into parsed JSON: skip the walk
        return data
    repaired = 0

    def repair(value: Any) -> Any:
        nonlocal repaired
        if isinstance(value, str):
            fixed = _SURROGATE.sub("\ufffd", value)
            repaired += fixed != value
            return fixed
        if isinstance(value, list):
            return [repair(v) for v in value]
        if isinstance(value, dict):
            return {repair(k): repair(v) for k, v in value.items()}
        return value

    data = repair(data)
    if repaired:
        report.repaired_text += repaired
        report.warn(f"{where}: {repaired} strings with a lone surrogate escape (not Unicode); repaired with U+FFFD")
    return data


def _answers(values: Iterable[Any]) -> list[str]:
    """Stripped non-empty strings, first occurrence kept, order kept."""
    out: list[str] = []
    for v in values:
        if isinstance(v, str) and v.strip() and v.strip() not in out:
            out.append(v.strip())
    return out


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _check_limit(max_questions: int | None) -> None:
    if max_questions is not None and max_questions < 1:
        raise DataError(f"--max_questions must be at least 1, got {max_questions}")


def _finish(report: ReadReport, docs: list[Document], qa: list[QAPair]) -> ReadResult:
    report.documents, report.questions = len(docs), len(qa)
    return docs, qa, report


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
    qid, question = _text(item.get(id_key)), _text(item.get(question_key))
    if not qid or not question:
        report.malformed += 1
        report.warn(f"{where}: missing {id_key} or {question_key}; skipped")
        return None
    answer = item.get(answer_key) if isinstance(item.get(answer_key), dict) else {}
    answers = _answers([answer.get(value_key), *_list(answer.get(aliases_key)), *_list(answer.get(normalized_key))])
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
    _check_limit(max_questions)
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
            text = _read_text(path, report)
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
        title = _text(page.get("Title")) or Path(filename).stem.replace("_", " ")
        docs[doc_id] = Document(id=doc_id, title=title, text=text)
        return doc_id

    full = False
    for domain in domains:
        for split in ("train", "dev"):
            path = base / "qa" / f"{domain}-{split}.json"
            if full or not path.is_file():
                continue
            data = _load_json(path, report)
            items = data.get("Data") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise DataError(f'{path}: not a TriviaQA file (expected an object with a "Data" list)')
            report.files_read += 1
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
    return _finish(report, list(docs.values()), list(qa.values()))


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
            f"the Hugging Face `datasets` package is not importable ({_one_line(e)}); pip install datasets"
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
    _check_limit(max_questions)
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
                raise DataError(f"{HF_OFFLINE_MESSAGE} [{type(e).__name__}: {_one_line(e)}]") from None
            except (hub_errors, ValueError) as e:
                raise DataError(
                    f"could not load trivia_qa config {config!r} split {split!r}: {type(e).__name__}: {_one_line(e)}"
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
                        filename = _text(page.get("filename"))
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
                            title = _text(page.get("title")) or Path(filename).stem.replace("_", " ")
                            docs[doc_id] = Document(id=doc_id, title=title, text=text)
                        if doc_id not in doc_ids:
                            doc_ids.append(doc_id)
                pair = QAPair(id=qid, question=question, answers=answers, doc_ids=doc_ids)
                _add_triviaqa_pair(qa, pair, where, report)
                if max_questions is not None and len(qa) >= max_questions:
                    break
    return _finish(report, list(docs.values()), list(qa.values()))


# ------------------------------------------------------------------------------------------------- SQuAD


def _squad_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.is_file())
        if not files:
            raise DataError(f"{path}: no *.json SQuAD files in this directory (--from_dir)")
        return files
    raise DataError(f"{path}: SQuAD file or directory not found (--from_dir)")


def read_squad(path: str | os.PathLike, documents: str = "paragraphs", max_questions: int | None = None) -> ReadResult:
    """Read SQuAD v1.1 / v2.0 JSON: a file, or every *.json in a directory (sorted).

    documents="paragraphs": one Document per paragraph, id "<title>/<i>" (i = index in the article);
    documents="articles": one per article, id "<title>", paragraphs joined by blank lines.
    Answers are the unique answer texts in order; v2 unanswerable questions are skipped and counted.
    With max_questions, reading stops there (the current article's documents are still kept whole).
    """
    if documents not in ("paragraphs", "articles"):
        raise DataError(f"SQuAD documents must be 'paragraphs' or 'articles', got {documents!r}")
    _check_limit(max_questions)
    report = ReadReport(source="squad")
    docs: list[Document] = []
    qa: list[QAPair] = []
    seen_qids: set[str] = set()
    seen_titles: dict[str, int] = {}
    full = False
    for file in _squad_files(Path(path)):
        if full:
            break
        data = _load_json(file, report)
        articles = data.get("data") if isinstance(data, dict) else None
        if not isinstance(articles, list):
            raise DataError(f'{file}: not a SQuAD file (expected an object with a "data" list)')
        report.files_read += 1
        for a, article in enumerate(articles):
            if full:
                break
            where = f"{file}: data[{a}]"
            article = article if isinstance(article, dict) else {}
            paragraphs = article.get("paragraphs")
            if not isinstance(paragraphs, list):
                report.malformed += 1
                report.warn(f'{where}: no "paragraphs" list; skipped')
                continue
            title = _text(article.get("title")) or f"{file.stem}-{a}"
            # Two articles with one title would share document ids; number the later ones.
            seen_titles[title] = seen_titles.get(title, 0) + 1
            if seen_titles[title] > 1:
                report.warn(f"{where}: title {title!r} repeated; ids use {title}~{seen_titles[title]}")
                title = f"{title}~{seen_titles[title]}"
            contexts: list[str] = []
            for p, para in enumerate(paragraphs):
                para = para if isinstance(para, dict) else {}
                context = para.get("context") if isinstance(para.get("context"), str) else ""
                qas = [] if full else _list(para.get("qas"))
                if not context.strip():
                    report.empty_documents += 1
                    report.malformed += len(qas)
                    report.warn(f"{where}.paragraphs[{p}]: empty context; it and its {len(qas)} questions skipped")
                    continue
                contexts.append(context)
                doc_id = f"{title}/{p}" if documents == "paragraphs" else title
                if documents == "paragraphs":
                    docs.append(Document(id=doc_id, title=title.replace("_", " "), text=context))
                for q, item in enumerate(qas):
                    if full:
                        break  # limit reached: the rest of this article is read for its documents only
                    qwhere = f"{where}.paragraphs[{p}].qas[{q}]"
                    item = item if isinstance(item, dict) else {}
                    qid, question = _text(item.get("id")), _text(item.get("question"))
                    if not qid or not question:
                        report.malformed += 1
                        report.warn(f"{qwhere}: missing id or question; skipped")
                        continue
                    if item.get("is_impossible") is True:
                        report.unanswerable += 1
                        continue
                    raw = _list(item.get("answers"))
                    answers = _answers(a.get("text") for a in raw if isinstance(a, dict))
                    if not answers:
                        report.empty_answers += 1
                        report.warn(f"{qwhere} ({qid}): no answers; skipped")
                        continue
                    if qid in seen_qids:
                        report.duplicate_questions += 1
                        report.warn(f"{qwhere}: question id {qid} seen before; skipped")
                        continue
                    seen_qids.add(qid)
                    qa.append(QAPair(id=qid, question=question, answers=answers, doc_ids=[doc_id]))
                    full = max_questions is not None and len(qa) >= max_questions
            if documents == "articles" and contexts:
                docs.append(Document(id=title, title=title.replace("_", " "), text="\n\n".join(contexts)))
    return _finish(report, docs, qa)


# ------------------------------------------------------------------------------------------------ folder


def walk_once(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root)` following symlinked folders, but entering each real folder once: a link back up the tree
    cannot loop, and a folder linked twice is read once, through the first path in sorted order. As with os.walk,
    a caller may prune the subfolder list in place."""
    seen: set[tuple[int, int]] = set()
    for folder, subdirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs.sort()
        yield folder, subdirs, files


def _text_files(root: Path) -> list[Path]:
    """*.txt and *.md under root, recursively (through symlinked folders too), sorted by relative path; hidden
    files and folders left out."""
    found = []
    for folder, subdirs, files in walk_once(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith((".txt", ".md")):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _path_text(path: str) -> str:
    """A file path as valid text: bytes of a name that are not UTF-8 (which Python keeps as lone surrogates, that
    nothing downstream can encode) become \\xNN escapes, so the name stays unique and printable."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _title(text: str, path: Path) -> str:
    m = _HEADING.search(text)
    return m.group(1).strip() if m else path.stem


def _read_qa_jsonl(path: Path, doc_ids: set[str], report: ReadReport, max_questions: int | None) -> list[QAPair]:
    """QA pairs from a JSONL file; every bad line becomes a "<file>:<line>: <why>" warning and is skipped."""
    try:
        text = _read_text(path, report)
    except OSError as e:
        raise DataError(f"{path}: cannot read QA file ({e.strerror or e})") from None
    report.files_read += 1
    qa: list[QAPair] = []
    seen: set[str] = set()
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and others that JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if max_questions is not None and len(qa) >= max_questions:
            break
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = _repair_surrogates(json.loads(line), line, where, report)
        except json.JSONDecodeError as e:
            report.malformed += 1
            report.warn(f"{where}: bad JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            report.malformed += 1
            report.warn(f"{where}: expected a JSON object")
            continue
        question = _text(obj.get("question"))
        raw_answers = obj.get("answers")
        raw_ids = obj.get("doc_ids", [])
        qid = obj.get("id")
        why = None
        if not question:
            why = 'missing or empty "question"'
        elif not isinstance(raw_answers, list) or not all(isinstance(a, str) for a in raw_answers):
            why = '"answers" must be a list of strings'
        elif qid is not None and not (isinstance(qid, str) and qid.strip()):
            why = '"id" must be a non-empty string'
        elif not isinstance(raw_ids, list) or not all(isinstance(d, str) for d in raw_ids):
            why = '"doc_ids" must be a list of strings'
        if why is not None:
            report.malformed += 1
            report.warn(f"{where}: {why}")
            continue
        answers = _answers(raw_answers)
        if not answers:
            report.empty_answers += 1
            report.warn(f"{where}: empty answers")
            continue
        qid = qid.strip() if qid is not None else "q-" + hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
        if qid in seen:
            report.duplicate_questions += 1
            report.warn(f"{where}: question id {qid} seen before; skipped")
            continue
        seen.add(qid)
        unknown = [d for d in raw_ids if d not in doc_ids]
        if unknown:
            report.unknown_doc_ids += len(unknown)
            report.warn(f"{where}: unknown doc ids {unknown[:3]} dropped")
        kept = [d for d in dict.fromkeys(raw_ids) if d in doc_ids]
        qa.append(QAPair(id=qid, question=question, answers=answers, doc_ids=kept))
    return qa


def read_folder(
    root: str | os.PathLike, qa_path: str | os.PathLike | None = None, max_questions: int | None = None
) -> ReadResult:
    """Read every *.txt / *.md under root (id = relative path, title = first markdown heading or file stem).

    QA pairs come from `qa_path`, else root/qa.jsonl when present: one {"question", "answers", "id"?,
    "doc_ids"?} object per line; ids default to "q-" + sha1(question)[:12]. No QA file is fine (empty qa).
    """
    _check_limit(max_questions)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (--from_dir must be a directory of .txt/.md files)")
    report = ReadReport(source="folder")
    docs: list[Document] = []
    for path in _text_files(root):
        try:
            text = _read_text(path, report)
        except OSError as e:
            report.unreadable_files += 1
            report.warn(f"{path}: cannot read ({e.strerror or e}); skipped")
            continue
        report.files_read += 1
        if not text.strip():
            report.empty_documents += 1
            report.warn(f"{path}: empty document; skipped")
            continue
        name = path.relative_to(root).as_posix()
        doc_id = _path_text(name)
        if doc_id != name:
            report.repaired_text += 1
            report.warn(f"{path}: file name is not valid UTF-8; its document id is {doc_id!r}")
        docs.append(Document(id=doc_id, title=_title(text, Path(doc_id)), text=text))
    if qa_path is not None:
        qa_file = Path(qa_path)
        if not qa_file.is_file():
            raise DataError(f"{qa_file}: QA file not found")
    else:
        qa_file = root / "qa.jsonl"
    qa = _read_qa_jsonl(qa_file, {d.id for d in docs}, report, max_questions) if qa_file.is_file() else []
    return _finish(report, docs, qa)


# ---------------------------------------------------------------------------------------------- dispatch


def read_source(name: str, from_dir: str | None, **kw: Any) -> ReadResult:
    """Dispatch `--data NAME --from_dir PATH` to its reader; extra keywords go to the reader.

    For triviaqa-hf, from_dir (optional) is the Hugging Face cache folder.
    """
    if name == "triviaqa-hf":
        if from_dir is not None:
            kw.setdefault("cache_dir", from_dir)
        return read_triviaqa_hf(**kw)
    readers = {"triviaqa": read_triviaqa_dir, "squad": read_squad, "folder": read_folder}
    if name not in readers:
        raise DataError(f"unknown --data {name!r}; expected one of {', '.join(SOURCES)}")
    if from_dir is None:
        what = {
            "triviaqa": "the unpacked triviaqa-rc tarball",
            "squad": "a SQuAD JSON file or a folder of them",
            "folder": "a folder of .txt/.md files",
        }[name]
        raise DataError(f"--data {name} needs --from_dir PATH ({what})")
    return readers[name](from_dir, **kw)
