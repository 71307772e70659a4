"""The command line's vocabulary: its errors (UsageError, ArgumentError, one line, exit 2), the
argparse types, the option groups several commands share (each option declared once), the
--version line, and the launcher-aware resume hint."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..recipes import Recipe

if TYPE_CHECKING:
    from ..train import TrainOptions



PAPER = Recipe()  # the defaults the help text quotes: the cifar10 recipe's


class UsageError(Exception):
    """A bad value from the command line or the user's files: exit 2."""


class ArgumentError(ValueError):
    """A value the parser refuses: exit 2 from the command line, this exception from Python."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse's errors in one line (its usage block is for --help), exit 2 (main)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self.prog, message)


def number_type(kind: type, low: float, strict: bool = False) -> Callable[[str], float | int]:
    """An argparse type: a finite int or float >= low (> low if strict)."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        if value < low or (strict and value == low):
            bound = f"{'>' if strict else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text})")
        return value
    return parse


positive_int, non_negative_int = number_type(int, 1), number_type(int, 0)


positive_float, non_negative_float = number_type(float, 0, strict=True), number_type(float, 0)


def worker_count(text: str) -> int:
    """An argparse type: a worker count this machine can run (data.workers.check_workers)."""
    from ..data.workers import check_workers

    try:
        return check_workers(non_negative_int(text), what="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def model_options(p: argparse.ArgumentParser) -> None:
    from .. import models

    p.add_argument("--shortcut", choices=models.SHORTCUTS,
                   help="shortcut option or mapping (default: A for CIFAR nets, B for ImageNet "
                   "nets, none for plain nets)")
    p.add_argument("--layout", choices=models.LAYOUTS,
                   help="bottleneck stride placement (default: v1, the paper's)")
    p.add_argument("--layers-per-block", type=int, choices=(1, 2, 3),
                   help="conv layers in F(x) (default: 2, or 3 for bottleneck nets)")


def device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (default: auto, the GPU if there is one)")


def loading_options(p: argparse.ArgumentParser) -> None:
    """How a data source is read (train, eval): bad images, memory or streamed, workers."""
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded, counted and named (default: "
                   "off, a bad image is an error naming it)")
    p.add_argument("--loader", choices=("auto", "memory", "stream"), default="auto",
                   help="an image folder held in memory or streamed from its files by worker "
                   "processes (default: auto, streamed if its images exceed 64 px)")
    p.add_argument("--workers", type=worker_count,
                   help="loader processes for streamed images (default: one per core, at "
                   "most 8)")


def run_options(p: argparse.ArgumentParser) -> None:
    """How runs execute (TrainOptions, read back by train_options); they change no result."""
    from ..distributed import RENDEZVOUS_TIMEOUT

    device_option(p)
    loading_options(p)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model (default: auto, on for runs of >= 5000 "
                   "iterations)")
    p.add_argument("--compile-mode",
                   choices=("default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode (default: torch's default)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="capture the whole step as one CUDA graph (default: auto, on for CUDA "
                   "devices)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward, for ResNet-1202 in 24 GB "
                   "(default: off)")
    p.add_argument("--skip-nonfinite", type=non_negative_int, default=0, metavar="K",
                   help="skip steps with a NaN/inf loss, stop after K in a row (default: 0, stop "
                   "at the first)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms; two runs write identical metrics.jsonl "
                   "(default: off)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar when stderr is a terminal)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BN statistics over the global batch instead of each "
                   "rank's share (default: off, per rank as the paper's 8 GPUs)")
    p.add_argument("--rendezvous-timeout", type=positive_float, default=RENDEZVOUS_TIMEOUT,
                   metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before a clear "
                   f"error (default: {RENDEZVOUS_TIMEOUT:g})")


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The TrainOptions of run_options' flags."""
    from ..train import TrainOptions

    auto = {"auto": None, "on": True, "off": False}
    return TrainOptions(
        device=args.device, compile_model=auto[args.compile], compile_mode=args.compile_mode,
        cuda_graphs=auto[args.cuda_graphs], gradient_checkpointing=args.gradient_checkpointing,
        skip_bad_images=args.skip_bad_images, skip_nonfinite=args.skip_nonfinite,
        deterministic=args.deterministic, progress=False if args.no_progress else None,
        workers=args.workers, loader=args.loader, sync_bn=args.sync_bn,
        rendezvous_timeout=args.rendezvous_timeout,
    )


def study_options(p: argparse.ArgumentParser, depths_help: str) -> None:
    """Options shared by `reproduce` and `study`: both train arms into a run pool (an
    experiments.Experiment), with `train`'s run options."""
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="report folder (required)")
    p.add_argument("--depths", type=positive_int, nargs="+", help=depths_help)
    p.add_argument("--iterations", type=positive_int,
                   help=f"each run's schedule, milestones scaled (default: the paper's, "
                   f"{PAPER.iterations}; mlp-depth 3000, rnn-depth 1500)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="runs per net; Table 6 reports best and mean±std (default: 1)")
    p.add_argument("--runs", type=Path, help="run pool shared between studies (default: OUT/runs)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the reports from finished runs, train nothing (default: off)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="the arms' precision (default: the recipe's, auto); runs of another "
                   "precision are other runs, named so in the pool")
    p.add_argument("--batch-size", type=positive_int,
                   help="the arms' batch size (default: the recipe's, 128 CIFAR, 256 ImageNet); "
                   "runs of another size are named so in the pool")
    run_options(p)


DATA_HELP = ("fashion-mnist, mnist, cifar10, cifar100, cifar10-jpeg, or an ImageFolder folder "
              "(train/ and test/ or val/, one folder per class) (required)")


def _version() -> str:
    """"reslab 0.1.0 (torch 2.14.1, torchvision 0.29.1)": the versions a bug report needs. Read
    from the installed packages' metadata, so importing torch is not needed to print them."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"reslab {__version__} (torch {installed('torch')}, torchvision " \
           f"{installed('torchvision')}; JPEG decoder: {_jpeg_decoder()})"


def _jpeg_decoder() -> str:
    """Which JPEG decoder the photo loader uses (data/jpeg.py's test, without importing torch)."""
    import ctypes

    library = Path(__file__).resolve().parent.parent / "data" / "_jpeg_region.so"
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return "whole images (the region decoder is not built: a C compiler and libjpeg-turbo's " \
            "headers at install)"
    return f"libjpeg-turbo regions ({library.name})"


class VersionAction(argparse._VersionAction):
    """argparse's version action wraps the line at the terminal's width; this prints it whole."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:  # noqa: ANN001
        print(_version())
        parser.exit(0)


def this_command() -> str:
    """The command a user reruns to resume: torchrun's, under torchrun."""
    import shlex

    from ..distributed import launcher_command

    return shlex.join(launcher_command() or ["reslab", *sys.argv[1:]])


# Under torchrun, a rank other than 0 waits this long before printing its error: an error every
# rank meets is then printed once, by rank 0, after which the agent stops the other ranks.
RANK_ERROR_DELAY = 5.0


def fail(command: str, message: str, code: int = 2) -> int:
    """The error in one line on stderr (under torchrun, once: see RANK_ERROR_DELAY)."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if os.environ.get("RANK", "0") != "0":  # torch is loaded on a rank: the import is free
        from ..distributed import under_torchrun

        if under_torchrun():
            import time

            time.sleep(RANK_ERROR_DELAY)  # rank 0 met it too, unless this rank's own
    print(f"{command}: error: {one_line}", file=sys.stderr)
    return code
