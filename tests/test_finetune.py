"""Fine-tuning from trained weights (issue 26, item 3): torchvision state dicts on disk, reslab
runs and weights files; a frozen body changes nothing but the classifier, BN statistics
included; a crafted pickle is refused unopened; a resumed fine-tune is checked against the same
start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from reslab import build_model
from reslab.checkpoint import load_weights, save_weights
from reslab.cli import main
from reslab.data import load_dataset
from reslab.finetune import file_digest, initialise, load_source
from reslab.train import RunSpec, _initialise

ROOT = Path(__file__).resolve().parents[1]
MAKE_RUN = ROOT / "results/fashion-mnist/make-run"  # `make run`'s ResNet-20 on Fashion-MNIST


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory):
    """torchvision's ResNet-18 with seeded random weights (nothing downloaded), saved as its
    published files are: a plain state dict."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():  # BN statistics that are not the defaults, so loading them shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "resnet18-seeded.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_a_torchvision_state_dict_starts_a_fine_tune_with_torchvisions_forward(
        torchvision_resnet18):
    tv, path = torchvision_resnet18
    spec = RunSpec(model="resnet18", data="x", init_from=str(path), init_sha256=file_digest(path))
    model = build_model("resnet18", num_classes=1000)
    notes = _initialise(model, spec)
    assert notes == [f"initialised from {path.resolve()}"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), tv(x), atol=1e-5, rtol=0)
        # (in training mode too, BN on the batch; this updates both models' statistics)
        assert torch.allclose(model.train()(x), tv.train()(x), atol=1e-4, rtol=0)
    tv.eval()
    # Another number of classes: the body is torchvision's, the classifier fresh.
    other = build_model("resnet18", num_classes=5)
    fresh = other.fc.weight.clone()
    notes = _initialise(other, spec)
    assert notes[1] == "classifier re-initialised: the source has 1000 classes, this run 5"
    assert torch.equal(other.fc.weight, fresh)
    saved = load_source(path)
    assert torch.equal(other.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])


def test_a_crafted_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "resnet18-evil.pth"
    torch.save({"conv1.weight": Payload()}, evil)
    with pytest.raises(Exception, match="cannot load --init-from weights file .*never runs code"):
        load_source(evil)
    code = main(["train", "resnet18", "--data", str(tmp_path), "--init-from", str(evil),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "cannot load --init-from weights file" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_source_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    state, _ = load_weights(MAKE_RUN / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks layer1\.3\.conv1\.weight \(and \d+ more\)"):
        initialise(build_model("resnet32", in_channels=1), state, MAKE_RUN)
    with pytest.raises(ValueError, match=r"conv1\.weight is \(16, 1, 3, 3\) there, "
                                         r"\(16, 3, 3, 3\) here \(another number of input"):
        initialise(build_model("resnet20"), state, MAKE_RUN)
    assert main(["train", "resnet20", "--data", "x", "--init-from", str(MAKE_RUN / "recipe.json"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "recipe.json: not a weights file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A 3-class subset of Fashion-MNIST as an image folder (PNG, 28x28 grey)."""
    ds = load_dataset("fashion-mnist", download=False)
    root = tmp_path_factory.mktemp("three")
    for split, images, labels, n in (("train", ds.train_images, ds.train_labels, 96),
                                     ("test", ds.test_images, ds.test_labels, 32)):
        for c in (0, 1, 2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in (labels == c).nonzero()[:n, 0].tolist():
                Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    return root


def _fine_tune(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "resnet20", "--data", str(data), "--recipe", "finetune",
                 "--iterations", "12", "--batch-size", "32", "--eval-every", "12",
                 "--out", str(out), *extra])


def test_a_linear_probe_changes_only_the_classifier(three_classes, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "cache"))
    source, _ = load_weights(MAKE_RUN / "model.safetensors")
    assert _fine_tune(three_classes, tmp_path / "probe", "--init-from", str(MAKE_RUN),
                      "--linear-probe") == 0
    out = capsys.readouterr().out
    assert "classifier re-initialised: the source has 10 classes, this run 3" in out
    tuned, meta = load_weights(tmp_path / "probe" / "model.safetensors")
    assert set(tuned) == set(source)
    changed = sorted(k for k in source if k not in ("fc.weight", "fc.bias")
                     and not torch.equal(tuned[k], source[k]))
    assert changed == []  # every tensor of the body, BN running statistics included
    assert tuned["fc.weight"].shape == (3, 64)
    spec = meta["spec"]
    assert spec["freeze"] == ["stem", "conv2_x", "conv3_x", "conv4_x"]
    assert spec["init_from"] == str((MAKE_RUN / "model.safetensors").resolve())
    assert spec["init_sha256"] == file_digest(MAKE_RUN / "model.safetensors")
    summary = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert summary["trainable_params"] == 64 * 3 + 3

    # Freezing the stem and conv2_x: those fixed, conv3_x on trained.
    assert _fine_tune(three_classes, tmp_path / "part", "--init-from", str(MAKE_RUN),
                      "--freeze", "stem,conv2_x") == 0
    tuned, _ = load_weights(tmp_path / "part" / "model.safetensors")
    fixed = [k for k in source if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert fixed and all(torch.equal(tuned[k], source[k]) for k in fixed)
    assert not torch.equal(tuned["layer2.0.conv1.weight"], source["layer2.0.conv1.weight"])
    assert not torch.equal(tuned["layer3.2.bn2.running_mean"],
                           source["layer3.2.bn2.running_mean"])


def test_a_resumed_fine_tune_is_checked_against_the_same_start(three_classes, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "cache"))
    state, meta = load_weights(MAKE_RUN / "model.safetensors")
    src = tmp_path / "source.safetensors"
    save_weights(src, state, meta)
    assert _fine_tune(three_classes, tmp_path / "run", "--init-from", str(src),
                      "--linear-probe") == 0
    state["fc.bias"] = state["fc.bias"] + 1  # the source file changes
    save_weights(src, state, meta)
    capsys.readouterr()
    assert _fine_tune(three_classes, tmp_path / "run", "--init-from", str(src),
                      "--linear-probe", "--iterations", "24") == 2
    assert "holds a different run (init_sha256:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--freeze", "conv9_x"], "cannot freeze 'conv9_x': the parts of this network are stem, "
                              "conv2_x, conv3_x, conv4_x, fc"),
    (["--freeze", "stem,conv2_x,conv3_x,conv4_x,fc"], "--freeze covers every part"),
    (["--freeze", "stem", "--linear-probe"], "give --freeze or --linear-probe, not both"),
    (["--init-from", "/nonexistent/run"], "no such file or run folder"),
])
def test_bad_fine_tuning_options_are_refused_before_any_work(tmp_path, capsys, argv, message):
    code = main(["train", "resnet20", "--data", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "run"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_torchvision_bottleneck_weights_read_as_v1_5(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "resnet50-seeded.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    photos = tmp_path / "photos"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (photos / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((64, 80, 3), 90 * i + 40, np.uint8)).save(
                    photos / split / c / f"{i}.jpg")
    code = main(["train", "resnet50", "--data", str(photos), "--init-from", str(path),
                 "--recipe", "finetune", "--augmentation", "scale", "--iterations", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "run"),
                 "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "read as a torchvision state dict: layout v1.5" in captured.err
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["layout"] == "v1.5"


def test_a_fine_tune_resumes_once_its_source_is_moved_or_copied(three_classes, tmp_path, capsys,
                                                                monkeypatch):
    """Issue 38.3: a run's identity is what it computes: its source by content; and once a
    checkpoint holds every weight, the source may be gone."""
    from conftest import Crashed, crash_after_checkpoint

    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "cache"))
    state, meta = load_weights(MAKE_RUN / "model.safetensors")
    src = tmp_path / "source.safetensors"
    save_weights(src, state, meta)
    assert _fine_tune(three_classes, tmp_path / "whole", "--init-from", str(src),
                      "--checkpoint-every", "6") == 0
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 6)
        with pytest.raises(Crashed):
            _fine_tune(three_classes, tmp_path / "cut", "--init-from", str(src),
                       "--checkpoint-every", "6")
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    os.replace(src, tmp_path / "moved.safetensors")  # the path the run started from is gone
    capsys.readouterr()
    assert _fine_tune(three_classes, tmp_path / "cut", "--init-from", str(src),
                      "--checkpoint-every", "6") == 0
    assert f"{src} is gone; resuming" in capsys.readouterr().err
    whole, _ = load_weights(tmp_path / "whole" / "model.safetensors")
    cut, _ = load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # bit for bit
    # A byte-identical copy at another path is the same run: "finished; nothing to do".
    assert _fine_tune(three_classes, tmp_path / "cut", "--init-from", str(copy),
                      "--checkpoint-every", "6") == 0
    assert "is finished" in capsys.readouterr().out
    # Without a checkpoint, a missing source is still an error.
    assert _fine_tune(three_classes, tmp_path / "new", "--init-from", str(src)) == 2
    assert "no such file or run folder" in capsys.readouterr().err
