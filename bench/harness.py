"""How the benchmark compares: the reference process (bench/torch_worker.py) driven over JSON lines, samples of every
candidate taken in turn, and one result row per figure with its ratio."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def worker_env() -> dict:
    """This process's environment minus the BLAS preload fastpath added, i.e. what the user started us with."""
    env = dict(os.environ)
    ours = env.pop("RAGMLX_PRELOADED", "")
    env.pop("RAGMLX_BLAS_PREFIX", None)
    if env.pop("RAGMLX_REEXEC", None) == "1" and ours:
        rest = env.get("LD_PRELOAD", "").removeprefix(ours).lstrip(":")
        if rest:
            env["LD_PRELOAD"] = rest
        else:
            env.pop("LD_PRELOAD", None)
    return env


class Worker:
    """The PyTorch/faiss side: one long-lived `bench/torch_worker.py` process answering JSON-line commands."""

    def __init__(self, log_path: Path):
        self.log = open(log_path, "w")
        self.log_path = log_path
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "torch_worker.py")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=worker_env())

    def __call__(self, task: str, **spec) -> dict:
        self.proc.stdin.write(json.dumps({"task": task, **spec}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"bench worker died during {task}: {self.log_path.read_text()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench worker {task}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def interleaved(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict]:
    """Take `repeats` samples of every candidate in turn (A, B, C, A, B, C...); median seconds per candidate."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, sample in candidates.items():
            samples[name].append(sample())
    return {name: {"s": statistics.median(s), "best": min(s), "samples": s} for name, s in samples.items()}


def best_ratio(t: dict, ours: str, reference: str) -> float:
    """Speed ratio of the fastest samples: less sensitive than the medians to other processes' load."""
    return t[reference]["best"] / t[ours]["best"]


def row(figure: str, ours: float, reference: float | None, unit: str, ours_name: str, reference_name: str,
        **details) -> dict:
    ratio = ours / reference if reference else None
    return {"figure": figure, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit,
            "ours_name": ours_name, "reference_name": reference_name, **details}
