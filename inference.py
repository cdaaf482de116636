"""The interactive loop: a question in, the retrieved chunks and a streamed answer out."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from datasets import EOS_ID, Dataset


def answer_stream(gen, data: Dataset, question: np.ndarray, chunk_ids: np.ndarray, args):
    """Yield the answer's text pieces as tokens are decoded (one question)."""
    from generator import build_passages

    passages = mx.array(build_passages(data, question[None, :], chunk_ids[None, :]))
    tokens: list[int] = []
    text = ""
    for tok in gen.generate(passages, args.max_answer_tokens, args.temperature, args.sample_top_k, args.seed):
        t = int(tok[0])
        if t == EOS_ID:
            break
        tokens.append(t)
        # Decode the whole answer so far: SentencePiece pieces only render correctly in context.
        new = data.decode(tokens)
        yield new[len(text) :]
        text = new


def loop(data: Dataset, retr, index, gen, args, stdin=None, out=None) -> int:
    """Read questions until `quit`, EOF or Ctrl+C; works from a terminal or a pipe."""
    import index as chunk_index

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    width = data.questions.shape[1]
    interactive = stdin.isatty()
    print("Ask a question (quit to exit).", file=out, flush=True)
    try:
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if text.lower() in ("quit", "exit"):
                break
            if not text:
                print("(empty question: type a question, or quit)", file=out, flush=True)
                continue
            tokens = data.tokenizer.encode(text)
            if len(tokens) > width:
                print(f"(question too long: {len(tokens)} tokens, at most {width})", file=out, flush=True)
                continue
            if not interactive:
                print(f"> {text}", file=out)
            question = data.encode_question(text)
            emb = retr(mx.array(question[None]))
            scores, ids = chunk_index.search(emb, index, args.top_k)
            for rank, (s, c) in enumerate(zip(scores[0], ids[0]), 1):
                print(f"  {rank}. {s:.3f} [{data.chunk_title(int(c))}] {data.chunk_text(int(c))}", file=out)
            if gen is not None:
                out.write("Answer: ")
                for piece in answer_stream(gen, data, question, ids[0], args):
                    out.write(piece)
                    out.flush()
                out.write("\n")
            out.flush()
    except KeyboardInterrupt:
        print("", file=out)
    return 0
