"""Checkpoints and weights files (issue 6): atomic writes, retention, the fall-back past a
truncated newest checkpoint, and nothing that runs from a file; each protection with a test that
fails if the protection is removed."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import reslab
import reslab.checkpoint
import reslab.loop
import reslab.step
import reslab.train
from conftest import RELIABILITY_SPEC, RELIABILITY_TINY, make_dataset
from reslab.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    safe_load,
    save_checkpoint,
    save_weights,
)
from reslab.cli import main
from reslab.train import TrainOptions, train

TINY, SPEC = RELIABILITY_TINY, RELIABILITY_SPEC
pytestmark = pytest.mark.usefixtures("quiet_machine")


class Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after it runs."""


def _die_after_checkpoint(monkeypatch, step: int) -> None:
    real = reslab.loop.save_checkpoint

    def save(run_dir, at, state, keep=2):
        path = real(run_dir, at, state, keep=keep)
        if at == step:
            raise Killed(path)
        return path

    monkeypatch.setattr(reslab.loop, "save_checkpoint", save)


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
# Issue 23, item 4: a damaged file is an error naming it, never a silently different model


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit in the middle of the tensor data (after the safetensors header)."""
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    data[(header + len(data)) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_weights_with_a_flipped_bit_are_refused_by_name(tmp_path, finished, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(finished.weights)
    assert reslab.load_trained(path).classes == ("c0", "c1", "c2")  # saved with the weights
    _flip_a_weight_bit(path)
    load_file(str(path))  # safetensors itself reads it happily: only the digest can tell
    with pytest.raises(CheckpointError, match=f"weights {path} are damaged"):
        reslab.load_trained(path)
    assert main(["eval", str(path), "--data", str(finished.folder), "--device", "cpu"]) == 2
    assert f"weights {path} are damaged" in capsys.readouterr().err


def test_a_checkpoint_with_a_flipped_bit_is_skipped_for_the_one_before(tmp_path, finished):
    run = tmp_path / "run"
    run.mkdir()
    states = {}
    for step in (5, 10):
        states[step] = {"model": {"w": torch.full((64,), float(step))}, "step": step}
        save_checkpoint(run, step, states[step])
    newest = run / "checkpoint-00000010.pt"
    data = bytearray(newest.read_bytes())
    at = data.find(torch.full((64,), 10.0).numpy().tobytes())
    data[at + 100] ^= 0x01  # inside the tensor: torch.load does not check its zip CRCs
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["step"] == 10  # loads, silently different
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is damaged"):
        safe_load(newest)
    with pytest.warns(UserWarning, match=f"checkpoint {newest} is unreadable"):
        state, path = load_latest_checkpoint(run)
    assert path.name == "checkpoint-00000005.pt" and torch.equal(state["model"]["w"],
                                                                 states[5]["model"]["w"])
