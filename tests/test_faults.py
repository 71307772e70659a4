"""Faults a run meets (issue 6): undecodable images, NaN losses, full and read-only disks, bad
configuration; each with a test that fails if the protection is removed. Full disks are a mocked
write and, where this machine lets root mount one, a real 1 MB tmpfs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import reslab.checkpoint
import reslab.loop
import reslab.step
import reslab.train
from conftest import (
    RELIABILITY_SPEC,
    RELIABILITY_TINY,
    impossible_png,
    make_dataset,
    write_image_folder,
)
from reslab.checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
    safe_load,
)
from reslab.cli import main
from reslab.train import NonFiniteLoss, TrainOptions, train

TINY, SPEC = RELIABILITY_TINY, RELIABILITY_SPEC
pytestmark = pytest.mark.usefixtures("quiet_machine")


# ---------------------------------------------------------------------------------------------
# 5: images of the wrong mode (bombs, truncated and text-as-JPEG files, 16-bit and odd modes:
# tests/test_data.py)


def test_undecodable_images_name_the_file_or_are_a_counted_skip(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=48, n_test=9))
    bad = [impossible_png(folder / "train" / "c0" / "mode.png")]
    bad.append(str(folder / "train" / "c1" / "notes.jpg"))
    Path(bad[1]).write_text("not an image")
    args = ["train", "resnet8", "--data", str(folder), "--out", str(tmp_path / "run"),
            "--iterations", "2", "--batch-size", "16", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot decode image {bad[0]}" in err and "--skip-bad-images" in err
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind
    (folder / "train" / "c2" / "labels.csv").write_text("not an image")
    assert main([*args, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err  # on stderr: stdout is for results (eval --json)
    assert "skipped 2 bad image(s) (--skip-bad-images)" in err
    assert all(path in err for path in bad)
    assert f"ignored 1 file(s) that are not images: {folder / 'train/c2/labels.csv'}" in err
    # Skipping cannot leave a split empty: tests/test_data.py.


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
    real = reslab.loop.save_checkpoint

    def save(run_dir, step, state, keep=2):
        path = real(run_dir, step, state, keep=keep)
        written[path.name] = path.read_bytes()
        return path

    monkeypatch.setattr(reslab.loop, "save_checkpoint", save)
    return written


def test_nan_loss_stops_with_the_iteration_and_the_last_checkpoint_untouched(tmp_path,
                                                                              monkeypatch):
    _nan_loss_at(monkeypatch, {13})
    written = _recording_saves(monkeypatch)
    run = tmp_path / "run"
    kept = run / "checkpoint-00000010.pt"
    with pytest.raises(NonFiniteLoss, match=rf"loss is nan at iteration 13; the last good "
                       rf"checkpoint, {kept}, is untouched"):
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
    real = reslab.loop.save_checkpoint

    def save_then_die(run_dir, step, state, keep=2):
        path = real(run_dir, step, state, keep=keep)
        if step == 5:
            raise KeyboardInterrupt  # as a kill right after the checkpoint
        return path

    monkeypatch.setattr(reslab.loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(SPEC, tmp_path / "b", data=make_dataset(),
              options=TrainOptions(tensorboard=False, deterministic=True))
    monkeypatch.setattr(reslab.loop, "save_checkpoint", real)
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
    assert main([*args, "--skip-nonfinite", "2"]) == 2  # the user's to fix (--lr), not a bug
    err = capsys.readouterr().err
    assert "loss is nan at iteration 7 (3 in a row)" in err
    assert "no checkpoint was saved yet, so rerunning starts over" in err  # says there is none


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
    assert "checkpoint-00000010.pt is intact" in str(info.value)
    assert "rerun the same command to resume from it" in str(info.value)
    assert not list(run.glob(".*tmp*"))  # the temporary file is removed
    state, path = load_latest_checkpoint(run)
    assert path.name == "checkpoint-00000010.pt" and state["step"] == 10
    monkeypatch.undo()  # space freed: the same call resumes and ends as if nothing happened
    train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert (run / "model.safetensors").read_bytes() == finished.weights


def test_full_disk_at_the_first_checkpoint_claims_no_earlier_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _write_fails(monkeypatch, "checkpoint-00000005", errno.ENOSPC)
    with pytest.raises(CheckpointError) as info:
        train(SPEC, run, data=make_dataset(), options=TrainOptions(tensorboard=False))
    assert "no checkpoint was written yet" in str(info.value) and "intact" not in str(info.value)
    assert "(it starts from the beginning)" in str(info.value)


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


def test_real_full_and_read_only_disk(tmp_path, finished, capsys):
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
        # A new --out on the read-only disk: one line naming it, before any data is read.
        assert main(["train", "resnet8", "--data", str(finished.folder), "--out",
                     str(disk / "new"), "--iterations", "2", "--batch-size", "16"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"reslab train: error: --out {disk / 'new'} cannot be created: {disk} is not "
            "writable; give an --out on a writable disk"]
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
