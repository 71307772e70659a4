"""The `reslab` command: parse, then call the library. Exit codes: 0 success, 2 usage or input
errors (the message names the bad value and the fix), 1 anything unexpected."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import models


class UsageError(Exception):
    """A bad value from the command line or the user's files: exit 2."""


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shortcut", choices=models.SHORTCUTS, help="shortcut option or mapping")
    p.add_argument("--layout", choices=models.LAYOUTS, help="bottleneck stride placement")
    p.add_argument("--layers-per-block", type=int, choices=(1, 2, 3), help="conv layers in F(x)")


def cmd_info(args: argparse.Namespace) -> int:
    from .complexity import describe

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
        for stage, (c, h, w) in r.stages:
            print(f"    {stage:<8} {h}x{w}, {c} channels")
        return 0
    header = f"{'model':<11} {'family':<9} {'input':>5} {'params':>12} {'mult-adds':>10}"
    print(header + "  stages (HxW)")
    for r in rows:
        sizes = " ".join(f"{h}" for _, (_, h, _) in r.stages)
        print(f"{r.name:<11} {r.family:<9} {r.input_size:>5} {r.params:>12,} "
              f"{_human(r.multiply_adds):>10}  {sizes}")
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Deep Residual Learning for Image Recognition (He et al. 2016), exactly.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters, multiply-adds and stage sizes of a model")
    p.add_argument("model", nargs="?", help="e.g. resnet20, plain56, resnet50")
    p.add_argument("--all", action="store_true", help="every model of the paper, as a table")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input-size", type=int, help="input side in pixels (32 CIFAR, 224 ImageNet)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int)
    _model_options(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as e:
        print(f"reslab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
