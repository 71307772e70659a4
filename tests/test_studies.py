"""`reslab study block-depth | shortcuts` end to end on a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_dataset, write_image_folder
from reslab import experiments as ex
from reslab.blocks import ResidualBlock
from reslab.cli import main
from reslab.studies import study_arms, versus_reference
from reslab.train import load_trained


def _tiny_recipe(iterations, seed, base=None):
    from dataclasses import replace

    from reslab.recipes import Recipe

    return replace(Recipe().with_iterations(iterations), seed=seed, batch_size=16,
                   eval_every=4, checkpoint_every=4, log_every=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), make_dataset(n_train=48, n_test=16))


def test_block_depth_arms_have_intended_layers():
    arms = study_arms("block-depth", ex.Experiment("x", Path("x"), iterations=100), (56,))
    assert [a.label for a in arms] == ["plain-56 (every k)", "ResNet-56 k=1", "ResNet-56 k=2",
                                       "ResNet-56 k=3"]
    from reslab import build_model

    for arm in arms:
        k = arm.spec.layers_per_block or 2
        model = build_model(arm.spec.model, layers_per_block=arm.spec.layers_per_block)
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        assert {b.num_layers for b in blocks} == {k}
        assert len(blocks) == 3 * 54 // (3 * k)  # depth 56 = 54 conv layers in blocks + 2
    # ResNet-56 and plain-56 with 2-layer blocks are the reproduce runs, spelled the same way.
    names = {a.run_name() for a in arms}
    assert "resnet56-100it-seed0" in names and "plain56-100it-seed0" in names


def test_plain_twin_is_one_net_for_every_block_depth():
    """Why the block-depth study trains one plain arm: k only regroups conv-BN-ReLU layers."""
    import torch

    from reslab import build_model

    x = torch.randn(2, 3, 32, 32)
    outs, params = [], []
    for k in (1, 2, 3):
        torch.manual_seed(0)
        model = build_model("plain20", layers_per_block=k).eval()
        params.append([p.detach().clone() for p in model.parameters()])
        outs.append(model(x))
    for other, out in zip(params[1:], outs[1:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(params[0], other, strict=True))
        assert torch.equal(outs[0], out)
    # ... which is not so with shortcuts: the residual functions differ.
    torch.manual_seed(0)
    one = build_model("resnet20", layers_per_block=1).eval()(x)
    torch.manual_seed(0)
    assert not torch.allclose(one, build_model("resnet20", layers_per_block=3).eval()(x))


def test_shortcut_arms_reuse_reproduce_runs():
    arms = study_arms("shortcuts", ex.Experiment("x", Path("x"), iterations=100), (56,))
    names = {a.label: a.run_name() for a in arms}
    assert names["d56 A"] == "resnet56-100it-seed0" and names["d56 none"] == "plain56-100it-seed0"
    assert names["d56 gated"] == "resnet56-gated-100it-seed0"


def test_studies_end_to_end_share_runs(tmp_path, folder, monkeypatch, capsys):
    monkeypatch.setattr(ex, "study_recipe", _tiny_recipe)
    pool = tmp_path / "pool"
    base = ["--data", str(folder), "--iterations", "8", "--depths", "20", "--runs", str(pool)]
    assert main(["study", "shortcuts", "--out", str(tmp_path / "sc"), *base]) == 0
    capsys.readouterr()
    assert main(["study", "block-depth", "--out", str(tmp_path / "bd"), *base]) == 0
    out = capsys.readouterr().out
    assert out.count("is finished") == 2  # ResNet-20 and plain-20 (k=2) were not trained twice
    assert main(["study", "block-depth", "--out", str(tmp_path / "x"), *base[:-4],
                 "--depths", "14"]) == 2
    assert "18n+2" in capsys.readouterr().err
    for study, arms in (("sc", 7), ("bd", 4)):
        summary = json.loads((tmp_path / study / "summary.json").read_text())
        assert len(summary) == arms
        for e in summary:
            assert e["final_train_error"] == e["final_train_error"]  # not NaN
        with Image.open(tmp_path / study / "curves.png") as im:
            im.verify()
    # Each run's own summary records its block depth (the report does not infer it from names).
    bd = json.loads((tmp_path / "bd" / "summary.json").read_text())
    assert {e["label"]: e["layers_per_block"] for e in bd} == {
        "plain-20 (every k)": 2, "ResNet-20 k=1": 1, "ResNet-20 k=2": 2, "ResNet-20 k=3": 3}
    report = (tmp_path / "sc" / "report.md").read_text()
    assert "gate_opening: stage1" in report and "lambda: stage1" in report
    summary = json.loads((tmp_path / "sc" / "summary.json").read_text())
    gated = next(e for e in summary if e["label"] == "d20 gated")
    assert set(gated["study_choice"]["gate_opening_per_stage"]) == {"stage1", "stage2", "stage3"}
    # Per block: ResNet-20 has three blocks a stage, and their mean is the stage's mean.
    for kind in ("gate_opening", "lambda"):
        arm = next(e for e in summary if f"{kind}_per_block" in e["study_choice"])
        blocks, stages = (arm["study_choice"][f"{kind}_{x}"] for x in ("per_block", "per_stage"))
        assert [len(v) for v in blocks.values()] == [3, 3, 3]
        for stage, v in blocks.items():
            assert sum(v) / 3 == pytest.approx(stages[stage])
        assert f"| {arm['label']} | 0 | {kind} | " in report
    assert "| d20 gated | d20 A | 1 / 1 | " in report  # every arm against option A
    report_before = report
    assert main(["study", "shortcuts", "--out", str(tmp_path / "sc"), *base,
                 "--report-only"]) == 0
    assert (tmp_path / "sc" / "report.md").read_text() == report_before
    model, *_ = load_trained(pool / "resnet20-scaled-b16-8it-seed0")  # batch 16: named
    lams = [b.shortcut_scale.item() for b in model.modules() if isinstance(b, ResidualBlock)]
    assert any(abs(v - 1.0) > 1e-6 for v in lams)  # λ received gradient and moved


def test_versus_reference_counts_evaluations_and_gaps(tmp_path):
    """The order at each evaluation and the final gaps, on curves written here."""
    def run(name, test, train, final_test, label, seed):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": 10 * (i + 1), "test_error": te, "train_error": tr}
                for i, (te, tr) in enumerate(zip(test, train, strict=True))]
        rows.insert(1, {"step": 15, "train_error": 0.9})  # a log line without an evaluation
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"label": label, "run": name, "depth": 20, "seed": seed,
                "final_test_error": final_test, "final_train_error": train[-1]}

    train = [0.3, 0.2, 0.1, 0.1]
    # Option A's seeds span 0.30-0.32, 0.20-0.22, 0.10-0.12, 0.10-0.12 in test error.
    results = [run(f"a{s}", [0.30 + lo, 0.20 + lo, 0.10 + lo, 0.10 + lo], train, f, "d20 A", s)
               for s, (lo, f) in enumerate(((0.0, 0.10), (0.02, 0.11), (0.01, 0.12)))]
    # below all, among, above all, above all; training error among at every evaluation
    results += [run("g0", [0.20, 0.21, 0.50, 0.50], train, 0.50, "d20 gated", 0)]
    results += [run(f"c{s}", [0.40] * 4, train, f, "d20 C", s)
                for s, f in enumerate((0.14, 0.16))]
    lines = versus_reference("shortcuts", results, tmp_path)
    assert not any(line.startswith("| d20 A |") for line in lines)
    gated = next(line for line in lines if line.startswith("| d20 gated |"))
    assert gated == ("| d20 gated | d20 A | 1 / 3 | +39.00 | +0.00 | 1 · 1 · 2 (last 2: 0 · 0 · 2) "
                     "| 0 · 4 · 0 (last 2: 0 · 2 · 0) |")
    c = next(line for line in lines if line.startswith("| d20 C |"))
    # gap 15 - 11 = 4 points; sample variances 0.0002 (C) and 0.0001 (A)
    se = 100 * (0.0002 / 2 + 0.0001 / 3) ** 0.5
    assert c.startswith(f"| d20 C | d20 A | 2 / 3 | +4.00 ± {se:.2f} | +0.00 ± 0.00 | 0 · 0 · 4")
    # No reference finished: no section.
    assert versus_reference("shortcuts", results[3:], tmp_path) == []
