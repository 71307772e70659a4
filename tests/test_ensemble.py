"""Ensembles (ensemble.py): the members' softmax scores averaged, as the paper's Table 5."""

import json
import math

import pytest
import torch
from test_imagenet import photo_tree
from torch import nn

from conftest import make_dataset, write_image_folder
from reslab.cli import main
from reslab.ensemble import Ensemble, EnsembleError, ensemble
from reslab.evaluate import evaluate, top5_error
from reslab.train import load_trained


class Fixed(nn.Module):
    """A 'net' whose logits are given: the hand computation's members."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.fc = nn.Linear(1, logits.shape[1])
        self.in_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_an_ensembles_error_and_loss_on_fixed_logits_equal_a_hand_computation():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.5], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # By hand: mean of the two softmaxes, row by row.
    p = (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2
    # row 0: p = (e^2/(e^2+2) + 1/(e^3+2)) / 2 for class 0 vs (1/(e^2+2) + e^3/(e^3+2)) / 2 for 1
    e2, e3 = math.e ** 2, math.e ** 3
    assert p[0, 0].item() == pytest.approx((e2 / (e2 + 2) + 1 / (e3 + 2)) / 2)
    assert p[0].argmax() == 1  # b is surer, so the ensemble says 1: wrong
    assert p[1].argmax() == 1 and p[2].argmax() == 2  # a is surer on rows 1 and 2: right
    model = Ensemble([Fixed(a), Fixed(b)], ["fp32", "fp32"]).eval()
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    error, loss = evaluate(model, images, labels, torch.zeros(1), None, precision="fp32")
    wrong = sum(int(p[i].argmax() != labels[i]) for i in range(3))
    assert error == wrong / 3
    assert loss == pytest.approx(-torch.log(p[torch.arange(3), labels]).mean().item(), rel=1e-6)
    assert torch.allclose(torch.softmax(model(images.float()), 1), p, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs (seeds 0 and 1) on one small folder, a 3-class and an RGB folder."""
    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(n_train=64, n_test=24, size=12, classes=3, channels=1)
    folder = write_image_folder(root / "data", data)
    out = []
    for seed in (0, 1):
        run = root / f"r{seed}"
        assert main(["train", "resnet8", "--data", str(folder), "--out", str(run),
                     "--iterations", "4", "--batch-size", "16", "--seed", str(seed),
                     "--precision", "fp32", "--no-progress"]) == 0
        out.append(run)
    other = write_image_folder(root / "rgb", make_dataset(n_train=32, n_test=8, size=12,
                                                          classes=3, channels=3))
    rgb = root / "rgb-run"
    assert main(["train", "resnet8", "--data", str(other), "--out", str(rgb), "--iterations",
                 "2", "--batch-size", "16", "--precision", "fp32", "--no-progress"]) == 0
    return folder, out, rgb


def _eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_ensemble_of_one_run_is_the_run_and_of_two_copies_too(runs, capsys):
    folder, (r0, r1), _ = runs
    alone = _eval(capsys, r0, "--data", folder)
    one = ensemble([load_trained(r0)], [r0])
    error, loss = evaluate(one.model, *_test(folder), one.mean, one.std, precision="fp32",
                           memory_format=torch.channels_last)
    assert (error, loss) == (alone["test_error"], alone["test_loss"])  # bit for bit
    two = _eval(capsys, r0, r0, "--data", folder)
    assert two["test_error"] == alone["test_error"]
    assert two["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-6)
    assert [m["test_error"] for m in two["members"]] == [alone["test_error"]] * 2
    both = _eval(capsys, r0, r1, "--data", folder)
    assert [m["run"] for m in both["members"]] == [str(r0), str(r1)]
    assert both["model"] == ["resnet8", "resnet8"] and both["images"] == 24


def _test(folder):
    from reslab.data import open_data

    data = open_data(str(folder))
    return data.test_images, data.test_labels


def test_mismatched_members_are_refused_with_one_line(runs, tmp_path, capsys):
    folder, (r0, _), rgb = runs
    capsys.readouterr()
    assert main(["eval", str(r0), str(rgb), "--data", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{rgb} takes 3-channel" in err[0]  # the member, by name
    members = [load_trained(r0), load_trained(rgb)]
    with pytest.raises(EnsembleError, match="cannot ensemble .*rgb-run: it has 3-channel"):
        ensemble(members, [r0, rgb])
    renamed = load_trained(r0)._replace(classes=("x", "y", "z"))
    with pytest.raises(EnsembleError, match="other class names"):
        ensemble([load_trained(r0), renamed], [r0, "renamed"])
    with pytest.raises(EnsembleError, match="another input normalisation"):
        shifted = load_trained(r0)
        ensemble([load_trained(r0), shifted._replace(mean=shifted.mean + 1)], [r0, "shifted"])


def test_an_ensemble_of_streamed_runs_takes_every_protocol(tmp_path, capsys):
    tree = photo_tree(tmp_path / "photos", train=6, val=2)
    members = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        assert main(["train", "resnet8", "--data", str(tree), "--out", str(run), "--recipe",
                     "imagenet", "--iterations", "2", "--batch-size", "6", "--workers", "0",
                     "--seed", str(seed), "--precision", "fp32", "--no-progress"]) == 0
        members.append(run)
    for protocol in ("centre", "10-crop"):
        out = _eval(capsys, *members, "--data", tree, "--protocol", protocol, "--workers", "0")
        assert out["protocol"] == protocol and len(out["members"]) == 2
        assert "test_top5_error" in out and all("test_error" in m for m in out["members"])
        copies = _eval(capsys, members[0], members[0], "--data", tree, "--protocol", protocol,
                       "--workers", "0")
        assert copies["test_error"] == copies["members"][0]["test_error"]


def test_predict_with_several_runs_averages_their_softmax_scores(runs, tmp_path, capsys):
    from PIL import Image

    folder, (r0, r1), _ = runs
    image = tmp_path / "x.png"
    Image.fromarray(make_dataset(n_train=8, n_test=4, size=12).test_images[0, 0].numpy()).save(
        image)

    def top(*args):
        capsys.readouterr()
        assert main(["predict", *map(str, args), "--json", "--top-k", "3"]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["model"], {t["class"]: t["probability"] for t in out["predictions"][0]["top"]}

    name0, p0 = top(r0, image)
    _, p1 = top(r1, image)
    names, both = top(r0, r1, image)
    assert names == [str(r0), str(r1)] and name0 == str(r0)
    for cls, p in both.items():
        assert p == pytest.approx((p0[cls] + p1[cls]) / 2, abs=1e-5)
    _, copies = top(r0, r0, image)
    assert copies == pytest.approx(p0, abs=1e-6)
    onnx = tmp_path / "r0.onnx"
    assert main(["export", str(r0), "--format", "onnx", "--out", str(onnx)]) == 0
    capsys.readouterr()
    assert main(["predict", str(r0), str(onnx), str(image)]) == 2
    assert "an ensemble takes run folders" in capsys.readouterr().err


def test_top5_error_by_hand():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([5, 0, 4])  # out of the top 5, out, in
    assert top5_error(logits, labels) == pytest.approx(2 / 3)
    assert top5_error(logits[:, :5], torch.tensor([0, 0, 0])) is None  # 5 classes: no top-5
