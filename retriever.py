"""The retriever: a transformer bi-encoder trained contrastively so that questions land near their chunks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from datasets import PAD_ID, Dataset
from training import UsageError
from layers import Encoder, check_dims, init_embedding, padding_mask, plan_packing, to_device
import cores
import distributed as dist


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int = 128
    num_blocks: int = 2
    num_heads: int = 4
    embedding_dim: int = 128
    temperature: float = 0.05
    checkpoint: bool = False

    def __post_init__(self):
        check_dims(self.dim, self.num_heads, self.num_blocks, self.embedding_dim)

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever(nn.Module):
    """One encoder shared by questions and chunks; masked mean pooling; L2-normalised embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        init_embedding(self.embed, args.dim)
        self.encoder = Encoder(args.dim, args.num_blocks, args.num_heads, args.checkpoint)
        self.proj = nn.Linear(args.dim, args.embedding_dim, bias=False)

    def __call__(self, tokens: mx.array, packings: list | None = None) -> mx.array:
        """tokens [N, L] -> L2-normalised embeddings [N, E] (rows spread over the CPU's cores, see cores.py);
        `packings`: the tokens' `layers.plan_packing` arrays (`embed_rows` makes them)."""
        return cores.map_rows(self._embed, tokens, cores.PerPart(packings))

    def embed_rows(self, tokens: np.ndarray) -> mx.array:
        """Embeddings of host token rows [N, L], packed and spread over the cores, evaluated."""
        plans = to_device(plan_packing(tokens != PAD_ID))
        with cores.spread():
            e = self(mx.array(tokens), plans)
            mx.eval(e)
        return e

    def _embed(self, tokens: mx.array, packing=None) -> mx.array:
        valid = tokens != PAD_ID
        h = self.encoder(self.embed(tokens), padding_mask(valid), packing)
        w = valid.astype(h.dtype)[..., None]
        pooled = (h * w).sum(axis=1) / mx.maximum(w.sum(axis=1), 1.0)
        e = self.proj(pooled)
        return e * mx.rsqrt((e * e).sum(axis=-1, keepdims=True) + 1e-12)


def contrastive_loss(
    model: Retriever,
    questions,
    chunks,
    positive_mask,
    target=None,
    question_packings=None,
    chunk_packings=None,
    gather: bool = False,
):
    """Cross-entropy over the [B, C] question x chunk score matrix (temperature-scaled).

    Chunk `target[i]` (default i) is question i's positive; `positive_mask[i, j]` marks other chunks that also
    hold question i's answer (duplicates, in-batch collisions): they are removed from the negatives, not counted
    as errors. With `gather` (data-parallel, see `shard_contrastive`) the chunk embeddings of every rank are
    gathered first, so each question is scored against the whole global batch of chunks. `question_packings`,
    `chunk_packings`: the rows' packing plans (`with_packings`; empty or None: not packed)."""
    q = model(questions, question_packings or None)
    c = model(chunks, chunk_packings or None)
    if gather:
        c = dist.gather_with_grad(c)
    scores = (q @ c.T) / model.args.temperature
    B = q.shape[0]
    target = mx.arange(B) if target is None else target
    eye = mx.arange(scores.shape[1])[None, :] == target[:, None]
    scores = mx.where(positive_mask & ~eye, -1e9, scores)
    loss = nn.losses.cross_entropy(scores, target, reduction="mean")
    acc = (mx.argmax(scores, axis=1) == target).astype(mx.float32).mean()
    ntokens = (questions != PAD_ID).sum() + (chunks != PAD_ID).sum()
    return loss, (acc, ntokens)


def shard_contrastive(batch: tuple, rank: int, size: int, local_negatives: bool = False) -> tuple:
    """`rank`'s share of a global contrastive batch (questions [B], chunks [B positives + M negatives], mask).

    The rank keeps its B/N questions, their positives and M/N of the sampled negatives. By default its mask
    columns are put in the order the chunk embeddings come back from all_gather (rank 0's positives and
    negatives, then rank 1's, ...) and the target is the position of each question's positive there, so the
    loss equals the one-process loss over the same global batch. `local_negatives` keeps only this rank's
    chunks as candidates (cheaper communication, weaker negatives)."""
    questions, chunks, mask = batch
    B, M = len(questions), len(chunks) - len(questions)
    if M % size:
        raise UsageError(f"the {M} sampled negatives are not divisible by the {size} processes")
    b, m = B // size, M // size
    cols = [np.r_[s * b : (s + 1) * b, B + s * m : B + (s + 1) * m] for s in range(size)]
    rows = slice(rank * b, (rank + 1) * b)
    if local_negatives:
        order, target = cols[rank], np.arange(b)
    else:
        order, target = np.concatenate(cols), rank * (b + m) + np.arange(b)
    return questions[rows], chunks[cols[rank]], mask[rows][:, order], target


def with_packings(batch: tuple, spreading: bool) -> tuple:
    """A training batch (questions, chunks, mask[, target]) as (questions, chunks, mask, target, question plans,
    chunk plans), the plans from `layers.plan_packing` (empty where packing would not shrink the work), so that the
    encoder's position-wise layers skip the padding: ~35% of the built-in corpus's question positions and ~12% of
    its chunks'. The step with the benchmark's shapes (dim 256, 4 blocks) took 767 instead of 861 ms (medians of 10
    interleaved steps, same machine); the main command's (dim 128, 2 blocks) 182 against 189 ms over 100."""
    questions, chunks, mask, *target = batch
    target = target[0] if target else np.arange(len(questions), dtype=np.int32)
    plans = (plan_packing(rows != PAD_ID, spreading) or [] for rows in (questions, chunks))
    return questions, chunks, mask, target, *plans


class ContrastiveBatches:
    """Deterministic batches: step s always yields the same questions, positives and sampled negatives."""

    def __init__(self, data: Dataset, question_ids: np.ndarray, batch_size: int, negatives: int, seed: int):
        if len(question_ids) < batch_size:
            raise UsageError(
                f"--batch_size {batch_size} is larger than the {len(question_ids)} answerable training questions"
            )
        self.data, self.ids, self.B, self.negatives, self.seed = data, question_ids, batch_size, negatives, seed
        self.per_epoch = len(question_ids) // batch_size
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.positive_sets = {int(i): set(data.positives(int(i)).tolist()) for i in question_ids}

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.ids))
        return self._order_cache[1]

    def __call__(self, step: int):
        epoch, k = divmod(step, self.per_epoch)
        qids = self._order(epoch)[k * self.B : (k + 1) * self.B]
        rng = np.random.default_rng([self.seed, 1, step])
        pos = [int(rng.choice(self.data.positives(int(q)))) for q in qids]
        neg = rng.integers(0, len(self.data.chunks), size=self.negatives).tolist()
        chunk_ids = pos + neg
        mask = np.array([[c in self.positive_sets[int(q)] for c in chunk_ids] for q in qids], dtype=bool)
        return (
            np.asarray(self.data.questions[qids]),
            np.asarray(self.data.chunks[np.array(chunk_ids)]),
            mask,
        )


def train(
    data: Dataset,
    directory,
    train_overrides: dict,
    model_overrides: dict,
    identifier: str | None = None,
    new_model: bool = False,
    train_defaults: dict | None = None,
    negatives: int | None = None,
    eval_questions: int = 1000,
    visualisation: bool = False,
    compile: bool = True,
    log=print,
    local_negatives: bool = False,
    eval_chunks: int = 200_000,
) -> tuple[Retriever, str | None, mx.array | None]:
    """Train (or resume) the retriever on the dataset's training questions; returns the model, its checkpoint id
    and, when the last evaluation embedded every chunk with the final weights, those embeddings (the index is
    then written from them instead of embedding the corpus again), else None. Evaluates Recall@1/5/20 and MRR on
    validation questions against the whole chunk index, or against `eval_chunks` of them (their labelled chunks and
    a fixed random sample) on a larger corpus.

    `train_defaults` fills the training flags `train_overrides` leaves None on a fresh start (a resume takes
    them from its checkpoint).

    Under `mlx.launch` each rank trains on its share of every global batch; in-batch negatives span the global
    batch unless `local_negatives`; only rank 0 logs and saves."""
    import index as chunk_index
    import training as T

    if not dist.is_main():
        log = _quiet

    model, found = T.load_or_init(
        directory,
        "retriever",
        Retriever,
        ModelArgs,
        {"vocab_size": data.vocab_size},
        model_overrides,
        data.tokenizer_sha1,
        identifier,
        new_model,
        log,
    )
    if model.args.vocab_size != data.vocab_size:
        raise T.UsageError(f"retriever vocab_size {model.args.vocab_size} != tokenizer's {data.vocab_size}")
    cfg = T.TrainConfig.merged(found.metadata.get("train") if found else None, train_overrides, train_defaults)
    if note := T.seed_change(found, cfg):
        log(note)
    train_ids = data.split_indices("train", answerable=True)
    valid_ids = data.split_indices("valid", answerable=True)[:eval_questions]
    if len(train_ids) == 0:
        raise T.UsageError("no training questions with an answer chunk: the retriever needs QA pairs")
    batches = ContrastiveBatches(
        data, train_ids, cfg.batch_size, cfg.batch_size if negatives is None else negatives, cfg.seed
    )
    optimizer = T.make_optimizer(cfg)
    T.restore_optimizer(optimizer, model, found.optimizer_state if found else {})
    start = int(found.metadata.get("step", 0)) if found else 0
    state = {
        "id": found.id if found else None,
        "best": found.metadata.get("best") if found else None,
        "embedded": None,  # (step, embeddings of every chunk) of the last evaluation
    }
    history = list(found.metadata.get("history", [])) if found else []  # training curves, saved with each checkpoint
    log(
        f"retriever: {T.count_parameters(model):,} parameters, {len(train_ids):,} training questions, "
        f"{len(data.chunks):,} chunks"
    )

    sample = chunk_index.eval_chunk_ids(data, valid_ids, eval_chunks)
    if sample is not None:
        log(
            f"retriever: evaluating during training against {len(sample):,} of the {len(data.chunks):,} chunks "
            "(the validation questions' labelled chunks and a fixed random sample; optimistic)"
        )

    def evaluate(step: int) -> dict:
        if len(valid_ids) == 0:
            return {}
        tokens = data.chunks if sample is None else data.chunks[sample]
        index = chunk_index.embed_distributed(model, tokens)  # each rank embeds its share
        state["embedded"] = (step, index) if sample is None else None
        metrics = chunk_index.evaluate(model, data, valid_ids, index, chunk_ids=sample)
        log(f"eval  {step:>6}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if visualisation and sample is None:
            show_retrieval(model, data, int(valid_ids[0]), index, log=log)
        return metrics

    def save(step: int, metrics: dict) -> None:
        score = metrics.get("recall@5")
        if score is not None and (state["best"] is None or score > state["best"]["recall@5"]):
            state["best"] = {"recall@5": score, "step": step}
        state["id"] = T.save_state(
            directory,
            "retriever",
            model,
            optimizer,
            step,
            cfg,
            metrics,
            {"tokenizer_sha1": data.tokenizer_sha1, "best": state["best"], "history": history},
            state["id"],
        )
        log(f"saved retriever {state['id'][:12]} at step {step}")

    if dist.is_main():  # the single writer of the folder
        ckpt_cleanup(directory)
    loss_fn, shard = parallel_loss(local_negatives)
    prepare = partial(with_packings, spreading=cores.spreads())  # decided here: `prepare` runs on another thread
    hint = T.resume_hint(new_model, identifier, "--retriever_identifier")
    T.fit(
        model, optimizer, cfg, loss_fn, batches, start, evaluate, save, "acc", log, compile, shard, prepare, hint,
        history,
    )  # fmt: skip
    embedded = state["embedded"]  # at the last step, the final weights' (every rank evaluates the same steps)
    final = embedded[1] if embedded is not None and embedded[0] == cfg.num_iters else None
    return model, dist.broadcast_text(state["id"]), final  # only rank 0 saved; every rank needs the id


def parallel_loss(local_negatives: bool = False):
    """(loss_fn, shard_batch) for `training.fit`: the plain loss alone; under `mlx.launch` the sharded batch with
    chunk embeddings gathered across ranks (or kept local with `local_negatives`)."""
    if dist.size() == 1:
        return contrastive_loss, None
    return (
        partial(contrastive_loss, gather=not local_negatives),
        partial(shard_contrastive, local_negatives=local_negatives),
    )


def _quiet(_msg: str) -> None:
    """The log of ranks other than 0."""


def ckpt_cleanup(directory) -> None:
    import checkpoint

    if Path(directory).is_dir():
        checkpoint.cleanup_temp_files(directory)


def show_retrieval(model: Retriever, data: Dataset, question: int, index: mx.array, k: int = 3, log=print) -> None:
    """Print one validation question with its top-k chunks (for --visualisation)."""
    import index as chunk_index

    q = model(mx.array(np.asarray(data.questions[question : question + 1])))
    scores, ids = chunk_index.search(q, index, k)
    qa = data.qa[question]
    log(f"  Q: {qa['question']}  (gold: {qa['answers'][0]})")
    gold = set(data.positives(question).tolist())
    for s, c in zip(scores[0], ids[0]):
        mark = "*" if int(c) in gold else " "
        log(f"  {mark} {s:.3f} [{data.chunk_title(int(c))}] {data.chunk_text(int(c))[:100]}")
