"""Readers for real QA corpora: SQuAD and a folder of text here, TriviaQA (the rc tarball or the Hugging Face
hub) in triviaqa.py, all dispatched by `read_source`; and what they share: the report, `DataError` and the helpers.

Every reader returns `(documents, qa, report)`. Problems inside a file are warnings collected in the
`ReadReport` (the caller prints them) and the rest is still read; a source that cannot be read at all raises
`DataError` with one line naming the path or flag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from records import Document, QAPair

SOURCES = ("triviaqa", "triviaqa-hf", "squad", "folder")
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


def one_line(text: object) -> str:
    """The first line of `text`, stripped; "" when there is none."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def read_text(path: Path, report: ReadReport) -> str:
    """Decode a file as UTF-8; undecodable bytes become U+FFFD and the file is counted, not rejected."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        report.non_utf8_files += 1
        report.warn(f"{path}: not valid UTF-8 (byte {e.start}); decoded with replacement characters")
        return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")


def load_json(path: Path, report: ReadReport) -> Any:
    """A whole JSON file; one that cannot be opened or parsed is a DataError naming it."""
    try:
        text = read_text(path, report)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return repair_surrogates(data, text, str(path), report)


def load_json_list(path: Path, key: str, source: str, report: ReadReport) -> list:
    """The list under `key` of a JSON object file (SQuAD's "data", TriviaQA's "Data"), the file counted as read;
    DataError naming the file when it is not such an object."""
    data = load_json(path, report)
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f'{path}: not a {source} file (expected an object with a "{key}" list)')
    report.files_read += 1
    return items


def repair_surrogates(data: Any, text: str, where: str, report: ReadReport) -> Any:
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


def unique_answers(values: Iterable[Any]) -> list[str]:
    """Stripped non-empty strings, first occurrence kept, order kept."""
    out: list[str] = []
    for v in values:
        if isinstance(v, str) and v.strip() and v.strip() not in out:
            out.append(v.strip())
    return out


def stripped(value: Any) -> str:
    """`value` stripped when it is a string, else ""."""
    return value.strip() if isinstance(value, str) else ""


def as_list(value: Any) -> list:
    """`value` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def check_limit(max_questions: int | None) -> None:
    """Refuse a --max_questions below 1 (None means no limit)."""
    if max_questions is not None and max_questions < 1:
        raise DataError(f"--max_questions must be at least 1, got {max_questions}")


def finish(report: ReadReport, docs: list[Document], qa: list[QAPair]) -> ReadResult:
    """A reader's result, with the report's document and question counts filled in."""
    report.documents, report.questions = len(docs), len(qa)
    return docs, qa, report


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
    check_limit(max_questions)
    report = ReadReport(source="squad")
    docs: list[Document] = []
    qa: list[QAPair] = []
    seen_qids: set[str] = set()
    seen_titles: dict[str, int] = {}
    full = False
    for file in _squad_files(Path(path)):
        if full:
            break
        articles = load_json_list(file, "data", "SQuAD", report)
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
            title = stripped(article.get("title")) or f"{file.stem}-{a}"
            # Two articles with one title would share document ids; number the later ones.
            seen_titles[title] = seen_titles.get(title, 0) + 1
            if seen_titles[title] > 1:
                report.warn(f"{where}: title {title!r} repeated; ids use {title}~{seen_titles[title]}")
                title = f"{title}~{seen_titles[title]}"
            contexts: list[str] = []
            for p, para in enumerate(paragraphs):
                para = para if isinstance(para, dict) else {}
                context = para.get("context") if isinstance(para.get("context"), str) else ""
                qas = [] if full else as_list(para.get("qas"))
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
                    qid, question = stripped(item.get("id")), stripped(item.get("question"))
                    if not qid or not question:
                        report.malformed += 1
                        report.warn(f"{qwhere}: missing id or question; skipped")
                        continue
                    if item.get("is_impossible") is True:
                        report.unanswerable += 1
                        continue
                    raw = as_list(item.get("answers"))
                    answers = unique_answers(a.get("text") for a in raw if isinstance(a, dict))
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
    return finish(report, docs, qa)


# ------------------------------------------------------------------------------------------------ folder


def walk_once(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root)` following symlinked folders, but entering each real folder once: a link back up the tree
    cannot loop, and a folder linked twice is read once, through the first path in sorted order. This program's
    outputs (`is_ragmlx_output`: a run's --save_dir or a dataset cache, when they lie inside the source folder, as
    with `cd notes && main.py --data folder --from_dir .`) are never entered. As with os.walk, a caller may prune
    the subfolder list in place."""
    for folder, subdirs, files in _walk_unique(root):
        subdirs[:] = [d for d in subdirs if not is_ragmlx_output(Path(folder) / d)]
        yield folder, subdirs, files


def is_ragmlx_output(folder: Path) -> bool:
    """Whether `folder` is this program's output, never source data even inside --from_dir: a dataset cache (its
    meta.json, with the cache's own keys, beside tokenizer.model) or a run's --save_dir (such a cache in dataset/,
    or retriever checkpoints). False for anything it cannot read, as os.walk passes over a folder it cannot enter."""

    def dataset_cache(path: Path) -> bool:
        if not (os.path.isfile(path / "meta.json") and os.path.isfile(path / "tokenizer.model")):
            return False
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and {"fingerprint", "format", "tokenizer_sha1"} <= meta.keys()

    try:
        return (
            dataset_cache(folder)
            or dataset_cache(folder / "dataset")
            or any((folder / "checkpoints").glob("*.retriever.json"))
        )
    except OSError:
        return False


def _walk_unique(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
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
    files and folders, and this program's outputs, left out."""
    found = []
    for folder, subdirs, files in walk_once(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith((".txt", ".md")):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def folder_sources(root: str | os.PathLike) -> list[Path]:
    """The files `read_folder(root)` reads: its documents and, when there, root/qa.jsonl (what the dataset's
    fingerprint hashes, so that an image or a log written beside them does not rebuild it)."""
    root = Path(root)
    qa = root / "qa.jsonl"
    return [f for f in _text_files(root) if os.path.isfile(f)] + ([qa] if os.path.isfile(qa) else [])


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
        text = read_text(path, report)
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
            obj = repair_surrogates(json.loads(line), line, where, report)
        except json.JSONDecodeError as e:
            report.malformed += 1
            report.warn(f"{where}: bad JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            report.malformed += 1
            report.warn(f"{where}: expected a JSON object")
            continue
        question = stripped(obj.get("question"))
        raw_answers = obj.get("answers")
        raw_ids = obj.get("doc_ids", [])
        qid = obj.get("id")
        if isinstance(qid, int) and not isinstance(qid, bool):  # "id": 17, as many datasets number their questions
            qid = str(qid)
        why = None
        if not question:
            why = 'missing or empty "question"'
        elif not isinstance(raw_answers, list) or not all(isinstance(a, str) for a in raw_answers):
            why = '"answers" must be a list of strings'
        elif qid is not None and not (isinstance(qid, str) and qid.strip()):
            why = '"id" must be a non-empty string or an integer'
        elif not isinstance(raw_ids, list) or not all(isinstance(d, str) for d in raw_ids):
            why = '"doc_ids" must be a list of strings'
        if why is not None:
            report.malformed += 1
            report.warn(f"{where}: {why}")
            continue
        answers = unique_answers(raw_answers)
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
    root: str | os.PathLike,
    qa_path: str | os.PathLike | None = None,
    max_questions: int | None = None,
) -> ReadResult:
    """Read every *.txt / *.md under root (id = relative path, title = first markdown heading or file stem), but
    none in a run's output folder inside it (whose reports would otherwise become documents: `walk_once`).

    QA pairs come from `qa_path`, else root/qa.jsonl when present: one {"question", "answers", "id"?,
    "doc_ids"?} object per line; an id is a string or an integer, and defaults to "q-" + sha1(question)[:12]. No QA
    file is fine (empty qa).
    """
    check_limit(max_questions)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (--from_dir must be a directory of .txt/.md files)")
    report = ReadReport(source="folder")
    docs: list[Document] = []
    for path in _text_files(root):
        try:
            text = read_text(path, report)
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
    return finish(report, docs, qa)


# ---------------------------------------------------------------------------------------------- dispatch


def read_source(name: str, from_dir: str | None, **kw: Any) -> ReadResult:
    """Dispatch `--data NAME --from_dir PATH` to its reader; extra keywords go to the reader.

    For triviaqa-hf, from_dir (optional) is the Hugging Face cache folder.
    """
    import triviaqa  # here, not at the top: triviaqa imports this module

    if name == "triviaqa-hf":
        if from_dir is not None:
            kw.setdefault("cache_dir", from_dir)
        return triviaqa.read_triviaqa_hf(**kw)
    readers = {"triviaqa": triviaqa.read_triviaqa_dir, "squad": read_squad, "folder": read_folder}
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
