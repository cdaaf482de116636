"""End to end through `python main.py`: dataset -> retriever -> generator -> inference, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, file_bytes

import datasets as D  # noqa: E402  (the project's module, not Hugging Face's)

TINY = [
    "--corpus_size",
    "60",
    "--vocab_size",
    "400",
    "--dim",
    "32",
    "--num_blocks",
    "1",
    "--num_heads",
    "2",
    "--batch_size",
    "16",
    "--retriever_iters",
    "20",
    "--num_iters",
    "20",
    "--steps_per_eval",
    "10",
]


def main_py(save_dir: Path, *args: str, flags=TINY, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real command line in a child process (as a user would)."""
    return subprocess.run(
        [sys.executable, "main.py", "--save_dir", str(save_dir), *flags, *args],
        cwd=ROOT,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=300,
    )


def main_py_bytes(save_dir: Path, *args: str, stdin: bytes, env: dict | None = None) -> subprocess.CompletedProcess:
    """`main_py` with raw bytes on stdin (not necessarily UTF-8); the output is decoded as UTF-8."""
    p = subprocess.run(
        [sys.executable, "main.py", "--save_dir", str(save_dir), *TINY, *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        timeout=300,
        env=env,
    )
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def answers(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Answer:")]


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr
    return p.stdout


def checkpoints(save_dir: Path, kind: str) -> list[dict]:
    """Metadata of every checkpoint of `kind`, oldest step first."""
    metas = [json.loads(p.read_text()) for p in (save_dir / "checkpoints").glob(f"*.{kind}.json")]
    return sorted(metas, key=lambda m: m["step"])


def one_line_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    return lines[0]


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.out: dict[str, str] = {}
        self.after_retriever: dict[str, bytes] = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Run:
    """The three training targets, once, in order; tests that change the folder work on a copy."""
    run = Run(tmp_path_factory.mktemp("pipeline") / "run")
    run.out["dataset"] = ok(main_py(run.path, "--target", "dataset"))
    run.out["retriever"] = ok(main_py(run.path, "--target", "retriever"))
    run.after_retriever = file_bytes(run.path / "checkpoints")
    run.out["all"] = ok(main_py(run.path, "--target", "all"))
    return run


def copy_of(run: Run, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run.path, dst)
    return dst


def first_test_question(run: Run) -> dict:
    qa = json.loads((run.path / "dataset" / "qa.json").read_text())
    return next(q for q in qa if q["split"] == "test")


# ------------------------------------------------------------------ training targets


def test_training_targets_write_verifiable_checkpoints(tiny_run):
    ckdir = tiny_run.path / "checkpoints"
    assert (tiny_run.path / "dataset" / "meta.json").is_file()
    for kind in ("retriever", "generator"):
        metas = checkpoints(tiny_run.path, kind)
        assert [m["step"] for m in metas] == [10, 20], kind
        for m in metas:
            weights = ckdir / f"{m['id']}.{kind}.safetensors"
            assert weights.is_file()
            assert hashlib.sha1(weights.read_bytes()).hexdigest() == m["id"], f"{weights.name}: name != sha1sum"
            assert (ckdir / f"{m['id']}.{kind}.optimizer.safetensors").is_file()
        assert metas[1]["parent"] == metas[0]["id"]
    newest = checkpoints(tiny_run.path, "retriever")[-1]["id"]
    assert (ckdir / f"{newest}.embedding.json").is_file(), "the chunk-embedding cache"
    assert (ckdir / f"{newest}.embedding-0-of-1.npy").is_file()
    assert checkpoints(tiny_run.path, "generator")[-1]["retriever"] == newest
    assert "recall@5" in tiny_run.out["retriever"]
    # --target all reused the finished retriever instead of training it again
    assert "retriever: resuming from " + newest[:12] in tiny_run.out["all"]
    assert {k: v for k, v in file_bytes(ckdir).items() if ".retriever." in k} == {
        k: v for k, v in tiny_run.after_retriever.items() if ".retriever." in k
    }
    assert "test set" in tiny_run.out["all"]
    # each run ends with its stages' wall times, and they add up to the total (which the benchmark reads)
    for target, stages in (("dataset", ["dataset"]), ("retriever", ["dataset", "retriever", "test"]),
                           ("all", ["dataset", "retriever", "generator", "test"])):  # fmt: skip
        total, parts = re.fullmatch(r"done in (\d+)s \((.*)\)", tiny_run.out[target].strip().splitlines()[-1]).groups()
        seconds = {name: float(t[:-1]) for name, t in (part.split() for part in parts.split(", "))}
        assert list(seconds) == stages, target
        assert abs(sum(seconds.values()) - int(total)) <= 0.5 + 0.05 * len(stages), target


def test_one_ctrl_c_saves_that_step_and_ends_the_whole_run(tiny_run, tmp_path):
    """Ctrl+C during the retriever's training: its step is saved and the command exits 130, without going on to
    index chunks with, and train the generator on, a half-trained retriever."""
    run = copy_of(tiny_run, tmp_path)
    flags = [*TINY, "--retriever_iters", "100000", "--steps_per_report", "1", "--new_model"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "main.py", "--save_dir", str(run), *flags, "--target", "all"]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in child.stdout:  # the first training report: the loop is running
        lines.append(line)
        if line.startswith("step "):
            child.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + child.stdout.read()
    assert child.wait(timeout=120) == 130, out
    stopped = re.search(r"saved retriever (\w+) at step (\d+)\nstopped at step (\d+); resume by running the same "
                        r"command without --new_model", out)  # fmt: skip
    assert stopped and stopped.group(2) == stopped.group(3), out
    assert "generator" not in out and "index:" not in out and "Traceback" not in out
    saved = [m["step"] for m in checkpoints(run, "retriever") if m["id"].startswith(stopped.group(1))]
    assert saved == [int(stopped.group(2))], "the step it stopped at is a complete checkpoint"


def test_second_retriever_run_resumes(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    last = checkpoints(run, "retriever")[-1]
    out = ok(main_py(run, "--target", "retriever", "--retriever_iters", "30"))
    assert f"resuming from {last['id'][:12]} (step 20)" in out
    assert "trained with --seed" not in out, "the same seed: no warning"
    assert "step     30/30" in out
    assert "eval       0" not in out, "a resumed run does not start over at step 0"
    newest = checkpoints(run, "retriever")[-1]
    assert newest["step"] == 30 and newest["parent"] == last["id"]
    # the generator learned from the step-20 retriever's chunks: answering with the newer one says so
    out = ok(main_py(run, "--target", "all", "--inference", stdin="quit\n"))
    generator_id = checkpoints(run, "generator")[-1]["id"]
    want = f"warning: generator {generator_id[:12]} was trained on retriever {last['id'][:12]}"
    assert want in out and f"--retriever_identifier {last['id'][:12]}" in out
    out = ok(main_py(run, "--target", "all", "--inference", "--retriever_identifier", last["id"], stdin="quit\n"))
    assert "was trained on retriever" not in out


# ------------------------------------------------------------------ inference


def test_inference_answers_questions_from_a_pipe(tiny_run):
    before = file_bytes(tiny_run.path / "checkpoints")
    q = first_test_question(tiny_run)
    out = ok(main_py(tiny_run.path, "--target", "all", "--inference", stdin=f"{q['question']}\n\nquit\nnever read\n"))
    titles = {d["title"] for d in json.loads((tiny_run.path / "dataset" / "documents.json").read_text())}
    assert f"> {q['question']}" in out
    ranked = [line for line in out.splitlines() if line.startswith(("  1. ", "  2. ", "  3. ", "  4. ", "  5. "))]
    assert len(ranked) == 5
    for line in ranked:
        assert line.split("[", 1)[1].split("]", 1)[0] in titles, line
    assert sum(line.startswith("Answer:") for line in out.splitlines()) == 1
    assert "(empty question" in out
    assert "never read" not in out, "input after quit is not read"
    assert file_bytes(tiny_run.path / "checkpoints") == before, "inference trains nothing"


def test_inference_ends_cleanly_at_eof(tiny_run):
    q = first_test_question(tiny_run)
    out = ok(main_py(tiny_run.path, "--target", "all", "--inference", stdin=f"{q['question']}\n"))
    assert "Answer:" in out
    out = ok(main_py(tiny_run.path, "--target", "retriever", "--inference", stdin=f"{q['question']}"))
    assert "  1. " in out and "Answer:" not in out, "retrieval only"


def test_a_closed_stdin_reads_as_no_questions_and_the_checkpoints_load(tiny_run):
    """With descriptor 0 closed, MLX opened each checkpoint as descriptor 0 and took that for a failure: every
    checkpoint was 'corrupt' (and a training run would have started over, pruning the real ones)."""
    newest = checkpoints(tiny_run.path, "retriever")[-1]["id"]
    p = subprocess.run(
        [sys.executable, "main.py", "--save_dir", str(tiny_run.path), *TINY, "--target", "all", "--inference"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    out = ok(p)
    assert f"retriever: using {newest[:12]}" in out and "corrupt" not in out + p.stderr
    assert "Ask a question" in out and not answers(out)


def test_inference_notes_a_line_without_tokens_and_goes_on(tiny_run):
    """A line that is not blank but has no tokens (zero-width space, BOM, DEL) is refused like an empty one."""
    q = first_test_question(tiny_run)["question"]
    out = ok(main_py(tiny_run.path, "--target", "all", "--inference", stdin=f"\u200b\n\ufeff\n\x7f\n{q}\n"))
    assert out.count("(no tokens in that line: type a question, or quit)") == 3
    assert f"> {q}\n" in out and len(answers(out)) == 1


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_inference_reads_bytes_that_are_not_utf8(tiny_run, errors):
    """They are read as U+FFFD, whichever way Python decodes stdin (`surrogateescape` under a C locale)."""
    q = first_test_question(tiny_run)["question"]
    stdin = f"{q} caf".encode() + b"\xe9\n" + f"{q}\n".encode()
    env = dict(os.environ, PYTHONIOENCODING=f"utf-8:{errors}")
    out = ok(main_py_bytes(tiny_run.path, "--target", "all", "--inference", stdin=stdin, env=env))
    assert f"> {q} caf\ufffd\n" in out and f"> {q}\n" in out
    assert len(answers(out)) == 2


def test_inference_answers_a_question_longer_than_the_stored_ones(tiny_run):
    """Questions are stored as wide as the longest one (up to MAX_QUESTION_TOKENS); a longer one is still asked."""
    data = D.Dataset(tiny_run.path / "dataset")
    width = data.questions.shape[1]
    assert width < D.MAX_QUESTION_TOKENS
    long = first_test_question(tiny_run)["question"]
    while len(data.tokenizer.encode(long)) <= width:
        long = "please tell me " + long
    too_long = "where " * D.MAX_QUESTION_TOKENS
    out = ok(main_py(tiny_run.path, "--target", "all", "--inference", stdin=f"{long}\n{too_long}\n"))
    assert f"> {long}\n" in out and len(answers(out)) == 1
    n = len(data.tokenizer.encode(too_long.strip()))
    assert f"(question too long: {n} tokens, at most {D.MAX_QUESTION_TOKENS})" in out


def test_sampled_answers_differ_per_question_and_repeat_per_seed(tiny_run):
    """With --temperature, each question of a session draws a new sample; the same session again repeats them."""
    q = first_test_question(tiny_run)["question"]
    flags = ("--target", "all", "--inference", "--temperature", "3", "--sample_top_k", "100")
    first = answers(ok(main_py(tiny_run.path, *flags, stdin=f"{q}\n" * 3)))
    assert len(first) == 3 and len(set(first)) > 1, first
    assert answers(ok(main_py(tiny_run.path, *flags, stdin=f"{q}\n" * 3))) == first


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--context_size", "0"], "--context_size"),
        (["--batch_size", "0"], "--batch_size"),
        (["--data", "folder", "--from_dir", "does/not/exist"], "does/not/exist"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, flag):
    line = one_line_error(main_py(tmp_path / "run", "--target", "retriever", *flags))
    assert flag in line
    assert not (tmp_path / "run" / "dataset").exists()


def test_conflicting_dim_exits_2_and_leaves_checkpoints_alone(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    before = file_bytes(run / "checkpoints")
    line = one_line_error(main_py(run, "--target", "retriever", "--dim", "64"))
    assert "--dim 64" in line and checkpoints(run, "retriever")[-1]["id"][:12] in line
    assert file_bytes(run / "checkpoints") == before


def test_new_model_with_a_generator_to_resume_exits_2_before_training_anything(tiny_run, tmp_path):
    """The conflict was found only after a fresh retriever had trained, saved and pruned older checkpoints."""
    run = copy_of(tiny_run, tmp_path)
    before = file_bytes(run / "checkpoints")
    generator = checkpoints(run, "generator")[-1]["id"][:12]
    line = one_line_error(main_py(run, "--target", "all", "--new_model", "--identifier", generator, "--lr_warmup", "5"))
    assert file_bytes(run / "checkpoints") == before
    assert "--identifier" in line and "--new_model" in line


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    older, newest = checkpoints(run, "retriever")
    weights = run / "checkpoints" / f"{newest['id']}.retriever.safetensors"
    blob = bytearray(weights.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF
    weights.write_bytes(bytes(blob))
    out = ok(main_py(run, "--target", "retriever", "--inference", stdin="quit\n"))
    warning = [line for line in out.splitlines() if weights.name in line]
    assert warning and "corrupt" in warning[0], out
    assert f"using {older['id'][:12]} (step 10)" in out
    assert (run / "checkpoints" / f"{older['id']}.embedding.json").is_file()


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "1", "--sample_top_k", "-5"], "--sample_top_k"),
        (["--sample_top_k", "3"], "--sample_top_k"),  # it would decode greedily without saying so
        (["--max_answer_tokens", "0"], "--max_answer_tokens"),
    ],
)
def test_bad_decoding_flags_exit_2_with_one_line(tiny_run, flags, flag):
    line = one_line_error(main_py(tiny_run.path, "--target", "all", "--inference", *flags, stdin="quit\n"))
    assert flag in line


def test_keep_zero_is_a_usage_error(tmp_path):
    line = one_line_error(main_py(tmp_path / "run", "--target", "retriever", "--keep", "0"))
    assert "--keep" in line


def test_eval_chunks_zero_is_a_usage_error(tmp_path):
    line = one_line_error(
        main_py(tmp_path / "run", "--target", "retriever", "--corpus_size", "30", "--eval_chunks", "0")
    )
    assert "--eval_chunks" in line


@pytest.mark.parametrize(
    "flags, flag", [(["--split", "train"], "--split"), (["--dim", "x"], "--dim"), (["--no_such_flag"], "no_such_flag")]
)
def test_a_flag_argparse_rejects_is_one_line(tmp_path, flags, flag):
    line = one_line_error(main_py(tmp_path / "run", "--target", "dataset", *flags))
    assert flag in line


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--target", "eval", "--inference"], "--inference"),
        (["--target", "retriever", "--learning_rate", "nan"], "--learning_rate"),
        (["--target", "retriever", "--weight_decay", "-1"], "--weight_decay"),
        (["--target", "retriever", "--retriever_iters", "0"], "--retriever_iters"),
        (["--target", "dataset", "--seed", str(2**64)], "--seed"),
        (["--target", "dataset", "--from_dir", "docs"], "--from_dir is for real data"),  # builtin: it was ignored
        (["--target", "dataset", "--max_questions", "10"], "--max_questions is for real data"),
    ],
)
def test_flags_that_would_be_ignored_or_train_nan_are_usage_errors(tmp_path, flags, flag):
    line = one_line_error(main_py(tmp_path / "run", *flags))
    assert flag in line


def test_a_save_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    line = one_line_error(main_py(tmp_path / "notes.txt", "--target", "dataset"))
    assert "--save_dir" in line and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_bad_identifier_is_refused_before_the_retriever_trains(tiny_run, tmp_path):
    """A mistyped --identifier used to surface only after the retriever stage had trained, saved and pruned."""
    run = copy_of(tiny_run, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    for identifier in ("zz", "abcdef123"):  # malformed; well formed, but no such generator
        p = main_py(run, "--target", "all", "--retriever_iters", "40", "--identifier", identifier)
        assert "generator checkpoint" in one_line_error(p) and "saved retriever" not in p.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    p = main_py(run, "--target", "retriever")
    assert "checkpoints is not a folder" in one_line_error(p)
    assert "step " not in p.stdout, "refused before any training"


@pytest.mark.parametrize("target", ["dataset", "eval"])
def test_a_save_dir_below_a_file_is_refused_before_any_work(tmp_path, target):
    (tmp_path / "afile").write_text("mine")
    p = main_py(tmp_path / "afile" / "run", "--target", target)
    assert f"{tmp_path / 'afile'} is not a folder" in one_line_error(p) and "dataset: " not in p.stdout
    line = one_line_error(main_py(tmp_path / "run", "--target", "dataset", "--to_dir", str(tmp_path / "afile" / "x")))
    assert f"dataset folder {tmp_path / 'afile' / 'x'} (--to_dir" in line and (tmp_path / "afile").read_text() == "mine"


def test_an_up_to_date_dataset_in_a_folder_that_cannot_be_written_is_read(tiny_run, tmp_path, monkeypatch):
    """A shared, read-only prepared dataset with one's own --save_dir: only a build needs to write there."""
    import checkpoint

    data = D.Dataset(tiny_run.path / "dataset")
    monkeypatch.setattr(checkpoint, "unwritable", lambda path: "not writable (as if read-only)")
    spec = D.SourceSpec(corpus_size=60)
    assert D.build_dataset(spec, tiny_run.path / "dataset", 400, 64, log=lambda _m: None) == tiny_run.path / "dataset"
    with pytest.raises(D.DatasetError, match="dataset folder .*not writable"):
        D.build_dataset(spec, tiny_run.path / "dataset", 400, 32, log=lambda _m: None)  # another chunking: a build
    assert D.Dataset(tiny_run.path / "dataset").meta == data.meta


def test_a_file_system_error_is_one_line(monkeypatch, capsys):
    """What the early checks cannot foresee (a disk that fills up) ends as `error: <file>: <reason>`, exit 2."""
    import main
    import pipeline

    def full(args):
        raise OSError(28, "No space left on device", "runs/x/dataset/.tmp-chunks.npy")

    monkeypatch.setattr(pipeline, "run", full)
    assert main.main(["--target", "dataset"]) == 2
    assert capsys.readouterr().err == "error: runs/x/dataset/.tmp-chunks.npy: No space left on device\n"


def test_a_bad_embedding_identifier_is_refused_before_the_retriever_trains(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    p = main_py(run, "--target", "retriever", "--retriever_iters", "30", "--embedding_identifier", "deadbeef")
    assert "--embedding_identifier 'deadbeef': not found" in one_line_error(p) and "saved retriever" not in p.stdout


def test_chunks_of_one_token_build(tmp_path):
    """A chunk whose one piece decodes to nothing ("\u2581") made the word-boundary check crash."""
    ok(main_py(tmp_path / "run", "--target", "dataset", "--corpus_size", "20", "--context_size", "1"))
    assert D.Dataset(tmp_path / "run" / "dataset").chunks.shape[1] == 1


def test_top_k_beyond_the_corpus_feeds_every_chunk_once(tiny_run, monkeypatch):
    """The random-chunk baseline took --top_k itself: 5,000 chunks a question (memory and time blew up), where
    retrieval stops at the corpus."""
    import generator
    import index as chunk_index
    import main
    import pipeline
    import retriever
    from datasets import Dataset

    args = main.build_parser().parse_args(["--save_dir", str(tiny_run.path), *TINY, "--top_k", "5000"])
    data = Dataset(tiny_run.path / "dataset")
    ckdir = pipeline.checkpoint_dir(args)
    retr, rid = pipeline.load_trained(ckdir, "retriever", retriever, data, None, "retriever")
    index = chunk_index.load_or_build(retr, rid, data.chunks, ckdir, log=lambda _m: None)
    fed = []

    def evaluate_answers(gen, data, ids, chunk_ids, **kw):
        fed.append(np.asarray(chunk_ids).shape)
        return {"em": 0.0, "f1": 0.0}, []

    monkeypatch.setattr(generator, "evaluate_answers", evaluate_answers)
    pipeline.summarise(args, data, retr, index, gen=object())
    assert len(fed) == 2 and fed[0] == fed[1] and fed[0][1] == len(data.chunks), "retrieved and random alike"


def test_negative_seed_is_a_usage_error(tmp_path):
    line = one_line_error(main_py(tmp_path / "run", "--target", "dataset", "--seed", "-1"))
    assert "--seed" in line


@pytest.mark.parametrize("size", ["-5", "100000000"])
def test_a_corpus_size_out_of_range_is_a_usage_error(tmp_path, size):
    """Negative, or beyond what the built-in corpus can name (100 M documents ran for minutes, growing, before)."""
    line = one_line_error(main_py(tmp_path / "run", "--target", "dataset", "--corpus_size", size))
    assert "--corpus_size must be between 1 and 200,000" in line


@pytest.mark.parametrize("missing", ["retriever", "generator"])
def test_inference_before_training_is_a_usage_error(tiny_run, tmp_path, missing):
    if missing == "retriever":
        run, target = tmp_path / "run", "retriever"
        ok(main_py(run, "--target", "dataset"))
    else:
        run, target = copy_of(tiny_run, tmp_path), "all"
        for p in (run / "checkpoints").glob("*.generator.*"):
            p.unlink()
    line = one_line_error(main_py(run, "--target", target, "--inference", stdin="quit\n"))
    assert f"no {missing} checkpoint" in line
