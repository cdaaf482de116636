"""The dataset stage: corpus -> SentencePiece tokenizer -> fixed token windows (chunks) -> a memory-mapped cache.

This module's name shadows the Hugging Face `datasets` package inside the project; code that needs the real
package imports it through `triviaqa.import_hf_datasets()`, which does so on purpose.

Cache layout (`<to_dir>`, default `<save_dir>/dataset`), written into a temporary folder and swapped in whole,
so a failed run never touches a prepared cache (and a folder holding anything else is never replaced):
    meta.json           sizes, special ids, tokenizer sha1, the fingerprint of the inputs, statistics
    tokenizer.model     SentencePiece BPE model (PAD=0, UNK=1, BOS=2, EOS=3)
    documents.json      [{"id", "title"}] in chunk order
    qa.json             [{"id", "question", "answers", "split", "doc_ids"}], plus "expanded" with --expand_answers
    chunks.npy          int32 [num_chunks, chunk_width], PAD-filled after each document's last token (chunk_width:
                        context_size, or the longest document's tokens when no document fills a window)
    chunk_doc.npy       int32 [num_chunks]  document index of each chunk
    chunk_offset.npy    int32 [num_chunks]  token offset of the chunk inside its document
    questions.npy       int32 [num_qa, max_question_tokens]  PAD-filled
    answers.npy         int32 [num_qa, max_answer_tokens]    canonical answer (or its expanded sentence) + EOS
    expansions.json     {"models": {model: {question id: {"question", "answer", "expanded"}}}}, kept across rebuilds
    pos_offsets.npy     int64 [num_qa + 1]  CSR offsets into pos_chunks
    pos_chunks.npy      int32 chunks that contain each question's answer
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

import checkpoint as ckpt
import expansion
from metrics import is_unspaced, normalize_answer
from records import Document, QAPair, split_of

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# 2: a word before punctuation at a chunk boundary keeps its answer label; a long answer keeps its EOS.
# 3: answers in scripts written without spaces (Chinese, Japanese, ...) are matched per character; a chunk boundary
#    inside the second half of a hyphenated word ("San Diego-Car|lsbad") no longer drops the first half.
# 4: answers are NFKC-normalised, as the tokenizer normalises the chunks ("２０１０" finds "2010"); a boundary after a
#    combining mark (Devanagari, Bengali, Arabic...) cuts a word; the tokenizer no longer records a thread count.
FORMAT_VERSION = 4
MAX_QUESTION_TOKENS = 48
MAX_ANSWER_TOKENS = 32
MAX_EXPANDED_TOKENS = 64  # a whole sentence, when answers are expanded
# SentencePiece skips training sentences over 4,192 bytes (max_sentence_length); longer lines go in in pieces.
MAX_SENTENCE_BYTES = 4000
MAX_SENTENCES = 2_000_000  # lines the tokenizer trains on at most (a seeded sample of a larger corpus)
EXPANSIONS_FILE = "expansions.json"
ARRAYS = ("chunks", "chunk_doc", "chunk_offset", "questions", "answers", "pos_offsets", "pos_chunks")
# Everything a cache folder may hold (macOS Finder's .DS_Store is no loss): a rebuild replaces no other folder.
CACHE_FILES = frozenset(
    {"meta.json", "tokenizer.model", "documents.json", "qa.json", EXPANSIONS_FILE, ".DS_Store"}
    | {f"{name}.npy" for name in ARRAYS}
)


class DatasetError(ValueError):
    """A dataset that cannot be built or read; the message names the file or flag."""


@dataclass
class SourceSpec:
    """Which corpus to read; everything here goes into the cache fingerprint."""

    data: str = "builtin"
    from_dir: str | None = None
    corpus_size: int = 2000
    seed: int = 0
    squad_documents: str = "articles"
    max_questions: int | None = None
    expander_model: str | None = None  # --expand_answers: mlx_lm model that rewrites answers as sentences


def read_corpus(spec: SourceSpec, log=print) -> tuple[list[Document], list[QAPair]]:
    """Documents and QA pairs from the chosen source."""
    if spec.data == "builtin":
        import builtin_corpus

        if not 0 < spec.corpus_size <= builtin_corpus.MAX_DOCUMENTS:
            raise DatasetError(
                f"--corpus_size must be between 1 and {builtin_corpus.MAX_DOCUMENTS:,}, got {spec.corpus_size:,}"
            )
        return builtin_corpus.generate(spec.corpus_size, seed=spec.seed)
    import readers

    kw = {"max_questions": spec.max_questions}
    if spec.data == "squad":
        kw["documents"] = spec.squad_documents
    try:
        docs, qa, report = readers.read_source(spec.data, spec.from_dir, **kw)
    except readers.DataError as e:
        raise DatasetError(str(e)) from None
    for line in report.messages[:20]:
        log(f"warning: {line}")
    log(report.summary())
    return docs, qa


def utf8_pieces(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """`line` cut into pieces of at most `max_bytes` UTF-8 bytes, each ending on a character boundary. Bytes, not
    characters: a 3-byte script (CJK) passes SentencePiece's byte limit from ~1,400 characters."""
    data = line.encode("utf-8")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back to the character's start
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


def sample_lines(lines: Iterable[str], limit: int, seed: int) -> list[str]:
    """At most `limit` of the non-empty `lines`: all of them when there are that few, else a uniform sample
    (reservoir sampling) that depends only on the lines and `seed`. SentencePiece's own sampling of a large input
    draws a new sample in every process, so a rebuilt dataset (or each rank's) would get another tokenizer."""
    rng = random.Random(seed)
    kept: list[str] = []
    for i, line in enumerate(line for line in lines if line):
        if i < limit:
            kept.append(line)
        elif (j := rng.randrange(i + 1)) < limit:
            kept[j] = line
    return kept


def train_tokenizer(texts: list[str], vocab_size: int, seed: int = 0, max_sentences: int = MAX_SENTENCES) -> bytes:
    """Train a SentencePiece BPE model in memory and return its bytes: on every line of `texts`, or on a sample of
    `max_sentences` of them drawn with `seed` (the same tokenizer from the same texts, every time)."""

    def sentences():
        for text in texts:
            for line in text.split("\n"):
                # SentencePiece skips lines over its byte limit; feed long lines in pieces instead.
                yield from utf8_pieces(line.strip())

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample_lines(sentences(), max_sentences, seed)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            character_coverage=1.0,
            byte_fallback=True,
            # `sample_lines` gives at most this many, so SentencePiece never samples (a new draw in every process);
            # kept, not 0, as the tokenizer it trains on the same lines differs with 0 (so would every checkpoint's).
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DatasetError(
            f"--vocab_size {vocab_size}: SentencePiece could not train ({e}); "
            "the corpus may be too small for it, or it is below the 256 byte pieces plus specials"
        ) from None
    return without_thread_count(model.getvalue())


def without_thread_count(model_bytes: bytes) -> bytes:
    """A trained SentencePiece model with the trainer's thread count cleared from its recorded settings. It does not
    change a piece, but it changed the file's bytes, and so the tokenizer's sha1 that checkpoints are keyed on, from
    one machine to another with a different number of cores."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # an environment from before protobuf was a requirement
        raise DatasetError(
            f"the tokenizer's model file needs protobuf ({e}): pip install -r requirements.txt"
        ) from None

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()


def kept_tokenizer(previous: Path, trained: bytes) -> bytes:
    """The cache's tokenizer file when the one just trained is the same model but for the thread count that
    versions before dataset format 4 recorded: its bytes, and so the sha1 that the checkpoints trained on it name,
    stay across the rebuild. Else (no such file, another model) the new one."""
    from google.protobuf.message import DecodeError

    try:
        old = previous.read_bytes()
        return old if without_thread_count(old) == trained else trained
    except (OSError, DecodeError):
        return trained


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: tokenizer not found; run --target dataset first")
    return spm.SentencePieceProcessor(model_file=str(path))


def chunk_documents(doc_tokens: list[list[int]], context_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into windows of `context_size` tokens, PAD-filling the last one.

    Every token lands in exactly one chunk. Returns (chunks, chunk_doc, chunk_offset)."""
    counts = [max(1, -(-len(t) // context_size)) for t in doc_tokens]
    chunks = np.full((sum(counts), context_size), PAD_ID, dtype=np.int32)
    chunk_doc = np.repeat(np.arange(len(doc_tokens), dtype=np.int32), counts)
    chunk_offset = np.zeros(len(chunk_doc), dtype=np.int32)
    row = 0
    for tokens, n in zip(doc_tokens, counts):
        for j in range(n):
            window = tokens[j * context_size : (j + 1) * context_size]
            chunks[row, : len(window)] = window
            chunk_offset[row] = j * context_size
            row += 1
    return chunks, chunk_doc, chunk_offset


def _word_char(ch: str) -> bool:
    # U+FFFD is a character whose UTF-8 bytes (byte-fallback pieces, "<0xC3>") a boundary splits: part of a word;
    # so is a combining mark (a vowel sign or virama in Devanagari, Bengali, Tamil...; Arabic harakat), which
    # `isalnum` calls neither a letter nor a digit.
    if not ch:  # the text of a one-piece chunk that decodes to nothing ("\u2581" alone, at --context_size 1)
        return False
    return ch == "\ufffd" or ((ch.isalnum() or unicodedata.category(ch)[0] == "M") and not is_unspaced(ch))


def whole_word_texts(sp: spm.SentencePieceProcessor, chunks: np.ndarray, chunk_doc: np.ndarray) -> list[str]:
    """Each chunk's text without the word cut by a chunk boundary, for answer matching: a window that ends in "cat"
    of "catalogue" must not count as containing the answer "cat". A boundary cuts a word when the next chunk does
    not start a new word ("\u2581") and the characters on both sides are letters or digits; a boundary between a
    word and its "." or "," cuts nothing, nor one next to a character of a script written without spaces (Chinese,
    Japanese, ...: each is a word). Decoded text, not pieces, so that byte-fallback pieces count as the letters
    they spell."""
    rows = [row[row != PAD_ID].tolist() for row in chunks]
    decoded = [sp.decode(r) for r in rows]
    cut = [
        chunk_doc[c] == chunk_doc[c + 1]
        and _word_char(decoded[c][-1:])
        and _word_char(decoded[c + 1][:1])
        and not sp.id_to_piece(rows[c + 1][0]).startswith("\u2581")
        for c in range(len(rows) - 1)
    ]
    texts = []
    for c, text in enumerate(decoded):
        start, end = 0, len(text)
        while c > 0 and cut[c - 1] and start < end and _word_char(text[start]):  # the rest of the previous word
            start += 1
        while c < len(cut) and cut[c] and end > start and _word_char(text[end - 1]):  # a word the next goes on with
            end -= 1
        texts.append(text[start:end].strip())
    return texts


def label_answers(
    chunk_texts: list[str],
    chunk_doc: np.ndarray,
    qa: list[QAPair],
    doc_index: dict[str, int],
    sp: spm.SentencePieceProcessor | None = None,
) -> list[list[int]]:
    """For each question, the chunks whose normalised text contains a normalised answer as whole words.

    When a question names its evidence documents only their chunks are searched (the answer string may appear
    elsewhere by chance); otherwise every chunk, through an inverted index on words. With the tokenizer `sp` that
    the chunk texts were decoded from, each answer first goes through it too (decode(encode(answer))), so both
    sides carry the same normalisation: NFKC, and the deletion of U+FFFD that a misread byte became."""
    norm = [f" {normalize_answer(t)} " for t in chunk_texts]
    tokenized = (lambda a: sp.decode(sp.encode(a))) if sp is not None else (lambda a: a)
    doc_chunks: dict[int, list[int]] = defaultdict(list)
    for c, d in enumerate(chunk_doc.tolist()):
        doc_chunks[d].append(c)
    postings: dict[str, list[int]] | None = None
    labels = []
    for q in qa:
        answers = [a for a in (normalize_answer(tokenized(a)) for a in q.answers) if a]
        evidence = [doc_index[d] for d in q.doc_ids if d in doc_index]
        if evidence:
            candidates = [c for d in evidence for c in doc_chunks[d]]
        else:
            if postings is None:
                postings = defaultdict(list)
                for c, text in enumerate(norm):
                    for w in set(text.split()):
                        postings[w].append(c)
            candidates = sorted({c for a in answers for c in postings.get(a.split()[0], [])})
        labels.append([c for c in candidates if any(f" {a} " in norm[c] for a in answers)])
    return labels


def _clip(rows: list[list[int]], limit: int, what: str, log=print) -> list[list[int]]:
    """`rows` cut to `limit` tokens, with one warning counting the rows cut (silently, a cut answer would lose
    its EOS and teach the generator an answer that never ends)."""
    cut = sum(len(r) > limit for r in rows)
    if cut:
        log(f"warning: {cut:,} of {len(rows):,} {what} are longer than {limit} tokens and were cut to {limit}")
    return [r[:limit] for r in rows]


def _pad_rows(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), PAD_ID, dtype=np.int32)
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, : len(r)] = r
    return out


def _save_expansions(to_dir: Path, expansions: dict) -> None:
    """Write the expansion cache into `to_dir` (atomically; the folder made if new), where the next build reads
    it whether or not this one finishes."""
    to_dir = Path(to_dir).resolve()
    to_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(to_dir / EXPANSIONS_FILE, {"format": 1, "models": expansions})


def read_expansions(to_dir: Path, log=print) -> dict[str, dict[str, dict]]:
    """The expansion cache of an existing dataset folder: {model: {question id: entry}}; {} when there is none."""
    path = Path(to_dir) / EXPANSIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log(f"warning: {path}: unreadable expansion cache ({e}); answers will be expanded again")
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    return {m: e for m, e in models.items() if isinstance(e, dict)} if isinstance(models, dict) else {}


def expander_key(model_name: str) -> str:
    """The expansion cache's key for a model: a hub id as given; a local folder with its files' signature, so that
    new weights written into the same folder are not answered with the old model's sentences."""
    if Path(model_name).is_dir():
        return f"{model_name}@{source_files_signature(model_name)[:12]}"
    return model_name


def expand_qa(model_name: str | None, qa: list[QAPair], to_dir: Path, log=print) -> tuple[list[str] | None, dict]:
    """Each question's canonical answer as a sentence by `model_name` (None: no expansion), reusing the cache in
    `to_dir` for questions whose id, text and answer are unchanged. Returns (sentences or None, updated cache)."""
    cache = read_expansions(to_dir, log)
    if model_name is None:
        return None, cache  # an existing cache is carried over, for a later --expand_answers
    key = expander_key(model_name)
    for stale in [k for k in cache if k.startswith(f"{model_name}@") and k != key]:
        del cache[stale]  # the same folder's earlier weights: gone from disk, their sentences with them
    entries = dict(cache.get(key, {}))

    def cached(q: QAPair) -> str | None:
        e = entries.get(q.id)
        if isinstance(e, dict) and (e.get("question"), e.get("answer")) == (q.question, q.answers[0]):
            return e.get("expanded") if isinstance(e.get("expanded"), str) else None
        return None

    out = [cached(q) for q in qa]
    todo = [i for i, e in enumerate(out) if e is None]
    log(f"expansion: {len(qa) - len(todo):,} answers from the cache, {len(todo):,} to generate with {model_name}")
    if todo:
        try:
            model, tokenizer = expansion.load_expander(model_name)
            sentences = expansion.expand_answers(
                model, tokenizer, [(qa[i].question, qa[i].answers[0]) for i in todo], log=log
            )
        except expansion.ExpansionError as e:
            raise DatasetError(str(e)) from None
        for i, sentence in zip(todo, sentences):
            out[i] = sentence
            entries[qa[i].id] = {"question": qa[i].question, "answer": qa[i].answers[0], "expanded": sentence}
    cache[key] = entries
    return out, cache


def fingerprint(spec: SourceSpec, vocab_size: int, context_size: int) -> str:
    import builtin_corpus

    payload = dict(vars(spec), vocab_size=vocab_size, context_size=context_size, version=FORMAT_VERSION)
    if payload["expander_model"] is None:  # caches built before the option existed stay valid
        del payload["expander_model"]
    elif os.path.isdir(spec.expander_model):  # a local model folder: its files too, so a retrained one is seen
        payload["expander_files"] = source_files_signature(spec.expander_model)
    if spec.data == "builtin":  # new templates must not reuse an old cache
        payload["builtin_version"] = builtin_corpus.VERSION
    if spec.from_dir:
        payload["from_dir"] = os.path.abspath(spec.from_dir)
        import readers

        files = readers.folder_sources(spec.from_dir) if spec.data == "folder" else None
        payload["files"] = source_files_signature(spec.from_dir, files)
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def source_files_signature(path: str | Path, files: list[Path] | None = None) -> str:
    """A hash of every source file's relative path, size and mtime, so edited data is re-read. Symlinked folders
    are followed as the folder reader follows them, and as it does, hidden files and folders (a `.git` that git
    rewrites) and this program's outputs inside the source folder (`readers.walk_once`) are left out; paths are
    hashed as bytes, since a file name need not be UTF-8."""
    import readers

    def visible(folder: str, subdirs: list[str], names: list[str]) -> list[Path]:
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        return [Path(folder) / name for name in names if not name.startswith(".")]

    path = Path(path)
    if files is None:  # `files`: exactly those a reader reads under `path` (the folder reader's), else all
        files = [path] if path.is_file() else []
        if path.is_dir():
            found = (f for walked in readers.walk_once(path) for f in visible(*walked))
            files = sorted(f for f in found if f.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        name = os.fsencode(f.relative_to(path) if f != path else f.name)
        h.update(name + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_replaceable(to_dir: Path) -> None:
    """Refuse a --to_dir that holds anything but a dataset cache's own files: a build swaps in a whole new folder,
    so a --to_dir equal to --save_dir (or above it) would delete the checkpoints beside the cache."""
    if not to_dir.exists():
        return
    if not to_dir.is_dir():
        raise DatasetError(f"--to_dir {to_dir}: exists and is not a folder; choose an empty or new folder")
    foreign = sorted(p.name for p in to_dir.iterdir() if p.name not in CACHE_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DatasetError(
            f"--to_dir {to_dir}: holds {shown} besides a dataset cache, and a build replaces the whole folder; "
            "choose an empty or new folder (the default is SAVE_DIR/dataset)"
        )


def _up_to_date(to_dir: Path, fp: str, log=print) -> bool:
    """Whether `to_dir` holds a complete cache of the inputs with fingerprint `fp`. One with a file missing or
    damaged is rebuilt, with a note: reusing it would fail at load, advising this very build."""
    try:
        meta = json.loads((to_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return False  # no cache, or an unreadable meta.json: build
    if not isinstance(meta, dict) or meta.get("fingerprint") != fp:
        return False
    try:
        _open_cache(to_dir)
    except (OSError, ValueError, KeyError) as e:
        log(f"dataset: {to_dir} is incomplete or damaged ({e}); rebuilding it")
        return False
    return True


def build_dataset(
    spec: SourceSpec,
    to_dir: str | Path,
    vocab_size: int = 4096,
    context_size: int = 64,
    force: bool = False,
    log=print,
) -> Path:
    """Read, tokenise, chunk and label a corpus into `to_dir`. Idempotent: an up-to-date cache is reused."""
    if context_size <= 0:
        raise DatasetError(f"--context_size must be positive, got {context_size}")
    if vocab_size < 64:
        raise DatasetError(f"--vocab_size must be at least 64, got {vocab_size}")
    to_dir = Path(to_dir)
    fp = fingerprint(spec, vocab_size, context_size)
    if not force and _up_to_date(to_dir, fp, log):
        log(f"dataset: {to_dir} is up to date")
        return to_dir
    # A cache that is up to date is only read (a shared, read-only one works); a build writes a sibling folder and
    # swaps it in (`_write_cache`), so the folder around the cache must take writes.
    problem = ckpt.unwritable(to_dir.resolve().parent)
    if problem:
        raise DatasetError(f"dataset folder {to_dir} (--to_dir, by default SAVE_DIR/dataset): {problem}")
    _check_replaceable(to_dir)  # before reading the corpus, so a refusal comes at once
    docs, qa = read_corpus(spec, log)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DatasetError(f"--data {spec.data}: no documents with text")
    # Before the tokenizer, so that an unusable --expander_model fails fast.
    expanded, expansions = expand_qa(spec.expander_model, qa, to_dir, log)
    if expanded is not None:  # kept at once: a build that fails later must not cost the sentences generated
        _save_expansions(to_dir, expansions)

    log(f"dataset: {len(docs):,} documents, {len(qa):,} QA pairs; training a {vocab_size}-token BPE tokenizer")
    model_bytes = train_tokenizer([d.text for d in docs] + [q.question for q in qa], vocab_size, spec.seed)
    model_bytes = kept_tokenizer(to_dir / "tokenizer.model", model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    doc_tokens = sp.encode([d.text for d in docs], num_threads=os.cpu_count() or 1)
    docs, doc_tokens = _drop_tokenless(docs, doc_tokens, log)
    if not docs:
        raise DatasetError(f"--data {spec.data}: no document has any tokens")
    chunks, chunk_doc, chunk_offset = chunk_documents(doc_tokens, context_size)
    longest = max(len(t) for t in doc_tokens)
    if longest < context_size:  # no document fills a window: its columns beyond the longest are PAD in every chunk
        chunks = chunks[:, :longest]  # and every model would attend over them (--context_size 5000 ran out of RAM)
        log(f"dataset: no document is longer than {longest} tokens; its chunks are stored {longest} wide")
    chunk_texts = whole_word_texts(sp, chunks, chunk_doc)
    doc_index = {d.id: i for i, d in enumerate(docs)}

    q_tokens = sp.encode([q.question for q in qa]) if qa else []
    keep = [i for i, t in enumerate(q_tokens) if t]
    if len(keep) < len(qa):
        log(f"warning: {len(qa) - len(keep)} questions have no tokens and were dropped")
    qa = [qa[i] for i in keep]
    q_tokens = _clip([q_tokens[i] for i in keep], MAX_QUESTION_TOKENS, "questions", log)
    expanded = None if expanded is None else [expanded[i] for i in keep]
    targets = expanded if expanded is not None else [q.answers[0] for q in qa]
    a_limit = MAX_ANSWER_TOKENS if expanded is None else MAX_EXPANDED_TOKENS
    a_tokens = _clip(sp.encode(targets), a_limit - 1, "answers (before their EOS)", log) if qa else []
    a_tokens = [t + [EOS_ID] for t in a_tokens]
    labels = label_answers(chunk_texts, chunk_doc, qa, doc_index, sp)
    no_answer = sum(1 for chunks_of_q in labels if not chunks_of_q)
    if no_answer:
        log(f"warning: {no_answer:,} of {len(qa):,} questions have their answer in no chunk (kept, counted as misses)")

    q_width = max((len(t) for t in q_tokens), default=1)
    a_width = max((len(t) for t in a_tokens), default=1)
    splits = [split_of(q.id) for q in qa]
    pos_offsets = np.zeros(len(qa) + 1, dtype=np.int64)
    pos_offsets[1:] = np.cumsum([len(chunks_of_q) for chunks_of_q in labels])
    pos_chunks = np.array([c for chunks_of_q in labels for c in chunks_of_q], dtype=np.int32)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "source": vars(spec),
        "vocab_size": sp.get_piece_size(),
        "context_size": context_size,
        "chunk_width": int(chunks.shape[1]),  # the context size, or the longest document when none fills a window
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "tokenizer_sha1": hashlib.sha1(model_bytes).hexdigest(),
        "num_documents": len(docs),
        "num_chunks": int(len(chunks)),
        "num_qa": len(qa),
        "splits": {s: splits.count(s) for s in ("train", "valid", "test")},
        "questions_without_answer_chunk": no_answer,
        "tokens": int(sum(len(t) for t in doc_tokens)),
        "question_tokens": q_width,
        "answer_tokens": a_width,
        "expansion_fallbacks": None
        if expanded is None
        else sum(e == expansion.fallback_sentence(q.answers[0]) for q, e in zip(qa, expanded)),
    }
    arrays = {
        "chunks": chunks,
        "chunk_doc": chunk_doc,
        "chunk_offset": chunk_offset,
        "questions": _pad_rows(q_tokens, q_width),
        "answers": _pad_rows(a_tokens, a_width),
        "pos_offsets": pos_offsets,
        "pos_chunks": pos_chunks,
    }
    _write_cache(to_dir, meta, model_bytes, docs, qa, splits, arrays, expanded, expansions)
    width, splits_count = chunks.shape[1], meta["splits"]
    log(f"dataset: {meta['num_chunks']:,} chunks of {width} tokens, splits {splits_count}, written to {to_dir}")
    return to_dir


def _drop_tokenless(docs: list[Document], doc_tokens: list[list[int]], log=print) -> tuple[list, list]:
    """Documents that encode to no tokens (only characters SentencePiece normalises away, such as zero-width
    spaces) left out with a warning counting them: each would be a chunk of PAD only."""
    keep = [i for i, t in enumerate(doc_tokens) if t]
    if len(keep) < len(docs):
        log(f"warning: {len(docs) - len(keep)} documents have no tokens and were dropped")
    return [docs[i] for i in keep], [doc_tokens[i] for i in keep]


def _write_cache(to_dir: Path, meta, model_bytes, docs, qa, splits, arrays, expanded=None, expansions=None) -> None:
    """Write everything into a temporary sibling folder, fsync it, then swap it in whole. A symlinked `to_dir` is
    resolved first: the swap replaces the folder it points to and keeps the link."""
    to_dir = to_dir.resolve()
    to_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + to_dir.name + "-", dir=to_dir.parent))
    try:
        (tmp / "tokenizer.model").write_bytes(model_bytes)
        (tmp / "documents.json").write_text(json.dumps([{"id": d.id, "title": d.title} for d in docs]))
        (tmp / "qa.json").write_text(
            json.dumps(
                [
                    {"id": q.id, "question": q.question, "answers": q.answers, "split": s, "doc_ids": q.doc_ids}
                    | ({} if expanded is None else {"expanded": expanded[i]})
                    for i, (q, s) in enumerate(zip(qa, splits))
                ]
            )
        )
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        if expansions:
            (tmp / EXPANSIONS_FILE).write_text(json.dumps({"format": 1, "models": expansions}))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if to_dir.exists():
            old = to_dir.with_name(".tmp-old-" + to_dir.name + f"-{os.getpid()}")
            os.replace(to_dir, old)
        os.replace(tmp, to_dir)
        ckpt.fsync_dir(to_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_cache(path: Path) -> tuple[dict, list, list, dict[str, np.ndarray]]:
    """(meta, documents, qa, arrays) of the cache in `path`, the arrays memory-mapped, so that this is cheap: every
    file must be there, the tokenizer must match its sha1 and the arrays' shapes meta.json's sizes. Raises OSError,
    ValueError or KeyError saying what is missing or wrong."""
    meta = json.loads((path / "meta.json").read_text())
    documents = json.loads((path / "documents.json").read_text())
    qa = json.loads((path / "qa.json").read_text())
    if hashlib.sha1((path / "tokenizer.model").read_bytes()).hexdigest() != meta["tokenizer_sha1"]:
        raise ValueError("tokenizer.model does not match meta.json")
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
    n_chunks, n_qa = meta["num_chunks"], meta["num_qa"]
    shapes = {
        "chunks": (n_chunks, meta.get("chunk_width", meta["context_size"])),
        "chunk_doc": (n_chunks,),
        "chunk_offset": (n_chunks,),
        "questions": (n_qa, meta["question_tokens"]),
        "answers": (n_qa, meta["answer_tokens"]),
        "pos_offsets": (n_qa + 1,),
    }
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{name}.npy has shape {arrays[name].shape}, meta.json says {shape}")
    if len(arrays["pos_chunks"]) != arrays["pos_offsets"][-1]:
        raise ValueError("pos_chunks.npy does not match pos_offsets.npy")
    if (len(documents), len(qa)) != (meta["num_documents"], n_qa):
        raise ValueError("documents.json or qa.json does not match meta.json")
    # Damaged contents (bytes overwritten, not the file cut short): token ids and indexes out of range. One pass
    # over each array, ~0.1 s for a million chunks.
    limits = {"chunks": meta["vocab_size"], "questions": meta["vocab_size"], "answers": meta["vocab_size"],
              "chunk_doc": meta["num_documents"], "pos_chunks": n_chunks}  # fmt: skip
    for name, end in limits.items():
        a = arrays[name]
        if a.size and not (0 <= a.min() and a.max() < end):
            raise ValueError(f"{name}.npy holds values outside [0, {end})")
    if arrays["pos_offsets"][0] != 0 or (np.diff(arrays["pos_offsets"]) < 0).any():
        raise ValueError("pos_offsets.npy is not an increasing list of offsets")
    return meta, documents, qa, arrays


class Dataset:
    """A prepared cache, memory-mapped: nothing is re-tokenised."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise DatasetError(f"{self.path}: no prepared dataset (meta.json missing); run --target dataset first")
        try:
            self.meta, self.documents, self.qa, arrays = _open_cache(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError(
                f"{self.path}: unreadable dataset cache ({e}); rebuild it with --target dataset"
            ) from None
        self.chunks = arrays["chunks"]
        self.chunk_doc = arrays["chunk_doc"]
        self.chunk_offset = arrays["chunk_offset"]
        self.questions = arrays["questions"]
        self.answers = arrays["answers"]
        self.pos_offsets = np.asarray(arrays["pos_offsets"])
        self.pos_chunks = np.asarray(arrays["pos_chunks"])
        self.tokenizer = load_tokenizer(self.path / "tokenizer.model")
        self.splits = np.array([q["split"] for q in self.qa])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def context_size(self) -> int:
        return int(self.meta["context_size"])

    @property
    def tokenizer_sha1(self) -> str:
        return self.meta["tokenizer_sha1"]

    def positives(self, i: int) -> np.ndarray:
        return self.pos_chunks[self.pos_offsets[i] : self.pos_offsets[i + 1]]

    def split_indices(self, split: str, answerable: bool = False) -> np.ndarray:
        """Question indices of a split; `answerable` keeps only those with at least one labelled chunk."""
        idx = np.nonzero(self.splits == split)[0]
        if answerable:
            idx = idx[self.pos_offsets[idx + 1] > self.pos_offsets[idx]]
        return idx

    def chunk_text(self, c: int) -> str:
        row = np.asarray(self.chunks[c])
        return self.tokenizer.decode(row[row != PAD_ID].tolist())

    def chunk_title(self, c: int) -> str:
        return self.documents[int(self.chunk_doc[c])]["title"]

    def decode(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens if t not in (PAD_ID, EOS_ID, BOS_ID)])
