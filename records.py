"""Plain records shared by every corpus reader and by the dataset builder."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SPLITS = ("train", "valid", "test")


@dataclass
class Document:
    """One source document: `id` is stable across runs, `title` is shown to users."""

    id: str
    title: str
    text: str


@dataclass
class QAPair:
    """A question with every accepted answer (the first is the canonical one).

    `doc_ids` names the evidence documents when the source gives them (empty otherwise).
    """

    id: str
    question: str
    answers: list[str]
    doc_ids: list[str] = field(default_factory=list)


def split_of(question_id: str, valid: float = 0.1, test: float = 0.1) -> str:
    """Deterministic split by a hash of the question id, so adding data never reshuffles the test set."""
    h = int.from_bytes(hashlib.sha1(question_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < test:
        return "test"
    if h < test + valid:
        return "valid"
    return "train"
