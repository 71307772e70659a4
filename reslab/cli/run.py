"""`reslab train` and `reslab.train(...)`: the command line's options to a RunSpec and
TrainOptions; the library decides (reslab.train.train)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from .options import UsageError, fail, this_command, train_options


def cmd_train(args: argparse.Namespace) -> int:
    from ..distributed import world_from_env
    from ..train import NonFiniteLoss, TrainingStopped

    main = world_from_env().main  # under torchrun, rank 0 speaks for the run
    try:
        summary = _train(args)
    except TrainingStopped as e:
        if main:
            print(f"stopped after iteration {e.step} ({e.checkpoint.name} saved). Resume with the "
                  f"same command: {this_command()}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        return fail("reslab train", str(e))
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
    from .parser import build_parser  # which imports this module's cmd_train

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

    from ..data import open_data
    from ..recipes import get_recipe
    from ..train import RunSpec, check_start, train

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
    finetune = finetune_fields(args)
    spec = RunSpec(
        model=args.model, data=data_spec(args.data), recipe=recipe, shortcut=args.shortcut,
        layout=finetune.pop("layout", args.layout), layers_per_block=args.layers_per_block,
        zero_init_residual=args.zero_init_residual, in_channels=args.in_channels,
        num_classes=args.num_classes, **finetune,
    )
    options = train_options(args)
    # Device, model and run folder first: a mistake there is reported before the data is read.
    check_start(spec, args.out, options, compare=args.epochs is None)
    data = open_data(args.data, val_split=recipe.val_split, seed=0,
                     skip_bad_images=args.skip_bad_images, loader=args.loader)
    report_left_out(data)
    if args.epochs is not None:
        spec = replace(spec, recipe=recipe.with_epochs(args.epochs, data.train_size))
    return train(spec, args.out, data=data, options=options)


def finetune_fields(args: argparse.Namespace) -> dict:
    """RunSpec's init_from, init_sha256, freeze (and layout) from --init-from, --freeze and
    --linear-probe."""
    from ..models import part_names

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
        from ..finetune import file_digest, resolve_source

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
    from ..checkpoint import list_checkpoints
    from ..finetune import WEIGHTS

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


def report_left_out(data) -> None:  # noqa: ANN001 (a data.Dataset; data imports torch)
    """Say which files a data set left out: bad images skipped, files that are not images."""
    for files, what in ((data.skipped_files, "skipped {} bad image(s) (--skip-bad-images)"),
                        (data.ignored_files, "ignored {} file(s) that are not images")):
        if files:
            print(what.format(len(files)) + ": " + ", ".join(files[:5])
                  + (" ..." if len(files) > 5 else ""), file=sys.stderr)


def data_spec(data: str) -> str:
    """Known names stay names; a folder is recorded as its absolute path."""
    from ..data import DATASETS

    return data if data in DATASETS else str(Path(data).resolve())
