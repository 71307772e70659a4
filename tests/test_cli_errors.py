"""Every error a user can cause exits 2 with one line naming the value and the fix, writes
nothing, and never shows a traceback (issue 23, items 1, 2 and 6): a table of bad invocations,
a closed output pipe, Ctrl-C during start-up, and help text with every option's default."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reslab.data
from conftest import make_dataset, write_image_folder
from reslab.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """Everything under `path` (names and bytes), to show a command left it as it was."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def places(tmp_path_factory, finished):
    """Paths the table's --out values refer to: a file, a folder of someone's files, a run."""
    root = tmp_path_factory.mktemp("places")
    (root / "a-file").write_text("the user's notes\n")
    (root / "photos").mkdir()
    (root / "photos" / "holiday.jpg").write_bytes(b"not ours")
    other = write_image_folder(root / "other-classes", make_dataset(n_train=12, n_test=6))
    for split in ("train", "test"):  # the same images and shapes under other class names
        for i, name in enumerate(("c0", "c1", "c2")):
            (other / split / name).rename(other / split / f"kind{i}")
    run = root / "run"  # 20 iterations, lr divided at 10 and 15, as the command line trains it
    assert main(["train", "resnet8", "--data", str(finished.folder), "--out", str(run),
                 "--iterations", "20", "--batch-size", "16", "--no-progress"]) == 0
    # Weights whose metadata was edited, tensors and digest intact (issue 38, item 4).
    _edited(run / "model.safetensors", root / "no-size.safetensors", input_size=[0, -3])
    _edited(run / "model.safetensors", root / "few-names.safetensors", classes=["c0", "c1"])
    return {"file": root / "a-file", "photos": root / "photos", "run": run,
            "data": finished.folder, "other": other, "no_size": root / "no-size.safetensors",
            "few_names": root / "few-names.safetensors",
            "image": sorted((finished.folder / "test" / "c0").iterdir())[0]}


def _edited(weights: Path, out: Path, **changes) -> None:
    """A copy of `weights` with its reslab metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads(f.metadata()["reslab"])
    save_file(load_file(str(weights)), str(out),
              metadata={"reslab": json.dumps({**meta, **changes})})


TRAIN = ["train", "resnet8", "--data", "{data}", "--out", "{new}", "--iterations", "2",
         "--batch-size", "16", "--no-progress"]
EVAL = ["eval", "{run}", "--data", "{data}", "--device", "cpu"]
EXPORT = ["export", "{run}", "--format", "onnx", "--out", "{new}.onnx"]

# (arguments, what the one line must say, the path that must be left as it was)
BAD_INVOCATIONS = [
    ([*TRAIN, "--bogus"], "unrecognized arguments: --bogus", "{new}"),
    ([*TRAIN, "--iterations", "0"], "argument --iterations: must be >= 1 (got 0)", "{new}"),
    ([*TRAIN, "--lr", "-0.1"], "argument --lr: must be > 0 (got -0.1)", "{new}"),
    ([*TRAIN, "--lr", "nan"], "argument --lr: must be a finite number (got nan)", "{new}"),
    ([*TRAIN, "--lr", "inf"], "argument --lr: must be a finite number (got inf)", "{new}"),
    ([*TRAIN, "--lr", "fast"], "argument --lr: 'fast' is not a number", "{new}"),
    ([*TRAIN, "--weight-decay", "nan"], "argument --weight-decay: must be a finite", "{new}"),
    (["train", "resnet8", "--data", "{data}", "--out", "{new}", "--epochs", "inf"],
     "argument --epochs: must be a finite number (got inf)", "{new}"),
    ([*TRAIN, "--checkpoint-every", "0"], "argument --checkpoint-every: must be >= 1", "{new}"),
    ([*TRAIN, "--skip-nonfinite", "-1"], "argument --skip-nonfinite: must be >= 0", "{new}"),
    ([*TRAIN, "--warmup-min-depth", "-1"], "argument --warmup-min-depth: must be >= 0",
     "{new}"),
    ([*TRAIN, "--batch-size", "0"], "argument --batch-size: must be >= 1 (got 0)", "{new}"),
    ([*TRAIN, "--batch-size", "1000"],
     "batch size 1000 is larger than the 96 training images; use a smaller --batch-size", "{new}"),
    ([*TRAIN, "--num-classes", "2"], "labels up to 2 but the model has 2 classes", "{new}"),
    ([*TRAIN, "--in-channels", "3"], "--in-channels 3 but", "{new}"),
    ([*TRAIN, "--val-split", "96"], "--val-split 96 leaves no training images", "{new}"),
    ([*TRAIN, "--device", "tpu"], "--device 'tpu' is not a device name", "{new}"),
    ([*TRAIN, "--device", "cuda:99"], "--device cuda:99: this machine has", "{new}"),
    ([*TRAIN, "--device", "cpu", "--cuda-graphs", "on"], "CUDA graphs need a CUDA device",
     "{new}"),
    ([*TRAIN, "--recipe", "fast"], "unknown recipe 'fast'; valid: cifar10, quick", "{new}"),
    ([*TRAIN, "--epochs", "1"], "give --iterations or --epochs, not both", "{new}"),
    ([*TRAIN, "--milestones", "5", "3"], "milestones must be positive and increase (got 5 3)",
     "{new}"),
    ([*TRAIN, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'", "{new}"),
    (["train", "resnet9", *TRAIN[2:]], "depth 9 of 'resnet9' is not 6n+2", "{new}"),
    (["train", "resnet50", *TRAIN[2:], "--layers-per-block", "2"],
     "--layers-per-block 2 does not fit resnet50", "{new}"),
    (["train", "plain20", *TRAIN[2:], "--shortcut", "B"],
     "plain20 is a plain net (no shortcuts); use --shortcut none", "{new}"),
    (["train", "resnet8", "--data", "no-such-data", *TRAIN[4:]], "unknown dataset 'no-such-data'",
     "{new}"),
    ([*TRAIN[:5], "{file}", *TRAIN[6:]], "--out {file} is a file, not a folder", "{file}"),
    ([*TRAIN[:5], "{file}/run", *TRAIN[6:]], "{file} is a file, so the folder cannot be created",
     "{file}"),
    ([*TRAIN[:5], "{photos}", *TRAIN[6:]], "--out {photos} is a folder of other files "
     "(holiday.jpg), not a run folder", "{photos}"),
    ([*TRAIN[:5], "/proc/reslab-test/run", *TRAIN[6:]], "--out /proc/reslab-test/run cannot be "
     "created", "{new}"),
    ([*TRAIN[:5], "{run}", "--iterations", "20", "--batch-size", "16", "--lr", "0.05"],
     "{run} holds a different run (recipe.lr: 0.1 there, 0.05 now); nothing was overwritten",
     "{run}"),
    ([*TRAIN[:5], "{run}", "--iterations", "40", "--batch-size", "16"],
     "To extend it, keep its milestones (--iterations 40 --milestones 10 15)", "{run}"),
    ([*TRAIN[:5], "{run}", "--iterations", "10", "--batch-size", "16"],
     "a shorter run (10) is another run", "{run}"),
    (["eval", "{new}", "--data", "{data}"], "no model.safetensors at {new}", "{new}"),
    ([*EVAL[:4], "--device", "tpu"], "--device 'tpu' is not a device name", "{run}"),
    ([*EVAL[:3], "{other}", *EVAL[4:]], "{other}'s class 0 is 'kind0' but {run} was trained with "
     "'c0' as class 0", "{run}"),
    (["info", "resnet9"], "depth 9 of 'resnet9' is not 6n+2", "{new}"),
    (["info", "resnet20", "--input-size", "0"], "argument --input-size: must be >= 1", "{new}"),
    (["reproduce", "table6", "--data", "{data}", "--out", "{new}", "--seeds", "0"],
     "argument --seeds: must be >= 1 (got 0)", "{new}"),
    (["bench", "train", "resnet20", "--steps", "0"], "argument --steps: must be >= 1", "{new}"),
    # Issue 38. 1: an export replaces no file it did not create, and never the run's own.
    (EXPORT[:4] + ["--out", "{run}/model.safetensors"], "--out {run}/model.safetensors is the "
     "weights being exported; give another path", "{run}"),
    (EXPORT[:4] + ["--out", "{run}/metrics.jsonl", "--overwrite"], "{run}/metrics.jsonl is one "
     "of the run folder's own files, which an export never replaces", "{run}"),
    (EXPORT[:4] + ["--out", "{file}"], "{file} exists; give another --out, or --overwrite to "
     "replace it", "{file}"),
    (EXPORT[:4] + ["--out", "{photos}/holiday.jpg"], "{photos}/holiday.jpg exists; give another "
     "--out, or --overwrite", "{photos}"),
    # 2: worker counts bounded by the machine.
    ([*TRAIN, "--workers", "1000"], f"argument --workers: 1000 is more worker processes than "
     f"this machine's {os.cpu_count()} cores; give 0 to {os.cpu_count()}", "{new}"),
    (["data", "check", "{data}", "--workers", "1000"], "argument --workers: 1000 is more",
     "{data}"),
    # 4: metadata validated like a command-line value.
    (["export", "{no_size}", "--format", "onnx", "--out", "{new}.onnx"], "its input_size [0, -3] "
     "is not an image size resnet8 can take: two sides (H W) of 4 to 4096", "{new}.onnx"),
    (["predict", "{no_size}", "{image}"], "its input_size [0, -3] is not an image size", "{new}"),
    (["predict", "{few_names}", "{image}"], "2 class names for 3 outputs", "{new}"),
    # 5: --input-size bounded both ways.
    (EXPORT + ["--input-size", "100000", "100000"], "--input-size 100000 100000 is not an image "
     "size resnet8 can take: two sides (H W) of 4 to 4096 pixels", "{new}.onnx"),
    (EXPORT + ["--input-size", "1", "1"], "--input-size 1 1 is not an image size", "{new}.onnx"),
    # 7: predict's arguments swapped, a bad image, its own .pt2 (test_export), weights that are
    # an image.
    (["predict", "{image}", "{run}"], "{image} is an image, not a model: the model comes first",
     "{run}"),
    (["predict", "{run}", "{photos}/holiday.jpg"], "cannot decode image {photos}/holiday.jpg: ",
     "{photos}"),
    (["eval", "{image}", "--data", "{data}"], "{image} is an image, not a weights file", "{new}"),
    # 8: --freeze naming nothing.
    ([*TRAIN, "--freeze", ","], "--freeze ',' names no part; give some of stem, conv2_x", "{new}"),
    # 15-16: reslab torchrun's own arguments (its runs: tests/test_distributed.py).
    (["torchrun", "--nproc-per-node"], "argument --nproc-per-node/--nproc_per_node: expected one "
     "argument", "{new}"),
    (["torchrun", "--nproc-per-node", "2"], "no reslab command after torchrun's options", "{new}"),
]


@pytest.mark.parametrize("argv,says,untouched", BAD_INVOCATIONS,
                         ids=[" ".join(a[2:5] if a[0] == "train" else a[:3]) + f"-{i}"
                              for i, (a, _, _) in enumerate(BAD_INVOCATIONS)])
def test_bad_invocation_exits_2_with_one_line_and_touches_nothing(argv, says, untouched, places,
                                                                  tmp_path, capsys):
    names = {**places, "new": tmp_path / "new-run"}
    argv = [a.format(**names) for a in argv]
    path = Path(untouched.format(**names))
    before = _snapshot(path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line: no usage block, no warning, no traceback
    assert lines[0].startswith("reslab") and ": error: " in lines[0]
    assert says.format(**names) in lines[0]
    assert _snapshot(path) == before


def test_the_corrected_command_works_after_a_failed_start(places, tmp_path, capsys):
    """A start that failed after the run folder's lock was taken (the data did not fit) leaves
    no folder behind, so the corrected command simply runs."""
    run = tmp_path / "run"
    argv = [a.format(data=places["data"], new=run) for a in TRAIN]
    assert main([*argv, "--batch-size", "1000"]) == 2
    assert not run.exists()
    assert main(argv) == 0
    assert "final test error" in capsys.readouterr().out


def test_ctrl_c_while_the_data_loads_writes_nothing(places, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reslab.data, "open_data", interrupted)
    run = tmp_path / "run"
    assert main([a.format(data=places["data"], new=run) for a in TRAIN]) == 128 + signal.SIGINT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "interrupted (Ctrl-C)" in err[0]
    assert not run.exists()


def _reslab(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "reslab", *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_output_closed_early_is_one_line_not_a_traceback():
    read, write = os.pipe()
    os.close(read)  # like `reslab info --all | head -0`: every write meets a closed pipe
    proc = _reslab("info", "--all", stdout=write)
    os.close(write)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.splitlines() == ["reslab info: error: the output was closed before it was all "
                                "written (e.g. by head); a run folder resumes with the same "
                                "command"]


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(places, tmp_path):
    run = tmp_path / "run"
    proc = _reslab(*[a.format(data=places["data"], new=run) for a in TRAIN],
                   stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # torch is still being imported: nothing has been checked or written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err.splitlines()[-1]
    assert not run.exists()


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in _options(sub):
                    yield f"{name} {a[0]}", a[1]
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield action.option_strings[0] if action.option_strings else action.dest, action


def test_every_option_says_what_it_does_and_its_default():
    seen = 0
    for name, action in _options(build_parser()):
        assert action.help, f"{name} has no help text"
        if action.option_strings:  # positionals have no default to state
            assert "default" in action.help or action.required, f"{name}: {action.help!r}"
            if action.required:
                assert "(required)" in action.help, name
        seen += 1
    assert seen > 60  # every subcommand's options were walked


@pytest.mark.parametrize("argv,flag", [
    (["bench", "onnx", "resnet20", "--input-size", "64"], "--input-size"),
    (["bench", "infer", "resnet20", "--steps", "3"], "--steps"),
    (["bench", "train", "resnet20", "--threads", "2"], "--threads"),
    (["bench", "train", "resnet20", "--workers", "1"], "--workers"),
])
def test_bench_refuses_an_option_its_mode_does_not_use(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"does not use {flag}; omit it" in err[0]
