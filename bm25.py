"""BM25 baseline retriever over the same text chunks as the dense retriever.

`bm25s` builds the term-by-chunk score matrix and saves/loads it (numpy .npy with allow_pickle=False plus
JSON; nothing is unpickled). Tokenising and top-k search are our own so that every query in a batch is
scored with one vectorised pass and ties are broken the same way every time (lower chunk id first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
import bm25s
from bm25s.stopwords import STOPWORDS_EN  # the list bm25s uses for stopwords="en"

from metrics import space_unspaced

CONFIG_NAME = "ragmlx_bm25.json"
FORMAT_VERSION = 2  # 2: each character of a script written without spaces is a token
METHODS = ("robertson", "lucene", "atire", "bm25l", "bm25+")
STEMMERS = ("minimal", "none")
# Upper bound on the dense [queries, chunks] score block, so big corpora are scored in query blocks.
_MAX_BLOCK_ELEMENTS = 1 << 24

_POSSESSIVE = re.compile(r"['\u2019]s\b")
# Marks deleted inside words so "U.S.A." -> "usa" and "don't" -> "dont", as in normalize_answer.
_JOINERS = re.compile(r"[.'\u2018\u2019`\u00b4]")
_WORD = re.compile(r"[^\W_]+")
_STOPWORDS = frozenset(STOPWORDS_EN)


def minimal_stem(word: str) -> str:
    """Lucene's EnglishMinimalStemmer: strip plural -s/-es/-ies ("beatles" -> "beatle", "cities" -> "city")."""
    n = len(word)
    if n < 3 or word[-1] != "s" or word[-2] in "us":
        return word
    if word[-2] == "e":
        if n > 3 and word[-3] == "i" and word[-4] not in "ae":
            return word[:-3] + "y"
        if word[-3] in "iaoe":
            return word
    return word[:-1]


def tokenize(text: str, stem: str = "minimal") -> list[str]:
    """NFKC (as the tokenizer, whose decoded chunks are indexed, normalises a raw question), lower-case, drop
    possessive 's, delete in-word periods/apostrophes, split on all other punctuation and whitespace (and between
    the characters of scripts written without spaces, as `normalize_answer` does), remove English stopwords, then
    optionally apply the minimal plural stemmer."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = space_unspaced(_JOINERS.sub("", _POSSESSIVE.sub("", text)))
    words = [w for w in _WORD.findall(text) if w not in _STOPWORDS]
    if stem == "minimal":
        return [minimal_stem(w) for w in words]
    return words


class BM25Retriever:
    """Sparse lexical retriever; chunk ids are positions in the list given to `build`."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stem: str = "minimal"):
        if method not in METHODS:
            raise ValueError(f"unknown BM25 method {method!r}; choose one of {METHODS}")
        if stem not in STEMMERS:
            raise ValueError(f"unknown BM25 stemmer {stem!r}; choose one of {STEMMERS}")
        if not k1 >= 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1 = float(k1)
        self.b = float(b)
        self.method = method
        self.stem = stem
        self._model: bm25s.BM25 | None = None

    @classmethod
    def build(cls, chunk_texts: Sequence[str], **kw) -> "BM25Retriever":
        """Index `chunk_texts`; chunk i gets id i. Extra keywords go to the constructor."""
        retriever = cls(**kw)
        retriever._index(chunk_texts)
        return retriever

    def _index(self, chunk_texts: Sequence[str]) -> None:
        if len(chunk_texts) == 0:
            raise ValueError("BM25 index needs at least one chunk")
        corpus_tokens = [tokenize(t, self.stem) for t in chunk_texts]
        if not any(corpus_tokens):
            raise ValueError("BM25 index: no chunk has any indexable (non-stopword) term")
        model = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        model.index(corpus_tokens, show_progress=False)
        self._model = model

    @property
    def num_chunks(self) -> int:
        """Number of indexed chunks."""
        return int(self._require_model().scores["num_docs"])

    def _require_model(self) -> bm25s.BM25:
        if self._model is None:
            raise RuntimeError("BM25Retriever has no index: use BM25Retriever.build(...) or .load(...)")
        return self._model

    def _query_token_ids(self, query: str) -> np.ndarray:
        model = self._require_model()
        n_terms = len(model.scores["indptr"]) - 1
        ids = [model.vocab_dict.get(t, -1) for t in tokenize(query, self.stem)]
        # Unknown terms (and bm25s's placeholder "" term, which has no column) contribute nothing.
        return np.asarray([i for i in ids if 0 <= i < n_terms], dtype=np.int64)

    def _score_block(self, token_ids: list[np.ndarray]) -> np.ndarray:
        """Dense BM25 scores [len(token_ids), num_chunks]: one bincount over every query's postings."""
        model = self._require_model()
        data, indices, indptr = (model.scores[key] for key in ("data", "indices", "indptr"))
        n_docs = self.num_chunks
        lens_per_query = [len(t) for t in token_ids]
        toks = np.concatenate(token_ids) if token_ids else np.zeros(0, np.int64)
        rows_of_tok = np.repeat(np.arange(len(token_ids), dtype=np.int64), lens_per_query)
        starts = indptr[toks].astype(np.int64)
        lens = indptr[toks + 1].astype(np.int64) - starts
        total = int(lens.sum())
        # Positions of every posting of every query term, in query-then-term order.
        offsets = np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.arange(total, dtype=np.int64) - offsets + np.repeat(starts, lens)
        flat = np.repeat(rows_of_tok, lens) * n_docs + indices[pos].astype(np.int64)
        scores = np.bincount(flat, weights=data[pos], minlength=len(token_ids) * n_docs)
        scores = scores.reshape(len(token_ids), n_docs)
        if model.nonoccurrence_array is not None:
            # BM25L/BM25+ give every chunk a floor score for each query term it lacks.
            extra = np.bincount(rows_of_tok, weights=model.nonoccurrence_array[toks], minlength=len(token_ids))
            scores += extra[:, None]
        return scores.astype(np.float32)

    @staticmethod
    def _top_k_row(row: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k best scores, best first, ties broken by lower id (deterministic)."""
        if k < row.size:
            threshold = np.partition(row, row.size - k)[row.size - k]
            above = np.flatnonzero(row > threshold)
            tied = np.flatnonzero(row == threshold)[: k - above.size]
            cand = np.concatenate([above, tied])
        else:
            cand = np.arange(row.size)
        return cand[np.lexsort((cand, -row[cand]))]

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunks per query: (scores [Q, k'] float32, chunk ids [Q, k'] int64), best first.

        k' = min(k, num_chunks). A query with no indexed term gets all-zero scores and ids 0..k'-1.
        """
        if isinstance(queries, str):
            raise ValueError("search expects a list of query strings, got a single string")
        if int(k) < 1:
            raise ValueError(f"search needs k >= 1, got {k}")
        n_docs = self.num_chunks
        k = min(int(k), n_docs)
        token_ids = [self._query_token_ids(q) for q in queries]
        out_scores = np.zeros((len(queries), k), dtype=np.float32)
        out_ids = np.zeros((len(queries), k), dtype=np.int64)
        block = max(1, _MAX_BLOCK_ELEMENTS // n_docs)
        for lo in range(0, len(queries), block):
            scores = self._score_block(token_ids[lo : lo + block])
            for j, row in enumerate(scores):
                ids = self._top_k_row(row, k)
                out_ids[lo + j] = ids
                out_scores[lo + j] = row[ids]
        return out_scores, out_ids

    def save(self, directory: str | os.PathLike, extra: dict[str, dict] | None = None) -> None:
        """Write the index to `directory` (replaced whole); .npy arrays without pickle plus JSON, and each of
        `extra` (file name: JSON object) in the same folder, so that they are swapped in together."""
        model = self._require_model()
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp folder and swap it in, so a crash never leaves a half-written index.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model.save(tmp, allow_pickle=False, show_progress=False)
            config = {
                "format_version": FORMAT_VERSION,
                "k1": self.k1,
                "b": self.b,
                "method": self.method,
                "stem": self.stem,
                "stopwords": "en",
                "num_chunks": self.num_chunks,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name, obj in (extra or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BM25Retriever":
        """Read an index written by `save`; never unpickles (np.load with allow_pickle=False)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"{config_path}: not a BM25 index (missing {CONFIG_NAME})")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON ({e})") from e
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format_version {config.get('format_version')!r}, this version reads {FORMAT_VERSION}"
            )
        retriever = cls(k1=config["k1"], b=config["b"], method=config["method"], stem=config["stem"])
        try:
            model = bm25s.BM25.load(directory, allow_pickle=False, mmap=False, load_corpus=False, show_progress=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty .npy file
            raise ValueError(f"{directory}: cannot load BM25 index ({e})") from e
        if int(model.scores["num_docs"]) != config["num_chunks"]:
            raise ValueError(
                f"{directory}: index holds {model.scores['num_docs']} chunks but config says {config['num_chunks']}"
            )
        if model.method != retriever.method or model.k1 != retriever.k1 or model.b != retriever.b:
            raise ValueError(f"{directory}: bm25s params disagree with {CONFIG_NAME}")
        retriever._model = model
        return retriever
