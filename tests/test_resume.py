"""Resume equals uninterrupted (issue 6): real kills (SIGKILL at random points, SIGINT) of
`python -m reslab train`, then the same command; deterministic mode; a resume that no longer fits
its data."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import reslab.checkpoint
import reslab.data.feed
import reslab.step
import reslab.train
from conftest import (
    RELIABILITY_SPEC,
    RELIABILITY_TINY,
    Crashed,
    crash_after_checkpoint,
    make_dataset,
    write_image_folder,
)
from reslab.checkpoint import list_checkpoints
from reslab.cli import main
from reslab.train import RunFolderError, TrainOptions, train

TINY, SPEC = RELIABILITY_TINY, RELIABILITY_SPEC
pytestmark = pytest.mark.usefixtures("quiet_machine")


# ---------------------------------------------------------------------------------------------
# 1 and 3: kill -9 anywhere, SIGINT; the same command again gives the uninterrupted result

N = 50  # iterations of the CLI runs
CLI_ARGS = ["resnet8", "--iterations", str(N), "--batch-size", "16", "--checkpoint-every", "5",
            "--eval-every", "10", "--log-every", "3", "--deterministic", "--no-progress"]

# Runs `reslab ARGS` but SIGKILLs itself inside the n-th evaluation of this process, or halfway
# through writing its n-th checkpoint or its weights (leaving half a temporary file, as a real
# kill would).
KILLER = r"""
import os, signal, sys
import reslab.checkpoint, reslab.data.feed
from reslab.cli import main

kind, n = sys.argv[1], int(sys.argv[2])
del sys.argv[1:3]
calls = [0]
evaluate, atomic_write = reslab.data.feed.evaluate, reslab.checkpoint.atomic_write

def dying_evaluate(*args, **kwargs):
    calls[0] += 1
    result = evaluate(*args, **kwargs)
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

def dying_write(path, data):
    if path.name.startswith("checkpoint-" if kind == "checkpoint" else "model.safetensors"):
        calls[0] += 1
        if calls[0] == n:
            with open(path.with_name(f".{path.name}.tmp-{os.getpid()}"), "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, data)

if kind == "eval":
    reslab.data.feed.evaluate = dying_evaluate
else:
    reslab.checkpoint.atomic_write = dying_write
sys.exit(main())
"""


def _start(args: list[str], env: dict, kill: tuple[str, int] | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", KILLER, kill[0], str(kill[1])] if kill else \
        [sys.executable, "-m", "reslab"]
    return subprocess.Popen([*head, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _complete_lines(path: Path) -> list[str]:
    """metrics.jsonl without a torn last line (a kill mid-write)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _last_step(run: Path) -> int:
    lines = _complete_lines(run / "metrics.jsonl")
    return json.loads(lines[-1])["step"] if lines else 0


def _newest_checkpoint(run: Path) -> int:
    found = list_checkpoints(run)
    return int(found[-1].stem.split("-")[1]) if found else 0


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if _last_step(run) >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"run never reached step {step}")


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The uninterrupted CLI run, started now, awaited by .finish()."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_image_folder(root / "imgs", make_dataset(n_train=64, n_test=200))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               RESLAB_DATA=str(root / "reslab-data"))
    args = [*CLI_ARGS, "--data", str(folder)]
    proc = _start(["train", *args, "--out", str(root / "ref")], env)

    def finish() -> Path:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return root / "ref"

    return SimpleNamespace(root=root, args=args, env=env, finish=finish)


def test_kill_9_at_10_random_points_then_rerun_equals_uninterrupted(cli_reference):
    ref = cli_reference
    run = ref.root / "cut"
    cmd = ["train", *ref.args, "--out", str(run)]
    rng = random.Random(2016)
    kinds = ["step"] * 3 + ["eval"] * 3 + ["checkpoint"] * 3
    rng.shuffle(kinds)
    kinds.append("weights")  # last: the run is over but for its final weights file
    processes = []  # (newest checkpoint when it started, its stdout, metrics when it ended)
    landed = []
    for kind in kinds:
        start = _newest_checkpoint(run)
        low = max(start, _last_step(run)) + 1
        if kind == "step" and low > N - 6:
            kind = "checkpoint"  # too close to the end for a kill from outside
        if start == N:
            kind = "weights"
        if kind == "step":  # from outside: mid-epoch, in evaluation or in a checkpoint write
            at = rng.randint(low, min(low + 8, N - 6))
            proc = _start(cmd, ref.env)
            _wait_for_step(run, at, proc)
            proc.kill()
        else:  # from inside: the n-th evaluation or checkpoint write of this process
            every = {"eval": 10, "checkpoint": 5, "weights": N}[kind]
            left = sum(1 for s in range(start + 1, N + 1) if s % every == 0 or s == N)
            at = rng.randint(1, min(2, left)) if kind != "weights" else 1
            proc = _start(cmd, ref.env, kill=(kind, at))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (kind, err)
        torn = [p.name for p in run.glob(".*.tmp-*")]
        landed.append(f"{kind} {at}: from {start}, logged {_last_step(run)}, "
                      f"newest checkpoint {_newest_checkpoint(run)}, torn {torn}")
        processes.append((start, out, _complete_lines(run / "metrics.jsonl")))
    start = _newest_checkpoint(run)
    final = _start(cmd, ref.env)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    processes.append((start, out, _complete_lines(run / "metrics.jsonl")))

    ref_run = ref.finish()
    ref_metrics = _complete_lines(ref_run / "metrics.jsonl")
    recovered = 0
    for start, out, metrics in processes[1:]:  # each one reran the command after a kill
        resumed = (f"from checkpoint-{start:08d}.pt" in out) if start else "resuming" not in out
        recovered += resumed and metrics == ref_metrics[: len(metrics)]
    weights_equal = (run / "model.safetensors").read_bytes() == \
        (ref_run / "model.safetensors").read_bytes()
    print("kill points:", *landed, sep="\n  ")
    assert (recovered, weights_equal) == (10, True), landed
    assert _complete_lines(run / "metrics.jsonl") == ref_metrics  # byte for byte, 1..N
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000045.pt",
                                                       "checkpoint-00000050.pt"]
    assert not list(run.glob(".*.tmp*"))  # torn temporaries of killed processes are removed


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(cli_reference):
    ref = cli_reference
    run = ref.root / "interrupted"
    cmd = ["train", *ref.args, "--out", str(run)]
    proc = _start(cmd, ref.env)
    _wait_for_step(run, 23, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    said = re.search(r"stopped after iteration (\d+) \((checkpoint-\d+\.pt) saved\)\. "
                     r"Resume with the same command: reslab (.*)", err)
    assert said, err
    step = int(said[1])
    assert step >= 23 and said[2] == f"checkpoint-{step:08d}.pt" and (run / said[2]).exists()
    assert shlex.split(said[3]) == cmd
    assert not (run / "model.safetensors").exists()
    again = _start(cmd, ref.env)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"from checkpoint-{step:08d}.pt" in out
    ref_run = ref.finish()
    assert (run / "model.safetensors").read_bytes() == \
        (ref_run / "model.safetensors").read_bytes()
    assert (run / "metrics.jsonl").read_bytes() == (ref_run / "metrics.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------
# 7: deterministic mode


def test_deterministic_runs_write_identical_metrics(tmp_path, finished, monkeypatch):
    seen = []
    real = reslab.data.feed.evaluate
    monkeypatch.setattr(reslab.data.feed, "evaluate", lambda *a, **k: (
        seen.append(torch.are_deterministic_algorithms_enabled()), real(*a, **k))[1])
    args = ["train", "resnet8", "--data", str(finished.folder), "--iterations", "10",
            "--batch-size", "16", "--eval-every", "5", "--log-every", "1", "--no-progress"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name), "--deterministic"]) == 0
    assert seen == [True] * 4 and not torch.are_deterministic_algorithms_enabled()
    a, b = ((tmp_path / name / "metrics.jsonl").read_bytes() for name in ("a", "b"))
    assert a == b and len(a.splitlines()) == 10
    assert main([*args, "--out", str(tmp_path / "c")]) == 0  # without: wall-clock times
    assert (tmp_path / "c" / "metrics.jsonl").read_bytes() != a and seen[-1] is False


def test_resume_after_the_data_gained_classes_exits_2(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=48, n_test=9))
    run = tmp_path / "run"
    args = ["train", "resnet8", "--data", str(folder), "--out", str(run), "--iterations", "5",
            "--batch-size", "16", "--no-progress"]
    assert main(args) == 0
    (run / "model.safetensors").unlink()  # unfinished again: it resumes from its checkpoint
    (run / "summary.json").unlink()
    before = {name: (run / name).read_bytes() for name in ("checkpoint-00000005.pt",
                                                           "metrics.jsonl", "env.json",
                                                           "recipe.json")}
    write_image_folder(tmp_path / "imgs", make_dataset(n_train=10, n_test=10, classes=5))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint-00000005.pt'} does not fit resnet8" in err
    assert "5 classes" in err and "size mismatch for fc.weight" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# One run per folder at a time (issue 23, item 3)


def test_two_processes_on_one_folder_one_is_refused(tmp_path):
    """Started together on one run folder: one trains, the other exits 2 naming the folder and
    the holder's pid; the run is whole, each step logged once; no lock is left behind."""
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=64, n_test=40))
    env = dict(os.environ, OMP_NUM_THREADS="1", RESLAB_DATA=str(tmp_path / "reslab-data"))
    run = tmp_path / "run"
    args = ["train", "resnet8", "--data", str(folder), "--out", str(run), "--iterations", "400",
            "--batch-size", "16", "--eval-every", "100", "--log-every", "10", "--no-progress"]
    procs = [_start(args, env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    assert f"{run} is in use by another reslab process (pid {winner.pid})" in refused
    assert len(refused.strip().splitlines()) == 1, refused
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == sorted(set(steps)) and steps[-1] == 400
    assert not (run / ".lock").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, finished):
    """A .lock file whose process is gone (SIGKILL leaves the file, the kernel drops the lock)
    is taken over; a lock held right now refuses the start with exit 2."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999\n")  # a dead holder's file
    train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert (run / "model.safetensors").read_bytes() == finished.weights
    assert not (run / ".lock").exists()
    other = tmp_path / "other"
    other.mkdir()
    with open(other / ".lock", "w") as f:  # held by "another process" (another open file)
        f.write("4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(RunFolderError, match=r"in use by another reslab process \(pid "
                           r"4242\)"):
            train(SPEC, other, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert sorted(p.name for p in other.iterdir()) == [".lock"]  # nothing else written


# ---------------------------------------------------------------------------------------------
# What does not change the result does not define the run (issue 23, item 5)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return reslab.checkpoint.load_weights(path)[0]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_how_often_a_run_evaluates_logs_and_saves_may_change_on_resume(tmp_path, finished,
                                                                       monkeypatch):
    crash_after_checkpoint(monkeypatch, 10)
    run, options = tmp_path / "run", TrainOptions(tensorboard=False)
    with pytest.raises(Crashed):
        train(SPEC, run, data=make_dataset(), options=options)
    monkeypatch.undo()
    other = replace(SPEC.recipe, eval_every=4, log_every=3, checkpoint_every=7)
    train(replace(SPEC, recipe=other), run, data=make_dataset(), options=options)
    assert _equal(_tensors(run / "model.safetensors"), _tensors(finished.run / "model.safetensors"))
    changed = json.loads((run / "env.json").read_text())["resumes"][0]["changed"]
    assert changed == ["recipe.checkpoint_every: 5 there, 7 now", "recipe.eval_every: 10 there, "
                       "4 now", "recipe.log_every: 2 there, 3 now"]
    assert json.loads((run / "recipe.json").read_text())["recipe"]["checkpoint_every"] == 7
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000014.pt",
                                                       "checkpoint-00000020.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "test_error" in r] == [10, 12, 16, 20]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 15, 16, 18, 20]


def test_a_finished_run_extends_to_more_iterations_on_the_same_schedule(tmp_path, finished):
    run, direct, options = tmp_path / "run", tmp_path / "direct", TrainOptions(tensorboard=False)
    shutil.copytree(finished.run, run)
    longer = replace(SPEC, recipe=replace(SPEC.recipe, iterations=30))  # lr still ÷10 at 10, 15
    assert SPEC.recipe.milestones == longer.recipe.milestones == (10, 15)
    # With the milestones scaled (20, 30), iterations 10-19 would have trained at another lr.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    scaled = replace(SPEC, recipe=SPEC.recipe.with_iterations(40))
    with pytest.raises(RunFolderError, match=r"keep its milestones \(--iterations 40 "
                       r"--milestones 10 15\)"):
        train(scaled, run, data=make_dataset(), options=options)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    train(longer, run, data=make_dataset(), options=options)
    train(longer, direct, data=make_dataset(), options=options)
    assert _equal(_tensors(run / "model.safetensors"), _tensors(direct / "model.safetensors"))
    assert (run / "model.20.safetensors").read_bytes() == finished.weights  # kept aside
    assert json.loads((run / "summary.json").read_text())["iterations"] == 30
    assert json.loads((run / "summary.20.json").read_text())["iterations"] == 20
    assert json.loads((run / "env.json").read_text())["resumes"][-1]["extended_from"] == 20
    assert train(longer, run, data=make_dataset(), options=options)["iterations"] == 30  # done


def test_a_run_folder_from_before_a_recipe_field_existed_still_resumes(tmp_path, finished):
    """recipe.json written before accumulate, augmentation, lr_policy and plateau_patience (and
    the spec's init_from, init_sha256 and freeze) existed: those fields mean their defaults, so
    the run is the same run."""
    run = tmp_path / "run"
    shutil.copytree(finished.run, run)
    spec = json.loads((run / "recipe.json").read_text())
    for name in ("accumulate", "augmentation", "lr_policy", "plateau_patience"):
        del spec["recipe"][name]
    for name in ("init_from", "init_sha256", "freeze"):  # the spec's own fields, likewise
        del spec[name]
    (run / "recipe.json").write_text(json.dumps(spec))
    done = train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert done["iterations"] == 20  # finished, not refused as a different run


def test_a_resume_between_the_warm_ups_end_and_its_record_still_names_it(tmp_path, monkeypatch):
    # ResNet-110's warm-up (Sec. 4.2) on resnet8; a record every 7 iterations, a checkpoint
    # every one, and a crash right after the checkpoint of the iteration the warm-up ended.
    recipe = replace(SPEC.recipe, warmup_min_depth=8, warmup_window=4, log_every=7,
                     checkpoint_every=1)
    spec, options = replace(SPEC, recipe=recipe), TrainOptions(tensorboard=False,
                                                               deterministic=True)
    train(spec, tmp_path / "ref", data=make_dataset(), options=options)
    ref = (tmp_path / "ref" / "metrics.jsonl").read_text()
    [ended] = [r["warmup_over_at"] for r in map(json.loads, ref.splitlines())
               if "warmup_over_at" in r]
    assert ended % 7  # so the crash falls between the warm-up's end and the record naming it
    crash_after_checkpoint(monkeypatch, ended)
    with pytest.raises(Crashed):
        train(spec, tmp_path / "cut", data=make_dataset(), options=options)
    monkeypatch.undo()
    train(spec, tmp_path / "cut", data=make_dataset(), options=options)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == ref
