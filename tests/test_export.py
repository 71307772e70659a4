"""Exported models compute what the run computes: ONNX Runtime's and the torch.export program's
logits on uint8 images equal the Trained model's fp32 logits on data.normalize'd images (1e-4
max abs, batch 1 and 7) for ResNet-20 (option A, per-pixel mean, 1 channel; per-channel mean
and std, 3 channels) and ResNet-50 (option B, layouts v1 and v1.5); each ONNX file passes
onnx's full check and carries its metadata; a changed mean inside the graph breaks parity;
export_run writes beside a run's weights; bad inputs get clear errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import make_dataset
from reslab.bench.infer import (
    agreement_on_run,
    bench_inference,
    random_images,
    stand_in,
    top1_agreement,
)
from reslab.data import normalize
from reslab.export import (
    OnnxModel,
    export_onnx,
    export_program,
    export_run,
    fold_batch_norm,
    input_size_of,
    load_onnx,
    onnx_metadata,
)
from reslab.train import Trained, load_trained

pytestmark = pytest.mark.usefixtures("quiet_machine")  # one thread: the machine is shared

TOL = 1e-4  # max abs on logits of std ~1 (stand_in's head); fp32 reorderings give ~1e-5
CASES = {
    # Fashion-MNIST-like: 1 channel, 28x28 per-pixel mean (Sec. 4.2), option A.
    "resnet20-grey-pixel-mean": dict(name="resnet20", in_channels=1,
                                     mean=torch.linspace(0.2, 0.6, 28 * 28).view(1, 28, 28)),
    "resnet20-rgb-channel-mean-std": dict(name="resnet20", mean=torch.tensor([0.49, 0.48, 0.45]),
                                          std=torch.tensor([0.25, 0.24, 0.26])),
    # ImageNet: the paper's layout with its per-pixel mean; torchvision's with mean and std.
    "resnet50-v1-pixel-mean": dict(name="resnet50", layout="v1"),
    "resnet50-v1.5-channel-mean-std": dict(name="resnet50", layout="v1.5",
                                           mean=torch.tensor([0.485, 0.456, 0.406]),
                                           std=torch.tensor([0.229, 0.224, 0.225])),
}


def reference(trained: Trained, images: torch.Tensor) -> torch.Tensor:
    """The run's own evaluation: the PyTorch model in fp32 on normalize(images)."""
    with torch.no_grad():
        return trained.model(normalize(images, trained.mean, trained.std))


def images_for(trained: Trained, n: int, seed: int) -> torch.Tensor:
    return random_images(n, int(trained.mean.shape[0]), input_size_of(trained),
                         torch.Generator().manual_seed(seed))


def max_difference(model, trained: Trained, images: torch.Tensor) -> float:
    return (model(images) - reference(trained, images)).abs().max().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, quiet_machine):
    """Each case's Trained, its .onnx, and its state before exporting."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for key, case in CASES.items():
        case = dict(case)
        trained = stand_in(case.pop("name"), **case, seed=len(out))
        before = {k: v.clone() for k, v in trained.model.state_dict().items()}
        out[key] = (trained, export_onnx(trained, root / f"{key}.onnx"), before)
    return out


@pytest.mark.parametrize("key", CASES)
def test_onnx_runtime_logits_equal_pytorch_fp32(exported, key):
    trained, path, _ = exported[key]
    model = load_onnx(path, threads=1)
    for batch, seed in ((1, 1), (7, 2)):
        images = images_for(trained, batch, seed)
        assert model(images).shape == (batch, trained.model.fc.out_features)
        assert max_difference(model, trained, images) < TOL


@pytest.mark.parametrize("key", CASES)
def test_onnx_file_passes_the_full_check_and_carries_its_metadata(exported, key):
    trained, path, _ = exported[key]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("images", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    c, (h, w) = int(trained.mean.shape[0]), input_size_of(trained)
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [c, h, w]
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["reslab.spec"])["model"] == trained.spec.model
    model = load_onnx(path, threads=1)
    assert model.classes == trained.classes and len(model.classes) == model.num_classes
    assert model.input_size == (h, w) == ((28, 28) if c == 1 else
                                          (32, 32) if trained.spec.model == "resnet20" else
                                          (224, 224))
    assert model.in_channels == c
    assert f"uint8 (N, {c}, {h}, {w})" in model.metadata["input_format"]


def test_export_leaves_the_callers_model_as_it_was(exported):
    for trained, _, before in exported.values():
        after = trained.model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert any(isinstance(m, nn.BatchNorm2d) for m in trained.model.modules())


@pytest.mark.parametrize("key", ["resnet20-rgb-channel-mean-std", "resnet50-v1.5-channel-mean-std"])
def test_folded_logits_equal_unfolded(exported, key):
    trained = exported[key][0]
    folded = fold_batch_norm(trained.model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = images_for(trained, 3, 3)
    with torch.no_grad():
        logits = folded(normalize(images, trained.mean, trained.std))
    difference = (logits - reference(trained, images)).abs().max().item()
    assert 0 < difference < TOL  # 0 would mean nothing was folded (or BN was a no-op)


@pytest.mark.parametrize("key", ["resnet20-grey-pixel-mean", "resnet50-v1-pixel-mean"])
def test_a_changed_mean_inside_the_graph_fails_the_parity_check(exported, key, tmp_path):
    trained, path, _ = exported[key]
    proto = onnx.load(str(path))
    (mean,) = [t for t in proto.graph.initializer if t.name == "mean"]
    values = onnx.numpy_helper.to_array(mean)
    assert torch.allclose(torch.from_numpy(values.copy()).view_as(trained.mean), trained.mean)
    mean.CopyFrom(onnx.numpy_helper.from_array(values + 2 / 255, "mean"))  # two grey levels
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    images = images_for(trained, 7, 2)
    assert max_difference(load_onnx(path, threads=1), trained, images) < TOL
    assert max_difference(load_onnx(tmp_path / "edited.onnx", threads=1), trained,
                          images) > 100 * TOL


@pytest.mark.parametrize("key", ["resnet20-grey-pixel-mean", "resnet20-rgb-channel-mean-std",
                                 "resnet50-v1.5-channel-mean-std"])
def test_torch_export_program_gives_the_same_logits(exported, key, tmp_path):
    trained = exported[key][0]
    path = export_program(trained, tmp_path / "model.pt2")
    extra = {"reslab.json": ""}
    program = torch.export.load(path, extra_files=extra).module()
    meta = json.loads(extra["reslab.json"])
    # Recognised by its bytes where weights are expected (issue 38, item 7), not "header too
    # large".
    with pytest.raises(ValueError, match="model.pt2 is a torch.export program"):
        load_trained(path)
    assert json.loads(meta["classes"]) == list(trained.classes)
    assert json.loads(meta["input_size"]) == list(input_size_of(trained))
    for batch, seed in ((1, 4), (7, 5)):
        images = images_for(trained, batch, seed)
        with torch.no_grad():
            assert max_difference(program, trained, images) < TOL


def test_input_size_follows_the_run_the_mean_or_the_family(exported):
    grey = exported["resnet20-grey-pixel-mean"][0]
    rgb = exported["resnet20-rgb-channel-mean-std"][0]
    assert input_size_of(grey) == (28, 28) and input_size_of(rgb) == (32, 32)
    assert input_size_of(exported["resnet50-v1.5-channel-mean-std"][0]) == (224, 224)
    assert input_size_of(rgb._replace(input_size=(20, 24))) == (20, 24)  # recorded by the run
    assert input_size_of(grey, (40, 36)) == (40, 36)
    for size in ((0, 32), (3, 32), (32, 4097), (32,), (32.0, 32)):  # resnet20: 4 to 4096 px
        with pytest.raises(ValueError, match="is not an image size resnet20 can take"):
            input_size_of(rgb, size)
    assert input_size_of(rgb, (4, 4096)) == (4, 4096)
    with pytest.raises(ValueError, match=r"--input-size 16 16 is not an image size resnet50 "
                       r"can take: two sides \(H W\) of 32 to 4096 pixels \(resnet50 "
                       r"down-samples by 32\)"):
        input_size_of(exported["resnet50-v1-pixel-mean"][0], (16, 16))
    # Trained on photographs (Sec. 3.4's augmentation): the 224 crop, whatever the family.
    recipe = replace(rgb.spec.recipe, augmentation="scale")
    on_photos = rgb._replace(spec=replace(rgb.spec, recipe=recipe))
    assert input_size_of(on_photos) == (224, 224)
    assert onnx_metadata(on_photos, (224, 224))["reslab.photos"] == "true"
    assert load_onnx(exported["resnet20-rgb-channel-mean-std"][1], threads=1).photos is False


def test_export_at_another_size_subtracts_the_per_pixel_means_average(exported, tmp_path):
    grey, _, _ = exported["resnet20-grey-pixel-mean"]
    model = load_onnx(export_onnx(grey, tmp_path / "32.onnx", input_size=(32, 36)), threads=1)
    assert model.input_size == (32, 36)
    assert model.metadata["normalization"] == "per-channel mean"
    images = random_images(3, 1, (32, 36), torch.Generator().manual_seed(6))
    averaged = grey._replace(mean=grey.mean.mean((1, 2)))  # as stats.mean_at does
    assert max_difference(model, averaged, images) < TOL
    assert max_difference(model, grey._replace(mean=grey.mean[:, :1, :1].flatten()),
                          images) > 100 * TOL


def test_export_run_writes_beside_the_weights(finished, tmp_path):
    run = finished.run
    trained = load_trained(run)
    assert export_run(run, "onnx") == run / "model.onnx"
    assert export_run(run / "model.safetensors", "torch-export") == run / "model.pt2"
    with pytest.raises(ValueError, match="model.onnx exists; give another --out, or "
                       "--overwrite to replace it"):
        export_run(run, "onnx")
    (tmp_path / "chosen.onnx").write_bytes(b"an older export")
    chosen = export_run(run, "onnx", tmp_path / "chosen.onnx", overwrite=True)
    assert chosen == tmp_path / "chosen.onnx"
    assert load_onnx(export_run(run, "onnx", tmp_path / "16.onnx", input_size=(16, 14)),
                     threads=1).input_size == (16, 14)
    images = images_for(trained, 5, 7)  # the run's own size: its per-pixel mean's (12x12)
    assert images.shape[1:] == (1, 12, 12)
    for path in (run / "model.onnx", chosen):
        model = load_onnx(path, threads=1)
        assert model.classes == trained.classes == ("c0", "c1", "c2")
        assert max_difference(model, trained, images) < TOL
    with torch.no_grad():
        assert max_difference(torch.export.load(run / "model.pt2").module(), trained,
                              images) < TOL


def test_export_never_replaces_the_runs_own_files(finished, tmp_path):
    """Issue 38, item 1: not with --overwrite, not through a link, not a file yet to come."""
    run = finished.run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (tmp_path / "link.onnx").symlink_to(run / "metrics.jsonl")
    for out in (run / "metrics.jsonl", run / "recipe.json", tmp_path / "link.onnx",
                run / "checkpoint-0000099.pt", run / "summary.json"):
        with pytest.raises(ValueError, match="one of the run folder's own files"):
            export_run(run, "onnx", out, overwrite=True)
    with pytest.raises(ValueError, match="is the weights being exported"):
        export_run(run / "model.safetensors", "torch-export", run / "model.safetensors",
                   overwrite=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_onnx_metadata_is_checked_like_options_and_the_file_found_by_its_bytes(exported,
                                                                               tmp_path):
    """Issue 38, items 4 and 7: an input size the net cannot take, fewer class names than
    outputs or a size its graph does not have are refused by name; an .onnx renamed without
    its suffix still predicts."""
    from PIL import Image

    from reslab.predict import open_predictor, predict

    path = exported["resnet20-rgb-channel-mean-std"][1]
    for key, value, says in (("input_size", "[0, -3]", r"its input_size \[0, -3\] is not an "
                              "image size resnet20 can take"),
                             ("classes", '["c0"]', "1 class names for 10 outputs"),
                             ("input_size", "[28, 28]", r"differ from its graph's")):
        proto = onnx.load(str(path))
        for prop in proto.metadata_props:
            if prop.key == f"reslab.{key}":
                prop.value = value
        onnx.save(proto, str(tmp_path / "edited.onnx"))
        with pytest.raises(ValueError, match=f"edited.onnx has malformed reslab metadata "
                           f"\\(.*{says}"):
            load_onnx(tmp_path / "edited.onnx")
    images = [tmp_path / f"{i}.png" for i in range(2)]
    for i, image in enumerate(images):
        Image.fromarray(np.full((32, 32, 3), 90 * i, np.uint8)).save(image)
    (tmp_path / "model").write_bytes(path.read_bytes())
    bare, named = open_predictor(tmp_path / "model"), open_predictor(path)
    assert not bare.any_size and bare.input_size == (32, 32)
    assert [r.top for r in predict(bare, images)] == [r.top for r in predict(named, images)]


def test_export_run_errors_are_clear(finished, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'; valid: onnx, "
                       "torch-export"):
        export_run(finished.run, "tflite")
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"keep me")
    kept.chmod(0o444)
    with pytest.raises(ValueError, match="kept.onnx exists; give another --out, or --overwrite"):
        export_run(finished.run, "onnx", kept)
    with pytest.raises(ValueError, match="kept.onnx exists and is not writable"):
        export_run(finished.run, "onnx", kept, overwrite=True)
    assert kept.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="is a folder"):
        export_run(finished.run, "onnx", tmp_path)
    with pytest.raises(ValueError, match="no folder"):
        export_run(finished.run, "onnx", tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="no model.safetensors"):
        export_run(tmp_path, "onnx")


def test_load_onnx_refuses_what_reslab_did_not_export(exported, tmp_path):
    with pytest.raises(ValueError, match="no ONNX model at .*absent.onnx"):
        load_onnx(tmp_path / "absent.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.onnx is not a loadable ONNX model"):
        load_onnx(text)
    proto = onnx.load(str(exported["resnet20-rgb-channel-mean-std"][1]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ValueError, match="foreign.onnx is an ONNX model but not one exported "
                       "by reslab"):
        OnnxModel(tmp_path / "foreign.onnx")


def test_onnx_model_refuses_images_of_the_wrong_kind(exported):
    trained, path, _ = exported["resnet20-rgb-channel-mean-std"]
    model = load_onnx(path, threads=1)
    images = images_for(trained, 2, 8)
    with pytest.raises(ValueError, match=r"takes uint8 \(N, 3, 32, 32\) images, got "
                       r"torch.float32"):
        model(images.float())
    with pytest.raises(ValueError, match=r"got torch.uint8 \(2, 3, 28, 28\)"):
        model(images[:, :, :28, :28])


def test_stand_in_spreads_top1_and_agreement_counts_flips(exported):
    trained = exported["resnet20-rgb-channel-mean-std"][0]
    images = images_for(trained, 64, 9)
    plain = lambda x: reference(trained, x)
    flipped = lambda x: -reference(trained, x)
    r = top1_agreement({"fp32": plain, "same": plain, "flipped": flipped}, "fp32", images, 16)
    assert r["distinct_top1_classes"] >= 5  # a random head alone gives one class for all
    assert r["paths"]["same"] == {"top1_agreement": 1.0, "max_abs_logit_difference": 0.0}
    assert r["paths"]["flipped"]["top1_agreement"] < 0.2


def test_bench_inference_measures_every_path_on_one_model():
    r = bench_inference("resnet8", (1, 4), threads=1, rounds=2, round_s=0.01,
                        compile_model=False)
    assert set(r["batches"]) == {"1", "4"} and r["input_size"] == [32, 32]
    for row in r["batches"].values():
        assert set(row["paths"]) == {"ONNX Runtime (uint8 in)", "eager fp32 (NCHW)",
                                     "BN folded + channels_last, fp32",
                                     "BN folded + channels_last, bf16"}
        assert all(len(p["rounds"]) == 2 and p["images_per_second"] > 0
                   for p in row["paths"].values())
        assert row["reslab_best_path"].startswith("BN folded")
    agreement = r["top1_vs_eager_fp32_random_images"]["paths"]
    assert agreement["ONNX Runtime (uint8 in)"]["max_abs_logit_difference"] < TOL
    assert agreement["BN folded + channels_last, bf16"]["max_abs_logit_difference"] > 1e-3


def test_a_trained_runs_export_classifies_its_test_split_as_the_run_does(finished):
    r = agreement_on_run(finished.run, make_dataset(), batch=16, threads=1)
    assert r["images"] == 40 and r["data"] == "synthetic"
    onnx_row = r["paths"]["ONNX Runtime (uint8 in)"]
    assert onnx_row["top1_agreement"] == 1.0 and onnx_row["max_abs_logit_difference"] < TOL
    assert onnx_row["top1_error"] == r["reference_top1_error"]
