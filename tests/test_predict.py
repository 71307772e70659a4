"""`reslab predict`, the pooled features and the stage outputs (issue 26: items 1 and 4): the
same error as `reslab eval` over Fashion-MNIST's test set, the same predictions through the
exported ONNX model, bad files named and the rest predicted, the photo protocol's views, and a
reslab ResNet-50 as the backbone of torchvision's Faster R-CNN."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RELIABILITY_SPEC
from reslab import build_model
from reslab.cli import main
from reslab.data import load_dataset, normalize
from reslab.data.photo_augment import centre_view, resize_shorter, ten_views
from reslab.data.tree import decode_rgb
from reslab.predict import list_images, open_predictor, predict
from reslab.train import load_trained

ROOT = Path(__file__).resolve().parents[1]
MAKE_RUN = ROOT / "results/fashion-mnist/make-run"  # `make run`'s ResNet-20, committed


@pytest.fixture(scope="module")
def fashion_test(tmp_path_factory):
    """Fashion-MNIST's 10,000 test images as PNG files, test/<class>/<index>.png."""
    ds = load_dataset("fashion-mnist", download=False)
    root = tmp_path_factory.mktemp("fashion") / "test"
    for i, (image, label) in enumerate(zip(ds.test_images, ds.test_labels, strict=True)):
        folder = root / f"{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")
    return root


def _predicted(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main(argv + ["--json"])
    return code, json.loads(capsys.readouterr().out)


def _error(report: dict) -> tuple[float, list[int]]:
    top = [p["top"][0]["index"] for p in report["predictions"]]
    truth = [int(Path(p["path"]).parent.name) for p in report["predictions"]]
    return sum(a != b for a, b in zip(top, truth, strict=True)) / len(top), top


def test_predict_over_the_test_set_has_evals_error_and_onnx_the_same_predictions(
        fashion_test, tmp_path, capsys):
    assert main(["eval", str(MAKE_RUN), "--data", "fashion-mnist", "--precision", "fp32",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    code, report = _predicted(capsys, ["predict", str(MAKE_RUN), str(fashion_test),
                                       "--precision", "fp32", "--top-k", "3"])
    assert code == 0 and report["failed"] == []
    error, top = _error(report)
    assert len(top) == evaluated["images"] == 10_000
    assert error == pytest.approx(evaluated["test_error"], abs=1e-12)
    assert 0.05 < error < 0.15  # a trained net (9.1% when committed), not a constant answer
    first = report["predictions"][0]["top"]
    assert [t["probability"] for t in first] == sorted((t["probability"] for t in first),
                                                       reverse=True)
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(MAKE_RUN), "--format", "onnx", "--out", str(onnx)]) == 0
    capsys.readouterr()
    code, through_onnx = _predicted(capsys, ["predict", str(onnx), str(fashion_test)])
    assert code == 0 and _error(through_onnx)[1] == top


def test_a_bad_file_is_named_and_the_others_still_predicted(tmp_path, capsys):
    good = tmp_path / "shoe.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code = main(["predict", str(MAKE_RUN), str(good), str(bad), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 2  # a user's error (issue 38: not 1, the code of a bug)
    assert out.startswith(f"{good}  ") and out.count("%") == 2
    assert f"reslab predict: error: cannot decode image {bad}" in err
    assert "1 could not be read" in err and "--skip-bad-images" not in err  # predict lacks it
    assert main(["predict", str(MAKE_RUN), str(tmp_path / "none.png")]) == 2
    assert "no such image or folder" in capsys.readouterr().err


def test_images_are_prepared_as_the_run_was_trained(tmp_path):
    # A colour image of another size, for a 1-channel 28x28 run: grey (PIL's luma), 28x28.
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    predictor = open_predictor(MAKE_RUN, precision="fp32")
    assert (predictor.in_channels, predictor.input_size, predictor.photos) == (1, (28, 28), False)
    [result] = list(predict(predictor, [tmp_path / "colour.png"], top_k=10, features=True))
    grey = torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))).float()
    x = torch.nn.functional.interpolate(grey[None, None], size=(28, 28), mode="bilinear",
                                        antialias=True).round().clamp(0, 255).to(torch.uint8)
    trained = load_trained(MAKE_RUN)
    with torch.no_grad():
        features = trained.model.forward_features(normalize(x, trained.mean, trained.std))
        probs = trained.model.fc(features).softmax(1)[0]
    assert [i for i, _ in result.top] == probs.argsort(descending=True).tolist()
    assert np.allclose(result.features, features[0].numpy(), atol=1e-5)
    assert sum(p for _, p in result.top) == pytest.approx(1, abs=1e-5)


def test_features_are_written_for_a_folder(tmp_path, capsys):
    for i in range(3):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "features.npy"
    assert main(["predict", str(MAKE_RUN), str(tmp_path), "--features", str(out)]) == 0
    capsys.readouterr()
    rows = np.load(out)
    assert rows.shape == (3, 64) and rows.dtype == np.float32  # ResNet-20's 64 pooled channels
    assert out.with_suffix(".txt").read_text().split() == [str(tmp_path / f"{i}.png")
                                                           for i in range(3)]
    assert not np.allclose(rows[0], rows[2])
    # Without the suffix: written under the name given and reported by it (issue 38).
    bare = tmp_path / "out" / "feats"
    bare.parent.mkdir()
    assert main(["predict", str(MAKE_RUN), str(tmp_path), "--features", str(bare)]) == 0
    assert f"in {bare}, their images in order in {bare}.txt" in capsys.readouterr().err
    assert sorted(p.name for p in bare.parent.iterdir()) == ["feats", "feats.txt"]
    assert np.array_equal(np.load(bare), rows)
    assert main(["predict", str(MAKE_RUN), str(tmp_path), "--features",
                 str(tmp_path / "feats.txt")]) == 2
    assert "give the features a name ending .npy" in capsys.readouterr().err


def test_photo_runs_see_the_test_protocols_views(tmp_path):
    # A run trained on streamed photographs (Sec. 3.4 augmentation): its predictions are the
    # centre 224 crop's, or the mean of the ten crops' probabilities.
    from reslab.checkpoint import save_weights
    from reslab.runfolder import weights_metadata

    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4).eval()
    spec = replace(RELIABILITY_SPEC, recipe=replace(RELIABILITY_SPEC.recipe,
                                                    augmentation="scale", pad=0))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    weights = tmp_path / "model.safetensors"
    save_weights(weights, model.state_dict(), weights_metadata(
        json.loads(json.dumps(spec.as_dict())), 3, 4, mean, std, ("a", "b", "c", "d"),
        (224, 224)))
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 420, 3), np.uint8)).save(photo)
    predictor = open_predictor(weights, precision="fp32")
    assert predictor.photos and predictor.classes == ("a", "b", "c", "d")
    image = decode_rgb(str(photo))
    for protocol, views in (("centre", centre_view(image)[None]), ("10-crop", ten_views(image))):
        [result] = list(predict(predictor, [photo], top_k=4, protocol=protocol))
        with torch.no_grad():
            expected = model(normalize(views, mean, std)).softmax(1).mean(0)
        assert np.allclose([p for _, p in result.top], expected.sort(descending=True).values,
                           atol=1e-5), protocol
    # Multi-scale: the whole image and its flip at each of the five shorter sides, averaged.
    [result] = list(predict(predictor, [photo], top_k=4, protocol="multi-scale"))
    with torch.no_grad():
        scales = []
        for side in (224, 256, 384, 480, 640):
            x = resize_shorter(image, side)[None]
            scales.append(model(normalize(torch.cat([x, x.flip(-1)]), mean, std)).softmax(1)
                          .mean(0))
        expected = torch.stack(scales).mean(0)
    assert np.allclose([p for _, p in result.top], expected.sort(descending=True).values,
                       atol=1e-5)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2100, 100)).save(strip)
    [(path, message)] = list(predict(predictor, [strip]))
    assert path == str(strip) and "more than 20:1" in message
    with pytest.raises(ValueError, match="--protocol 10-crop is for runs trained on photographs"):
        list(predict(open_predictor(MAKE_RUN), [photo], protocol="10-crop"))


def test_list_images_searches_folders_and_refuses_empty_ones(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "a" / "b" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert list_images([tmp_path / "a"]) == [tmp_path / "a" / "b" / "x.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="holds no images"):
        list_images([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------
# Item 4: features and backbones


@pytest.mark.parametrize("name,stages", [
    ("resnet20", {"conv1": (16, 32, 32), "conv2_x": (16, 32, 32), "conv3_x": (32, 16, 16),
                  "conv4_x": (64, 8, 8)}),
    ("resnet50", {"conv1": (64, 112, 112), "conv2_x": (256, 56, 56), "conv3_x": (512, 28, 28),
                  "conv4_x": (1024, 14, 14), "conv5_x": (2048, 7, 7)}),
])
def test_stage_outputs_are_table_1s_and_the_features_what_fc_sees(name, stages):
    torch.manual_seed(0)
    model = build_model(name).eval()
    side = 32 if name == "resnet20" else 224
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model.forward_stages(x)
        assert {k: tuple(v.shape[1:]) for k, v in out.items()} == stages
        last = list(out)[-1]
        features = model.forward_features(x)
        assert torch.allclose(features, out[last].mean((2, 3)), atol=1e-5)
        assert torch.allclose(model.fc(features), model(x), atol=1e-5)
        assert list(model.forward_stages(x, ["conv3_x"])) == ["conv3_x"]
    assert model.stage_channels()[last] == model.num_features
    with pytest.raises(ValueError, match="unknown stage 'conv9_x'"):
        model.forward_stages(x, ["conv9_x"])


def test_faster_rcnn_trains_on_a_reslab_resnet50s_stages():
    # Sec. 4.3 / the appendix: Faster R-CNN on ResNet stages, here torchvision's own FasterRCNN
    # and FPN over a reslab ResNet-50's conv2_x..conv5_x: a training step's forward and loss.
    from torchvision.models.detection import FasterRCNN

    from reslab.backbone import StageBackbone

    torch.manual_seed(0)
    backbone = StageBackbone(build_model("resnet50", layout="v1.5"))
    assert backbone.out_channels == 256
    detector = FasterRCNN(backbone, num_classes=3, min_size=256, max_size=256).train()
    images = [torch.rand(3, 256, 256)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [140.0, 60.0, 230.0, 200.0]]),
                "labels": torch.tensor([1, 2])}]
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0  # gradients reach conv2_x
    plain = StageBackbone(build_model("resnet50"), stages=("conv4_x",), fpn_channels=None)
    assert plain.out_channels == [1024]
    assert list(plain(torch.rand(1, 3, 64, 64))) == ["0"]
    with pytest.raises(ValueError, match="unknown stage 'conv6_x'"):
        StageBackbone(build_model("resnet50"), stages=("conv6_x",))
