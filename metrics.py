"""Evaluation metrics: answer normalisation, EM/F1, answer containment, retrieval recall/MRR, latency.

Pure Python and numpy so every metric can be checked without MLX.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

# TriviaQA's official script also treats these quote-like marks as punctuation; the two non-ASCII
# backtick/acute marks are Unicode "modifier symbols", not "punctuation", so name them explicitly.
_EXTRA_PUNCT = frozenset("\u2018\u2019\u00b4`")
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Scripts written without spaces between words (Han, kana incl. halfwidth katakana, Hangul syllables, Thai, Lao,
# Myanmar, Khmer): each character counts as a word, as MLQA's and CMRC's evaluations (and BERT's tokenizer, for
# Han) count it.
_UNSPACED = re.compile(
    "([\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f\U00030000-\U000323af])"
)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or ch in _EXTRA_PUNCT or unicodedata.category(ch).startswith("P")


def is_unspaced(ch: str) -> bool:
    """Whether `ch` belongs to a script written without spaces between words (so it is a word of its own)."""
    return bool(_UNSPACED.match(ch))


def space_unspaced(text: str) -> str:
    """`text` with a space on each side of every character of a script written without spaces ("住在北京" ->
    " 住  在  北  京 "), so that whole-word matching and token F1 work per character there."""
    return _UNSPACED.sub(r" \1 ", text)


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation, with TriviaQA's underscores as spaces.

    NFKC first, as the tokenizer normalises every text it encodes (SentencePiece's default `nmt_nfkc`): chunk
    texts and predictions are decoded from its tokens, the gold answers are raw, and "２０１０", "ｶﾀｶﾅ", "ﬁ" or an
    accent in decomposed form must match what the tokenizer made of them. Lower-case; underscores become spaces
    (TriviaQA); punctuation, ASCII or Unicode, is deleted (SQuAD: "U.S.A." -> "usa"; TriviaQA's script would make
    it a space); the articles a/an/the are removed as whole words; each character of a script written without
    spaces (Chinese, Japanese, Korean, Thai, ...) becomes a word of its own (MLQA's convention; "北京" -> "北 京");
    whitespace is collapsed.
    """
    text = unicodedata.normalize("NFKC", s).lower().replace("_", " ")
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(space_unspaced(text).split())


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise ValueError("answers must be a list of strings, got a single string")
    if len(answers) == 0:
        raise ValueError("answers is empty: every question needs at least one gold answer")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0."""
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1_single(pred_toks: list[str], gold_toks: list[str]) -> float:
    # SQuAD v2 convention: if either side is empty, F1 is 1 only when both are empty.
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    num_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Bag-of-tokens F1 between the normalised prediction and the best-matching gold alias."""
    _check_answers(answers)
    pred_toks = normalize_answer(prediction).split()
    return max(_f1_single(pred_toks, normalize_answer(a).split()) for a in answers)


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """True if some normalised alias occurs in the normalised text as a whole-token sequence.

    Aliases that normalise to nothing (e.g. "The") never count as found.
    """
    _check_answers(answers)
    padded = f" {normalize_answer(text)} "
    for a in answers:
        norm = normalize_answer(a)
        # Both sides are single-space joined, so space padding enforces token boundaries.
        if norm and f" {norm} " in padded:
            return True
    return False


def _first_hit_ranks(ranked_ids: np.ndarray, relevant: Sequence[Iterable[int]]) -> np.ndarray:
    """0-based position of the first relevant id per question; K (one past the end) when none."""
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2:
        raise ValueError(f"ranked_ids must be 2-D [questions, K], got shape {ranked.shape}")
    n_q, k_max = ranked.shape
    if len(relevant) != n_q:
        raise ValueError(f"relevant has {len(relevant)} entries but ranked_ids has {n_q} rows")
    ranks = np.full(n_q, k_max, dtype=np.int64)
    for i, rel in enumerate(relevant):
        rel_set = {int(r) for r in rel}
        if not rel_set:
            continue
        hits = np.flatnonzero(np.isin(ranked[i], list(rel_set)))
        if hits.size:
            ranks[i] = hits[0]
    return ranks


def recall_at_k(
    ranked_ids: np.ndarray,
    relevant: Sequence[Iterable[int]],
    ks: Sequence[int] = (1, 5, 20, 100),
) -> dict[int, float]:
    """Fraction of questions with at least one relevant id among the first k retrieved.

    `ranked_ids` is [Q, K], best first. k larger than K is capped at K (the key stays the requested k).
    Questions whose relevant set is empty count as misses, so recall is over all Q questions;
    use `count_no_relevant` to report how many such questions there were.
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    ranks = _first_hit_ranks(ranked_ids, relevant)
    if ranks.size == 0:
        return {int(k): 0.0 for k in ks}
    k_max = np.asarray(ranked_ids).shape[1]
    return {int(k): float(np.mean(ranks < min(int(k), k_max))) for k in ks}


def count_no_relevant(relevant: Sequence[Iterable[int]]) -> int:
    """How many questions have no relevant id at all (they are misses in recall@k and MRR)."""
    return sum(1 for rel in relevant if len(set(rel)) == 0)


def mean_reciprocal_rank(ranked_ids: np.ndarray, relevant: Sequence[Iterable[int]]) -> float:
    """Mean over questions of 1/rank of the first relevant id in the list (1-based), 0 if none is listed."""
    ranks = _first_hit_ranks(ranked_ids, relevant)
    if ranks.size == 0:
        return 0.0
    k_max = np.asarray(ranked_ids).shape[1]
    rr = np.where(ranks < k_max, 1.0 / (ranks + 1.0), 0.0)
    return float(rr.mean())


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """Latency summary in milliseconds: {"p50_ms", "p95_ms", "mean_ms", "n"} (linear-interpolated percentiles)."""
    if len(seconds) == 0:
        raise ValueError("latency_percentiles needs at least one timing")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


def aggregate_qa(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1 (fractions in [0, 1]) over a set of predictions: {"em", "f1", "n"}."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if len(predictions) == 0:
        raise ValueError("aggregate_qa needs at least one prediction")
    em = [exact_match(p, a) for p, a in zip(predictions, answers)]
    f1 = [token_f1(p, a) for p, a in zip(predictions, answers)]
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1)), "n": len(predictions)}
