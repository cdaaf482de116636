"""The interactive loop's helpers: streamed answers with byte-fallback characters, question rows, sampling seeds."""

from __future__ import annotations

import io
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from helpers import build_builtin

import inference  # noqa: E402
from datasets import EOS_ID, MAX_QUESTION_TOKENS, PAD_ID  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A built-in corpus whose vocabulary has no 'ü', 'ï' or 'é': they are spelled in byte-fallback tokens."""
    return build_builtin(tmp_path_factory.mktemp("inference") / "dataset")


class FixedAnswer:
    """Yields a fixed answer's tokens, then EOS, as `Generator.generate` yields a batch of one."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def generate(self, passages, *args):
        for t in [*self.tokens, EOS_ID]:
            yield mx.array([t])


@pytest.mark.parametrize("answer", ["Zürich", "naïve café", "a plain answer"])
def test_streamed_answer_is_the_decoded_answer(data, answer):
    tokens = data.tokenizer.encode(answer)
    assert data.decode(tokens) == answer
    half_decoded = any("\ufffd" in data.decode(tokens[:n]) for n in range(1, len(tokens)))
    assert half_decoded == (not answer.isascii()), "the non-ASCII answers are spelled in byte-fallback tokens"
    args = SimpleNamespace(max_answer_tokens=20, temperature=0.0, sample_top_k=0, seed=0)
    pieces = list(inference.answer_stream(FixedAnswer(tokens), data, data.questions[0], np.arange(3), args))
    assert "".join(pieces) == answer


def test_pieces_hold_back_a_half_decoded_character():
    pieces = list(inference.stable_pieces(["Z", "Z\ufffd", "Zü", "Zür\ufffd\ufffd", "Zür\ufffd\ufffd", "Zürč"]))
    assert pieces == ["Z", "ü", "r", "č"]
    # an answer that ends half-way through a character, or with U+FFFD inside it, keeps it
    assert "".join(inference.stable_pieces(["a", "a\ufffd"])) == "a\ufffd"
    assert "".join(inference.stable_pieces(["\ufffd", "\ufffdb"])) == "\ufffdb"
    assert list(inference.stable_pieces([])) == []


def test_question_row_keeps_a_long_question_whole():
    assert inference.question_row([5, 6], 4).tolist() == [5, 6, PAD_ID, PAD_ID]
    assert inference.question_row(list(range(4, 11)), 4).tolist() == list(range(4, 11))
    assert inference.refusal(list(range(MAX_QUESTION_TOKENS))) is None
    assert "too long" in inference.refusal(list(range(MAX_QUESTION_TOKENS + 1)))
    assert "no tokens" in inference.refusal([])


def test_question_seeds_differ_by_question_and_by_session_seed():
    seeds = {inference.question_seed(seed, asked) for seed in (0, 1) for asked in range(50)}
    assert len(seeds) == 100
    assert inference.question_seed(7, 3) == inference.question_seed(7, 3)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_end_of_input_at_a_terminal_ends_the_prompt_line(data):
    """Ctrl+D at the prompt left the shell's next prompt on the same line as ours."""
    out = io.StringIO()
    args = SimpleNamespace(seed=0)
    assert inference.loop(data, None, None, None, args, stdin=Terminal(""), out=out) == 0
    assert out.getvalue().endswith("> \n")
