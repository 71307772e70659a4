"""`reslab bench`: the JSON contract, and that the faster inference path computes the same."""

from __future__ import annotations

import json

import pytest
import torch

from reslab import build_model
from reslab.cli import main
from reslab.export import fold_batch_norm
from reslab.runtime import resolve_precision


def test_bn_folding_is_exact_enough():
    torch.manual_seed(0)
    for name, opts in (("resnet8", {}), ("resnet8", {"shortcut": "C"}), ("resnet50", {})):
        model = build_model(name, **opts).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 3, 64, 64)
        folded = fold_batch_norm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_bench_train_and_infer_json(capsys):
    assert main(["bench", "train", "resnet8", "--steps", "2", "--batch-size", "32",
                 "--no-compile", "--no-ablation", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("images_per_second", "reference_images_per_second", "ratio", "peak_fraction"):
        assert r[key] > 0, key
    assert abs(sum(r["step_split"].values()) - 1) < 0.05
    # The peak is that of the precision reslab trains in here; bf16's only where it is native.
    assert r["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert (r["peak_bf16_madds_per_s"] is None) == (r["precision"] == "fp32")
    peak = r[f"peak_{r['precision']}_madds_per_s"]
    assert r["peak_fraction"] == pytest.approx(r["achieved_madds_per_s"] / peak)
    assert 0 < r["kernel_split"]["convolution_share"] < 1
    assert main(["bench", "infer", "resnet8", "--batch-size", "4", "--no-compile",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # The best path is the fastest row, the reference is the eager fp32 row, and the ratio is
    # theirs: each figure is read from the rows it names.
    paths = {k: v["images_per_second"] for k, v in r["paths"].items()}
    assert r["best_path"] == max(paths, key=paths.get)
    assert r["images_per_second"] == paths[r["best_path"]]
    assert r["reference_images_per_second"] == paths["eager fp32"]
    assert r["ratio"] == pytest.approx(paths[r["best_path"]] / paths["eager fp32"])
    assert r["folding_max_abs_error"] < 1e-3


def test_frozen_compiled_inference_computes_the_same():
    """The freezing path of `bench infer` (weights as constants, pre-packed) changes no output."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = build_model("resnet8").eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    folded = fold_batch_norm(model).to(memory_format=torch.channels_last)
    with inductor_config.patch(freezing=True), torch.no_grad():
        frozen = torch.compile(folded)
        assert torch.allclose(frozen(x), model(x), atol=1e-4, rtol=1e-4)
