"""The `reslab` command: parse, then call the library.

Exit codes: 0 success; 2 an error the user can fix (a bad option or value, unusable data, a run
folder that cannot be used, a device this machine lacks, a full disk, output closed early),
reported in one line that names the value and the fix, with nothing written; 128+signal a run
stopped by SIGTERM/SIGINT (its checkpoint saved; Ctrl-C before training started writes nothing);
1 a bug in reslab, with its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .recipes import Recipe

if TYPE_CHECKING:
    from .train import TrainOptions

_PAPER = Recipe()  # the defaults the help text quotes: the cifar10 recipe's


class UsageError(Exception):
    """A bad value from the command line or the user's files: exit 2."""


class ArgumentError(ValueError):
    """A value the parser refuses: exit 2 from the command line, this exception from Python."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (its usage block is for --help), exit 2 (main)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self.prog, message)


def _number(kind: type, low: float, strict: bool = False) -> Callable[[str], float | int]:
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


_positive_int, _count = _number(int, 1), _number(int, 0)
_positive, _non_negative_float = _number(float, 0, strict=True), _number(float, 0)


def _workers(text: str) -> int:
    """An argparse type: a worker count this machine can run (data.workers.check_workers)."""
    from .data.workers import check_workers

    try:
        return check_workers(_count(text), what="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def _model_options(p: argparse.ArgumentParser) -> None:
    from . import models

    p.add_argument("--shortcut", choices=models.SHORTCUTS,
                   help="shortcut option or mapping (default: A for CIFAR nets, B for ImageNet "
                   "nets, none for plain nets)")
    p.add_argument("--layout", choices=models.LAYOUTS,
                   help="bottleneck stride placement (default: v1, the paper's)")
    p.add_argument("--layers-per-block", type=int, choices=(1, 2, 3),
                   help="conv layers in F(x) (default: 2, or 3 for bottleneck nets)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """How runs execute (TrainOptions, read back by _train_options); they change no result."""
    from .distributed import RENDEZVOUS_TIMEOUT

    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (default: auto, the GPU if there is one)")
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
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded, counted and named (default: "
                   "off, a bad image is an error naming it)")
    p.add_argument("--skip-nonfinite", type=_count, default=0, metavar="K",
                   help="skip steps with a NaN/inf loss, stop after K in a row (default: 0, stop "
                   "at the first)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms; two runs write identical metrics.jsonl "
                   "(default: off)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar when stderr is a terminal)")
    p.add_argument("--loader", choices=("auto", "memory", "stream"), default="auto",
                   help="an image folder held in memory or streamed from its files by worker "
                   "processes (default: auto, streamed if its images exceed 64 px)")
    p.add_argument("--workers", type=_workers,
                   help="loader processes for streamed images (default: one per core, at "
                   "most 8)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BN statistics over the global batch instead of each "
                   "rank's share (default: off, per rank as the paper's 8 GPUs)")
    p.add_argument("--rendezvous-timeout", type=_positive, default=RENDEZVOUS_TIMEOUT,
                   metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before a clear "
                   f"error (default: {RENDEZVOUS_TIMEOUT:g})")


def _train_options(args: argparse.Namespace) -> TrainOptions:
    """The TrainOptions of _run_options' flags."""
    from .train import TrainOptions

    auto = {"auto": None, "on": True, "off": False}
    return TrainOptions(
        device=args.device, compile_model=auto[args.compile], compile_mode=args.compile_mode,
        cuda_graphs=auto[args.cuda_graphs], gradient_checkpointing=args.gradient_checkpointing,
        skip_bad_images=args.skip_bad_images, skip_nonfinite=args.skip_nonfinite,
        deterministic=args.deterministic, progress=False if args.no_progress else None,
        workers=args.workers, loader=args.loader, sync_bn=args.sync_bn,
        rendezvous_timeout=args.rendezvous_timeout,
    )


def _study_options(p: argparse.ArgumentParser, depths_help: str) -> None:
    """Options shared by `reproduce` and `study`: both train arms into a run pool (an
    experiments.Experiment), with `train`'s run options."""
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="report folder (required)")
    p.add_argument("--depths", type=_positive_int, nargs="+", help=depths_help)
    p.add_argument("--iterations", type=_positive_int,
                   help=f"each run's schedule, milestones scaled (default: the paper's, "
                   f"{_PAPER.iterations}; mlp-depth 3000, rnn-depth 1500)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="runs per net; Table 6 reports best and mean±std (default: 1)")
    p.add_argument("--runs", type=Path, help="run pool shared between studies (default: OUT/runs)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the reports from finished runs, train nothing (default: off)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="the arms' precision (default: the recipe's, auto); runs of another "
                   "precision are other runs, named so in the pool")
    p.add_argument("--batch-size", type=_positive_int,
                   help="the arms' batch size (default: the recipe's, 128 CIFAR, 256 ImageNet); "
                   "runs of another size are named so in the pool")
    _run_options(p)


_DATA_HELP = ("fashion-mnist, mnist, cifar10, cifar100, cifar10-jpeg, or an ImageFolder folder "
              "(train/ and test/ or val/, one folder per class) (required)")


def cmd_info(args: argparse.Namespace) -> int:
    from . import models
    from .complexity import describe

    if args.pretrained:
        from .pretrained import info_pretrained

        print(info_pretrained(args.model, as_json=args.json))
        return 0
    names = models.list_models() if args.all else [args.model]
    if not names or names == [None]:
        raise UsageError("give a MODEL (e.g. resnet20) or --all; valid: " + ", ".join(
            models.list_models()))
    rows = [
        describe(
            n, input_size=args.input_size, in_channels=args.in_channels,
            num_classes=args.num_classes, shortcut=args.shortcut, layout=args.layout,
            layers_per_block=args.layers_per_block,
        )
        for n in names
    ]
    if args.json:
        out = [r.as_dict() for r in rows]
        print(json.dumps(out if args.all else out[0], indent=2))
        return 0
    if not args.all:
        r = rows[0]
        print(f"{r.name} ({r.family} family, {r.input_size}x{r.input_size}x{r.in_channels} input, "
              f"{r.num_classes} classes)")
        print(f"  parameters      {r.params:,}")
        print(f"  multiply-adds   {r.multiply_adds:,} per image ({_human(r.multiply_adds)})")
        print("  output size (Table 1):")
        for stage, shape in r.stages:
            print(f"    {stage:<8} {_shape(shape)}")
        return 0
    header = f"{'model':<11} {'family':<9} {'input':>5} {'params':>12} {'mult-adds':>10}"
    print(header + "  stages (HxW)")
    for r in rows:
        sizes = " ".join(f"{shape[1]}" if len(shape) == 3 else "-" for _, shape in r.stages)
        print(f"{r.name:<11} {r.family:<9} {r.input_size:>5} {r.params:>12,} "
              f"{_human(r.multiply_adds):>10}  {sizes}")
    return 0


def _shape(shape: tuple[int, ...]) -> str:
    """A stage's output: (C, H, W) of a conv net, (width,) of an MLP, (steps, width) of an LSTM."""
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}, {shape[0]} channels"
    if len(shape) == 2:
        return f"{shape[0]} steps of {shape[1]} units"
    return f"{shape[0]} units"


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import world_from_env
    from .train import NonFiniteLoss, TrainingStopped

    main = world_from_env().main  # under torchrun, rank 0 speaks for the run
    try:
        summary = _train(args)
    except TrainingStopped as e:
        if main:
            print(f"stopped after iteration {e.step} ({e.checkpoint.name} saved). Resume with the "
                  f"same command: {_this_command()}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        return _fail("reslab train", str(e))
    if not main:
        return 0
    print(f"final test error {100 * summary['final_test_error']:.2f}% "
          f"(train error {100 * summary['final_train_error']:.2f}%) after "
          f"{summary['iterations']} iterations; run folder {args.out}")
    return 0


def train_run(model: str, *, data: str | Path, out: str | Path, **options: Any) -> Path:
    """`reslab train MODEL --data DATA --out OUT --option value ...` from Python (reslab.train):
    the CLI's long option names as keywords (iterations=500, init_from="w.pth", sync_bn=True),
    parsed and checked by the CLI's own parser, its errors raised (ArgumentError, UsageError,
    the library's ValueErrors) instead of exit codes. Returns the run folder."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["train"]._actions if a.option_strings}
    argv = ["train", model, "--data", str(data), "--out", str(out)]
    for key, value in options.items():
        action = actions.get(key)
        if action is None or key in ("data", "out", "help"):
            raise TypeError(f"reslab.train() got an unexpected keyword argument {key!r}; the "
                            "options are " + ", ".join(sorted(set(actions) - {"data", "out",
                                                                               "help"})))
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # a switch: True gives it, False leaves it out
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    _train(parser.parse_args(argv))
    return Path(out)


def _train(args: argparse.Namespace) -> dict:
    """The run of `reslab train`'s arguments: its summary, or the error that stopped it."""
    from dataclasses import replace

    from .data import open_data
    from .recipes import get_recipe
    from .train import RunSpec, check_start, train

    recipe = get_recipe(args.recipe)
    overrides = {
        k: v for k, v in {
            "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
            "seed": args.seed, "precision": args.precision, "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every, "log_every": args.log_every,
            "val_split": args.val_split, "normalization": args.normalization,
            "augmentation": args.augmentation, "accumulate": args.accumulate,
            "warmup_min_depth": args.warmup_min_depth,
        }.items() if v is not None
    }
    recipe = replace(recipe, **overrides)
    if args.iterations is not None and args.epochs is not None:
        raise UsageError("give --iterations or --epochs, not both")
    if args.epochs is not None and args.milestones is not None:
        raise UsageError("--milestones are iterations: give --iterations with them, not --epochs")
    if args.iterations is not None:
        recipe = recipe.with_iterations(args.iterations)
    if args.milestones is not None:
        recipe = replace(recipe, milestones=tuple(args.milestones))
    finetune = _finetune_fields(args)
    spec = RunSpec(
        model=args.model, data=_data_spec(args.data), recipe=recipe, shortcut=args.shortcut,
        layout=finetune.pop("layout", args.layout), layers_per_block=args.layers_per_block,
        zero_init_residual=args.zero_init_residual, in_channels=args.in_channels,
        num_classes=args.num_classes, **finetune,
    )
    options = _train_options(args)
    # Device, model and run folder first: a mistake there is reported before the data is read.
    check_start(spec, args.out, options, compare=args.epochs is None)
    data = open_data(args.data, val_split=recipe.val_split, seed=0,
                     skip_bad_images=args.skip_bad_images, loader=args.loader)
    _report_left_out(data)
    if args.epochs is not None:
        spec = replace(spec, recipe=recipe.with_epochs(args.epochs, data.train_size))
    return train(spec, args.out, data=data, options=options)


def _finetune_fields(args: argparse.Namespace) -> dict:
    """RunSpec's init_from, init_sha256, freeze (and layout) from --init-from, --freeze and
    --linear-probe."""
    from .models import part_names

    fields: dict = {}
    if args.freeze is not None and args.linear_probe:
        raise UsageError("give --freeze or --linear-probe, not both")
    if args.linear_probe:
        fields["freeze"] = tuple(part_names(args.model)[:-1])  # everything but fc
    elif args.freeze is not None:
        fields["freeze"] = tuple(p.strip() for p in args.freeze.split(",") if p.strip())
        if not fields["freeze"]:
            raise UsageError(f"--freeze {args.freeze!r} names no part; give some of "
                             f"{', '.join(part_names(args.model))}, comma-separated, or omit it")
    if (args.freeze is not None or args.linear_probe) and args.init_from is None:
        print("note: freezing parts of a freshly initialised network trains only the rest "
              "on random features; --init-from gives them trained weights", file=sys.stderr)
    if args.init_from is not None:
        from .finetune import file_digest, resolve_source

        try:
            source = resolve_source(args.init_from)
        except ValueError:
            recorded = _recorded_source(args)
            if recorded is None:
                raise
            return {**fields, **recorded}  # the run's checkpoint holds every weight
        fields.update(init_from=str(source), init_sha256=file_digest(source))
    return fields  # the layout of torchvision's weights: finetune.source_layout


def _recorded_source(args: argparse.Namespace) -> dict | None:
    """A resumed fine-tune whose source was moved or deleted: its recorded init_from, SHA-256
    and layout, when --out holds a checkpoint of the run that started from that path."""
    from .checkpoint import list_checkpoints
    from .finetune import WEIGHTS

    out = Path(args.out)
    try:
        old = json.loads((out / "recipe.json").read_text())
    except (OSError, ValueError):
        return None
    given = Path(args.init_from).expanduser().resolve()
    if old.get("init_from") not in (str(given), str(given / WEIGHTS)):
        return None
    if not old.get("init_sha256") or not list_checkpoints(out):
        return None
    print(f"note: {args.init_from} is gone; resuming from {out}'s checkpoint, which holds "
          "every weight", file=sys.stderr)
    return {k: old[k] for k in ("init_from", "init_sha256", "layout") if old.get(k) is not None}


def _report_left_out(data) -> None:  # noqa: ANN001 (a data.Dataset; data imports torch)
    """Say which files a data set left out: bad images skipped, files that are not images."""
    skipped = getattr(data, "skipped_files", ())  # a streamed tree meets its bad images later
    for files, what in ((skipped, "skipped {} bad image(s) (--skip-bad-images)"),
                        (data.ignored_files, "ignored {} file(s) that are not images")):
        if files:
            print(what.format(len(files)) + ": " + ", ".join(files[:5])
                  + (" ..." if len(files) > 5 else ""), file=sys.stderr)


def _data_spec(data: str) -> str:
    """Known names stay names; a folder is recorded as its absolute path."""
    from .data import DATASETS

    return data if data in DATASETS else str(Path(data).resolve())


def cmd_eval(args: argparse.Namespace) -> int:
    """Test error of one run, or of an ensemble of runs (their softmax scores averaged, Table 5)
    beside each member's."""
    from .data import open_data
    from .ensemble import EnsembleError, combine, ensemble
    from .pretrained import load_source

    members = [load_source(run, device=args.device) for run in args.runs]
    data = open_data(args.data, skip_bad_images=args.skip_bad_images, loader=args.loader)
    _report_left_out(data)
    for run, trained in zip(args.runs, members, strict=True):
        _check_eval_data(args, run, trained, data)
    if len(members) == 1:
        record, label = _eval_one(args, members[0], data), members[0].spec.model
    else:
        try:
            joint = ensemble(members, args.runs, precision=args.precision)
        except EnsembleError as e:
            raise UsageError(str(e)) from None
        # Held test images: each member's logits once, the ensemble's from them (combine);
        # streamed ones (no logits): each protocol's views, every member, then the joint.
        logits = [data.test_logits(t.model, t.mean, t.std, precision=_precision(args, t))
                  for t in members]
        if any(z is None for z in logits):
            records = [_eval_one(args, trained, data) for trained in members]
            record = _eval_one(args, joint, data)
        else:
            records = [_eval_one(args, t, data, logits=z) for t, z in zip(members, logits,
                                                                         strict=True)]
            record = _eval_one(args, joint, data, logits=combine(logits))
        record = {**record, "model": [t.spec.model for t in members],
                  "members": [{"run": str(run), **r} for run, r in zip(args.runs, records,
                                                                       strict=True)]}
        label = f"ensemble of {len(members)}"
        if not args.json:
            for run, r in zip(args.runs, records, strict=True):
                print(f"  member {run}: {_error_line(r)}")
    if args.json:
        print(json.dumps({**record, "data": args.data}))
    else:
        print(f"{label} on {args.data} ({record['protocol']}): {_error_line(record)}")
    return 0


def _check_eval_data(args: argparse.Namespace, run: Path, trained, data) -> None:  # noqa: ANN001
    """The data fits the run (trained.check_fits); --protocol only where the data has one."""
    from .trained import check_fits

    check_fits(trained, data, run=str(run), data_name=args.data)
    if args.protocol is not None and args.protocol not in data.protocols:
        raise UsageError(f"--protocol {args.protocol} is for photographs streamed from an image "
                         f"folder; {args.data} is held in memory and tested on its single view "
                         "(Sec. 4.2)")


def _precision(args: argparse.Namespace, trained) -> str:  # noqa: ANN001
    """--precision, else an ensemble in fp32 (each member in its own) and a run in its own."""
    if args.precision:
        return args.precision
    return "fp32" if hasattr(trained.model, "members") else trained.spec.recipe.precision


def _eval_one(args: argparse.Namespace, trained, data, *, logits=None) -> dict:  # noqa: ANN001
    """One record of `trained` on `data` (from `logits` where given): the same keys for every
    data source."""
    r = data.evaluate(trained.model, trained.mean, trained.std, protocol=args.protocol,
                      precision=_precision(args, trained), workers=args.workers,
                      skip_bad_images=args.skip_bad_images, logits=logits)
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} bad image(s) (--skip-bad-images): "
              + "; ".join(r["skipped"][:3]), file=sys.stderr)
    return _record(trained.spec.model, args.precision or trained.spec.recipe.precision,
                   r["test_error"], r["test_top5_error"], r["test_loss"], r["protocol"],
                   r["images"], len(r["skipped"]))


def _record(model: str, precision: str, error: float, top5: float | None, loss: float,
            protocol: str, images: int, skipped: int) -> dict:
    """`reslab eval`'s record, the same keys for every data source (the names metrics.jsonl
    uses): test_error is the top-1 error; test_top5_error None for 5 classes or fewer."""
    return {"test_error": error, "test_top5_error": top5, "test_loss": loss,
            "protocol": protocol, "images": images, "skipped": skipped, "model": model,
            "precision": precision}


def _error_line(r: dict) -> str:
    top5 = "n/a (5 classes or fewer)" if r["test_top5_error"] is None else \
        f"{100 * r['test_top5_error']:.2f}%"
    return (f"test error {100 * r['test_error']:.2f}%, top-5 error {top5}, test loss "
            f"{r['test_loss']:.4f} ({r['images']} images, {r['precision']})")


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image; exit 2 (a user's error) if any image could not be predicted,
    each named in one line (the others are still predicted)."""
    import numpy as np

    from .ensemble import EnsembleError
    from .predict import (
        Prediction,
        class_name,
        is_model_source,
        list_images,
        open_predictor,
        predict,
    )

    if args.features is not None and args.features.with_suffix(".txt") == args.features:
        raise UsageError(f"--features {args.features}: its images are listed in "
                         f"{args.features}; give the features a name ending .npy")
    # RUN RUN ... IMAGES: the leading arguments that name models make an ensemble.
    runs, images = [args.run], list(args.images)
    while len(images) > 1 and is_model_source(images[0]):
        runs.append(images.pop(0))
    if len(runs) > 1 and args.features is not None:
        raise UsageError("--features are one net's: give a single run with --features")
    try:
        predictor = open_predictor(runs, device=args.device, precision=args.precision)
    except EnsembleError as e:
        raise UsageError(str(e)) from None
    files = list_images(images)
    done: list[Prediction] = []
    failed: list[tuple[str, str]] = []
    for result in predict(predictor, files, top_k=args.top_k, protocol=args.protocol,
                          batch_size=args.batch_size, features=args.features is not None):
        if isinstance(result, Prediction):
            done.append(result)
            if not args.json:
                print(f"{result.path}  " + "  ".join(
                    f"{class_name(predictor, i)} ({100 * p:.1f}%)" for i, p in result.top))
        else:
            failed.append(result)
            print(f"reslab predict: error: {result[1]}", file=sys.stderr)
    # Images in folders named after the model's classes (a test/ split): their top-1 error.
    labelled = [(r, Path(r.path).parent.name) for r in done]
    known = predictor.classes is not None and bool(labelled) and all(
        name in predictor.classes for _, name in labelled)
    error = None
    if known:
        error = sum(class_name(predictor, r.top[0][0]) != name for r, name in labelled) / len(done)
    if args.features is not None and done:
        with open(args.features, "wb") as f:  # the name given: np.save(name) would add .npy
            np.save(f, np.stack([r.features for r in done]).astype(np.float32))
        rows = Path(args.features).with_suffix(".txt")
        rows.write_text("".join(f"{r.path}\n" for r in done))
        print(f"features ({len(done)} x {done[0].features.shape[0]}) in {args.features}, their "
              f"images in order in {rows}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "model": str(args.run) if len(runs) == 1 else [str(r) for r in runs],
            "protocol": args.protocol,
            "predictions": [{"path": r.path, "top": [
                {"class": class_name(predictor, i), "index": i, "probability": p}
                for i, p in r.top]} for r in done],
            "failed": [{"path": path, "error": message} for path, message in failed],
            **({"top1_error": error} if error is not None else {}),
        }))
    elif done:  # with nothing predicted, the failures' lines say it all
        tail = f"; {len(failed)} could not be read" if failed else ""
        where = (f"; top-1 error {100 * error:.2f}% (their folders name their classes)"
                 if error is not None else "")
        print(f"{len(done)} image(s) predicted{tail}{where}", file=sys.stderr)
    return 2 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(args.run, args.format, args.out, overwrite=args.overwrite,
                      input_size=None if args.input_size is None else tuple(args.input_size))
    print(f"wrote {path}")
    return 0


def _bench_onnx(args: argparse.Namespace) -> int:
    """`reslab bench onnx MODEL`: ONNX Runtime against eager and reslab's best PyTorch path."""
    from .bench_infer import bench_inference

    r = bench_inference(args.model, (args.batch_size,) if args.batch_size else (1, 32),
                        threads=args.threads, compile_model=not args.no_compile)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    h, w = r["input_size"]
    print(f"{r['model']} inference at {h}x{w}, {r['threads']} threads, medians of "
          f"{r['rounds']} rounds")
    for row in r["batches"].values():
        print(f"  batch {row['batch_size']}:")
        for k, v in row["paths"].items():
            print(f"    {k:<34} {v['images_per_second']:>9.1f} img/s  x{v['vs_eager_fp32']:.2f}")
        print(f"    reslab's best: {row['reslab_best_path']}")
    agree = r["top1_vs_eager_fp32_random_images"]
    for k, v in agree["paths"].items():
        print(f"  top-1 vs eager fp32 on {agree['images']} random images, {k}: "
              f"{100 * v['top1_agreement']:.2f}%")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`reslab data check DIR`: decode every image before a long run; `reslab data bench DIR`:
    the loader's images/s against torchvision's on those files."""
    from .data import check_tree

    if args.action == "bench":
        from .bench_photos import bench_loader
        from .data.workers import default_workers

        r = bench_loader(args.folder, workers=args.workers if args.workers is not None else
                         default_workers(), batch_size=args.batch_size)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            decoder = "JPEG regions" if r["region_decoder"] else \
                "whole images (the region decoder is not built: run make)"
            print(f"{args.folder}, {r['workers']} workers, batch {r['batch_size']}: reslab "
                  f"{r['reslab_images_per_second']:.0f} img/s decoding {decoder}, torchvision "
                  f"{r['torchvision_images_per_second']:.0f} img/s, ratio x{r['ratio']:.2f}; "
                  f"reslab decoding whole JPEGs {r['reslab_whole_decode_images_per_second']:.0f}"
                  f" img/s; decoding whole images alone "
                  f"{r['decode_only_images_per_second']:.0f} img/s (reslab at "
                  f"{100 * r['of_decode_only']:.0f}% of it)")
        return 0

    tree, problems = check_tree(args.folder, workers=args.workers or 0)
    n = len(tree.train) + len(tree.test)
    if args.json:
        print(json.dumps({"folder": str(args.folder), "images": n,
                          "classes": tree.num_classes, "bad": problems,
                          "ignored": list(tree.ignored_files)}, indent=2))
        return 2 if problems else 0
    for message in problems:
        print(message)
    if tree.ignored_files:
        print(f"ignored {len(tree.ignored_files)} file(s) that are not images: "
              + ", ".join(tree.ignored_files[:5]), file=sys.stderr)
    print(f"{args.folder}: {n} images in {tree.num_classes} classes, {len(problems)} bad",
          file=sys.stderr)
    return 2 if problems else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`reproduce` (the paper's experiments) and `study` (the seed's questions) share a shape."""
    if args.command == "reproduce" and args.experiment in ("fig4", "table2", "table3", "table4"):
        from .imagenet_experiments import reproduce_imagenet as run
    elif args.command == "reproduce":
        from .reproduce import reproduce as run
    else:
        from .studies import run_study as run
    from .depth_studies import DEPTH_STUDIES
    from .experiments import Experiment
    from .train import TrainingStopped

    iterations = args.iterations or (DEPTH_STUDIES[args.experiment].iterations
                                     if args.experiment in DEPTH_STUDIES else _PAPER.iterations)
    exp = Experiment(
        data=_data_spec(args.data), out_dir=args.out, iterations=iterations,
        seeds=args.seeds, runs_dir=args.runs, report_only=args.report_only,
        options=_train_options(args), precision=args.precision, batch_size=args.batch_size,
    )
    try:
        report = run(args.experiment, exp, depths=args.depths)
    except TrainingStopped as e:
        print(f"stopped after iteration {e.step} of {e.checkpoint.parent.name} "
              f"({e.checkpoint.name} saved). Resume the whole study with the same command: "
              f"{_this_command()}", file=sys.stderr)
        return 128 + e.signum
    print(f"report: {report}")
    return 0


# The options each bench mode uses; one it does not use is refused, never silently ignored.
BENCH_USES = {
    "train": {"steps", "input_size", "in_channels", "no_ablation", "device"},
    "infer": {"input_size", "in_channels"},
    "onnx": {"threads"},
    "photos": {"steps", "device", "data", "workers"},
}


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    for name in ("threads", "steps", "input_size", "in_channels", "no_ablation", "device",
                 "data", "workers"):
        if getattr(args, name) not in (None, False) and name not in BENCH_USES[args.mode]:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"bench {args.mode} does not use {flag}; omit it (it is for bench "
                             + " and ".join(m for m, uses in BENCH_USES.items() if name in uses)
                             + ")")
    args.steps, args.device = args.steps or 20, args.device or "cpu"
    args.in_channels = args.in_channels or 3
    if args.mode == "onnx":
        return _bench_onnx(args)
    if args.mode == "photos":
        from .bench_photos import bench_train_photos
        from .data.workers import default_workers

        if args.data is None:
            raise UsageError("bench photos needs --data: an image folder (train/ and val/)")
        r = bench_train_photos(args.data, args.model, workers=args.workers if args.workers
                               is not None else default_workers(),
                               batch_size=args.batch_size or 32, steps=args.steps,
                               device=args.device)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(f"{r['model']} training at 224 from {args.data}, batch {r['batch_size']}, "
                  f"{r['workers']} workers: reslab {r['reslab_images_per_second']:.1f} img/s, "
                  f"plain PyTorch + torchvision {r['reference_images_per_second']:.1f} img/s, "
                  f"ratio x{r['ratio']:.2f}")
        return 0
    if args.mode == "train":
        r = bench.bench_train(args.model, batch_size=args.batch_size or 128, steps=args.steps,
                              input_size=args.input_size, in_channels=args.in_channels,
                              compile_model=not args.no_compile, ablation=not args.no_ablation,
                              device=args.device)
    else:
        r = bench.bench_infer(args.model, batch_size=args.batch_size or 1,
                              input_size=args.input_size, in_channels=args.in_channels,
                              compile_model=not args.no_compile)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['model']} {args.mode}, batch {r['batch_size']}, {r['input_size']}x"
          f"{r['input_size']}")
    if args.mode == "infer":
        for k, v in r["paths"].items():
            print(f"  {k:<34} {v['images_per_second']:>9.1f} img/s  x{v['gain']:.2f}")
        print(f"  best: {r['best_path']}, x{r['ratio']:.2f} eager fp32; BN folding max abs "
              f"error {r['folding_max_abs_error']:.1e}")
        return 0
    _print_bench_train(r)
    return 0


def _print_bench_train(r: dict) -> None:
    """`bench train`'s report, read off bench.bench_train's record."""
    print(f"  reslab end to end      {r['images_per_second']:>8.0f} img/s "
          f"(warm-up incl. compile {r['warmup_s']:.1f} s)")
    print(f"  tutorial end to end    {r['reference_images_per_second']:>8.0f} img/s   "
          f"ratio x{r['ratio']:.2f}")
    print(f"  reslab model only      {r['model_only_images_per_second']:>8.0f} img/s")
    print(f"  eager fp32 model only  {r['reference_model_only_images_per_second']:>8.0f} img/s"
          f"   ratio x{r['model_only_ratio']:.2f}")
    bf16 = r["peak_bf16_madds_per_s"]
    print(f"  peak probe: fp32 {r['peak_fp32_madds_per_s'] / 1e9:.0f}, bf16 "
          + (f"{bf16 / 1e9:.0f}" if bf16 else "not native (not probed)")
          + f" G multiply-adds/s; achieved {r['achieved_madds_per_s'] / 1e9:.0f} G = "
          f"{100 * r['peak_fraction']:.0f}% of {r['precision']}")
    print("  step split (reslab): " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in r["step_split"].items()))
    k = r["kernel_split"]
    print(f"  convolutions take {100 * k['convolution_share']:.0f}% of a model-only step, at "
          f"{k['convolution_madds_per_s'] / 1e9:.0f} G multiply-adds/s "
          f"({100 * k['convolution_peak_fraction']:.0f}% of {r['precision']} peak); the rest is "
          "BN, ReLU, additions")
    print("  step split (tutorial): " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in r["reference_step_split"].items()))
    for k, v in r.get("ablation_model_only", {}).items():
        print(f"  ablation {k:<28} {v['images_per_second']:>8.0f} img/s  x{v['gain']:.2f}")
    if "ablation_data" in r:
        gain = r["ablation_data"]["gain"]
        print(f"  ablation batched augmentation (end to end, fp32) x{gain:.2f}")
    if "ablation_threads" in r:
        gain = r["ablation_threads"]["gain"]
        print(f"  ablation threads {r['threads']} vs 1       x{gain:.2f}")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _version() -> str:
    """"reslab 0.1.0 (torch 2.14.1, torchvision 0.29.1)": the versions a bug report needs. Read
    from the installed packages' metadata, so importing torch is not needed to print them."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

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

    library = Path(__file__).resolve().parent / "data" / "_jpeg_region.so"
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return "whole images (the region decoder is not built: a C compiler and libjpeg-turbo's " \
            "headers at install)"
    return f"libjpeg-turbo regions ({library.name})"


class _Version(argparse._VersionAction):
    """argparse's version action wraps the line at the terminal's width; this prints it whole."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:  # noqa: ANN001
        print(_version())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    from . import models

    parser = _Parser(
        prog="reslab",
        description="Deep Residual Learning for Image Recognition (He et al. 2016), exactly.",
    )
    parser.add_argument("--version", action=_Version,
                        help="reslab's, torch's and torchvision's versions and the JPEG decoder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters, multiply-adds and stage sizes of a model")
    p.add_argument("model", nargs="?",
                   help=f"one of {', '.join(models.list_models())} (or --all)")
    p.add_argument("--all", action="store_true",
                   help="every model of the paper, as a table (default: off)")
    p.add_argument("--pretrained", action="store_true",
                   help="reslab's released weights (name, data, iterations, test error); with "
                   "a released NAME as MODEL, its model card (default: off)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.add_argument("--input-size", type=_positive_int,
                   help="input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets)")
    p.add_argument("--in-channels", type=_positive_int, default=3,
                   help="input channels (default: 3)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="classifier outputs (default: 10 for CIFAR nets, 1000 for ImageNet nets)")
    _model_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model with the paper's recipe")
    p.add_argument("model", help="e.g. resnet20, plain56, resnet110 (reslab info --all lists all)")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, type=Path,
                   help="run folder: created, or resumed if it holds this run unfinished "
                   "(required)")
    p.add_argument("--recipe", default="cifar10",
                   help="named recipe: cifar10 (Sec. 4.2), quick, imagenet (Sec. 3.4: lr "
                   "divided on plateaus), imagenet-step (÷10 at epochs 30 and 60 of 90) or "
                   "finetune (lr 0.01, 4,000 iterations; for --init-from) (default: cifar10)")
    p.add_argument("--augmentation", choices=("pad-crop-flip", "scale", "torchvision"),
                   help="pad-crop-flip (Sec. 4.2), scale (Sec. 3.4: shorter side in [256, 480], "
                   "224 crop, flip, PCA lighting) or torchvision (RandomResizedCrop) (default: "
                   "the recipe's)")
    p.add_argument("--accumulate", type=_positive_int, metavar="K",
                   help="split each batch into K micro-batches, gradients summed: the paper's "
                   "batch on a small GPU, BN statistics per micro-batch (default: 1)")
    p.add_argument("--iterations", type=_positive_int,
                   help=f"scale the schedule to N iterations, milestones with it (default: the "
                   f"recipe's; cifar10: {_PAPER.iterations})")
    p.add_argument("--epochs", type=_positive,
                   help="the same in epochs of the training set (default: the recipe's iterations)")
    p.add_argument("--milestones", type=_positive_int, nargs="*", metavar="N",
                   help="iterations at which lr is divided by 10, after --iterations' scaling; to "
                   "extend a finished run, keep its milestones (default: the recipe's, scaled; "
                   f"cifar10: {' '.join(map(str, _PAPER.milestones))})")
    p.add_argument("--lr", type=_positive,
                   help=f"learning rate (default: the recipe's; cifar10: {_PAPER.lr:g})")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"mini-batch size (default: the recipe's; cifar10: {_PAPER.batch_size})")
    p.add_argument("--weight-decay", type=_non_negative_float,
                   help=f"weight decay (default: the recipe's; cifar10: {_PAPER.weight_decay:g})")
    p.add_argument("--warmup-min-depth", type=_count, metavar="N",
                   help="CIFAR-style nets of N layers or more start at lr "
                   f"{_PAPER.warmup_lr:g} until training error is below "
                   f"{100 * _PAPER.warmup_until_error:.0f}%%, as Sec. 4.2 does for ResNet-110; "
                   "0 warms up every net (default: the recipe's; cifar10: "
                   f"{_PAPER.warmup_min_depth})")
    p.add_argument("--seed", type=_count,
                   help=f"initialisation and data order (default: the recipe's; {_PAPER.seed})")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="auto is bf16 where the hardware runs it natively (default: auto)")
    p.add_argument("--eval-every", type=_positive_int,
                   help="evaluate every K iterations; may change on resume (default: the "
                   f"recipe's; cifar10: {_PAPER.eval_every})")
    p.add_argument("--log-every", type=_count,
                   help="log training error every K iterations; may change on resume (default: "
                   "0, 1%% of the run)")
    p.add_argument("--checkpoint-every", type=_positive_int,
                   help="checkpoint every K iterations; may change on resume (default: the "
                   f"recipe's; cifar10: {_PAPER.checkpoint_every})")
    p.add_argument("--val-split", type=_count,
                   help="hold out N training images for validation (default: 0)")
    p.add_argument("--normalization", choices=("pixel", "channel", "source"),
                   help="per-pixel mean (the paper's), per-channel mean/std, or source: the "
                   "--init-from weights' own, fitted to the data (default: the recipe's: "
                   "source for finetune, else pixel)")
    p.add_argument("--in-channels", type=_positive_int,
                   help="input channels (default: the data's)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="classifier outputs (default: the data's classes)")
    p.add_argument("--zero-init-residual", action="store_true",
                   help="zero each block's last BN scale (not the paper's; default: off)")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from trained weights: a finished run folder, a reslab "
                   "model.safetensors, a released name (reslab info --pretrained), "
                   "torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1, from "
                   "torch.hub's cache) or a torchvision state dict (.pth, read without running "
                   "code); a classifier of another size is re-initialised (default: He init)")
    p.add_argument("--freeze", metavar="PARTS",
                   help="comma-separated parts kept fixed, BN statistics included: stem, "
                   "conv2_x, conv3_x, conv4_x (, conv5_x on ImageNet nets) (default: none)")
    p.add_argument("--linear-probe", action="store_true",
                   help="freeze everything but the classifier (fc) (default: off)")
    _run_options(p)
    _model_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test error of a trained run, or of an ensemble of runs")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="finished run folder or its model.safetensors, a released name (reslab "
                   "info --pretrained) or torchvision:WEIGHTS; several: their ensemble (softmax "
                   "scores averaged, as the paper's Table 5), beside each member")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (default: auto, the GPU if there is one)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded (default: off)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="evaluate in this precision (default: the run's training precision)")
    p.add_argument("--protocol", choices=("centre", "10-crop", "multi-scale"),
                   help="testing protocol for a streamed image folder (Sec. 3.4): the centre "
                   "224 crop, 10 crops, or whole images at 5 scales (default: centre)")
    p.add_argument("--loader", choices=("auto", "memory", "stream"), default="auto",
                   help="an image folder held in memory or streamed (default: auto)")
    p.add_argument("--workers", type=_workers,
                   help="loader processes for streamed images (default: one per core, at most 8)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="the top-k classes of images, from a trained run (or an "
                       "ensemble of runs) or its exported .onnx")
    p.add_argument("run", type=Path, help="finished run folder, its model.safetensors, an .onnx "
                   "exported from one, a released name (reslab info --pretrained) or "
                   "torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched for images; run folders, weights "
                   "files or released names before them join RUN in an ensemble (softmax "
                   "scores averaged)")
    p.add_argument("--top-k", type=_positive_int, default=5,
                   help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.add_argument("--protocol", choices=("centre", "10-crop", "multi-scale"), default="centre",
                   help="for runs trained on photographs: the centre 224 crop, 10 crops, or the "
                   "whole image at 5 scales (Sec. 3.4) (default: centre)")
    p.add_argument("--features", type=Path, metavar="OUT.npy",
                   help="also write each image's pooled feature vector (the classifier's input; "
                   "with 10-crop the mean of its views') to OUT.npy, its images in order in "
                   "OUT.txt (default: off)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="images per forward pass (default: 64)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (default: auto, the GPU if there is one)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="(default: the run's training precision, as reslab eval)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a trained run as one file: ONNX or a torch.export program")
    p.add_argument("run", type=Path, help="finished run folder or its model.safetensors")
    p.add_argument("--format", required=True, choices=("onnx", "torch-export"),
                   help="onnx (for ONNX Runtime: uint8 (N, C, H, W) images in, the run's "
                   "normalisation and the BN-folded network inside) or torch-export (.pt2) "
                   "(required)")
    p.add_argument("--out", type=Path,
                   help="output file, never an existing one without --overwrite nor a run's "
                   "own (default: model.onnx or model.pt2 beside the weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (never the run's weights, metrics or "
                   "other own files) (default: off, an existing file is an error)")
    p.add_argument("--input-size", type=_positive_int, nargs=2, metavar=("H", "W"),
                   help="image size the export takes (default: the run's training size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="check an image folder (decode every image, list the bad) or "
                       "time its loader against torchvision's")
    p.add_argument("action", choices=("check", "bench"), help="check or bench")
    p.add_argument("folder", type=Path, help="an ImageFolder tree (train/ and val/ or test/)")
    p.add_argument("--workers", type=_workers,
                   help="decoding processes (default: one per core; bench: at most 8)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="bench: images per batch (default: 64)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("reproduce", help="the paper's experiments: CIFAR-10's Table 6, Figures 6 "
                       "and 7; ImageNet's Figure 4, Tables 2, 3 and 4")
    p.add_argument("experiment", choices=("table6", "fig6", "fig7", "fig4", "table2", "table3",
                                          "table4"),
                   help="table6, fig6, fig7 (CIFAR-style data in memory); fig4, table2, table3, "
                   "table4 (an image tree, streamed)")
    _study_options(p, depths_help="the depths to train: CIFAR 6n+2, ImageNet 18 34 50 101 152 "
                   "(default: the paper's for the experiment)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("study", help="beyond the paper: block depth, shortcut mappings, "
                       "degradation in deep MLPs and LSTMs")
    p.add_argument("experiment", choices=("block-depth", "shortcuts", "mlp-depth", "rnn-depth"),
                   metavar="STUDY", help="block-depth, shortcuts, mlp-depth or rnn-depth")
    _study_options(p, depths_help="total depths (default: 56; shortcuts: 56 20; mlp-depth: 4 8 "
                   "14 20 32 56; rnn-depth: 1 2 4 8 16)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="training or inference speed vs a plain reference")
    p.add_argument("mode", choices=("train", "infer", "onnx", "photos"),
                   help="train, infer (PyTorch's inference paths), onnx (the exported model on "
                   "ONNX Runtime against eager and reslab's best PyTorch path, batch 1 and 32), "
                   "or photos (training at 224 from an image folder, reslab's loader and step "
                   "against torchvision's loader and a plain loop)")
    p.add_argument("model", help="e.g. resnet20, resnet50")
    p.add_argument("--batch-size", type=_positive_int,
                   help="(default: 128 train, 1 infer, 1 and 32 onnx, 32 photos)")
    p.add_argument("--threads", type=_positive_int,
                   help="onnx: threads for PyTorch and ONNX Runtime (default: all cores)")
    p.add_argument("--steps", type=_positive_int,
                   help="timed steps per setup, train and photos (default: 20)")
    p.add_argument("--input-size", type=_positive_int,
                   help="input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets)")
    p.add_argument("--in-channels", type=_positive_int,
                   help="input channels, train and infer (default: 3)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out (default: compiled)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the one-change-at-a-time ablation (default: run it)")
    p.add_argument("--device", help="cpu or cuda, train and photos (default: cpu)")
    p.add_argument("--data", type=Path,
                   help="photos: the image folder (default: none; photos needs one)")
    p.add_argument("--workers", type=_workers,
                   help="photos: loader processes (default: one per core, at most 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.set_defaults(func=cmd_bench)
    # Listed for --help only: main hands `reslab torchrun ...` to reslab.launch before parsing.
    sub.add_parser("torchrun", add_help=False,
                   help="torchrun [its options] COMMAND ...: torchrun -m reslab COMMAND, with "
                   "reslab's exit statuses and a bounded wait (reslab torchrun --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's entry point; every error a user can cause ends here as one line."""
    command = "reslab"
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchrun"]:  # torchrun's own options: its parser reads them
        from reslab.launch import torchrun
        return torchrun(argv[1:])
    try:
        # Ctrl-C while torch and numpy import is deferred to after the imports: raised inside
        # an extension's import it can leave a half-imported module and a bug-like traceback.
        interrupted: list[int] = []
        main_thread = threading.current_thread() is threading.main_thread()  # signals need it
        if main_thread:
            previous = signal.signal(signal.SIGINT,
                                     lambda signum, _frame: interrupted.append(signum))
        try:
            parser = build_parser()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        command = f"reslab {args.command}"
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except SystemExit as e:  # argparse: 0 for --help
        return e.code if isinstance(e.code, int) else 2
    except ArgumentError as e:  # one line, as "reslab train: error: ..."
        return _fail(e.prog, str(e))
    except (UsageError, ValueError) as e:
        return _fail(command, str(e))
    except BrokenPipeError:
        # Python's advice: point stdout at devnull, so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _fail(command, "the output was closed before it was all written (e.g. by head); "
                     "a run folder resumes with the same command")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(command, f"{where}{e.strerror or e}; check the path, its permissions and "
                     "free space")
    except MemoryError:
        return _fail(command, "out of memory; use a smaller --batch-size or a smaller model")
    except KeyboardInterrupt:
        return _fail(command, "interrupted (Ctrl-C) before training started or between runs; "
                     "nothing half-written is left: rerun the same command",
                     128 + signal.SIGINT)
    except RuntimeError as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's; torch may not be imported
            return _fail(command, f"out of device memory ({str(e).splitlines()[0]}); use a "
                         "smaller --batch-size or --gradient-checkpointing")
        raise


def _this_command() -> str:
    """The command a user reruns to resume: torchrun's, under torchrun."""
    import shlex

    from .distributed import launcher_command

    return shlex.join(launcher_command() or ["reslab", *sys.argv[1:]])


# Under torchrun, a rank other than 0 waits this long before printing its error: an error every
# rank meets is then printed once, by rank 0, after which the agent stops the other ranks.
RANK_ERROR_DELAY = 5.0


def _fail(command: str, message: str, code: int = 2) -> int:
    """The error in one line on stderr (under torchrun, once: see RANK_ERROR_DELAY)."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if os.environ.get("RANK", "0") != "0":  # torch is loaded on a rank: the import is free
        from .distributed import under_torchrun

        if under_torchrun():
            import time

            time.sleep(RANK_ERROR_DELAY)  # rank 0 met it too, unless this rank's own
    print(f"{command}: error: {one_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
