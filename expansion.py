"""Optional answer expansion: an mlx_lm language model rewrites each short gold answer as one full sentence.

Q "Where was X born?"  A "Velmora"  ->  "X was born in Velmora."  The sentence becomes the generator's training
target; the short gold answers stay the reference for EM/F1. A sentence that does not contain its answer (after
SQuAD normalisation) is replaced by the template "The answer is <answer>.", and such fallbacks are counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from metrics import normalize_answer

FLAG = "--expander_model"
INSTRUCTION = (
    "Rewrite the short answer as one complete sentence that answers the question and contains the "
    "answer word for word. Reply with the sentence only."
)
# Few-shot examples, shared by the chat and the plain prompt; none of them is about the built-in corpus.
EXAMPLES = (
    ("Where was Marie Curie born?", "Warsaw", "Marie Curie was born in Warsaw."),
    ("When did the Berlin Wall fall?", "1989", "The Berlin Wall fell in 1989."),
    ("Who wrote the novel Middlemarch?", "George Eliot", "The novel Middlemarch was written by George Eliot."),
)
_SENTENCE_END = re.compile(r"[.!?](?=[\s\"')\]]|$)")


class ExpansionError(ValueError):
    """The expander model cannot be loaded or used; the message names --expander_model."""


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them only once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_expander(model_path_or_id: str):
    """`(model, tokenizer)` from a local mlx_lm model folder or a Hugging Face model id, through `mlx_lm.load`.

    An id is looked up on the hub, or only in the local Hugging Face cache when HF_HUB_OFFLINE=1. Anything that
    cannot be loaded raises `ExpansionError` with a one-line message naming --expander_model."""
    name = str(model_path_or_id or "").strip()
    if not name:
        raise ExpansionError(f"{FLAG} is empty: give a local mlx_lm model folder or a Hugging Face model id")
    try:
        import mlx_lm
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
        from mlx_lm.utils import hf_repo_to_path
    except ImportError as e:
        raise ExpansionError(f"{FLAG} needs mlx-lm (pip install mlx-lm): {e}") from None

    path = Path(name).expanduser()
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~"))):
        raise ExpansionError(f"{FLAG} {name}: no such folder")
    source = str(path) if path.exists() else name
    try:
        if not path.exists() and _offline():
            source = str(hf_repo_to_path(name))  # the local cache only, no network
        return mlx_lm.load(source)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ExpansionError(
            f"{FLAG} {name}: not a local folder and not in the Hugging Face cache, and the hub "
            "cannot be reached (offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except RepositoryNotFoundError:
        raise ExpansionError(f"{FLAG} {name}: no such model on the Hugging Face hub (or it is private/gated)") from None
    except HFValidationError:
        raise ExpansionError(f"{FLAG} {name}: no such folder, and not a valid Hugging Face model id") from None
    except (OSError, ValueError, KeyError) as e:  # missing config/weights, unsupported architecture, bad JSON
        raise ExpansionError(f"{FLAG} {name}: mlx_lm cannot load it ({_first_line(e)})") from None


def fallback_sentence(answer: str) -> str:
    """The template used when the model's sentence does not contain the answer."""
    answer = answer.strip()
    return f"The answer is {answer}" + ("" if answer.endswith((".", "!", "?")) else ".")


def contains_answer(sentence: str, answer: str) -> bool:
    """Whether the normalised answer occurs in the normalised sentence as whole words."""
    a = normalize_answer(answer)
    return bool(a) and f" {a} " in f" {normalize_answer(sentence)} "


def first_sentence(text: str, answer: str, complete: bool = True) -> str | None:
    """The first sentence of the first line of `text`, or None when there is none.

    A full stop inside an occurrence of the answer ("St. Louis") does not end the sentence, nor does one before
    the answer has come ("Dr. Who first aired in 1963." for 1963: a "Dr." or "U.S." is no sentence end when the
    sentence would then miss its answer). Text without final punctuation counts as a sentence only when the model
    stopped by itself (`complete`), not at the token limit."""
    line = text.strip().split("\n", 1)[0].strip()
    line = re.sub(r"^(sentence|answer)\s*:\s*", "", line, flags=re.IGNORECASE).strip().strip('"').strip()
    if not line:
        return None
    needle = answer.strip()
    inside = [(m.start(), m.end()) for m in re.finditer(re.escape(needle), line, re.IGNORECASE)] if needle else []
    ends = [m.end() for m in _SENTENCE_END.finditer(line) if not any(s <= m.start() < e for s, e in inside)]
    for end in ends:
        if contains_answer(line[:end], answer):
            return line[:end]
    if ends:  # the answer is in none: the first sentence (the caller falls back to the template)
        return line[: ends[0]]
    if not complete and "\n" not in text.strip():
        return None  # cut off by max_tokens mid-sentence
    return line if line.endswith((".", "!", "?")) else line + "."


def build_prompt(tokenizer, question: str, answer: str) -> list[int]:
    """Prompt token ids: the chat template with few-shot turns when the tokenizer has one, else a plain
    few-shot completion prompt ending in "Sentence:"."""

    def query(q: str, a: str) -> str:
        return f"Question: {q}\nShort answer: {a}"

    if getattr(tokenizer, "has_chat_template", False):
        import jinja2

        turns = []
        for q, a, s in EXAMPLES:
            turns += [{"role": "user", "content": query(q, a)}, {"role": "assistant", "content": s}]
        turns.append({"role": "user", "content": query(question, answer)})
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": INSTRUCTION}] + turns, add_generation_prompt=True, enable_thinking=False
            )
        except jinja2.TemplateError:  # some templates (Gemma) refuse a system turn: put it in the first user turn
            turns[0] = {"role": "user", "content": INSTRUCTION + "\n\n" + turns[0]["content"]}
            ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, enable_thinking=False)
        return list(ids)
    shots = "".join(f"Question: {q}\nShort answer: {a}\nSentence: {s}\n\n" for q, a, s in EXAMPLES)
    return list(tokenizer.encode(f"{INSTRUCTION}\n\n{shots}Question: {question}\nShort answer: {answer}\nSentence:"))


def _newline_ids(tokenizer) -> set[int]:
    """Token ids that are exactly a line break, so generation stops at the end of the line."""
    ids = set()
    for text in ("\n", "\n\n"):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(int(enc[0]))
    return ids


def expand_answers(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    max_tokens: int = 48,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[str]:
    """One full sentence per `(question, answer)` pair, in order, generated greedily with `mlx_lm.batch_generate`.

    Each sentence contains its answer (normalised, as whole words); where the model's does not, the template
    "The answer is <answer>." is used instead, and the number of such fallbacks is logged."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tqdm import tqdm

    if max_tokens <= 0 or batch_size <= 0:
        raise ExpansionError(f"max_tokens and batch_size must be positive, got {max_tokens} and {batch_size}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    out: list[str] = []
    fallbacks = 0
    eos = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = eos | _newline_ids(tokenizer)  # stop at the end of the line, restored below
    try:
        # disable=None: a bar on a terminal only, not in logs
        with tqdm(total=len(pairs), desc="expanding answers", unit="answer", disable=None if progress else True) as bar:
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                prompts = [build_prompt(tokenizer, q, a) for q, a in batch]
                response = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
                for (_, a), text, ids in zip(batch, response.texts, response.token_ids):
                    sentence = first_sentence(text, a, complete=len(ids) < max_tokens)
                    if sentence is None or not contains_answer(sentence, a):
                        sentence = fallback_sentence(a)
                        fallbacks += 1
                    out.append(sentence)
                bar.update(len(batch))
    finally:
        tokenizer.eos_token_ids = eos
    if pairs:
        log(
            f"expansion: {len(pairs):,} answers expanded, {fallbacks:,} fell back to the template "
            f"({100 * fallbacks / len(pairs):.0f}%)"
        )
    return out
