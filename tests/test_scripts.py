"""The scripts under scripts/ still work against today's reslab: each Python script imports
(its reslab names exist) and runs its own functions on tiny inputs; each shell script parses
(`bash -n`) and, with DRY_RUN=1, prints the reslab commands it would run, which must parse with
reslab's own command-line parser. Fast: nothing here trains, benchmarks or reads a real data set."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import make_dataset
from reslab import build_model
from reslab.cli import ArgumentError, build_parser
from reslab.data import DATASETS
from reslab.models import model_family

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PYTHON_SCRIPTS = [
    "bench/allocator/bench_step_faults.py",
    "bench/conv_shapes.py",
    "fashion_mnist/bf16_gradients.py",
    "fashion_mnist/bn_recalibration.py",
    "fashion_mnist/stage1_cost.py",
    "memory/resnet1202.py",
]
SHELL_SCRIPTS = ["bench/allocator/run.sh", "bench/inference.sh", "bench/photos.sh",
                 "bench/run.sh", "bench/torchrun.sh", "cifar10_jpeg.sh", "h200/lib.sh",
                 "h200/run.sh", "h200/table6_64k.sh", "refactor_check.sh"]
MAKE_RUN = ROOT / "results/fashion-mnist/make-run"  # weights the fashion_mnist scripts read


def load(rel: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import scripts/REL as a module, with its folder on sys.path as when run as a script."""
    path = SCRIPTS / rel
    monkeypatch.syspath_prepend(str(path.parent))
    name = "script_" + rel.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """Scripts set torch's thread count for their timings; give the test process its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# What lives where


def test_every_script_is_tested_and_results_hold_no_code():
    found = sorted(str(p.relative_to(SCRIPTS)) for p in SCRIPTS.rglob("*")
                   if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts)
    assert found == sorted(PYTHON_SCRIPTS + SHELL_SCRIPTS), "a script without a test here"
    code = [str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*")
            if p.suffix in (".py", ".sh") and "runs" not in p.relative_to(ROOT).parts]
    assert code == [], "code belongs in scripts/, results/ holds outputs only"


def test_scripts_are_linted():
    """ruff must not skip scripts/ (pyproject's extend-exclude names results only)."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("no ruff beside this Python")
    out = subprocess.run([str(ruff), "check", "--show-files", "scripts"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for rel in PYTHON_SCRIPTS:
        assert str(SCRIPTS / rel) in out, f"ruff does not check scripts/{rel}"


# ---------------------------------------------------------------------------------------------
# Python scripts


def test_bench_step_faults_calls_the_bench_as_it_is(monkeypatch, capsys, keep_threads):
    mod = load("bench/allocator/bench_step_faults.py", monkeypatch)
    real = inspect.signature(mod.time_training)
    calls = []

    def fake_time_training(*args, **kwargs):  # the real one compiles: too slow for a test
        real.bind(*args, **kwargs)  # the script's call fits today's signature
        calls.append(real.bind(*args, **kwargs).arguments)
        return {"images_per_second": 1234.56}

    monkeypatch.setattr(mod, "time_training", fake_time_training)
    mod.main(["fused"])
    assert [c["steps"] for c in calls] == [5, 30]
    setup = calls[0]["setup"]
    assert setup.fused_sgd and setup.compile and setup.precision == "bf16"
    assert calls[0]["images"].shape == (2048, 1, 28, 28)
    mode, result = capsys.readouterr().out.split(" ", 1)
    assert mode == "fused" and json.loads(result)["images_per_second"] == 1234.6
    mod.main(["unfused"])
    assert not calls[-1]["setup"].fused_sgd


def test_conv_shapes_prints_a_row_per_shape_dtype_and_layout(monkeypatch, capsys, keep_threads):
    mod = load("bench/conv_shapes.py", monkeypatch)
    calls = []
    assert mod.median_ms(lambda: calls.append(1), n=3) >= 0 and len(calls) == 5 + 3
    monkeypatch.setattr(mod, "median_ms", lambda fn, n=30: (fn(), 1.0)[1])  # one call, "1 ms"
    monkeypatch.setattr(mod, "SHAPES", [(4, 8, 7, 2)])
    mod.main()
    header, *rows = capsys.readouterr().out.splitlines()
    assert header == mod.HEADER and len(rows) == 4
    assert rows[0].split()[:6] == ["4->", "8", "7x7", "stride", "2", "bfloat16"]
    assert {r.split()[6] for r in rows} == {"CL", "NCHW"}
    # 4x4 outputs x 8 channels x batch 128, 4 x 9 multiply-adds each, in 1 ms: 147 G/s
    assert rows[0].split()[-1] == f"{128 * 8 * 4 * 4 * 4 * 9 / 1e-3 / 1e9:.0f}"


def test_resnet1202_case_runs_one_step_and_main_extrapolates(monkeypatch, capsys):
    mod = load("memory/resnet1202.py", monkeypatch)
    # The subprocess's code, in this process on a small net: build_model takes its options.
    exec(compile(mod.CASE.format(model="resnet20", ckpt=True, batch=2), "CASE", "exec"), {})
    before, peak, seconds = capsys.readouterr().out.split()
    assert int(peak) >= int(before) > 0 and float(seconds) > 0
    monkeypatch.setattr(mod, "measure", lambda ckpt, batch: {
        "gradient_checkpointing": ckpt, "batch_size": batch, "peak_rss_gib": batch / 16})
    mod.main()
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "resnet1202" and len(out["measured"]) == 3
    assert out["no_checkpointing_batch128_estimate_gib"] == pytest.approx(8.0)  # 128 / 16


def _tiny_fashion(name: str, **_) -> object:
    assert name == "fashion-mnist"
    return make_dataset(n_train=64, n_test=20, size=28, classes=10)


def test_bf16_gradients_runs_on_the_make_run_weights(monkeypatch, capsys):
    mod = load("fashion_mnist/bf16_gradients.py", monkeypatch)
    model = build_model("resnet20", in_channels=1)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    mod.wrap_bns(model)
    assert sum(isinstance(m, mod.InFP32) for m in model.modules()) == bns
    # main(): the committed make-run weights (read by load_trained), a tiny data set.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(mod, "load_dataset", _tiny_fashion)
    mod.main(batch=4)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("bf16 autocast")
    errors = ast.literal_eval(lines[0][32:])  # the printed dict: stage -> relative error
    assert set(errors) == {"stem", "layer1", "layer2", "layer3", "fc"}
    assert all(0 < e < 1 for e in errors.values())


def test_bf16_gradients_fp32_against_itself_is_exact(monkeypatch):
    mod = load("fashion_mnist/bf16_gradients.py", monkeypatch)
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    stats = model.bn1.running_mean.clone()
    reference = mod.gradients(model, x, y, bf16=False)
    assert torch.equal(model.bn1.running_mean, stats)  # BN's statistics update undone
    assert set(mod.stage_errors(reference, reference).values()) == {0.0}


def test_bn_recalibration_runs_on_the_make_run_weights(monkeypatch, capsys):
    mod = load("fashion_mnist/bn_recalibration.py", monkeypatch)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bn_recalibration.py"])  # default: the make-run weights
    monkeypatch.setattr(mod, "load_dataset", _tiny_fashion)
    real = mod.recalibrate
    monkeypatch.setattr(mod, "recalibrate", lambda *a, **k: real(*a, **{**k, "batches": 1}))
    mod.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].startswith("as trained, eval fp32: ")
    assert lines[-1].startswith("BN stats re-estimated in bf16, eval bf16: ")
    assert all(ln.endswith("%") for ln in lines)
    model, mean, std, *_ = mod.load_trained(MAKE_RUN)
    real(model, make_dataset(n_train=8, size=28).train_images, mean, std, batches=1, bf16=False)
    bn = model.bn1
    assert bn.momentum is None and int(bn.num_batches_tracked) == 1  # one cumulative batch


def test_stage1_cost_times_both_variants(monkeypatch, capsys):
    mod = load("fashion_mnist/stage1_cost.py", monkeypatch)
    assert mod.InFP32 is sys.modules["bf16_gradients"].InFP32  # the sibling script's
    mod.main(batch=2, steps=1)
    out = capsys.readouterr().out
    assert "'bf16': '" in out and "'bf16 + stage 1 fp32': '" in out and "ratio " in out


# ---------------------------------------------------------------------------------------------
# Shell scripts


@pytest.mark.parametrize("rel", SHELL_SCRIPTS)
def test_shell_script_parses(rel):
    r = subprocess.run(["bash", "-n", str(SCRIPTS / rel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def dry_run(rel: str, tmp_path: Path, cores: int | None = None, **env: str) -> list[list[str]]:
    """Run scripts/REL from the repository root with DRY_RUN=1; the reslab argument lists it
    printed ("+ ARGS"), each checked against reslab's parser (without running anything) as on a
    machine of `cores` cores (the parser bounds --workers by the machine's; default: this one's)."""
    r = subprocess.run(["bash", str(SCRIPTS / rel)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DRY_RUN": "1", "RESLAB": "false", **env},
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    parser = build_parser()
    for argv in commands:
        try:
            with mock.patch("os.cpu_count", return_value=cores or os.cpu_count()):
                args = parser.parse_args(argv)
        except (SystemExit, ArgumentError) as e:
            pytest.fail(f"scripts/{rel}: reslab cannot parse: {shlex.join(argv)} ({e})")
        if getattr(args, "data", None) is not None:  # a known name, or bench photos' folder
            assert args.data in DATASETS or (args.command, args.mode) == ("bench", "photos"), argv
        if args.command in ("train", "bench"):
            model_family(args.model)  # a valid model name
    return commands


def _kinds(commands: list[list[str]]) -> set[tuple[str, str]]:
    return {(c[0], c[1]) for c in commands}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_bench_run_sh_dry_run(tmp_path):
    before = _tree(ROOT / "results/bench")
    commands = dry_run("bench/run.sh", tmp_path)
    assert _tree(ROOT / "results/bench") == before, "DRY_RUN=1 wrote into results/bench"
    assert len(commands) == 7 and _kinds(commands) == {("bench", "train"), ("bench", "infer")}


def test_photos_sh_dry_run(tmp_path):
    before = _tree(ROOT / "results")
    commands = dry_run("bench/photos.sh", tmp_path, PHOTOS=str(tmp_path / "photos"))
    assert _tree(ROOT / "results") == before, "DRY_RUN=1 wrote into results/"
    assert _kinds(commands) == {("data", "bench"), ("bench", "photos")} and len(commands) == 4
    assert not (tmp_path / "photos").exists()  # no files written either


def test_inference_sh_dry_run(tmp_path):
    import reslab.bench.infer

    before = _tree(ROOT / "results")
    r = subprocess.run(["bash", str(SCRIPTS / "bench/inference.sh")], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "DRY_RUN": "1"}, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [line.removeprefix("python: ") for line in r.stdout.splitlines()]
    assert _tree(ROOT / "results") == before and len(calls) == 3
    for call in calls:  # each a function of reslab.bench.infer, called with its arguments
        assert callable(getattr(reslab.bench.infer, call.split("(")[0]))


def test_torchrun_sh_dry_run(tmp_path):
    before = _tree(ROOT / "results")
    commands = dry_run("bench/torchrun.sh", tmp_path, WORK=str(tmp_path / "w"))
    assert _tree(ROOT / "results") == before and not (tmp_path / "w").exists()
    assert len(commands) == 3 and _kinds(commands) == {("train", "resnet20")}


def test_allocator_run_sh_dry_run(tmp_path):
    commands = dry_run("bench/allocator/run.sh", tmp_path, WORK=str(tmp_path), ROUNDS="1")
    assert len(commands) == 6 and _kinds(commands) == {("train", "resnet20")}
    assert list(tmp_path.iterdir()) == []  # no run folder made


def test_cifar10_jpeg_sh_dry_run(tmp_path):
    commands = dry_run("cifar10_jpeg.sh", tmp_path)
    assert _kinds(commands) == {("reproduce", "table6"), ("reproduce", "fig6"),
                                ("reproduce", "fig7")}
    assert all("cifar10-jpeg" in c for c in commands)


def test_h200_run_sh_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    commands = dry_run("h200/run.sh", tmp_path, cores=16, OUT=str(out), WORK=str(work),
                       LANES="abstk", DRY_RUN_CG="--cuda-graphs off", PY="false")
    assert _kinds(commands) == {("reproduce", "table6"), ("reproduce", "fig6"),
                                ("study", "shortcuts"), ("study", "block-depth"),
                                ("bench", "train"), ("bench", "photos"), ("train", "resnet20"),
                                ("data", "bench")}
    assert len(commands) == 13
    training = [c for c in commands if c[0] not in ("bench", "data")]
    assert all(c[c.index("--cuda-graphs") + 1] == "off" for c in training)
    assert not (out / "machine.txt").exists()  # no nvidia-smi, no tests, nothing packed
    # The fallback reads this test's result by name (run.sh: grep "^PASSED.*test_cuda_graphed").
    assert "def test_cuda_graphed" in (ROOT / "tests/test_train.py").read_text()


def test_h200_table6_64k_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    commands = dry_run("h200/table6_64k.sh", tmp_path, cores=16, OUT=str(out), WORK=str(work),
                       PY="false")
    assert _kinds(commands) == {("reproduce", "table6")}
    # ResNet-110 and ResNet-56 first, then ResNet-1202 without torch.compile; the paper's
    # schedule, one depth a command, all in one run pool, cifar10-jpeg.
    assert [c[c.index("--depths") + 1] for c in commands] == ["110", "56", "1202"]
    assert all(c[c.index("--iterations") + 1] == "64000" and c[c.index("--data") + 1]
               == "cifar10-jpeg" and c[c.index("--runs") + 1] == str(work / "runs")
               for c in commands)
    assert commands[2][commands[2].index("--compile") + 1] == "off"
    assert not out.exists() and not work.exists()  # nothing run, nothing written


def _table6_64k(tmp_path: Path, n: int, **env: str) -> tuple[str, Path]:
    """One call of scripts/h200/table6_64k.sh on the CPU with a tiny image folder; its log and
    the run pool it packed, unpacked into tmp_path/seedN."""
    import tarfile

    from conftest import write_image_folder

    data = tmp_path / "data"
    if not data.exists():
        write_image_folder(data, make_dataset(n_train=256, n_test=20, size=32, classes=10,
                                              channels=3))
    out = tmp_path / f"out{n}"
    base = {"DEVICE": "cpu", "DATA": str(data), "DEPTHS": "8", "BIG": "", "PROBE_S": "1",
            "START_S": "1", "PACK_S": "4", "PY": sys.executable, "OMP_NUM_THREADS": "1",
            "RESLAB_DATA": str(tmp_path / "cache"), "OUT": str(out),
            "WORK": str(tmp_path / f"w{n}")}
    r = subprocess.run(["bash", str(SCRIPTS / "h200/table6_64k.sh")], cwd=ROOT, text=True,
                       capture_output=True, timeout=300, env={**os.environ, **base, **env})
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "machine.txt", "probe.json",
                                                     "runs-1.tar.gz"]
    seed = tmp_path / f"seed{n}"
    with tarfile.open(out / "runs-1.tar.gz") as tar:
        tar.extractall(seed, filter="data")
    return (out / "log.txt").read_text(), seed


@pytest.mark.slow
def test_h200_table6_64k_tiny_run_packs_and_reuses(tmp_path):
    """The whole script on the CPU at a tiny schedule: data, probe, a lane, the pack (weights,
    no checkpoints); a second call given the packed folder (SEED_RUNS) trains nothing. Slow
    (~1.5 min here: the data, a probe and a lane for a script the GPU alone runs; its commands
    are checked against the parser by test_h200_table6_64k_dry_run in the default suite)."""
    log, seed = _table6_64k(tmp_path, 1, ITERATIONS="12", LIMIT="200")
    probe = json.loads((tmp_path / "out1/probe.json").read_text())
    assert probe["nets"]["resnet8"]["left"] == 12 and probe["nets"]["resnet8"]["s_per_step"] > 0
    assert "ResNet-8: exit 0" in log and "deadline: SIGTERM" not in log
    run = seed / "resnet8-12it-seed0"
    assert {p.name for p in run.iterdir()} >= {"metrics.jsonl", "recipe.json", "env.json",
                                               "summary.json", "model.safetensors"}
    assert not list(run.glob("checkpoint-*.pt"))
    log, seed2 = _table6_64k(tmp_path, 2, ITERATIONS="12", LIMIT="200", SEED_RUNS=str(seed))
    assert "ResNet-8: finished earlier" in log and "exit" not in log
    assert (seed2 / "resnet8-12it-seed0/summary.json").read_text() == \
        (run / "summary.json").read_text()


@pytest.mark.slow
def test_h200_table6_64k_deadline_stops_and_the_next_call_resumes(tmp_path):
    """The deadline's SIGTERM leaves a checkpoint, packed alone; the next call resumes from it.
    Slow (two calls of about a minute: the lane must reach its training loop first)."""
    log, seed = _table6_64k(tmp_path, 1, ITERATIONS="4000", LIMIT="70")
    assert "deadline: SIGTERM" in log
    run = seed / "resnet8-4000it-seed0"
    checkpoints = sorted(run.glob("checkpoint-*.pt"))
    assert len(checkpoints) == 1 and not (run / "summary.json").exists()
    done = int(checkpoints[0].stem.split("-")[1])
    log, seed = _table6_64k(tmp_path, 2, ITERATIONS="4000", LIMIT="70", SEED_RUNS=str(seed))
    probe = json.loads((tmp_path / "out2/probe.json").read_text())
    assert probe["nets"]["resnet8"]["left"] == 4000 - done
    assert f"from checkpoint-{done:08d}.pt" in (tmp_path / "w2/lane-8.log").read_text()
    newest = sorted((seed / "resnet8-4000it-seed0").glob("checkpoint-*.pt"))
    assert len(newest) == 1 and int(newest[0].stem.split("-")[1]) > done


@pytest.mark.slow
def test_refactor_check_passes_for_the_same_code_twice(tmp_path):
    """Issue 37's behaviour check, with this checkout as both sides: deterministic runs in
    each regime end bitwise equal (a refactor is checked the same way against the old tree)."""
    r = subprocess.run(["bash", str(SCRIPTS / "refactor_check.sh"), str(ROOT), str(ROOT),
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("weights bitwise equal") == 2, r.stdout

