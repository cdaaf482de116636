"""Plots: a run's training curves, from the history its checkpoints carry, and a benchmark's ratios.

    python plots.py --save_dir runs/default                      # -> runs/default/training_curves.png
    python plots.py --bench bench/results.json --out speed.png   # ours / reference for every figure

The curves are read from the newest retriever and generator checkpoints (or the ones `--retriever_identifier` and
`--identifier` name): `training.fit` records every report and evaluation in the checkpoint's metadata, so a
resumed model's curves run from its first step. Nothing is trained or loaded but JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import checkpoint as ckpt

# The validation metrics drawn, per model, on a 0-1 axis; anything else an evaluation reports goes on a second axis.
RATES = {"retriever": ("recall@1", "recall@5", "recall@20", "mrr"), "generator": ("em", "f1")}
AUX = {"retriever": "acc", "generator": "tok_acc"}  # training.fit's report names them so


class PlotError(ValueError):
    """Nothing to plot: the message says which file or folder, on one line."""


def history_of(directory: str | Path, ckpt_type: str, identifier: str | None = None) -> tuple[str, list[dict]]:
    """(checkpoint id, its training history) of the newest `ckpt_type` checkpoint in `directory`, or of the one
    `identifier` names (a full id or a unique prefix, as for main.py)."""
    try:
        meta = ckpt.read_metadata(directory, ckpt_type, identifier)
    except ckpt.CheckpointError as e:
        raise PlotError(str(e)) from None
    if meta is None:
        raise PlotError(f"{directory}: no {ckpt_type} checkpoint; train one with main.py first")
    history = meta.get("history")
    if not isinstance(history, list) or not history:
        raise PlotError(
            f"{directory}: {ckpt_type} checkpoint {meta['id'][:12]} has no training history (saved by an older version)"
        )
    return meta["id"], history


def _series(history: list[dict], key: str, evaluation: bool = False) -> tuple[list[int], list[float]]:
    rows = [(r["step"], (r.get("eval") or {}).get(key) if evaluation else r.get(key)) for r in history]
    rows = [(s, v) for s, v in rows if isinstance(v, (int, float))]
    return [s for s, _ in rows], [float(v) for _, v in rows]


def training_curves(save_dir: str | Path, out: str | Path | None = None, retriever: str | None = None,
                    generator: str | None = None) -> Path:  # fmt: skip
    """Draw the retriever's and the generator's curves (training loss and accuracy; validation metrics) into one
    PNG, `<save_dir>/training_curves.png` unless `out` names another file. A model not trained yet is left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    directory = Path(save_dir) / "checkpoints"
    runs = {}
    for ckpt_type, identifier in (("retriever", retriever), ("generator", generator)):
        try:
            runs[ckpt_type] = history_of(directory, ckpt_type, identifier)
        except PlotError:
            if identifier is not None:
                raise
    if not runs:
        raise PlotError(f"{directory}: no checkpoint with a training history; train with main.py first")

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for row, (ckpt_type, (ckpt_id, history)) in zip(axes, runs.items()):
        left, right = row
        steps, loss = _series(history, "loss")
        left.plot(steps, loss, color="tab:blue", label="training loss")
        left.set(xlabel="step", ylabel="loss", title=f"{ckpt_type} {ckpt_id[:12]}: training")
        twin = left.twinx()
        steps, aux = _series(history, AUX[ckpt_type])
        twin.plot(steps, aux, color="tab:orange", label=AUX[ckpt_type])
        twin.set(ylabel=AUX[ckpt_type], ylim=(0, 1))
        _legend(left, twin)

        keys = sorted({k for r in history for k in (r.get("eval") or {})})
        for key in [k for k in RATES[ckpt_type] if k in keys]:
            right.plot(*_series(history, key, evaluation=True), marker="o", label=key)
        right.set(xlabel="step", ylabel="validation", ylim=(0, 1), title=f"{ckpt_type}: validation")
        others = [k for k in keys if k not in RATES[ckpt_type]]
        twin = right.twinx() if others else None
        for key in others:
            twin.plot(*_series(history, key, evaluation=True), marker="s", linestyle="--", color="tab:gray", label=key)
        if twin is not None:
            twin.set(ylabel=", ".join(others))
        _legend(right, twin)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(save_dir) / "training_curves.png"
    ckpt.atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _legend(ax, twin) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize=8)


def bench_ratios(results: str | Path, out: str | Path) -> Path:
    """A horizontal bar per figure of a `bench/run.py` results file measured against an outside reference
    (PyTorch, faiss, recomputing the prefix; not our own variants against each other): ours / reference, with the
    tie at 1 marked (above 1: ours is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(results)
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlotError(f"{path}: not a bench/run.py results file ({e})") from None
    rows = [
        r for r in rows
        if isinstance(r.get("ratio"), (int, float)) and "%" not in r.get("unit", "")
        and not str(r.get("reference_name", "")).startswith("MLX")
    ]  # fmt: skip
    if not rows:
        raise PlotError(f"{path}: no figure with an outside reference to plot")
    labels = [
        f"{r['figure'].replace(', tok/s', '').replace(' tok/s', '')} vs {r['reference_name'].split(',')[0]}"
        for r in rows
    ]
    ratios = [float(r["ratio"]) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    for yi, x in zip(y, ratios):
        ax.text(x, yi, f" {x:.2f}x", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, max(ratios) * 1.12)
    ax.set(xlabel="ours / reference (> 1: ours is faster)", title=f"{path.name}: each ratio measured in one run")
    fig.tight_layout()
    out = Path(out)
    ckpt.atomic_write_path(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save_dir", default=None, help="a main.py --save_dir: draw its training curves")
    p.add_argument("--retriever_identifier", default=None, help="retriever checkpoint id (or prefix) [newest]")
    p.add_argument("--identifier", default=None, help="generator checkpoint id (or prefix) [newest]")
    p.add_argument("--bench", default=None, help="a bench/run.py results JSON: draw its ratios")
    p.add_argument("--out", default=None, help="the PNG to write [<save_dir>/training_curves.png]")
    args = p.parse_args(argv)
    if (args.save_dir is None) == (args.bench is None):
        p.error("give one of --save_dir and --bench")
    if args.bench is not None and args.out is None:
        p.error("--bench needs --out")
    try:
        if args.bench is not None:
            path = bench_ratios(args.bench, args.out)
        else:
            path = training_curves(args.save_dir, args.out, args.retriever_identifier, args.identifier)
    except (PlotError, ckpt.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
