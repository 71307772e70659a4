"""Weights by name (issue 40): torch.hub entry points, reslab's released nets (registry, cards,
SHA-256 on every load) and torchvision's weights through torchvision's API, offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import reslab
from reslab import pretrained
from reslab.cli import finetune_fields, main
from reslab.data import normalize
from reslab.data.cifar10_jpeg import CIFAR10_CLASSES, cifar10_jpeg_folder
from reslab.data.folder import decode_image
from reslab.finetune import initialise, load_source, source_layout
from reslab.models import build_model, list_models
from reslab.runfolder import RunSpec

REPO = Path(__file__).resolve().parent.parent
R56 = "resnet56.cifar10jpeg_16k"
TV = "torchvision:ResNet50_Weights.IMAGENET1K_V1"
PER_CLASS = 30  # the fast subset: the first 30 test images of each class, 300 in all


def _copy() -> Path:
    folder = cifar10_jpeg_folder()
    if folder is None:  # reported by -ra, never silent
        pytest.skip("the CIFAR-10 JPEG copy is not extracted (make data: data/cifar10-jpeg)")
    return folder


def _subset(per_class: int = PER_CLASS) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    files = [p for c in CIFAR10_CLASSES for p in sorted((_copy() / "test" / c).iterdir())
             [:per_class]]
    images = torch.from_numpy(np.stack([decode_image(p) for p in files])).permute(0, 3, 1, 2)
    labels = torch.arange(len(CIFAR10_CLASSES)).repeat_interleave(per_class)
    return files, images, labels


# The registry pins the facts of the committed runs -------------------------------------------

@pytest.mark.parametrize("name", list(pretrained.RELEASES))
def test_each_release_is_its_runs_own_figures_and_file(name):
    r = pretrained.RELEASES[name]
    run = (REPO / r.file).parent
    summary = json.loads((run / "summary.json").read_text())
    env = json.loads((run / "env.json").read_text())
    recipe = json.loads((run / "recipe.json").read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if "test_error" in line][-1]
    assert hashlib.sha256((REPO / r.file).read_bytes()).hexdigest() == r.sha256
    assert r.test_error == summary["final_test_error"] == last["test_error"]
    assert r.train_error == summary["final_train_error"]
    assert r.iterations == summary["iterations"] == recipe["recipe"]["iterations"] == last["step"]
    assert r.model == summary["model"] == recipe["model"] and recipe["data"] == "cifar10-jpeg"
    assert r.commit.split()[0] == env["commit"] and env["cpu"] in r.hardware
    assert r.wall_time_s == round(summary["wall_time_s"])
    assert f"{100 * r.test_error:.2f}%" in pretrained.card(name) and "JPEG" in r.limits
    measured = json.loads((REPO / "results/cifar10-jpeg/releases/fp32-eval.json").read_text())
    assert r.test_error_fp32 == measured["releases"][name]["test_error"]
    assert f"{100 * r.test_error_fp32:.2f}%" in pretrained.card(name)


def test_info_pretrained_lists_every_release_and_prints_a_card(capsys):
    assert main(["info", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in pretrained.RELEASES)
    assert main(["info", "--pretrained", R56, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == 0.1698
    assert main(["info", "--pretrained", "resnet56.imagenet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and R56 in err


# torch.hub ------------------------------------------------------------------------------------

def test_hub_has_an_entry_for_every_network_of_the_paper():
    for name in list_models():  # torch.hub.load checks that the entry is a callable
        model = torch.hub.load(str(REPO), name, source="local", num_classes=7) if name in (
            "resnet20", "resnet50") else None
        assert model is None or model.fc.out_features == 7
    hub = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    assert sorted(n for n in dir(hub) if callable(getattr(hub, n)) and n[0] != "_" and n not in
                  ("Callable", "annotations", "hub_model", "nn")) == sorted(list_models())
    model = torch.hub.load(str(REPO), "resnet110", source="local", shortcut="B", in_channels=1)
    assert model.conv1.in_channels == 1 and model.layer2[0].downsample is not None


def test_hub_resnet56_pretrained_is_the_release_on_a_subset_of_the_test_set():
    """The fast subset; test_hub_resnet56_pretrained_error_equals_its_card runs all 10,000."""
    model = torch.hub.load(str(REPO), "resnet56", source="local", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert cfg["name"] == R56 and cfg["classes"] == CIFAR10_CLASSES and cfg["std"] is None
    _, images, labels = _subset()
    with torch.no_grad():
        logits = model(normalize(images, cfg["mean"], cfg["std"]))
        run = reslab.load_trained(REPO / pretrained.RELEASES[R56].file).model.float()
        reference = run(normalize(images, cfg["mean"]).contiguous(
            memory_format=torch.channels_last))
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    error = (logits.argmax(1) != labels).float().mean().item()
    # 16.94% (float32) on all 10,000 images; 300 of them: within 4 binomial standard
    # deviations (8.7 points), and far from chance (90%).
    e = pretrained.RELEASES[R56].test_error_fp32
    assert abs(error - e) < 4 * (e * (1 - e) / len(labels)) ** 0.5, error


def test_reslab_eval_of_a_released_name_matches_on_the_subset(tmp_path, capsys):
    files, images, labels = _subset(10)
    for split in ("train", "test"):
        for f in files:
            (tmp_path / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / split / f.parent.name / f.name)
    assert main(["eval", R56, "--data", str(tmp_path), "--precision", "fp32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    trained = reslab.load_pretrained(R56)
    with torch.no_grad():
        logits = trained.model(normalize(images, trained.mean).contiguous(
            memory_format=torch.channels_last))
    assert report["images"] == len(files)
    assert report["test_error"] == pytest.approx((logits.argmax(1) != labels).float().mean())
    assert main(["predict", R56, str(tmp_path / "test"), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["top1_error"] == pytest.approx(report["test_error"])


@pytest.mark.slow
def test_hub_resnet56_pretrained_error_equals_its_card():
    from reslab.data import open_data
    from reslab.evaluate import evaluate

    _copy()
    model = torch.hub.load(str(REPO), "resnet56", source="local", pretrained=True).eval()
    data = open_data("cifar10-jpeg")
    error, _ = evaluate(model, data.test_images, data.test_labels, model.pretrained_cfg["mean"],
                        None, precision="fp32", memory_format=torch.channels_last)
    # The card's float32 figure, exactly: bf16's differs between CPUs by an image or two (16.99%
    # on an AVX2 EPYC against the training Xeon's 16.98%), float32's does not.
    assert error == pretrained.RELEASES[R56].test_error_fp32


# What a user without reslab runs: torch.hub fetches GitHub's zip of the commit (`git archive`,
# one top folder OWNER-REPO-SHORTSHA), unpacks it in its cache and imports the hubconf there.
_FROM_GITHUB = """
import shutil, sys, torch
from safetensors.torch import load_file
zipball = sys.argv[1]
def download(url, dst, hash_prefix=None, progress=True):  # GitHub's reply, without the network
    assert url == "https://github.com/reslab/reslab/zipball/main", url
    shutil.copy(zipball, dst)
torch.hub.download_url_to_file = download
torch.hub.set_dir(sys.argv[2])
model = torch.hub.load("reslab/reslab:main", "resnet56", pretrained=True, source="github",
                       trust_repo=True, skip_validation=True)
import reslab
assert reslab.__file__.startswith(sys.argv[2]), reslab.__file__  # the archive's code
weights = load_file(sys.argv[3])
state = model.state_dict()
assert all(torch.equal(state[k], weights[k]) for k in weights), "not the released weights"
print(model.pretrained_cfg["name"])
"""


@pytest.mark.slow
def test_hub_loads_the_released_weights_from_a_github_archive(tmp_path):
    """The weights are committed, so GitHub's archive of a commit carries them: torch.hub's
    github path (download, unzip, import) gives the release. The archive is this checkout's
    HEAD made as GitHub makes it; only the download is replaced."""
    import subprocess
    import sys

    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    zipball = tmp_path / "main.zip"
    subprocess.run(["git", "archive", "--format=zip", "-0", f"--prefix=reslab-reslab-{head}/",
                    "-o", str(zipball), "HEAD"], cwd=REPO, check=True, timeout=300)
    release = pretrained.RELEASES[R56]
    out = subprocess.run([sys.executable, "-c", _FROM_GITHUB, str(zipball), str(tmp_path / "hub"),
                          str(REPO / release.file)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == R56


def test_hub_pretrained_refuses_other_options_and_nets_without_weights():
    with pytest.raises(ValueError, match="num_classes=100 is another network"):
        pretrained.hub_model("resnet56", True, num_classes=100)
    with pytest.raises(ValueError, match="no released weights for resnet1202"):
        pretrained.hub_model("resnet1202", True)
    with pytest.raises(ValueError, match="is a resnet20, not a resnet56"):
        pretrained.hub_model("resnet56", "resnet20.cifar10jpeg_16k")


# The digest is checked on every load ----------------------------------------------------------

def test_a_changed_weights_file_is_refused_by_every_path(monkeypatch, tmp_path, capsys):
    bad = replace(pretrained.RELEASES[R56], sha256="0" * 64)
    monkeypatch.setitem(pretrained.RELEASES, R56, bad)
    for load in (pretrained.load_pretrained, lambda n: pretrained.hub_model("resnet56", n),
                 pretrained.weights_file):
        with pytest.raises(ValueError, match="not resnet56.cifar10jpeg_16k's 0000"):
            load(R56)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    for argv in (["predict", R56, str(image)], ["eval", R56, "--data", "cifar10-jpeg"],
                 ["train", "resnet56", "--init-from", R56, "--data", "cifar10-jpeg", "--out",
                  str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "SHA-256" in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_a_released_name_starts_from_its_file():
    args = SimpleNamespace(model="resnet20", freeze=None, linear_probe=False, layout=None,
                           init_from="resnet20.cifar10jpeg_64k")
    fields = finetune_fields(args)
    r = pretrained.RELEASES["resnet20.cifar10jpeg_64k"]
    assert fields == {"init_from": str(REPO / r.file), "init_sha256": r.sha256}


# torchvision's weights by name, offline -------------------------------------------------------

@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache; no download can happen."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in the tests")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


@pytest.fixture
def seeded_resnet50(torch_home) -> torch.nn.Module:
    """A seeded torchvision ResNet-50 (BN statistics too) in the cache, under the file name
    ResNet50_Weights.IMAGENET1K_V1 expects."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.2, 0.5)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    assert pretrained.torchvision_cache_path(weights) == path
    return net.eval()


def _photo(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(path)
    transforms = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    return path, transforms(Image.open(path).convert("RGB")).unsqueeze(0)


def test_load_pretrained_torchvision_uses_the_weights_metadata(seeded_resnet50, tmp_path):
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    trained = reslab.load_pretrained(TV)
    t = weights.transforms()
    assert trained.classes == tuple(weights.meta["categories"]) and len(trained.classes) == 1000
    assert trained.mean.tolist() == pytest.approx(t.mean) and \
        trained.std.tolist() == pytest.approx(t.std)
    assert trained.input_size == (224, 224) and trained.spec.layout == "v1.5"
    _, x = _photo(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x), seeded_resnet50(x), rtol=1e-4, atol=1e-4)


def test_init_from_torchvision_name_finds_the_cached_file_and_the_first_forward_equals(
        seeded_resnet50, torch_home, tmp_path, capsys):
    args = SimpleNamespace(model="resnet50", freeze=None, linear_probe=False, layout=None,
                           init_from=TV)
    fields = finetune_fields(args)
    cached = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert fields["init_from"] == str(cached)
    spec, note = source_layout(RunSpec(model="resnet50", data="photos",
                                           init_from=fields["init_from"]))
    assert spec.layout == "v1.5" and note.endswith("layout v1.5")  # the library's rule
    model = build_model("resnet50", layout=spec.layout)
    assert initialise(model, load_source(cached), cached) == []
    _, x = _photo(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), seeded_resnet50(x), rtol=1e-4, atol=1e-4)


def test_predict_with_torchvision_weights_names_their_categories(seeded_resnet50, tmp_path,
                                                                 capsys):
    photo, x = _photo(tmp_path)
    assert main(["predict", TV, str(photo), "--json", "--top-k", "3"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    with torch.no_grad():
        expected = seeded_resnet50(x).softmax(1)[0].topk(3).indices.tolist()
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert [t["index"] for t in top] == expected
    assert [t["class"] for t in top] == [categories[i] for i in expected]


def test_torchvision_weights_absent_offline_say_where_to_put_the_file(torch_home, tmp_path,
                                                                      capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    where = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    for argv in (["predict", TV, str(image)],
                 ["train", "resnet50", "--init-from", TV, "--data", str(tmp_path), "--out",
                  str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert str(where) in err and "https://download.pytorch.org/models/" in err
    assert not (tmp_path / "run").exists() and not where.exists()
    for bad, says in (("torchvision:ViT_B_16_Weights.IMAGENET1K_V1", "ResNets only"),
                      ("torchvision:ResNet50_Weights.NOPE", "not torchvision weights")):
        with pytest.raises(ValueError, match=says):
            reslab.load_pretrained(bad)
