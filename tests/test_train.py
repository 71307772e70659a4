"""The training engine: the schedule, a tiny end-to-end run, resume == uninterrupted bit for bit,
`reslab eval` == the logged test error, and a clear error for each bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, write_image_folder
from reslab.cli import main
from reslab.data import cifar10_jpeg_folder
from reslab.recipes import RECIPES, Recipe, get_recipe, learning_rate
from reslab.train import RunFolderError, RunSpec, TrainOptions, train

TINY = replace(Recipe(), batch_size=16, eval_every=10, checkpoint_every=10, log_every=2)


def test_paper_schedule_and_scaling():
    r = RECIPES["cifar10"]
    assert (r.lr, r.momentum, r.weight_decay, r.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (r.iterations, r.milestones) == (64_000, (32_000, 48_000))
    trace = {s: learning_rate(r, s) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
    assert trace == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
                                   48_000: 0.001, 63_999: 0.001})
    short = r.with_iterations(8_000)
    assert short.milestones == (4_000, 6_000) and short.iterations == 8_000
    assert r.with_epochs(30, 60_000).iterations == 14_063  # ceil(30 * 60000 / 128)
    assert learning_rate(r, 10, warming_up=True) == 0.01
    assert learning_rate(r, 40_000, warming_up=True) == pytest.approx(0.01)


@pytest.mark.parametrize("field,value,match", [
    ("lr", -0.1, "lr must be > 0"), ("iterations", 0, "iterations must be >= 1"),
    ("batch_size", 0, "batch size"), ("precision", "fp8", "precision"),
    ("milestones", (5, 3), "milestones must be positive and increase"),
    ("lr", float("inf"), "lr must be a finite number"),
    ("weight_decay", float("nan"), "weight-decay must be a finite number"),
])
def test_bad_recipe_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        replace(Recipe(), **{field: value})
    with pytest.raises(ValueError, match="unknown recipe 'x'; valid: cifar10"):
        get_recipe("x")


def _spec(**recipe) -> RunSpec:
    return RunSpec(model="resnet8", data="synthetic", recipe=replace(TINY, **recipe))


def test_warmup_is_a_condition_not_a_count(tmp_path, tiny_data):
    # resnet110's warm-up on the tiny set: lr 0.01 until the training error is below 80%.
    spec = RunSpec(model="resnet8", data="synthetic",
                   recipe=replace(TINY, iterations=30, warmup_min_depth=8, warmup_window=4,
                                  warmup_until_error=0.6))
    train(spec, tmp_path / "run", data=tiny_data, options=TrainOptions(tensorboard=False))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.01 and 0.1 in lrs
    switch = lrs.index(0.1)
    assert all(lr == 0.01 for lr in lrs[:switch])
    # The record whose iterations hold the warm-up's end names it (a record's lr is its last
    # iteration's, so that is the first record at 0.1 or the one before).
    [(at, ended)] = [(i, r["warmup_over_at"]) for i, r in enumerate(records)
                     if "warmup_over_at" in r]
    assert at in (switch - 1, switch)
    assert (records[at - 1]["step"] if at else 0) < ended <= records[at]["step"]
    spec_off = replace(spec, recipe=replace(spec.recipe, warmup_until_error=0.0))
    train(spec_off, tmp_path / "never", data=tiny_data, options=TrainOptions(tensorboard=False))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "never/metrics.jsonl").open()]
    assert set(lrs) == {0.01}  # never below 0% error: the warm-up never ends
    assert not any("warmup_over_at" in json.loads(line)
                   for line in (tmp_path / "never/metrics.jsonl").open())


def test_warmup_min_depth_from_the_command_line(tmp_path):
    # --warmup-min-depth 8 gives resnet8 ResNet-110's warm-up; by default it starts at lr 0.1.
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=32, n_test=9))
    first_lr = {}
    for depth in (None, 8):
        run = tmp_path / f"warmup-{depth}"
        extra = [] if depth is None else ["--warmup-min-depth", str(depth)]
        assert main(["train", "resnet8", "--data", str(folder), "--out", str(run),
                     "--iterations", "4", "--batch-size", "16", "--log-every", "1",
                     "--no-progress", *extra]) == 0
        first_lr[depth] = json.loads((run / "metrics.jsonl").open().readline())["lr"]
        recipe = json.loads((run / "recipe.json").read_text())["recipe"]
        assert recipe["warmup_min_depth"] == (110 if depth is None else depth)
    assert first_lr == {None: 0.1, 8: 0.01}


def test_tiny_end_to_end_run_folder_and_eval(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    summary = train(_spec(iterations=40), run, data=tiny_data)
    for name in ("recipe.json", "env.json", "metrics.jsonl", "model.safetensors",
                 "summary.json"):
        assert (run / name).exists(), name
    assert list(run.glob("checkpoint-*.pt")) and list((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    evals = [r for r in records if "test_error" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert {"step", "lr", "train_loss", "train_error", "test_error"} <= set(evals[-1])
    assert summary["final_test_error"] == evals[-1]["test_error"]
    assert summary["final_test_error"] < 0.5  # 3 learnable classes: far below chance (67%)
    # `reslab eval` on the run equals the last logged test error.
    folder = write_image_folder(tmp_path / "imgs", tiny_data)
    from reslab.data import load_dataset
    from reslab.evaluate import evaluate
    from reslab.train import load_trained

    model, mean, std, spec, *_ = load_trained(run)
    err, loss = evaluate(model, tiny_data.test_images, tiny_data.test_labels, mean, std,
                         precision=spec.recipe.precision, memory_format=torch.channels_last)
    assert err == evals[-1]["test_error"] and loss == pytest.approx(evals[-1]["test_loss"])
    # The folder holds the same test images (in class order); the error does not depend on order.
    assert load_dataset(str(folder)).test_labels.bincount().tolist() == [14, 13, 13]
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_error"] == evals[-1]["test_error"]
    assert out["precision"] == spec.recipe.precision
    # One record for every data source (issue 37): a streamed folder's keys (test_imagenet.py).
    assert set(out) == {"test_error", "test_top5_error", "test_loss", "protocol", "images",
                        "skipped", "model", "precision", "data"}
    assert (out["protocol"], out["test_top5_error"], out["skipped"]) == ("single view", None, 0)
    other = "fp32" if spec.recipe.precision == "bf16" else "bf16"
    assert main(["eval", str(run), "--data", str(folder), "--json", "--precision", other]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == other and abs(out["test_error"] - evals[-1]["test_error"]) <= 0.1


def test_finished_run_says_so_and_different_recipe_is_refused(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    train(_spec(iterations=20), run, data=tiny_data, options=TrainOptions(tensorboard=False))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    train(_spec(iterations=20), run, data=tiny_data, options=TrainOptions(tensorboard=False))
    assert "is finished" in capsys.readouterr().out
    with pytest.raises(RunFolderError, match="lr: 0.1 there, 0.05 now"):
        train(_spec(iterations=20, lr=0.05), run, data=tiny_data,
              options=TrainOptions(tensorboard=False))
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert before == after


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reslab", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"run never reached step {step}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_after_stop_equals_uninterrupted(tmp_path, sig):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=64, size=16))
    args = ["resnet8", "--data", str(folder), "--iterations", "60", "--batch-size", "16",
            "--checkpoint-every", "7", "--eval-every", "20", "--log-every", "1",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = _cli("train", *args, "--out", str(tmp_path / "ref"), env=env)
    assert ref.wait(300) == 0, ref.communicate()
    proc = _cli("train", *args, "--out", str(tmp_path / "cut"), env=env)
    _wait_for_step(tmp_path / "cut", 25, proc)
    proc.send_signal(sig)
    code = proc.wait(60)
    out, err = proc.communicate()
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and "Resume with the same command" in err, err
    else:
        assert code == -signal.SIGKILL
    assert not (tmp_path / "cut/model.safetensors").exists()
    resumed = _cli("train", *args, "--out", str(tmp_path / "cut"), env=env)
    assert resumed.wait(300) == 0, resumed.communicate()
    assert "resuming" in resumed.communicate()[0]
    a = load_file(str(tmp_path / "ref/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").open()]
    assert steps == list(range(1, 61))  # no duplicated or missing records after resume


def test_bad_inputs_exit_2_before_any_work(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=30, n_test=9))
    base = ["train", "resnet8", "--out", str(tmp_path / "r"), "--iterations", "5"]
    assert main([*base, "--data", "imagenette"]) == 2
    err = capsys.readouterr().err
    assert "fashion-mnist" in err and "cifar10" in err
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main([*base, "--data", str(folder), "--num-classes", "2"]) == 2
    assert "--num-classes 3" in capsys.readouterr().err
    assert main([*base, "--data", str(folder), "--in-channels", "3"]) == 2
    assert "1-channel" in capsys.readouterr().err
    assert main([*base, "--data", str(folder), "--batch-size", "64"]) == 2
    assert "larger than the 30 training images" in capsys.readouterr().err
    assert main([*base, "--data", str(folder), "--lr", "-1"]) == 2
    assert "argument --lr: must be > 0 (got -1)" in capsys.readouterr().err
    assert main([*base, "--data", str(folder), "--shortcut", "D"]) == 2  # argparse: exit 2
    assert not (tmp_path / "r").exists()  # more in tests/test_cli_errors.py


def test_reslab_train_from_python_is_the_command(tmp_path, capsys):
    """reslab.train(model, *, data, out, **options) (issue 37, DESIGN's contract): the CLI's
    long option names as keywords, the same run bit for bit, the CLI's errors raised."""
    import reslab

    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=64, n_test=16))
    options = ["--iterations", "4", "--batch-size", "16", "--deterministic", "--no-progress"]
    assert main(["train", "resnet8", "--data", str(folder), "--out", str(tmp_path / "cli"),
                 *options]) == 0
    for attempt in ("python", "again"):  # the second call: reslab.train is still callable
        out = reslab.train("resnet8", data=folder, out=tmp_path / attempt, iterations=4,
                           batch_size=16, deterministic=True, no_progress=True, sync_bn=False)
        assert out == tmp_path / attempt
        assert (out / "model.safetensors").read_bytes() == \
            (tmp_path / "cli" / "model.safetensors").read_bytes()
        assert (out / "metrics.jsonl").read_text() == (tmp_path / "cli/metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"argument --iterations: must be >= 1 \(got 0\)"):
        reslab.train("resnet8", data=folder, out=tmp_path / "bad", iterations=0)
    with pytest.raises(ValueError, match=r"depth 7 of 'resnet7' is not 6n\+2"):
        reslab.train("resnet7", data=folder, out=tmp_path / "bad")
    with pytest.raises(TypeError, match="unexpected keyword argument 'iteration'.*iterations"):
        reslab.train("resnet8", data=folder, out=tmp_path / "bad", iteration=4)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_real_fashion_mnist_smoke(tmp_path):
    """A few hundred iterations of the real recipe on real data (the main job, shortened): an
    accuracy gate, so `slow` (~40 s here); the default suite reads the real Fashion-MNIST in
    test_predict.py and the real JPEG copy in test_pretrained.py."""
    run = tmp_path / "run"
    code = main(["train", "resnet8", "--data", "fashion-mnist", "--out", str(run),
                 "--iterations", "300", "--eval-every", "300", "--no-progress"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_error"] < 0.25, summary


# The CIFAR-10 JPEG copy is not downloadable: a user's machine may lack it, CI extracts it.
_NO_CIFAR10_JPEG = cifar10_jpeg_folder() is None and not os.environ.get("CI")


@pytest.mark.slow
@pytest.mark.skipif(_NO_CIFAR10_JPEG, reason="no CIFAR-10 JPEG copy here: `make data "
                    "CIFAR10_JPEG=PATH/cifar10-jpeg.tar.gz` extracts it (with CI set, it fails)")
def test_real_cifar10_jpeg_smoke(tmp_path):
    """A few hundred iterations of the paper's recipe on the CIFAR-10 JPEG copy, then `reslab
    eval` of the run: the data path (`--data cifar10-jpeg`) end to end; an accuracy gate, so
    `slow` (~50 s here; the default suite reads the copy in test_pretrained.py)."""
    run = tmp_path / "run"
    code = main(["train", "resnet8", "--data", "cifar10-jpeg", "--out", str(run),
                 "--iterations", "300", "--eval-every", "300", "--no-progress"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["data"] == "cifar10-jpeg" and summary["data"] == "cifar10-jpeg"
    assert summary["final_test_error"] < 0.7, summary  # chance is 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_steps_equal_eager_steps(tmp_path, tiny_data):
    """The whole step as one CUDA graph (step.GraphedStep) trains as the eager loop does,
    through warm-up, captures at each new learning rate (milestones) and a warm-up condition."""
    spec = RunSpec(model="resnet8", data="synthetic",
                   recipe=replace(TINY.with_iterations(40), warmup_min_depth=8,
                                  warmup_window=4, warmup_until_error=0.6))
    runs = {}
    for graphs in (False, True):
        run = tmp_path / f"graphs-{graphs}"
        train(spec, run, data=tiny_data, options=TrainOptions(
            device="cuda", cuda_graphs=graphs, compile_model=False, tensorboard=False,
            deterministic=True))
        runs[graphs] = ([json.loads(line) for line in (run / "metrics.jsonl").open()],
                        load_file(run / "model.safetensors"))
    (eager, eager_w), (graphed, graphed_w) = runs[False], runs[True]
    assert [r["lr"] for r in graphed] == [r["lr"] for r in eager]
    assert len({r["lr"] for r in eager}) >= 3  # warm-up, 0.1 and a milestone: recaptures
    for a, b in zip(eager, graphed, strict=True):
        assert a["train_error"] == pytest.approx(b["train_error"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for k in eager_w:
        assert torch.allclose(eager_w[k].float(), graphed_w[k].float(), rtol=1e-4, atol=1e-5), k


def test_cuda_graphs_need_a_cuda_device(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        train(_spec(iterations=4), tmp_path / "run", data=tiny_data,
              options=TrainOptions(device="cpu", cuda_graphs=True, tensorboard=False))


def test_off_a_terminal_a_run_prints_a_line_per_log_interval(tmp_path, tiny_data, capsys):
    """Issue 38.11: nohup, CI or a pipe see the run progress (no tqdm bar off a terminal)."""
    folder = write_image_folder(tmp_path / "imgs", tiny_data)
    base = ["train", "resnet8", "--data", str(folder), "--iterations", "12", "--log-every", "3",
            "--eval-every", "6", "--batch-size", "16"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0  # stderr is no terminal here
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("iteration ")]
    paced = [line for line in lines if "images/s" in line]
    assert [line.split()[1] for line in paced] == ["3/12", "9/12"]  # 6 and 12 evaluate
    assert all(" lr 0.1 " in paced[0] and " loss " in line and line.endswith(" left")
               for line in paced)
    assert len(lines) == 4
    assert main([*base, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "images/s" not in capsys.readouterr().out  # asked for quiet: evaluations only
