"""The generator: a Fusion-in-Decoder encoder-decoder that reads the question with each retrieved chunk."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from datasets import BOS_ID, EOS_ID, PAD_ID, Dataset
from training import UsageError
import cores
import distributed as dist
import cpu_kernels
from layers import NEG_INF, DecoderBlock, Encoder, Packing, check_dims, init_embedding, padding_mask
from layers import plan_packing, to_device


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int = 128
    num_blocks: int = 2
    num_decoder_blocks: int = 2
    num_heads: int = 4
    max_answer_tokens: int = 32
    copy: bool = True
    checkpoint: bool = False

    def __post_init__(self):
        check_dims(self.dim, self.num_heads, self.num_blocks, self.num_decoder_blocks)

    def to_dict(self) -> dict:
        return asdict(self)


class Memory(NamedTuple):
    """The encoded passages of a batch: states [B, S, D], additive mask [B, 1, 1, S], token ids [B, S]."""

    states: mx.array
    mask: mx.array
    tokens: mx.array


class Pointer(nn.Module):
    """Copy attention (pointer-generator, See et al. 2017): a distribution over memory positions and a gate
    that mixes copying a passage token with generating from the vocabulary. Answers in RAG are mostly spans
    of the retrieved text, and copying them is far easier to learn from little data than generating them."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1)
        self.scale = dim**-0.5

    def __call__(self, h: mx.array, memory: Memory, cache: dict | None = None) -> tuple[mx.array, mx.array]:
        """Without a cache the key projection is folded into the query, as in layers.CrossAttention:
        q (M Wk^T)^T = (q Wk) M^T; decoding (a cache) projects the memory's keys once per question."""
        q = self.q_proj(h) * self.scale
        if cache is None:
            scores = (q @ self.k_proj.weight) @ memory.states.swapaxes(1, 2)
        else:
            if "k" not in cache:
                cache["k"] = self.k_proj(memory.states)
            scores = q @ cache["k"].swapaxes(1, 2)
        return cpu_kernels.softmax(scores + memory.mask[:, 0]), mx.sigmoid(self.gate(h))


class Generator(nn.Module):
    """`encode` each (question, chunk) passage on its own, concatenate the encodings as one memory, and
    `decode` the answer with causal self-attention and cross-attention over all passages at once; with
    `copy`, a pointer over the memory's tokens is mixed into the output distribution."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        init_embedding(self.embed, args.dim)
        self.encoder = Encoder(args.dim, args.num_blocks, args.num_heads, args.checkpoint)
        self.blocks = [DecoderBlock(args.dim, args.num_heads) for _ in range(args.num_decoder_blocks)]
        self.norm = nn.RMSNorm(args.dim)
        if args.copy:
            self.pointer = Pointer(args.dim)

    def encode(self, passages: mx.array, packing: Packing | tuple | None = None) -> Memory:
        """passages [B, P, L] -> one memory of P*L positions per question (each passage encoded on its own);
        with a `Packing` of the passages' real tokens, the encoder's position-wise layers skip the pads."""
        B, P, L = passages.shape
        flat = passages.reshape(B * P, L)
        valid = flat != PAD_ID
        h = self.encoder(self.embed(flat), padding_mask(valid), packing)
        states = h.reshape(B, P * L, h.shape[-1])
        return Memory(states, padding_mask(valid.reshape(B, P * L)), passages.reshape(B, P * L))

    def encode_spread(self, passages: mx.array) -> Memory:
        """`encode`, packed (`layers.plan_packing`), with the questions' rows spread over the CPU's cores
        (cores.py) and evaluated there: the encoder is most of generating a short answer (batch 32, 64 tokens:
        0.98 -> 0.74 s on 2 cores; 64 validation questions 0.276 -> 0.254 s packed). Greedy tokens can then differ
        with the number of streams where two candidates tie to float rounding."""
        plans = to_device(plan_packing(np.asarray(passages) != PAD_ID))
        with cores.spread():
            memory = cores.map_rows(self.encode, passages, cores.PerPart(plans))
            mx.eval(memory)
        return memory

    def decode(
        self, tokens: mx.array, memory: Memory, cache: list | None = None, log: bool = True, last: bool = False
    ) -> mx.array:
        """tokens [B, T] -> log-probabilities [B, T, V] (probabilities with `log=False`; with `last`, of the last
        position only: [B, 1, V]). With a cache, only the new tokens are passed in."""
        x = self.embed(tokens)
        T = x.shape[1]
        if cache is None or T > 1:
            offset = 0 if cache is None else cache[0].get("self", {}).get("length", 0)
            causal = mx.triu(mx.full((T, T + offset), NEG_INF), k=1 + offset).astype(x.dtype)
        else:
            causal = None  # one new token attends to every cached one
        for i, block in enumerate(self.blocks):
            x = block(x, memory.states, causal, memory.mask, None if cache is None else cache[i])
        h = self.norm(x[:, -1:] if last else x)
        logits = self.embed.as_linear(h)
        if not self.args.copy:
            logp = logits - cpu_kernels.logsumexp(logits)
            return logp if log else mx.exp(logp)
        attn, gate = self.pointer(h, memory, None if cache is None else cache[-1])
        B, T, S = attn.shape
        # Scatter the copy attention onto the vocabulary ids of the memory tokens: [B, T, V].
        b = mx.broadcast_to(mx.arange(B)[:, None, None], (B, T, S))
        t = mx.broadcast_to(mx.arange(T)[None, :, None], (B, T, S))
        v = mx.broadcast_to(memory.tokens[:, None, :], (B, T, S))
        copy = mx.zeros(logits.shape, dtype=attn.dtype).at[b, t, v].add(attn)
        probs = (1 - gate) * cpu_kernels.softmax(logits) + gate * copy
        return mx.log(probs + 1e-9) if log else probs

    def __call__(self, passages: mx.array, answer_in: mx.array) -> mx.array:
        return self.decode(answer_in, self.encode(passages))

    def make_cache(self) -> list[dict]:
        return [{} for _ in range(len(self.blocks) + 1)]

    def generate(
        self,
        passages: mx.array,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        sample_top_k: int = 0,
        seed: int | None = None,
        memory: Memory | None = None,
    ) -> Iterator[mx.array]:
        """Yield the next token [B] for every question in the batch, one step at a time, with a key/value cache.

        `temperature` 0 is greedy; otherwise sample, from the `sample_top_k` most likely tokens when > 0.
        `max_tokens` None: the model's `max_answer_tokens`. `memory` is `encode(passages)` when the caller has it
        already. The caller stops when every row has produced EOS. On the CPU the questions' rows are decoded spread
        over the cores, each slice with a cache of its own (dim 128, batch 64: 20 -> 14.7 ms a token on 2 cores);
        the sampling sees the whole batch."""
        max_tokens = self.args.max_answer_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:  # a caller gets no steps, and `until_eos` could not tell how many rows it had
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        key = mx.random.key(seed) if seed is not None else None
        memory = self.encode_spread(passages) if memory is None else memory
        B = memory.states.shape[0]
        if B == 0:  # no questions: no steps (MLX's argmax and scatter refuse empty arrays)
            return
        with cores.spread():
            parts = [(s, rows, cores.take_rows(memory, rows), self.make_cache()) for s, rows in cores.row_parts(B)]
        spread = cores.spread if len(parts) > 1 else nullcontext  # one row: keep the BLAS threads
        tokens = mx.full((B, 1), BOS_ID, dtype=mx.int32)
        for _ in range(max_tokens):
            with spread():
                scores = []  # greedy: probabilities (argmax needs no log over the vocabulary); sampling: log-probs
                for stream, rows, part_memory, cache in parts:
                    with mx.stream(stream):
                        scores.append(self.decode(tokens[rows], part_memory, cache, log=temperature > 0)[:, -1, :])
                scores = mx.concatenate(scores, axis=0) if len(scores) > 1 else scores[0]
                if temperature <= 0:
                    nxt = mx.argmax(scores, axis=-1)
                else:
                    sub = None
                    if key is not None:
                        key, sub = mx.random.split(key)
                    nxt = sample_tokens(scores / temperature, sample_top_k, sub)
                nxt = nxt.astype(mx.int32)
                mx.eval(nxt)
            yield nxt
            tokens = nxt[:, None]

    def generate_recompute(self, passages: mx.array, max_tokens: int, memory: Memory | None = None) -> list[list[int]]:
        """Greedy decoding that re-runs the decoder over the whole prefix for every token (the reference the
        cached path is tested and benchmarked against; spread over the cores as `generate` is, and the output
        head applied to the last position only, as a cache-less decoder needs). `memory` as in `generate`."""
        memory = self.encode_spread(passages) if memory is None else memory

        def last_probs(tokens, memory):
            return self.decode(tokens, memory, log=False, last=True)[:, -1, :]

        tokens = mx.full((memory.states.shape[0], 1), BOS_ID, dtype=mx.int32)
        spread = cores.spread if len(tokens) > 1 else nullcontext  # one row: keep the BLAS threads, as `generate`
        for _ in range(max_tokens):
            with spread():
                nxt = mx.argmax(cores.map_rows(last_probs, tokens, memory), axis=-1).astype(mx.int32)
                tokens = mx.concatenate([tokens, nxt[:, None]], axis=1)
                mx.eval(tokens)
        return np.array(tokens[:, 1:]).tolist()


def sample_tokens(logits: mx.array, top_k: int = 0, key: mx.array | None = None) -> mx.array:
    """One token per row [B] drawn from `logits` [B, V], among each row's `top_k` likeliest when 0 < top_k < V:
    exactly k of them, chosen by rank (a cut by value would keep every token tied with the k-th)."""
    if not 0 < top_k < logits.shape[-1]:
        return mx.random.categorical(logits, key=key)
    top = mx.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
    choice = mx.random.categorical(mx.take_along_axis(logits, top, axis=-1), key=key)
    return mx.take_along_axis(top, choice[:, None], axis=-1)[:, 0]


def greedy_answers(
    model: Generator, passages: np.ndarray, batch_size: int = 64, max_tokens: int | None = None
) -> list[list[int]]:
    """Greedy answers (token ids, without EOS) for a whole set of passages, batched."""
    out = []
    for i in range(0, len(passages), batch_size):
        out.extend(until_eos(model.generate(mx.array(passages[i : i + batch_size]), max_tokens)))
    return out


def until_eos(steps: Iterator[mx.array]) -> list[list[int]]:
    """Each row's tokens from `generate`'s steps up to its first EOS; stops drawing steps once all rows have one."""
    rows, done = None, None
    for tok in steps:
        t = np.array(tok)
        if rows is None:
            rows, done = [[] for _ in t], np.zeros(len(t), dtype=bool)
        for r in np.nonzero(~done)[0]:
            if t[r] == EOS_ID:
                done[r] = True
            else:
                rows[r].append(int(t[r]))
        if done.all():
            break
    return rows or []


def with_packings(batch: tuple, spreading: bool) -> tuple:
    """A training batch (passages, answer_in, answer_out) with its passages' packing plans appended when they
    shrink the work. Padding is 22% of the built-in corpus's retrieved passages (the question's PAD columns and the
    short last chunk of each document): packed, the main command's training step took 518 instead of 560 ms
    (medians of 60 interleaved steps each, same losses to float rounding)."""
    plans = plan_packing(batch[0] != PAD_ID, spreading)
    return batch if plans is None else (*batch, plans)


def seq2seq_loss(model: Generator, passages, answer_in, answer_out, packings: list | None = None):
    """Teacher-forced negative log-likelihood per answer token of the batch (PAD targets masked out) and token
    accuracy; the questions are spread over the CPU's cores (see cores.py), the sums over tokens taken at the end.
    `packings`: one per row slice, from `with_packings`."""
    sums = cores.map_rows(partial(_token_sums, model), passages, answer_in, answer_out, cores.PerPart(packings))
    nll, correct, ntok = (x.sum() for x in sums)
    # Under mlx.launch each rank holds a share of the batch's answer tokens, shares of different sizes: divide by
    # the whole batch's count, times the number of ranks the gradient averaging divides by, so that every token
    # weighs what it does in one process with the whole batch (a mean per rank would not).
    denominator = mx.maximum(dist.all_sum_in_graph(ntok), 1) / dist.size()
    return nll / denominator, (correct / denominator, ntok)


def _token_sums(model: Generator, passages, answer_in, answer_out, packing=None) -> tuple[mx.array, ...]:
    return _answer_sums(model, model.encode(passages, packing), answer_in, answer_out)


def _answer_sums(model: Generator, memory: Memory, answer_in, answer_out) -> tuple[mx.array, mx.array, mx.array]:
    """[1]-shaped sums over the batch's answer tokens: NLL, correct argmax predictions, tokens. With the copy
    head the log is taken of the target tokens' probabilities only, not of the whole [B, T, V] mixture."""
    out = model.decode(answer_in, memory, log=not model.args.copy)
    picked = mx.take_along_axis(out, answer_out[..., None], axis=-1).squeeze(-1)
    nll = -mx.log(picked + 1e-9) if model.args.copy else -picked
    mask = answer_out != PAD_ID
    correct = (mx.argmax(out, axis=-1) == answer_out) & mask
    return (nll * mask).sum()[None], correct.sum()[None], mask.sum()[None]


def build_passages(data: Dataset, questions: np.ndarray, chunk_ids: np.ndarray) -> np.ndarray:
    """[N, K, Lq + 1 + C] passages from question token rows [N, Lq] and chunk ids [N, K]: the question's tokens,
    EOS as a separator, then one chunk's tokens. The question part keeps its stored width (PAD-filled), so
    every batch has one shape."""
    q = np.asarray(questions)
    c = np.asarray(data.chunks[chunk_ids.reshape(-1)]).reshape(*chunk_ids.shape, -1)  # [N, K, C]
    N, K = chunk_ids.shape
    sep = np.full((N, K, 1), EOS_ID, dtype=np.int32)
    return np.concatenate([np.broadcast_to(q[:, None, :], (N, K, q.shape[1])), sep, c], axis=2)


def teacher_forcing(answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoder input (BOS + answer) and target (answer + EOS, PAD after) from stored answer rows."""
    bos = np.full((answers.shape[0], 1), BOS_ID, dtype=np.int32)
    pad = np.full((answers.shape[0], 1), PAD_ID, dtype=np.int32)
    answer_out = np.concatenate([answers, pad], axis=1)
    answer_in = np.concatenate([bos, answers], axis=1)
    answer_in[answer_in == EOS_ID] = PAD_ID
    return answer_in, answer_out


def trim_answers(answer_in: np.ndarray, answer_out: np.ndarray, multiple: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Drop the answer columns that are PAD in every row, keeping a multiple of `multiple` (or all): answers are
    short (3.7 tokens on average in the built-in corpus, stored 12 wide), and the decoder's cost grows with the
    width. The loss is unchanged (PAD targets are masked, and causal attention never looks ahead), and the compiled
    training step sees few distinct shapes (8, 12 and 13 in the built-in corpus)."""
    used = np.flatnonzero((answer_out != PAD_ID).any(axis=0))
    width = min(answer_out.shape[1], -(-(int(used[-1]) + 1 if used.size else 1) // multiple) * multiple)
    return answer_in[:, :width], answer_out[:, :width]


class FiDBatches:
    """Deterministic training batches of (passages, answer_in, answer_out) from precomputed retrieval."""

    def __init__(self, data: Dataset, question_ids: np.ndarray, retrieved: np.ndarray, batch_size: int, seed: int):
        if len(question_ids) < batch_size:
            raise UsageError(f"--batch_size {batch_size} is larger than the {len(question_ids)} training questions")
        self.data, self.ids, self.retrieved, self.B, self.seed = data, question_ids, retrieved, batch_size, seed
        self.per_epoch = len(question_ids) // batch_size

    def __call__(self, step: int):
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.ids))
        rows = order[k * self.B : (k + 1) * self.B]
        qids = self.ids[rows]
        answer_in, answer_out = trim_answers(*teacher_forcing(np.asarray(self.data.answers[qids])))
        return build_passages(self.data, self.data.questions[qids], self.retrieved[rows]), answer_in, answer_out


def evaluate_answers(
    model: Generator,
    data: Dataset,
    question_ids: np.ndarray,
    chunk_ids: np.ndarray,
    batch_size: int = 64,
    loss: bool = True,
) -> tuple[dict, list[str]]:
    """EM / token F1 of greedy answers (official normalisation, max over aliases) of `question_ids` reading
    `chunk_ids` [N, K] and, with `loss`, the validation loss (teacher-forced NLL per answer token); returns the
    metrics and the predicted answers. Each batch's passages are encoded once, for both (the encoder is most of
    the cost)."""
    from metrics import aggregate_qa

    nll, ntok, predictions = 0.0, 0, []
    for i in range(0, len(question_ids), batch_size):
        q = question_ids[i : i + batch_size]
        passages = mx.array(build_passages(data, data.questions[q], chunk_ids[i : i + batch_size]))
        memory = model.encode_spread(passages)
        if loss:
            answer_in, answer_out = (
                mx.array(a) for a in trim_answers(*teacher_forcing(np.asarray(data.answers[q])), 1)
            )
            with cores.spread():
                batch_nll, _, batch_ntok = cores.map_rows(partial(_answer_sums, model), memory, answer_in, answer_out)
                nll, ntok = nll + batch_nll.sum().item(), ntok + int(batch_ntok.sum().item())  # accuracy: unused
        predictions += [data.decode(t) for t in until_eos(model.generate(passages, memory=memory))]
    scores = aggregate_qa(predictions, [data.qa[int(i)]["answers"] for i in question_ids])
    metrics = {"valid_loss": nll / max(ntok, 1)} if loss else {}
    return {**metrics, "em": scores["em"], "f1": scores["f1"]}, predictions


def train(
    data: Dataset,
    directory,
    retrieved: np.ndarray,
    train_overrides: dict,
    model_overrides: dict,
    retriever_id: str | None,
    identifier: str | None = None,
    new_model: bool = False,
    train_defaults: dict | None = None,
    eval_questions: int = 500,
    visualisation: bool = False,
    compile: bool = True,
    log=print,
) -> tuple[Generator, str | None]:
    """Train (or resume) the generator on training questions with their retrieved chunks `retrieved` [Q, K]
    (row i belongs to question i). Evaluates validation loss, EM and F1 every --steps_per_eval.
    `train_defaults` fills the training flags `train_overrides` leaves None on a fresh start (a resume takes
    them from its checkpoint)."""
    import training as T

    model, found = T.load_or_init(
        directory,
        "generator",
        Generator,
        ModelArgs,
        {"vocab_size": data.vocab_size, "max_answer_tokens": int(data.answers.shape[1])},
        model_overrides,
        data.tokenizer_sha1,
        identifier,
        new_model,
        log,
    )
    cfg = T.TrainConfig.merged(found.metadata.get("train") if found else None, train_overrides, train_defaults)
    if note := T.seed_change(found, cfg):
        log(note)
    train_ids = data.split_indices("train")
    valid_ids = data.split_indices("valid")[:eval_questions]
    if len(train_ids) == 0:
        raise T.UsageError("no training questions: the generator needs QA pairs")
    batches = FiDBatches(data, train_ids, retrieved[train_ids], cfg.batch_size, cfg.seed)
    optimizer = T.make_optimizer(cfg)
    T.restore_optimizer(optimizer, model, found.optimizer_state if found else {})
    start = int(found.metadata.get("step", 0)) if found else 0
    state = {"id": found.id if found else None, "best": found.metadata.get("best") if found else None}
    history = list(found.metadata.get("history", [])) if found else []  # training curves, saved with each checkpoint
    log(
        f"generator: {T.count_parameters(model):,} parameters, {len(train_ids):,} training questions, "
        f"{retrieved.shape[1]} chunks each"
    )

    def evaluate(step: int) -> dict:
        if len(valid_ids) == 0:
            return {}
        metrics, predictions = evaluate_answers(model, data, valid_ids, retrieved[valid_ids])
        log(f"eval  {step:>6}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if visualisation:
            i = int(valid_ids[0])
            log(f"  Q: {data.qa[i]['question']}  (gold: {data.qa[i]['answers'][0]})")
            for c in retrieved[i][:3]:
                log(f"    [{data.chunk_title(int(c))}] {data.chunk_text(int(c))[:100]}")
            log(f"  A: {predictions[0]}")
        return metrics

    def save(step: int, metrics: dict) -> None:
        if "em" in metrics and (state["best"] is None or metrics["em"] > state["best"]["em"]):
            state["best"] = {"em": metrics["em"], "step": step}
        extra = {
            "tokenizer_sha1": data.tokenizer_sha1,
            "best": state["best"],
            "retriever": retriever_id,
            "top_k": int(retrieved.shape[1]),
            "history": history,
        }
        state["id"] = T.save_state(directory, "generator", model, optimizer, step, cfg, metrics, extra, state["id"])
        log(f"saved generator {state['id'][:12]} at step {step}")

    prepare = partial(with_packings, spreading=cores.spreads())  # decided here: `prepare` runs on another thread
    hint = T.resume_hint(new_model, identifier, "--identifier")
    T.fit(
        model, optimizer, cfg, seq2seq_loss, batches, start, evaluate, save, "tok_acc", log, compile,
        prepare=prepare, resume_hint=hint, history=history,
    )  # fmt: skip
    return model, dist.broadcast_text(state["id"])  # only rank 0 saved; every rank needs the id
