"""Issue 6, crash-safe training and hostile input: each protection with a test that fails if the
protection is removed. Kills are real (SIGKILL, SIGINT) on `python -m reslab train`; full disks
are a mocked write and, where this machine lets root mount one, a real 1 MB tmpfs."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import reslab.checkpoint
import reslab.step
import reslab.train
from conftest import make_dataset, write_image_folder
from reslab.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    safe_load,
    save_checkpoint,
    save_weights,
)
from reslab.cli import main
from reslab.data import DataError, load_dataset
from reslab.recipes import Recipe
from reslab.train import NonFiniteLoss, RunSpec, TrainOptions, train

TINY = replace(Recipe(), batch_size=16, eval_every=10, checkpoint_every=5, log_every=2)
SPEC = RunSpec(model="resnet8", data="synthetic", recipe=TINY.with_iterations(20))


@pytest.fixture(scope="module", autouse=True)
def quiet_machine(tmp_path_factory):
    """ImageFolder caches go to a folder of this module, never to ~/.cache; one thread, as the
    subprocesses (OMP_NUM_THREADS=1), so a loaded machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESLAB_DATA", str(tmp_path_factory.mktemp("reslab-data")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 20-iteration run of SPEC, and its data as an ImageFolder."""
    root = tmp_path_factory.mktemp("finished")
    data = make_dataset()
    train(SPEC, root / "run", data=data, options=TrainOptions(tensorboard=False))
    folder = write_image_folder(root / "imgs", data)
    return SimpleNamespace(run=root / "run", weights=(root / "run/model.safetensors").read_bytes(),
                           folder=folder)


class Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after it runs."""


def _die_after_checkpoint(monkeypatch, step: int) -> None:
    real = reslab.train.save_checkpoint

    def save(run_dir, at, state, keep=2):
        path = real(run_dir, at, state, keep=keep)
        if at == step:
            raise Killed(path)
        return path

    monkeypatch.setattr(reslab.train, "save_checkpoint", save)


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
import reslab.checkpoint, reslab.train
from reslab.cli import main

kind, n = sys.argv[1], int(sys.argv[2])
del sys.argv[1:3]
calls = [0]
evaluate, atomic_write = reslab.train.evaluate, reslab.checkpoint._atomic_write

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
    reslab.train.evaluate = dying_evaluate
else:
    reslab.checkpoint._atomic_write = dying_write
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
# 2: atomic checkpoints, retention, fallback past a truncated newest one


def test_checkpoint_is_written_to_a_temporary_file_fsynced_then_renamed(tmp_path, monkeypatch):
    old = save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}).read_bytes()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("rename", Path(a).parent, Path(b).name)), real_replace(a, b))[1])
    save_checkpoint(tmp_path, 10, {"w": torch.zeros(3)})
    assert events[:2] == ["fsync", ("rename", tmp_path, "checkpoint-00000010.pt")]

    def dies(fd):  # the new bytes are written, not yet renamed into place
        raise Killed

    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 5, {"w": torch.full((3,), 7.0)})
    assert (tmp_path / "checkpoint-00000005.pt").read_bytes() == old  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000005.pt",
                                                          "checkpoint-00000010.pt"]


@pytest.mark.parametrize("keep,kept", [(3, [20, 25, 30]), (2, [25, 30]), (1, [25, 30])])
def test_only_the_last_k_checkpoints_remain(tmp_path, keep, kept):
    for torn in (".checkpoint-00000003.pt.tmp-99999999", ".model.safetensors.tmp-99999999"):
        (tmp_path / torn).write_bytes(b"torn")  # left by killed writers
    for step in range(5, 31, 5):
        save_checkpoint(tmp_path, step, {"step": step}, keep=keep)
    assert [safe_load(p)["step"] for p in list_checkpoints(tmp_path)] == kept  # k >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [".model.safetensors.tmp-99999999"] + [f"checkpoint-{s:08d}.pt" for s in kept]
    save_weights(tmp_path / "model.safetensors", {"w": torch.ones(2)}, {})
    assert not list(tmp_path.glob(".*"))


def test_truncated_newest_checkpoint_resumes_from_the_previous(tmp_path, finished, monkeypatch,
                                                                capsys):
    run = tmp_path / "run"
    _die_after_checkpoint(monkeypatch, 15)
    with pytest.raises(Killed):
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    monkeypatch.undo()
    newest, previous = run / "checkpoint-00000015.pt", run / "checkpoint-00000010.pt"
    assert list_checkpoints(run) == [previous, newest]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning) as warned:
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    message = str(warned[0].message)
    assert f"checkpoint {newest} is unreadable" in message
    assert f"resuming from {previous}" in message
    assert "from checkpoint-00000010.pt (iteration 10/20)" in capsys.readouterr().out
    assert (run / "model.safetensors").read_bytes() == finished.weights


# ---------------------------------------------------------------------------------------------
# 4: nothing runs from a checkpoint or a weights file


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _write_payload(path: Path, marker: Path, form: str) -> None:
    state = {"model": Payload(marker), "step": 20}
    if form == "zip":
        torch.save(state, path)
    elif form == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))


@pytest.mark.parametrize("form", ["zip", "legacy", "raw-pickle"])
def test_a_checkpoint_that_would_run_a_command_is_refused(tmp_path, form, finished, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-00000020.pt"
    _write_payload(path, marker, form)
    with pytest.raises(CheckpointError, match="it never runs code from a checkpoint"):
        safe_load(path)
    assert not marker.exists()
    # Through the CLI: a run folder whose only checkpoint is the payload.
    run = tmp_path / "run"
    run.mkdir()
    recipe = json.loads((finished.run / "recipe.json").read_text())
    (run / "recipe.json").write_text(json.dumps({**recipe, "data": str(finished.folder)}))
    os.replace(path, run / path.name)
    assert main(["train", "resnet8", "--data", str(finished.folder), "--out", str(run),
                 "--iterations", "20", "--batch-size", "16", "--checkpoint-every", "5",
                 "--eval-every", "10", "--log-every", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and path.name in err
    assert not marker.exists()
    # The payload is live: an unrestricted load runs it (so the refusals above mean something).
    if form == "raw-pickle":
        pickle.loads((run / path.name).read_bytes())
    else:
        torch.load(run / path.name, weights_only=False)
    assert marker.exists()


def test_a_payload_checkpoint_newest_falls_back_to_the_good_one(tmp_path, finished):
    run = tmp_path / "run"
    run.mkdir()
    good = run / "checkpoint-00000015.pt"
    good.write_bytes((finished.run / "checkpoint-00000015.pt").read_bytes())
    _write_payload(run / "checkpoint-00000020.pt", tmp_path / "pwned", "zip")
    with pytest.warns(UserWarning, match="checkpoint-00000020.pt is unreadable"):
        state, path = load_latest_checkpoint(run)
    assert path == good and state["step"] == 15
    assert not (tmp_path / "pwned").exists()


def _meta(finished) -> dict:
    with safe_open(str(finished.run / "model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["reslab"])


def _edit(key: str, value):
    def edit(meta):
        *path, last = key.split(".")
        d = meta
        for k in path:
            d = d[k]
        d[last] = value
        return {"reslab": json.dumps(meta)}
    return edit


@pytest.mark.parametrize("craft,says", [
    pytest.param("text", "cannot read weights", id="text"),
    pytest.param("huge-header", "cannot read weights", id="huge-header"),
    pytest.param(lambda meta: {"reslab": "{not json"}, "malformed reslab metadata (not JSON",
                 id="not-json"),
    pytest.param(lambda meta: {"reslab": "[1, 2]"}, "has no reslab metadata", id="a-list"),
    pytest.param(lambda meta: {"other": "x"}, "has no reslab metadata", id="no-reslab-key"),
    pytest.param(_edit("spec", "rm -rf /"), "malformed reslab metadata or weights",
                 id="spec-a-string"),
    pytest.param(_edit("spec.model", "resnet9999"), "'resnet9999'", id="unknown-model"),
    pytest.param(_edit("spec.recipe.evil", 1), "unknown recipe fields ['evil']",
                 id="unknown-recipe-field"),
    pytest.param(_edit("num_classes", 5), "size mismatch for fc.weight", id="classes-vs-tensors"),
    pytest.param(_edit("normalization", "x"), "malformed reslab metadata or weights",
                 id="normalization-a-string"),
    pytest.param(_edit("normalization.mean", [0.5, 0.5]), "normalisation mean of shape (2,)",
                 id="mean-vs-channels"),
])
def test_crafted_weights_give_a_clear_error_in_eval(tmp_path, finished, capsys, craft, says):
    path = tmp_path / "model.safetensors"
    if craft == "text":
        path.write_text("this is not a safetensors file")
    elif craft == "huge-header":
        path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    else:
        save_file(load_file(str(finished.run / "model.safetensors")), str(path),
                  metadata=craft(_meta(finished)))
    assert main(["eval", str(path), "--data", str(finished.folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and says in err, err


# ---------------------------------------------------------------------------------------------
# 5: images of the wrong mode (bombs, truncated and text-as-JPEG files: tests/test_data.py)


def _png16(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            arrays[split, label] = rng.integers(0, 65536, (8, 8))
            _png16(tmp_path / split / label / "0.png", arrays[split, label])
    ds = load_dataset(str(tmp_path))
    assert ds.in_channels == 1
    for i, label in enumerate(("a", "b")):
        expected = torch.from_numpy((arrays["train", label] >> 8).astype(np.uint8))
        assert torch.equal(ds.train_images[i, 0], expected)  # clipping gives 255 almost everywhere


def test_wrong_mode_images_decode_into_the_dataset_mode(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "base").mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / "base" / "0.png")
    odd = root / "train" / "odd"
    odd.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(odd / "a-cmyk.jpg", quality=100)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(odd / "b-palette.png")
    Image.new("RGBA", (8, 8), (40, 50, 60, 0)).save(odd / "c-rgba.png")
    _png16(odd / "d-grey16.png", np.full((8, 8), 0x8A00))
    Image.new("LA", (8, 8), (70, 128)).save(odd / "e-la.png")
    Image.new("1", (8, 8), 1).save(odd / "f-bilevel.png")
    ds = load_dataset(str(root))
    assert ds.in_channels == 3 and ds.train_labels.tolist() == [0, 1, 1, 1, 1, 1, 1]
    pixel = [tuple(ds.train_images[i, :, 4, 4].tolist()) for i in range(1, 7)]
    assert all(abs(a - b) <= 2 for a, b in zip(pixel[0], (255, 0, 255), strict=True)), pixel[0]
    assert pixel[1:] == [(200, 100, 50), (40, 50, 60), (0x8A,) * 3, (70,) * 3, (255,) * 3]


def _impossible_png(path: Path) -> str:
    """A 16-bit palette PNG: a mode no decoder has."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 12, 12, 16, 3, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 12 * 25)) + chunk(b"IEND", b""))
    return str(path)


def test_undecodable_images_name_the_file_or_are_a_counted_skip(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=48, n_test=9))
    bad = [_impossible_png(folder / "train" / "c0" / "mode.png")]
    bad.append(str(folder / "train" / "c1" / "notes.jpg"))
    Path(bad[1]).write_text("not an image")
    args = ["train", "resnet8", "--data", str(folder), "--out", str(tmp_path / "run"),
            "--iterations", "2", "--batch-size", "16", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot decode image {bad[0]}" in err and "skip_bad_images" in err
    assert not (tmp_path / "run" / "recipe.json").exists()
    assert main([*args, "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad images (--skip-bad-images)" in out
    assert all(path in out for path in bad)
    root = tmp_path / "only-bad"  # skipping cannot leave a split empty
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True)
        _impossible_png(root / split / "x" / "0.png")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_dataset(str(root), skip_bad_images=True)


# ---------------------------------------------------------------------------------------------
# 6: numerical faults


def _nan_loss_at(monkeypatch, iterations: set[int]) -> None:
    """The training loss of these iterations (1-based) becomes NaN; evaluation is untouched."""
    real = torch.nn.functional.cross_entropy
    calls = [0]

    def cross_entropy(logits, labels, *args, **kwargs):
        calls[0] += 1
        loss = real(logits, labels, *args, **kwargs)
        return loss * float("nan") if calls[0] in iterations else loss

    monkeypatch.setattr(reslab.step, "F", SimpleNamespace(cross_entropy=cross_entropy))


def _recording_saves(monkeypatch) -> dict[str, bytes]:
    written = {}
    real = reslab.train.save_checkpoint

    def save(run_dir, step, state, keep=2):
        path = real(run_dir, step, state, keep=keep)
        written[path.name] = path.read_bytes()
        return path

    monkeypatch.setattr(reslab.train, "save_checkpoint", save)
    return written


def test_nan_loss_stops_with_the_iteration_and_the_last_checkpoint_untouched(tmp_path,
                                                                              monkeypatch):
    _nan_loss_at(monkeypatch, {13})
    written = _recording_saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at iteration 13; the last good "):
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert list(written) == ["checkpoint-00000005.pt", "checkpoint-00000010.pt"]
    on_disk = {p.name: p.read_bytes() for p in run.glob("checkpoint-*")}
    assert on_disk == written  # byte for byte as written before the NaN
    assert not (run / "model.safetensors").exists() and not list(run.glob(".*tmp*"))


def test_deferred_nan_check_stops_at_the_next_log_line_before_any_checkpoint(tmp_path,
                                                                            monkeypatch):
    """The GPU path (no host sync per step), exercised on the CPU."""
    monkeypatch.setattr(reslab.step, "DEFERRED_NAN_CHECK", ("cpu",))
    _nan_loss_at(monkeypatch, {13})
    written = _recording_saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"between iterations 13 and 14; the last good "):
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert list(written) == ["checkpoint-00000005.pt", "checkpoint-00000010.pt"]
    assert not (run / "model.safetensors").exists()


def test_deferred_nan_check_logs_the_same_metrics_resume_included(tmp_path, monkeypatch):
    """Window sums kept on the device give the per-step path's metrics, also across a resume
    from a checkpoint taken mid-window (iteration 5; lines every 2)."""
    train(SPEC, tmp_path / "a", data=make_dataset(),
          options=TrainOptions(tensorboard=False, deterministic=True))
    monkeypatch.setattr(reslab.step, "DEFERRED_NAN_CHECK", ("cpu",))
    real = reslab.train.save_checkpoint

    def save_then_die(run_dir, step, state, keep=2):
        path = real(run_dir, step, state, keep=keep)
        if step == 5:
            raise KeyboardInterrupt  # as a kill right after the checkpoint
        return path

    monkeypatch.setattr(reslab.train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(SPEC, tmp_path / "b", data=make_dataset(),
              options=TrainOptions(tensorboard=False, deterministic=True))
    monkeypatch.setattr(reslab.train, "save_checkpoint", real)
    train(SPEC, tmp_path / "b", data=make_dataset(),
          options=TrainOptions(tensorboard=False, deterministic=True))
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (
        tmp_path / "b" / "metrics.jsonl").read_bytes()


def test_skip_nonfinite_skips_the_step_and_stops_after_k_in_a_row(tmp_path, monkeypatch,
                                                                   capsys):
    _nan_loss_at(monkeypatch, {13, 14})
    run = tmp_path / "skipped"
    spec = replace(SPEC, recipe=replace(SPEC.recipe, checkpoint_every=1))
    train(spec, run, data=make_dataset(),
          options=TrainOptions(tensorboard=False, skip_nonfinite=2, keep_checkpoints=100))
    out = capsys.readouterr().out
    assert "skipped iteration 13: loss is nan (1 in a row, --skip-nonfinite 2)" in out
    assert "skipped iteration 14: loss is nan (2 in a row" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(2, 21, 2))
    weights = load_file(str(run / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # No update and no BN statistics from a skipped step: the state after 12 is that after 14.
    s12, s14, s15 = (safe_load(run / f"checkpoint-{s:08d}.pt") for s in (12, 14, 15))
    for part in ("model", "optimizer"):
        a, b = _flat(s12[part]), _flat(s14[part])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not torch.equal(s14["model"]["conv1.weight"], s15["model"]["conv1.weight"])

    _nan_loss_at(monkeypatch, {13, 14, 15})
    with pytest.raises(NonFiniteLoss, match=r"iteration 15 \(3 in a row\)"):
        train(spec, tmp_path / "three", data=make_dataset(),
              options=TrainOptions(tensorboard=False, skip_nonfinite=2, keep_checkpoints=100))


def _flat(state, prefix="") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in (state.items() if isinstance(state, dict) else enumerate(state)):
        if isinstance(v, (dict, list)):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_skip_nonfinite_from_the_command_line(tmp_path, finished, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {5, 6, 7})
    args = ["train", "resnet8", "--data", str(finished.folder), "--out", str(tmp_path / "r"),
            "--iterations", "10", "--batch-size", "16", "--no-progress"]
    assert main([*args, "--skip-nonfinite", "2"]) == 1
    assert "loss is nan at iteration 7 (3 in a row)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 7: deterministic mode


def test_deterministic_runs_write_identical_metrics(tmp_path, finished, monkeypatch):
    seen = []
    real = reslab.train.evaluate
    monkeypatch.setattr(reslab.train, "evaluate", lambda *a, **k: (
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


# ---------------------------------------------------------------------------------------------
# 8: resource faults


def _write_fails(monkeypatch, name: str, code: int) -> None:
    """Writing a file whose name contains `name` fails: a full disk after the first 4 kB, or a
    folder where nothing can be created."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:4096])
            raise OSError(code, os.strerror(code), self.f.name)

    def fake_open(file, mode="r", *args, **kwargs):
        if name not in str(file):
            return real_open(file, mode, *args, **kwargs)
        if code == errno.ENOSPC:
            return Full(real_open(file, mode, *args, **kwargs))
        raise OSError(code, os.strerror(code), str(file))

    monkeypatch.setattr(reslab.checkpoint, "open", fake_open, raising=False)


def test_full_disk_while_checkpointing(tmp_path, finished, monkeypatch):
    run = tmp_path / "run"
    _write_fails(monkeypatch, "checkpoint-00000015", errno.ENOSPC)
    with pytest.raises(CheckpointError) as info:
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert f"cannot write {run / 'checkpoint-00000015.pt'}: disk full" in str(info.value)
    assert "rerun the same command" in str(info.value)
    assert not list(run.glob(".*tmp*"))  # the temporary file is removed
    state, path = load_latest_checkpoint(run)
    assert path.name == "checkpoint-00000010.pt" and state["step"] == 10
    monkeypatch.undo()  # space freed: the same call resumes and ends as if nothing happened
    train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert (run / "model.safetensors").read_bytes() == finished.weights


def test_unwritable_folder_while_saving_weights_exits_2(tmp_path, finished, monkeypatch,
                                                        capsys):
    run = tmp_path / "run"
    args = ["train", "resnet8", "--data", str(finished.folder), "--out", str(run),
            "--iterations", "10", "--batch-size", "16", "--checkpoint-every", "5",
            "--no-progress"]
    _write_fails(monkeypatch, "model.safetensors", errno.EACCES)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run / 'model.safetensors'}: not writable" in err
    assert not (run / "model.safetensors").exists() and not list(run.glob(".*tmp*"))
    assert load_latest_checkpoint(run)[0]["step"] == 10
    monkeypatch.undo()
    assert main(args) == 0 and (run / "model.safetensors").exists()


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_real_full_and_read_only_disk(tmp_path, finished):
    """A 1 MB tmpfs holds one resnet8 checkpoint (~0.6 MB) but not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not _mount(["-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(disk)]):
        pytest.skip("needs root and permission to mount a tmpfs (the mocked tests cover this)")
    try:
        run = disk / "run"
        with pytest.raises(CheckpointError, match="checkpoint-00000010.pt: disk full"):
            train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
        assert not list(run.glob(".*tmp*"))
        assert load_latest_checkpoint(run)[0]["step"] == 5
        assert _mount(["-o", "remount,ro", str(disk)])
        with pytest.raises(CheckpointError, match=r"recipe.json: not writable \(read-only"):
            train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
        assert load_latest_checkpoint(run)[0]["step"] == 5
        assert _mount(["-o", "remount,rw,size=8m", str(disk)])
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
        assert (run / "model.safetensors").read_bytes() == finished.weights
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# 9: fail fast on bad configuration (more in tests/test_train.py::test_bad_inputs_exit_2...)


@pytest.mark.parametrize("extra,says", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--iterations", "0"], "iterations must be >= 1 (got 0)"),
    (["--lr", "-0.1"], "lr must be > 0 (got -0.1)"),
    (["--checkpoint-every", "0"], "checkpoint-every must be >= 1 (got 0)"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite: must be >= 0 (got -1)"),
    (["--epochs", "0"], "epochs must be > 0 (got 0.0)"),
])
def test_bad_configuration_exits_2_before_any_work(tmp_path, finished, capsys, extra, says):
    run = tmp_path / "run"
    assert main(["train", "resnet8", "--data", str(finished.folder), "--out", str(run),
                 *extra]) == 2
    assert says in capsys.readouterr().err
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("classes,size,says", [
    (5, 12, "has 5 classes but {run} was trained on 3"),
    (2, 12, "has 2 classes but {run} was trained on 3"),
    (3, 16, "has 16x16 images but {run} was trained on 12x12"),
])
def test_eval_on_data_that_does_not_fit_the_run_exits_2(tmp_path, finished, capsys, classes,
                                                        size, says):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=10, n_test=10,
                                                               classes=classes, size=size))
    assert main(["eval", str(finished.run), "--data", str(folder), "--device", "cpu"]) == 2
    assert says.format(run=finished.run) in capsys.readouterr().err


def test_resume_after_the_data_gained_classes_exits_2(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=48, n_test=9))
    run = tmp_path / "run"
    args = ["train", "resnet8", "--data", str(folder), "--out", str(run), "--iterations", "5",
            "--batch-size", "16", "--no-progress"]
    assert main(args) == 0
    (run / "model.safetensors").unlink()  # unfinished again: it resumes from its checkpoint
    (run / "summary.json").unlink()
    before = {name: (run / name).read_bytes() for name in ("checkpoint-00000005.pt",
                                                           "metrics.jsonl")}
    write_image_folder(tmp_path / "imgs", make_dataset(n_train=10, n_test=10, classes=5))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint-00000005.pt'} does not fit resnet8" in err
    assert "5 classes" in err and "size mismatch for fc.weight" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "model.safetensors").exists()
