"""The README's doc test: every command block of README.md runs, on tiny generated data.

Which blocks run (the rule). README.md's fenced blocks (```...```) are read in order:

- a ```python block is Python: it is executed (with the substitutions of PYTHON_SUBSTITUTIONS);
- any other block is a *command block* when every logical line (backslash continuations joined,
  ``#`` comments dropped) starts with a word of COMMANDS (reslab, torchrun, srun, make, pip,
  python). Each of its commands is run (RUNNERS, per command word), in a reduced form that says
  why (torchrun on 2 ranks with gloo, ``make -n``; REDUCE: fewer arms), run only under
  ``-m slow`` (SLOW, each with its measured cost), or listed in LISTED with the reason it cannot
  run here; a command word without a runner fails the test until it is run or listed;
- a block with no command line must be listed in NOT_COMMANDS (an output listing, the layout)
  by its first line; a block that mixes commands and other lines, or an unlisted block, fails.

So a new command block is run automatically or fails the test until it is listed; a LISTED or
NOT_COMMANDS entry that the README no longer has fails too (no stale reasons).

Every command runs in one temporary folder, in the README's order (later examples use the runs
of earlier ones, as a reader following the README would), with the data names and paths the
README uses mapped onto tiny generated equivalents (DATA_TABLE) and long schedules shrunk
(SHRINK), and must exit as the README says (0 unless EXIT says otherwise). ``reslab`` commands
run in-process through ``reslab.cli.main`` (the console script's entry point) so the whole test
takes about 100 s on this loaded 2-core machine (the `slow` variant adds SLOW: many minutes);
torchrun and make run as subprocesses on this checkout's code.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_data import write_cifar, write_cifar10_jpeg
from test_imagenet import photo_tree

from conftest import make_dataset, write_image_folder
from reslab.cli import BENCH_USES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

COMMANDS = ("reslab", "torchrun", "srun", "make", "pip", "python")

# Blocks that hold no command, by their first line, and what they are.
NOT_COMMANDS = {
    "iteration 4500/4500  lr 0.001  train error 8.61%  test error 8.35%":
        "the output `make run` prints (a listing, not a command)",
    "reslab/blocks.py       the blocks: F(x) merged with its shortcut (options A/B/C, mappings)":
        "the source layout (file names and what they hold)",
}

# Commands that cannot run here, exactly as the README writes them (comments dropped), and why.
LISTED = {
    "pip install .":
        "installs into the interpreter running the tests; tests/test_wheel.py (-m slow) builds "
        "the wheel and installs it with its dependencies into a fresh virtual environment, which "
        "trains, evaluates and predicts",
    "srun --nodes 2 --ntasks-per-node 1 reslab torchrun --nnodes 2 --nproc-per-node 8 "
    "--rdzv-backend c10d --rdzv-endpoint $(scontrol show hostnames | head -1):29400 --rdzv-id "
    "$SLURM_JOB_ID train resnet50 --data ~/imagenet --out runs/in50 --recipe imagenet":
        "needs a SLURM cluster; the command it starts on each node is the README's two-node "
        "c10d form, which runs here reduced (two agents on localhost)",
}

# Commands that run only under `-m slow`, with the reason: each costs minutes here whatever its
# size, in fixed work that no option shrinks (measured on this 2-core machine, loaded). The slow
# variant of the runner test runs them (after everything else, in the README's order).
SLOW = {
    "reslab info --all":
        "45-95 s: counting the LSTM twins' multiply-adds through torch's FlopCounterMode",
    "reslab bench train resnet20":
        "2+ min: matmul peak probes, the tutorial reference and the ablation's torch.compile",
    "reslab bench train resnet50 --device cuda --no-ablation":
        "2.5-3.5 min even at --steps 2 --batch-size 2 --input-size 32 (probes, references)",
    "reslab bench infer resnet50 --batch-size 32": "every inference path of ResNet-50 at 224",
    "reslab bench onnx resnet50": "ONNX export and every inference path of ResNet-50 at 224",
    "reslab torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
    "HOST:29400 --rdzv-id in50 train resnet50 --data ~/imagenet --out runs/in50 --recipe "
    "imagenet":
        "two agents and two workers starting torch on 2 cores, ~35 s; the default suite's "
        "tests/test_distributed.py trains with two agents on localhost the same way",
}

# A reduction beyond SHRINK for one command (its arms), and why.
REDUCE = {
    "reslab reproduce table3 --data ~/imagenet --out out/table3": (
        ["--depths", "50"], "one arm (ResNet-50) of the seven: all seven at 224 take 2.5 min"),
    "reslab study shortcuts --data fashion-mnist --out out/shortcuts --iterations 8000": (
        ["--depths", "20"], "the seven mappings at depth 20 only (56 as well doubles its time)"),
    "reslab study block-depth --data fashion-mnist --out out/blocks --iterations 8000": (
        ["--depths", "20"], "k = 1, 2, 3 and the plain twin at depth 20 (2.5x faster than 56)"),
}

# The exit status the README gives a command, where it is not 0, by (command, occurrence).
EXIT = {
    # "reslab export runs/r20 --format onnx  # runs/r20/model.onnx (again: --overwrite)": the
    # quickstart wrote the file, so the README's second export refuses it (exit 2); the test
    # then runs it again with --overwrite, as that comment says.
    ("reslab export runs/r20 --format onnx", 2): 2,
}

# The files a command's comment (or its own options) says it writes, checked after it runs.
WRITES = {
    "reslab export runs/r20 --format onnx": ["runs/r20/model.onnx"],
    "reslab export runs/r20 --format torch-export": ["runs/r20/model.pt2"],
    "reslab predict runs/r20 test/ --json --features f.npy": ["f.npy", "f.txt"],
}

# The data names and paths the README uses -> what the test generates in their place (ROOT is
# the temporary folder the commands run in; $HOME and $RESLAB_DATA point into it).
DATA_TABLE = {
    "fashion-mnist": "kept: tiny IDX files (10 classes, 28x28, 80 + 40 images) in "
                     "$RESLAB_DATA/fashion-mnist, where reslab looks first",
    "cifar10": "kept: the official python-version batches, 10 x 8 images per split "
               "(test_data.write_cifar), in $RESLAB_DATA/cifar10",
    "cifar10-jpeg": "kept: the copy's layout with 2 + 1 JPEGs per class (test_data."
                    "write_cifar10_jpeg) in $RESLAB_DATA/cifar10-jpeg; the copy's expected "
                    "sizes are patched to (20, 10) in-process",
    "~/imagenet, ~/flowers": "photo trees (test_imagenet.photo_tree: 3 classes, 70-140 px "
                             "JPEGs, 4 + 1 per class), streamed as photographs are",
    "~/mine, ~/three-classes": "RGB ImageFolders of 12 px images, 3 classes (conftest."
                               "make_dataset + write_image_folder), held in memory",
    "photos/": "a photo tree of 2 + 1 JPEGs per class (its train/ and val/ are searched)",
    "test/": "an ImageFolder test split of 28x28 grey PNGs in folders named after "
             "Fashion-MNIST's classes",
    "shoe.png, cat.jpg": "a 28x28 grey PNG; a 120x90 RGB JPEG",
    "resnet50-0676ba61.pth": "a seeded torchvision ResNet-50 state dict in ROOT, and the same "
                             "file in $TORCH_HOME/hub/checkpoints for the torchvision: names",
    "HOST:29400": "127.0.0.1:<a free port>",
}

# How long schedules and big settings shrink, per reslab subcommand: (option, value) pairs set
# (replaced, or added when absent). Nothing else of a command changes.
SHRINK = {
    "train": [("--iterations", "2"), ("--batch-size", "2"), ("--workers", "0")],
    "eval": [("--workers", "0")],
    "data": [("--workers", "0")],
    "reproduce": [("--iterations", "2"), ("--batch-size", "2"), ("--workers", "0")],
    "study": [("--iterations", "2"), ("--batch-size", "4"), ("--workers", "0")],
    "bench": [("--steps", "2"), ("--batch-size", "2"), ("--input-size", "32")],
}
# Counts shrunk only where the README gives them (--seeds 5: five seeds of every arm; one seed
# runs the same code, and tests/test_studies.py covers several).
SHRINK_IF_PRESENT = {"--seeds": "1"}
# `bench` compiles by default (a minute of torch.compile alone here): --no-compile.
BENCH_EXTRA = ["--no-compile"]

# In the Python blocks: the reader's own names, and GitHub (unreachable here) -> this checkout.
PYTHON_SUBSTITUTIONS = {
    '"path/to/reslab"': f'"{REPO}"',
    '"OWNER/reslab", "resnet20",': f'"{REPO}", "resnet20", source="local",',
}
PYTHON_PREAMBLE = "import torch\nx = torch.zeros(2, 1, 28, 28)  # the reader's batch\n"


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class Block:
    line: int  # README line of the opening fence
    lang: str
    text: str
    commands: list[str] = field(default_factory=list)  # logical lines, comments dropped


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        block = Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        if block.lang != "python":
            block.commands = [line for line in logical_lines(block.text) if line]
        blocks.append(block)
    return blocks


def logical_lines(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [" ".join(drop_comment(line).split()) for line in joined.splitlines()]


def drop_comment(line: str) -> str:
    m = re.search(r"(^|\s)#", line)
    return line[: m.start()] if m else line


def is_command(line: str) -> bool:
    return line.split()[0] in COMMANDS


def classify(blocks: list[Block]) -> tuple[list[Block], list[Block]]:
    """(command blocks, python blocks); fails on an unlisted, mixed or stale block."""
    commands, python, seen = [], [], set()
    for b in blocks:
        if b.lang == "python":
            python.append(b)
            continue
        flags = {is_command(line) for line in b.commands}
        if flags == {True}:
            commands.append(b)
            continue
        first = b.text.splitlines()[0].rstrip() if b.text.strip() else ""
        assert flags != {True, False}, (
            f"README.md line {b.line}: a block mixing commands and other lines; split it, or "
            f"teach tests/test_readme.py its command words ({b.commands})")
        assert first in NOT_COMMANDS, (
            f"README.md line {b.line}: a block the doc test neither runs nor lists (first line "
            f"{first!r}): start its lines with a command of {COMMANDS}, or add it to "
            "NOT_COMMANDS with what it is")
        seen.add(first)
    stale = set(NOT_COMMANDS) - seen
    assert not stale, f"NOT_COMMANDS lists blocks the README no longer has: {stale}"
    return commands, python


# ---------------------------------------------------------------------------------------------
# Substitution


def set_option(argv: list[str], name: str, value: str, add: bool = True) -> list[str]:
    """Replace the value after `name` (one value), or append `name value` when absent."""
    if name in argv:
        i = argv.index(name)
        return argv[: i + 1] + [value] + argv[i + 2:]
    return argv + [name, value] if add else argv


def expand(token: str) -> str:
    return os.path.expanduser(token) if token.startswith("~") else token


def shrink(argv: list[str]) -> list[str]:
    """A reslab command line (without `reslab`) with SHRINK applied and ~ expanded."""
    argv = [expand(t) for t in argv]
    if not argv or argv[0].startswith("-"):
        return argv
    for name, value in SHRINK.get(argv[0], []):
        if argv[0] == "bench" and name.lstrip("-").replace("-", "_") not in (
                BENCH_USES[argv[1]] | {"batch_size"}):
            continue  # bench refuses an option its mode does not use
        argv = set_option(argv, name, value)
    for name, value in SHRINK_IF_PRESENT.items():
        argv = set_option(argv, name, value, add=False)
    if argv[0] == "bench" and BENCH_EXTRA[0] not in argv:
        argv += BENCH_EXTRA
    if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") and (
        not torch.cuda.is_available()
    ):
        argv = set_option(argv, "--device", "cpu")  # GPU-only on this machine: the same on CPU
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Tiny data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def generate(root: Path, data_root: Path, home: Path, torch_home: Path) -> None:
    """Everything of DATA_TABLE, in ROOT, $RESLAB_DATA, $HOME and $TORCH_HOME."""
    fashion = make_dataset(n_train=80, n_test=40, size=28, classes=10, channels=1)
    folder = data_root / "fashion-mnist"
    folder.mkdir(parents=True)
    for prefix, images, labels in (("train", fashion.train_images, fashion.train_labels),
                                   ("t10k", fashion.test_images, fashion.test_labels)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.numpy())
    write_cifar(data_root / "cifar10" / "cifar-10-batches-py", "cifar10", n=8)
    write_cifar10_jpeg(data_root / "cifar10-jpeg")

    photo_tree(home / "imagenet", train=4, val=1)
    photo_tree(home / "flowers", train=4, val=1, seed=1)
    write_image_folder(home / "mine", make_dataset(n_train=24, n_test=12, channels=3))
    write_image_folder(home / "three-classes", make_dataset(n_train=24, n_test=12, channels=3,
                                                            seed=1))
    photo_tree(root / "photos", train=2, val=1, seed=2)
    from reslab.data.idx import IDX_FILES

    names = IDX_FILES["fashion-mnist"].classes
    for i in range(6):  # two images of each of three classes, named as Fashion-MNIST's
        out = root / "test" / names[i % 3]
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fashion.test_images[i, 0].numpy()).save(out / f"{i}.png")
    Image.fromarray(fashion.test_images[9, 0].numpy()).save(root / "shoe.png")
    rgb = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "cat.jpg")

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    for m in net.modules():  # BN statistics and scales as trained weights have them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.2, 0.5)
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / "resnet50-0676ba61.pth")
    (root / "resnet50-0676ba61.pth").write_bytes((cache / "resnet50-0676ba61.pth").read_bytes())


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Env:
    root: Path
    env: dict[str, str]
    log: list[str] = field(default_factory=list)


def run_reslab(argv: list[str], env: Env) -> int:
    from reslab.cli import main

    if argv[1:2] == ["torchrun"]:  # agents and workers: subprocesses, as torchrun's
        return run_torchrun(argv, env)
    return main(shrink(argv[1:]))


def run_torchrun(argv: list[str], env: Env) -> int:
    """Reduced: every --nproc-per-node is 2 (one node) or 1 (per agent of several nodes), gloo on
    CPU, a fresh --out (the README's run folder finished in the quickstart); several nodes are
    that many agents on localhost sharing one c10d rendezvous."""
    if argv[:2] == ["reslab", "torchrun"]:  # its options, then a reslab command
        i = next(j for j, word in enumerate(argv) if word in COMMAND_NAMES)
        launcher, program = argv[2:i], argv[i:]
    else:
        i = argv.index("-m")
        launcher, program = argv[1:i], argv[i + 2:]
        assert argv[i + 1] == "reslab", argv
    nodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    launcher = set_option(launcher, "--nproc-per-node", "2" if nodes == 1 else "1")
    if "--rdzv-endpoint" in launcher:
        launcher = set_option(launcher, "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    else:
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    program = shrink(program)
    env.log.append(f"torchrun #{len(env.log)}")
    program = set_option(program, "--out", f"{program[program.index('--out') + 1]}-torchrun"
                         f"{len(env.log)}")
    cmd = ([sys.executable, "-m", "reslab", "torchrun", *launcher, *program]
           if argv[0] == "reslab" else
           [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "reslab", *program])
    agents = [subprocess.Popen(cmd, cwd=env.root, env=env.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(nodes)]
    codes = []
    for agent in agents:
        out, _ = agent.communicate(timeout=300)
        if agent.returncode:
            print(out)
        codes.append(agent.returncode)
    return max(codes)


def run_make(argv: list[str], env: Env) -> int:
    """Reduced: `make -n TARGET` in the checkout (what it would do, nothing installed); the
    reslab commands it would run are then run here as the README's own are."""
    proc = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          env=env.env)
    if proc.returncode:
        print(proc.stdout, proc.stderr)
        return proc.returncode
    for line in proc.stdout.splitlines():
        words = line.split()  # recipe lines: only reslab's are run, and they hold no quotes
        if words and words[0].endswith("/reslab"):
            code = run_reslab(["reslab", *words[1:]], env)
            if code:
                return code
    return 0


COMMAND_NAMES = ("info", "train", "eval", "predict", "export", "data", "reproduce", "study",
                 "bench")
RUNNERS = {"reslab": run_reslab, "torchrun": run_torchrun, "make": run_make}


def run_python_block(block: Block) -> None:
    code = block.text
    for old, new in PYTHON_SUBSTITUTIONS.items():
        code = code.replace(old, new)
    exec(compile(PYTHON_PREAMBLE + code, f"README.md:{block.line}", "exec"), {})


# ---------------------------------------------------------------------------------------------
# The tests


def test_every_block_is_run_or_listed_by_the_rule():
    """The rule itself, with no data: every block classifies, and every LISTED command still
    appears (the runner test then runs the rest)."""
    commands, _ = classify(readme_blocks(README.read_text()))
    lines = {line for b in commands for line in b.commands}
    for table, name in ((LISTED, "LISTED"), (SLOW, "SLOW"), (REDUCE, "REDUCE"),
                        (WRITES, "WRITES"), ({c for c, _ in EXIT}, "EXIT")):
        assert not set(table) - lines, f"{name} names commands the README no longer has: " \
            f"{set(table) - lines}"
    for line in lines - set(LISTED):
        assert line.split()[0] in RUNNERS, (
            f"README command {line!r}: no runner for {line.split()[0]!r}; run it (RUNNERS) or "
            "list it with a reason (LISTED)")


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["fast", "with-slow"])
def test_every_readme_command_runs_on_tiny_data(slow, tmp_path, monkeypatch, capsys):
    """Every command and Python block of the README, in order; SLOW ones only when `slow`."""
    import reslab.data.cifar10_jpeg as jpeg_copy

    commands, python = classify(readme_blocks(README.read_text()))
    root, home = tmp_path / "work", tmp_path / "home"
    data_root, torch_home = tmp_path / "reslab-data", tmp_path / "torch"
    root.mkdir()
    home.mkdir()
    generate(root, data_root, home, torch_home)
    for name, value in {"HOME": str(home), "RESLAB_DATA": str(data_root),
                        "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
                            "PYTHONPATH", "")])}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(jpeg_copy, "CIFAR10_JPEG_SIZES", (20, 10))
    monkeypatch.setattr(jpeg_copy, "CHECKOUT_DATA", tmp_path / "no-checkout-data")
    monkeypatch.chdir(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = Env(root, dict(os.environ))
    failures, seen = [], {}
    order = sorted([(b.line, "commands", b) for b in commands]
                   + [(b.line, "python", b) for b in python], key=lambda t: t[0])
    try:
        for line, kind, block in order:
            if kind == "python":
                try:
                    run_python_block(block)
                except Exception as e:  # noqa: BLE001 - report every block, then fail
                    failures.append(f"README.md:{line} python block: {type(e).__name__}: {e}")
                continue
            for command in block.commands:
                if command in LISTED or (command in SLOW and not slow):
                    continue
                seen[command] = seen.get(command, 0) + 1
                expected = EXIT.get((command, seen[command]), 0)
                argv = shlex.split(command) + REDUCE.get(command, ([], ""))[0]
                start = time.perf_counter()
                try:
                    code = RUNNERS[argv[0]](argv, env)
                except Exception as e:  # noqa: BLE001
                    code = f"{type(e).__name__}: {e}"
                out = capsys.readouterr()
                if os.environ.get("RESLAB_DOCTEST_TIMES"):
                    with capsys.disabled():
                        print(f"{time.perf_counter() - start:6.1f}s exit {code} {command}")
                if code != expected:
                    failures.append(f"README.md:{line} `{command}`: exit {code}, the README "
                                    f"says {expected}\n{out.err[-2000:]}")
                missing = [f for f in WRITES.get(command, []) if not (root / f).exists()]
                if missing and code == expected:
                    failures.append(f"README.md:{line} `{command}` did not write {missing}")
                again = expected == 2 and argv[:2] == ["reslab", "export"]
                if again and run_reslab([*argv, "--overwrite"], env) != 0:
                    failures.append(f"README.md:{line} `{command} --overwrite` failed")
    finally:
        torch.set_num_threads(threads)
    assert not failures, "\n\n".join(failures)
