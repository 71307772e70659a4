"""Fine-tuning from trained weights (issue 26, item 3): torchvision state dicts on disk, reslab
runs and weights files; a frozen body changes nothing but the classifier, BN statistics
included; a crafted pickle is refused unopened; a resumed fine-tune is checked against the same
start."""

from __future__ import annotations

import json
import os
from dataclasses import replace
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
from reslab.recipes import RECIPES
from reslab.train import RunSpec, TrainOptions, _initialise, train

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
    # Another number of input channels is adapted (test_a_stem_is_adapted_...); another kernel
    # is not.
    with pytest.raises(ValueError, match=r"conv1\.weight is \(16, 1, 5, 5\) there, "
                                         r"\(16, 3, 3, 3\) here \(another stem"):
        initialise(build_model("resnet20"), {**state, "conv1.weight": torch.zeros(16, 1, 5, 5)},
                   MAKE_RUN)
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
    # From Python, the same rule (issue 37: the library owns it, not the CLI).
    spec = RunSpec(model="resnet50", data=str(photos), init_from=str(path), recipe=replace(
        RECIPES["finetune"], augmentation="scale", iterations=1, batch_size=2))
    train(spec, tmp_path / "python", options=TrainOptions(workers=0, tensorboard=False))
    assert "read as a torchvision state dict: layout v1.5" in capsys.readouterr().err
    assert json.loads((tmp_path / "python" / "recipe.json").read_text())["layout"] == "v1.5"


def test_a_fine_tune_resumes_once_its_source_is_moved_or_copied(three_classes, tmp_path, capsys,
                                                                monkeypatch):
    """Issue 38.3: a run's identity is what it computes: its source by content; and once a
    checkpoint holds every weight, the source may be gone. (Issue 38.10: the checkpoint holds
    the source's normalisation too, which this subset's own statistics are not: without it the
    resumed run would end otherwise.)"""
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


def test_a_stem_is_adapted_between_one_and_three_channels_as_timm_does():
    """Issue 38.10: timm's adapt_input_conv. A grey image in every channel of the RGB net (1 ->
    3), or an RGB net's grey input (3 -> 1), gives the source net's outputs."""
    torch.manual_seed(0)
    grey = build_model("resnet20", in_channels=1).eval()
    rgb = build_model("resnet20", in_channels=3).eval()
    assert "stem adapted from 1 to 3 input channel(s): conv1.weight repeated and divided by 3" \
        in initialise(rgb, grey.state_dict(), Path("grey"))[0]
    assert torch.equal(rgb.conv1.weight, grey.conv1.weight.repeat(1, 3, 1, 1) / 3)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), grey(x), atol=1e-5, rtol=0)
    torch.manual_seed(1)
    rgb = build_model("resnet20", in_channels=3).eval()
    assert "from 3 to 1 input channel(s): conv1.weight summed over its input channels" in \
        initialise(grey, rgb.state_dict(), Path("rgb"))[0]
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=0)


def test_a_grey_run_fine_tunes_on_rgb_images_and_back(three_classes, tmp_path, capsys,
                                                       monkeypatch):
    """Issue 38.10, the README's `--init-from runs/r20 --linear-probe` with a 1-channel
    Fashion-MNIST run onto RGB images, and that run onto grey ones: the stem adapted, the
    source's normalisation fitted (its per-pixel mean of another size reduced to per-channel,
    its channel repeated; or averaged), each said once, and recorded for eval."""
    from conftest import make_dataset, write_image_folder

    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "cache"))
    rgb = write_image_folder(tmp_path / "rgb", make_dataset(channels=3))  # 12x12 RGB PNGs
    assert _fine_tune(rgb, tmp_path / "probe", "--init-from", str(MAKE_RUN),
                      "--linear-probe") == 0
    out = capsys.readouterr().out
    assert out.count("stem adapted from 1 to 3 input channel(s): conv1.weight repeated and "
                     "divided by 3, as timm's adapt_input_conv") == 1
    assert ("normalised as the source was trained: its run's per-pixel mean (reduced to "
            "per-channel: 28x28 there, 12x12 here; its 1 channel repeated to 3), not this "
            "data's statistics") in out
    source, meta = load_weights(MAKE_RUN / "model.safetensors")
    tuned, tuned_meta = load_weights(tmp_path / "probe" / "model.safetensors")
    assert torch.equal(tuned["conv1.weight"], source["conv1.weight"].repeat(1, 3, 1, 1) / 3)
    expected = torch.tensor(meta["normalization"]["mean"]).mean((1, 2)).expand(3)
    assert torch.equal(torch.tensor(tuned_meta["normalization"]["mean"]), expected)
    assert tuned_meta["normalization"]["std"] is None
    assert main(["eval", str(tmp_path / "probe"), "--data", str(rgb)]) == 0
    capsys.readouterr()
    assert _fine_tune(three_classes, tmp_path / "back", "--init-from",
                      str(tmp_path / "probe")) == 0
    out = capsys.readouterr().out
    assert "stem adapted from 3 to 1 input channel(s): conv1.weight summed over its input " \
        "channels" in out
    assert "its run's per-channel mean (its 3 channels averaged to 1)" in out
    back = load_weights(tmp_path / "back" / "model.safetensors")[1]["normalization"]
    assert torch.allclose(torch.tensor(back["mean"]), expected[:1])


def test_a_fine_tune_on_photographs_takes_torchvisions_augmentation_and_normalisation(
        torchvision_resnet18, tmp_path, capsys):
    """Issue 38.10, the README's `--recipe finetune --init-from resnet50-0676ba61.pth` on
    photographs, through the Python API: not refused for Sec. 4.2's pad-crop-flip but trained
    with torchvision's RandomResizedCrop and flip, normalised with torchvision's ImageNet mean
    and std (not the photographs'), each said; the weights record both for eval, predict and
    export, recipe.json the run as asked."""
    from dataclasses import replace

    from test_imagenet import photo_tree

    from reslab.finetune import IMAGENET_MEAN, IMAGENET_STD
    from reslab.recipes import RECIPES
    from reslab.train import TrainOptions, train

    _, path = torchvision_resnet18
    photos = photo_tree(tmp_path / "photos", train=2, val=1)
    recipe = replace(RECIPES["finetune"], iterations=1, batch_size=2, eval_every=1)
    train(RunSpec(model="resnet18", data=str(photos), recipe=recipe, init_from=str(path)),
          tmp_path / "run", options=TrainOptions(tensorboard=False, workers=0, progress=False))
    out = capsys.readouterr().out
    assert "augmentation: torchvision's RandomResizedCrop 224 and flip for a fine-tune on " \
        "photographs" in out
    assert "normalised as the source was trained: torchvision's ImageNet mean and std" in out
    _, meta = load_weights(tmp_path / "run" / "model.safetensors")
    assert meta["normalization"]["mean"] == torch.tensor(IMAGENET_MEAN).tolist()
    assert meta["normalization"]["std"] == torch.tensor(IMAGENET_STD).tolist()
    assert meta["spec"]["recipe"]["augmentation"] == "torchvision"
    asked = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert asked["recipe"]["augmentation"] == "pad-crop-flip"  # a resume compares with this
    assert main(["predict", str(tmp_path / "run"), str(photos / "val")]) == 0
    assert "top-1 error" in capsys.readouterr().err


def test_the_source_normalisation_is_fitted_or_left_and_a_resume_keeps_its_start(tmp_path):
    """What fit_to_data decides: the source's normalisation where it fits; the data's per-pixel
    mean, with a note, where its channels cannot be reconciled; on a resume, whatever the
    checkpoint recorded (its start's), whatever the source says now."""
    from dataclasses import replace

    from reslab.data import Dataset, ImageTree
    from reslab.finetune import IMAGENET_MEAN, IMAGENET_STD, fit_to_data, source_normalization
    from reslab.recipes import RECIPES

    MEM, PHOTOS = Dataset.augmentations, ImageTree.augmentations  # the two regimes'

    _, meta = load_weights(MAKE_RUN / "model.safetensors")
    spec = RunSpec(model="resnet20", data="x", recipe=RECIPES["finetune"],
                   init_from=str(MAKE_RUN))
    fitted, norm, notes = fit_to_data(spec, augmentations=MEM, channels=1, size=(28, 28))
    assert torch.equal(norm[0], torch.tensor(meta["normalization"]["mean"])) and norm[1] is None
    assert fitted.recipe.normalization == "source" and len(notes) == 1
    # One channel repeats to any number (as the stem); three do not become two.
    fitted4 = fit_to_data(spec, augmentations=MEM, channels=4, size=(28, 28))
    assert fitted4[1][0].shape == (4, 28, 28)
    pth = tmp_path / "resnet20.pth"
    pth.write_bytes(b"")  # a torchvision file: ImageNet's mean and std, read from no file
    fitted, norm, notes = fit_to_data(replace(spec, init_from=str(pth)), augmentations=MEM,
                                      channels=2, size=(28, 28))
    assert norm is None and fitted.recipe.normalization == "pixel"
    assert notes == ["normalised with this data's per-pixel mean: the source has torchvision's "
                     "ImageNet mean and std, as torchvision's weights files are, which does not "
                     "fit 2-channel images"]
    # torchvision's weights by name: their transforms' (no file read).
    by_name = source_normalization("torchvision:ResNet50_Weights.IMAGENET1K_V2")
    assert by_name[0].tolist() == torch.tensor(IMAGENET_MEAN).tolist()
    assert by_name[1].tolist() == torch.tensor(IMAGENET_STD).tolist()
    recorded = {"mean": torch.zeros(1), "std": torch.ones(1)}
    _, norm, _ = fit_to_data(spec, augmentations=MEM, channels=1, size=(28, 28), recorded=recorded,
                             resuming=True)
    assert norm == (recorded["mean"], recorded["std"])
    fitted, norm, _ = fit_to_data(spec, augmentations=MEM, channels=1, size=(28, 28), resuming=True)
    assert norm is None and fitted.recipe.normalization == "pixel"  # the start's: the data's
    # Not a fine-tune: photographs keep the recipe's augmentation (the feed refuses it).
    fitted, _, _ = fit_to_data(RunSpec(model="resnet20", data="x"), augmentations=PHOTOS,
                               channels=3, size=(224, 224))
    assert fitted.recipe.augmentation == "pad-crop-flip"
