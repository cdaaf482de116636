"""Training histories saved with checkpoints, continued on resume, and drawn by plots.py."""

import json

import pytest

import plots
import retriever as R
from helpers import build_builtin, quiet

ARCH = dict(dim=32, num_blocks=1, num_heads=2, embedding_dim=16)


def train_retriever(data, ckdir, num_iters):
    flags = dict(batch_size=6, num_iters=num_iters, steps_per_report=1, steps_per_eval=2, lr_warmup=1, seed=0)
    R.train(data, ckdir, flags, ARCH, eval_questions=4, compile=False, log=quiet)
    return plots.history_of(ckdir, "retriever")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A retriever trained 4 steps, then resumed to 6; the history after each."""
    root = tmp_path_factory.mktemp("plots")
    data = build_builtin(root / "dataset", corpus_size=30, context_size=32)
    ckdir = root / "save" / "checkpoints"
    first = train_retriever(data, ckdir, 4)
    second = train_retriever(data, ckdir, 6)
    return root / "save", first, second


def test_history_records_every_report_and_evaluation_and_continues_on_resume(run):
    _, (_, first), (_, second) = run
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in first if "eval" in r] == [0, 2, 4]
    assert all({"loss", "acc", "lr", "it_per_s", "tok_per_s"} <= set(r) for r in first if "loss" in r)
    assert all("recall@5" in r["eval"] for r in first if "eval" in r)
    # the resumed run starts from the saved history: its first records are the first run's, then steps 5 and 6
    assert second[: len(first)] == first
    assert [r["step"] for r in second[len(first) :]] == [5, 6, 6]


def test_training_curves_are_drawn_from_the_checkpoints(run, tmp_path):
    save_dir, _, _ = run
    path = plots.training_curves(save_dir)  # no generator yet: the retriever's curves alone
    assert path == save_dir / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "r.png"
    assert plots.main(["--save_dir", str(save_dir), "--out", str(out)]) == 0 and out.stat().st_size > 1000


def test_nothing_to_plot_is_one_line(tmp_path, capsys):
    assert plots.main(["--save_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint with a training history" in err
    with pytest.raises(plots.PlotError, match="generator checkpoint 'abcdef': not found"):
        plots.training_curves(tmp_path, generator="abcdef")


def test_an_identifier_names_one_checkpoint(tmp_path):
    """A prefix two checkpoints share is an error, as it is for main.py, not the newer one's curves drawn."""
    import checkpoint as ckpt

    for created, ckpt_id in enumerate(["abc1231" + "0" * 33, "abc1232" + "0" * 33]):
        meta = {"id": ckpt_id, "type": "retriever", "format": ckpt.FORMAT, "created": created,
                "history": [{"step": 1, "loss": 1.0}]}  # fmt: skip
        (tmp_path / f"{ckpt_id}.retriever.json").write_text(json.dumps(meta))
    assert plots.history_of(tmp_path, "retriever", "ABC1231")[0] == "abc1231" + "0" * 33
    with pytest.raises(plots.PlotError, match="retriever checkpoint 'abc123' is ambiguous in .*: abc12310"):
        plots.history_of(tmp_path, "retriever", "abc123")


def test_bench_ratios(tmp_path):
    rows = [
        {"figure": "search", "ours": 3.0, "reference": 1.0, "ratio": 3.0, "unit": "q/s",
         "ours_name": "index.search", "reference_name": "faiss"},
        {"figure": "peak", "ours": 60.0, "reference": 58.0, "ratio": 1.03, "unit": "%",
         "ours_name": "MLX", "reference_name": "torch"},
        {"figure": "main", "ours": 277.0, "reference": None, "ratio": None, "unit": "s",
         "ours_name": "main.py", "reference_name": "-"},
    ]  # fmt: skip
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows}))
    out = plots.bench_ratios(results, tmp_path / "speed.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    results.write_text(json.dumps({"rows": rows[2:]}))
    with pytest.raises(plots.PlotError, match="no figure with an outside reference"):
        plots.bench_ratios(results, tmp_path / "none.png")
    results.write_text("{")
    with pytest.raises(plots.PlotError, match="not a bench/run.py results file"):
        plots.bench_ratios(results, tmp_path / "bad.png")
