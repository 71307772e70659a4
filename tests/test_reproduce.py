"""`reslab reproduce` end to end on a tiny configuration: reports, summaries, valid plots,
--report-only, and resuming an interrupted study."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_dataset, write_image_folder
from reslab import experiments as ex
from reslab import reproduce as rp
from reslab.cli import main
from reslab.train import TrainingStopped, TrainOptions


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), make_dataset(n_train=64, n_test=24))


def _png_ok(path: Path) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 300


@pytest.mark.parametrize("kind", ["table6", "fig6", "fig7"])
def test_reproduce_end_to_end_and_report_only(tmp_path, folder, kind, monkeypatch):
    monkeypatch.setattr(ex, "study_recipe", _tiny_recipe)
    out = tmp_path / kind
    seeds = "2" if kind == "table6" else "1"
    args = ["reproduce", kind, "--data", str(folder), "--out", str(out), "--depths", "8", "14",
            "--iterations", "12", "--seeds", seeds]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    nets = 2 if kind == "table6" else 4
    assert len(summary) == nets * int(seeds)
    for entry in summary:
        for key in ("model", "depth", "plain", "shortcut", "iterations", "params",
                    "final_train_error", "final_test_error", "seed"):
            assert key in entry
    assert "ResNet-14" in report and "final iteration" in report
    hardware = next(line for line in report.splitlines() if line.startswith("- hardware: "))
    on_cpu = not torch.cuda.is_available()
    assert "unknown" not in hardware and ("cores, CPU only" in hardware or not on_cpu)
    assert "## Schedules" in report and "- ResNet-14: 0.1, /10 at" in report
    if kind == "table6":
        assert " ± " in report  # best (mean ± std) over two seeds
        assert "deeper ResNets test lower (ResNet-14 vs ResNet-8, paper: lower)" in report
        _png_ok(out / "curves.png")
    if kind == "fig6":
        _png_ok(out / "fig6.png")
        assert "degradation" in report and "the cure" in report
        assert " logged points" in report
    if kind == "fig7":
        _png_ok(out / "fig7.png")
        responses = json.loads((out / "responses.json").read_text())
        assert len(responses["ResNet-14"]) == 1 + 12  # the stem and every 3x3 layer
        assert "- ResNet-14 vs plain-14 (paper: smaller): " in report
        assert "- deeper ResNets respond less (ResNet-14 vs ResNet-8, paper: smaller): " in report
    (out / "report.md").unlink()
    (out / "summary.json").unlink()
    assert main([*args, "--report-only"]) == 0
    assert (out / "report.md").read_text() == report
    assert json.loads((out / "summary.json").read_text()) == summary


def _tiny_recipe(iterations, seed, base=None):
    from dataclasses import replace

    from reslab.recipes import Recipe

    return replace(Recipe().with_iterations(iterations), seed=seed, batch_size=16,
                   eval_every=4, checkpoint_every=4, log_every=1)


def test_interrupted_study_resumes_where_it_stopped(tmp_path, folder, monkeypatch, capsys):
    """SIGTERM in the middle of the second run: the study stops, and a rerun reuses the first
    run and resumes the second from its checkpoint."""
    import signal

    import reslab.data.augment as tr  # where each batch's crops and flips are drawn

    monkeypatch.setattr(ex, "study_recipe", _tiny_recipe)
    real_aug, calls = tr.crop_flip_draw, []

    def augment_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) == 12 + 6:  # iteration 6 of the second run
            signal.raise_signal(signal.SIGTERM)
        return real_aug(*a, **kw)

    monkeypatch.setattr(tr, "crop_flip_draw", augment_then_stop)
    with pytest.raises(TrainingStopped) as stopped:
        rp.reproduce("fig6", ex.Experiment(str(folder), tmp_path, iterations=12), depths=(8, 14))
    assert stopped.value.step == 6
    monkeypatch.setattr(tr, "crop_flip_draw", real_aug)
    capsys.readouterr()
    rp.reproduce("fig6", ex.Experiment(str(folder), tmp_path, iterations=12), depths=(8, 14))
    out = capsys.readouterr().out
    assert out.count("is finished") == 1  # the first run is reused, not retrained
    assert "from checkpoint-00000006.pt (iteration 6/12)" in out
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 4


def test_hardware_names_every_machine_a_resumed_run_used(tmp_path):
    gpu = {"gpu": "NVIDIA H200", "cpu": "Intel(R) Xeon(R) Processor", "cpu_count": 16}
    cpu = {"gpu": None, "cpu": "AMD EPYC 9B14", "cpu_count": 2}
    (tmp_path / "env.json").write_text(json.dumps(dict(gpu, resumes=[gpu, cpu, cpu])))
    assert ex._hardware(tmp_path) == "NVIDIA H200, then AMD EPYC 9B14, 2 cores, CPU only"
    (tmp_path / "env.json").write_text(json.dumps(cpu))
    assert ex._hardware(tmp_path) == "AMD EPYC 9B14, 2 cores, CPU only"
    (tmp_path / "env.json").write_text("{torn")
    assert ex._hardware(tmp_path) == "unknown"


def test_provenance_names_the_commits_that_resumed_a_run():
    results = [{"commit": "b" * 40, "resumed_at_commits": ["c" * 40, "a" * 40],
                "hardware": "AMD EPYC, 2 cores, CPU only", "wall_time_s": 7200.0},
               {"commit": None, "hardware": "NVIDIA H200", "wall_time_s": 1800.0}]
    lines = ex._provenance(results, "fashion-mnist", "reslab reproduce table6")
    commits = next(line for line in lines if line.startswith("- commits"))
    assert f"{'a' * 10}, {'b' * 10}, {'c' * 10}, unknown;" in commits
    assert "- wall time of the runs: 2.50 h in total" in lines
    assert "- hardware: AMD EPYC, 2 cores, CPU only; NVIDIA H200" in lines


def test_paper_column_only_for_table6_nets():
    def run(label, shortcut, depth=20, **extra):
        return {"label": label, "shortcut": shortcut, "depth": depth, "plain": shortcut == "none",
                "params": 1, "iterations": 8000, "final_train_error": 0.1,
                "final_test_error": 0.1, **extra}
    rows = ex.runs_table([run("A", "A"), run("B", "B"), run("gated", "gated"), run("plain", "none"),
                          run("k=3", "A", layers_per_block=3), run("110", "A", depth=110)])
    paper = {row.split(" | ")[0][2:]: row.rstrip(" |").split(" | ")[-1] for row in rows[2:]}
    assert paper == {"A": "8.75", "B": "—", "gated": "—", "plain": "—", "k=3": "—",
                     "110": "6.43 (6.61 ± 0.16)"}


@pytest.mark.parametrize(("command", "first_run"), [
    (["reproduce", "table6", "--depths", "8"], "resnet8-{}12it-seed0"),
    (["study", "block-depth", "--depths", "20"], "plain20-{}12it-seed0"),
])
def test_run_options_reach_train(tmp_path, folder, monkeypatch, command, first_run):
    """`reslab reproduce` and `reslab study` take `train`'s run options to train() as one
    TrainOptions and --precision into the arms' recipes (another run, named so); without them,
    TrainOptions() and the recipe as it was, so that existing runs are reused."""
    class Recorded(Exception):
        pass

    seen = []

    def record(spec, run_dir, *, data=None, options):
        seen.append((spec, Path(run_dir).name, options))
        raise Recorded

    monkeypatch.setattr(ex, "train", record)
    args = [*command, "--data", str(folder), "--out", str(tmp_path), "--iterations", "12"]
    with pytest.raises(Recorded):
        main([*args, "--deterministic", "--compile", "off", "--compile-mode", "max-autotune",
              "--device", "cpu", "--cuda-graphs", "off", "--gradient-checkpointing",
              "--skip-nonfinite", "3", "--no-progress", "--precision", "fp32"])
    with pytest.raises(Recorded):
        main(args)
    (spec, name, options), (default_spec, default_name, default_options) = seen
    assert options == TrainOptions(
        device="cpu", compile_model=False, compile_mode="max-autotune", cuda_graphs=False,
        gradient_checkpointing=True, skip_nonfinite=3, deterministic=True, progress=False)
    assert spec.recipe == replace(ex.study_recipe(12, 0), precision="fp32")
    assert name == first_run.format("fp32-")
    assert default_options == TrainOptions()
    assert default_spec.recipe == ex.study_recipe(12, 0) and default_name == first_run.format("")


def _result(label: str, depth: int, train: float, test: float, run: str = "") -> dict:
    return {"label": label, "depth": depth, "final_train_error": train,
            "final_test_error": test, "run": run}


def test_ladder_claims_compare_test_errors_beside_table6():
    results = [_result("ResNet-20", 20, 0.02, 0.12), _result("ResNet-32", 32, 0.01, 0.11),
               _result("ResNet-32", 32, 0.01, 0.13), _result("ResNet-44", 44, 0.01, 0.125),
               _result("ResNet-50", 50, 0.01, 0.10)]
    assert rp.ladder_claims(results) == [
        "- deeper ResNets test lower (ResNet-32 vs ResNet-20, paper: 7.51% vs 8.75%, lower): "
        "12.00% vs 12.00% → does not agree",  # the mean of the two seeds ties
        "- deeper ResNets test lower (ResNet-44 vs ResNet-32, paper: 7.17% vs 7.51%, lower): "
        "12.50% vs 12.00% → does not agree",
        "- deeper ResNets test lower (ResNet-50 vs ResNet-44, paper: lower): 10.00% vs 12.50% "
        "→ agrees",
    ]
    assert rp.ladder_claims(results[:1]) == []


def test_fig6_claims_count_the_logged_points_where_each_held(tmp_path):
    def log(name, errors):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 10 * (i + 1), "train_error": e}) + "\n"
            for i, e in enumerate(errors)))
    log("p8", [0.5, 0.3, 0.2, 0.1])
    log("p14", [0.6, 0.4, 0.1, 0.2, 0.1])  # one point more than plain-8 logged
    log("r8", [0.5, 0.3, 0.2, 0.1])
    results = [_result("plain-8", 8, 0.1, 0.2, "p8"), _result("plain-14", 14, 0.2, 0.3, "p14"),
               _result("ResNet-8", 8, 0.1, 0.2, "r8")]
    assert rp.claims(results, tmp_path) == [
        "- degradation (plain-14 vs plain-8, paper: higher): 20.00% vs 10.00% → agrees; "
        "higher at 3 of 4 logged points",
        "- the cure at depth 8 (ResNet-8 vs plain-8, paper: lower): 10.00% vs 10.00% → does not "
        "agree; lower at 0 of 4 logged points",
    ]
    assert rp.claims(results)[0] == ("- degradation (plain-14 vs plain-8, paper: higher): "
                                      "20.00% vs 10.00% → agrees")


def test_schedule_names_the_milestones_and_where_the_warm_up_ended(tmp_path):
    from dataclasses import asdict

    from reslab.recipes import get_recipe

    recipe = get_recipe("cifar10").with_iterations(16000)
    (tmp_path / "recipe.json").write_text(json.dumps({"model": "resnet110",
                                                      "recipe": asdict(recipe)}))
    lrs = [(160, 0.01), (320, 0.01), (480, 0.1), (8000, 0.1), (8160, 0.01), (12160, 0.001)]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "lr": lr, "train_error": 0.5}) + "\n" for s, lr in lrs))
    assert rp.schedule(tmp_path) == ("0.01 until training error < 80% (over by iteration 480), "
                                     "then 0.1, /10 at 8,000 and 12,000; 16,000 iterations, "
                                     "batch 128")
    # The metrics name the iteration (65) when the warm-up ended inside the first record ...
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "lr": 0.1} | ({"warmup_over_at": 65} if s == 160 else {}))
        + "\n" for s in (160, 8000)))
    assert rp.schedule(tmp_path).startswith("0.01 until training error < 80% (over at "
                                            "iteration 65), then 0.1, /10 at 8,000")
    # ... and, in runs from before they did, the first record at 0.1 bounds it.
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "lr": 0.1}) + "\n" for s in (160, 8000)))
    assert rp.schedule(tmp_path).startswith("0.01 until training error < 80% (over by "
                                            "iteration 160), then 0.1, /10 at 8,000")
    (tmp_path / "recipe.json").write_text(json.dumps({"model": "resnet56",
                                                      "recipe": asdict(recipe)}))
    assert rp.schedule(tmp_path) == "0.1, /10 at 8,000 and 12,000; 16,000 iterations, batch 128"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 160, "lr": 0.01}) + "\n")
    assert rp.schedule(tmp_path).startswith("0.01 until training error < 80% (never over), then")
    # A run from before a recipe field existed (the committed Fashion-MNIST runs predate
    # lr_policy and warmup_min_depth) reads as that field's default.
    old = {k: v for k, v in asdict(recipe).items() if k not in ("lr_policy", "warmup_min_depth")}
    (tmp_path / "recipe.json").write_text(json.dumps({"model": "resnet56", "recipe": old}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 160, "lr": 0.1}) + "\n")
    assert rp.schedule(tmp_path) == "0.1, /10 at 8,000 and 12,000; 16,000 iterations, batch 128"


def test_fig7_draws_resnet110_without_a_plain_twin():
    exp = ex.Experiment(data="fashion-mnist", out_dir=Path("out"), iterations=100)
    labels = [a.label for a in rp.arms_for("fig7", exp, rp.DEFAULT_DEPTHS["fig7"])]
    assert labels == ["plain-20", "plain-56", "ResNet-20", "ResNet-56", "ResNet-110"]
    assert [a.label for a in rp.arms_for("fig6", exp, [56, 110])] == [
        "plain-56", "plain-110", "ResNet-56", "ResNet-110"]


def test_response_claims_compare_mean_stds():
    responses = {"plain-20": [2.0, 4.0], "plain-56": [1.0, 1.0], "ResNet-20": [1.0, 2.0],
                 "ResNet-56": [1.0, 3.0]}
    assert rp.response_claims(responses) == [
        "- ResNet-20 vs plain-20 (paper: smaller): 1.500 vs 3.000 → agrees",
        "- ResNet-56 vs plain-56 (paper: smaller): 2.000 vs 1.000 → does not agree",
        "- deeper ResNets respond less (ResNet-56 vs ResNet-20, paper: smaller): 2.000 vs 1.500 "
        "→ does not agree",
    ]


def test_a_run_too_short_or_near_chance_is_too_short_to_judge():
    """Issue 38.9: 30 iterations of training error say nothing about the paper's claims."""
    long, short = {"iterations": 8_000}, {"iterations": 30}
    results = [_result("plain-8", 8, 0.10, 0.2) | long, _result("plain-14", 14, 0.2, 0.3) | long]
    assert rp.claims(results)[0].endswith("→ agrees")
    results[1] |= short
    assert rp.claims(results)[0].endswith("→ too short to judge")
    ladder = [_result("ResNet-20", 20, 0.02, 0.12) | long, _result("ResNet-32", 32, 0.01, 0.11)
              | long]
    assert rp.ladder_claims(ladder, num_classes=10)[0].endswith("→ agrees")
    ladder[1]["final_test_error"] = 0.85  # 10 classes: chance is 90%
    assert rp.ladder_claims(ladder, num_classes=10)[0].endswith("→ too short to judge")
    assert rp.ladder_claims(ladder)[0].endswith("→ does not agree")  # classes unknown


def test_a_tiny_schedule_evaluates_and_checkpoints_at_its_end_only():
    r = ex.study_recipe(30, 0)
    assert (r.eval_every, r.checkpoint_every, r.log_interval) == (30, 30, 1)
    assert ex.study_recipe(1_000, 0).eval_every == 100
    assert ex.study_recipe(64_000, 0).eval_every == 3_200  # the committed runs' cadence
