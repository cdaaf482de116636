"""The interactive loop: a question in, the retrieved chunks and a streamed answer out."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import mlx.core as mx
import numpy as np

from datasets import EOS_ID, MAX_QUESTION_TOKENS, PAD_ID, Dataset

REPLACEMENT = "\ufffd"  # what a character decodes to while some of its byte-fallback tokens are still to come


def stable_pieces(decodes: Iterable[str]) -> Iterator[str]:
    """The new text of each successive decode of a growing answer, for printing as it grows; joined, the pieces
    are the last decode. A character split over byte-fallback tokens decodes to U+FFFD until its last byte comes,
    and then has the same length, so trailing U+FFFD is held back until a later decode replaces it (or the answer
    ends with it)."""
    shown = text = ""
    for text in decodes:
        stable = text.rstrip(REPLACEMENT)
        if len(stable) > len(shown):
            yield stable[len(shown) :]
            shown = stable
    if len(text) > len(shown):
        yield text[len(shown) :]


def answer_decodes(gen, data: Dataset, question: np.ndarray, chunk_ids: np.ndarray, args, seed: int | None):
    """Yield the whole answer so far, decoded again after each new token (SentencePiece pieces only render
    correctly in context); `seed` keys the sampling when `args.temperature` > 0."""
    from generator import build_passages

    passages = mx.array(build_passages(data, question[None, :], chunk_ids[None, :]))
    tokens: list[int] = []
    for tok in gen.generate(passages, args.max_answer_tokens, args.temperature, args.sample_top_k, seed):
        t = int(tok[0])
        if t == EOS_ID:
            break
        tokens.append(t)
        yield data.decode(tokens)


def answer_stream(gen, data: Dataset, question: np.ndarray, chunk_ids: np.ndarray, args, seed: int | None = None):
    """Yield the answer's text pieces as tokens are decoded (one question)."""
    return stable_pieces(answer_decodes(gen, data, question, chunk_ids, args, seed))


def question_seed(seed: int, asked: int) -> int:
    """The sampling seed of a session's `asked`-th question: a session is reproducible from --seed, and asking the
    same question again draws a new sample."""
    return int(np.random.SeedSequence([seed, asked]).generate_state(1)[0])


def refusal(tokens: list[int]) -> str | None:
    """Why a question's tokens cannot be asked (a one-line note), or None."""
    if not tokens:  # e.g. a zero-width space, a BOM or DEL: not blank, but nothing to tokenise
        return "(no tokens in that line: type a question, or quit)"
    if len(tokens) > MAX_QUESTION_TOKENS:
        return f"(question too long: {len(tokens)} tokens, at most {MAX_QUESTION_TOKENS})"
    return None


def question_row(tokens: list[int], width: int) -> np.ndarray:
    """A question's token row, PAD-filled to at least the stored width: the usual questions keep one shape, and a
    longer one is kept whole (neither model has a length limit)."""
    row = np.full(max(width, len(tokens)), PAD_ID, dtype=np.int32)
    row[: len(tokens)] = tokens
    return row


def tolerate_bad_bytes(stream) -> None:
    """Read undecodable input bytes as U+FFFD: `strict` decoding raises, and SentencePiece rejects the lone
    surrogates that `surrogateescape` (Python's choice under a C locale) makes of them."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")


def ask(data: Dataset, retr, index, gen, args, question: np.ndarray, seed: int, out) -> None:
    """Print one question's retrieved chunks and, with a generator, its answer as it is decoded."""
    import index as chunk_index

    scores, ids = chunk_index.search(retr(mx.array(question[None])), index, args.top_k)
    for rank, (s, c) in enumerate(zip(scores[0], ids[0]), 1):
        print(f"  {rank}. {s:.3f} [{data.chunk_title(int(c))}] {data.chunk_text(int(c))}", file=out)
    if gen is not None:
        out.write("Answer: ")
        for piece in answer_stream(gen, data, question, ids[0], args, seed):
            out.write(piece)
            out.flush()
        out.write("\n")
    out.flush()


def loop(data: Dataset, retr, index, gen, args, stdin=None, out=None) -> int:
    """Read questions until `quit`, EOF or Ctrl+C; works from a terminal or a pipe."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    tolerate_bad_bytes(stdin)
    width = data.questions.shape[1]
    interactive = stdin.isatty()
    asked = 0
    print("Ask a question (quit to exit).", file=out, flush=True)
    try:
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:  # EOF (Ctrl+D at a terminal: end the prompt's line, as Ctrl+C does)
                if interactive:
                    print("", file=out)
                break
            text = line.strip()
            if text.lower() in ("quit", "exit"):
                break
            if not text:
                print("(empty question: type a question, or quit)", file=out, flush=True)
                continue
            tokens = data.tokenizer.encode(text)
            note = refusal(tokens)
            if note:
                print(note, file=out, flush=True)
                continue
            if not interactive:
                print(f"> {text}", file=out)
            ask(data, retr, index, gen, args, question_row(tokens, width), question_seed(args.seed, asked), out)
            asked += 1
    except KeyboardInterrupt:
        print("", file=out)
    return 0
