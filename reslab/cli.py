"""The `reslab` command: parse, then call the library. Exit codes: 0 success, 2 usage or input
errors (the message names the bad value and the fix), 1 anything unexpected."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import models

if TYPE_CHECKING:
    from .train import TrainOptions


class UsageError(Exception):
    """A bad value from the command line or the user's files: exit 2."""


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shortcut", choices=models.SHORTCUTS, help="shortcut option or mapping")
    p.add_argument("--layout", choices=models.LAYOUTS, help="bottleneck stride placement")
    p.add_argument("--layers-per-block", type=int, choices=(1, 2, 3), help="conv layers in F(x)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """How runs execute (TrainOptions, read back by _train_options); they change no result."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model (auto: on for runs of >= 5000 iterations)")
    p.add_argument("--compile-mode",
                   choices=("default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode (default: torch's default)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="capture the whole step as one CUDA graph (auto: on for CUDA devices)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (ResNet-1202 in 24 GB)")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--skip-nonfinite", type=_non_negative, default=0, metavar="K",
                   help="skip steps with a NaN/inf loss, stop after K in a row (0: at the first)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms; two runs write identical metrics.jsonl")
    p.add_argument("--no-progress", action="store_true")


def _train_options(args: argparse.Namespace) -> TrainOptions:
    """The TrainOptions of _run_options' flags."""
    from .train import TrainOptions

    auto = {"auto": None, "on": True, "off": False}
    return TrainOptions(
        device=args.device, compile_model=auto[args.compile], compile_mode=args.compile_mode,
        cuda_graphs=auto[args.cuda_graphs], gradient_checkpointing=args.gradient_checkpointing,
        skip_bad_images=args.skip_bad_images, skip_nonfinite=args.skip_nonfinite,
        deterministic=args.deterministic, progress=False if args.no_progress else None,
    )


def _study_options(p: argparse.ArgumentParser, depths_help: str) -> None:
    """Options shared by `reproduce` and `study`: both train arms into a run pool (an
    experiments.Experiment), with `train`'s run options."""
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--depths", type=int, nargs="+", help=depths_help)
    p.add_argument("--iterations", type=int, default=64_000, help="the paper's: 64000")
    p.add_argument("--seeds", type=int, default=1, help="runs per net (Table 6: best, mean±std)")
    p.add_argument("--runs", type=Path, help="run pool shared between studies (default OUT/runs)")
    p.add_argument("--report-only", action="store_true", help="rewrite reports, train nothing")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="the arms' precision (default: the recipe's, auto); runs of another "
                   "precision are other runs, named so in the pool")
    _run_options(p)


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


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .data import load_dataset
    from .recipes import get_recipe
    from .train import NonFiniteLoss, RunSpec, TrainingStopped, train

    recipe = get_recipe(args.recipe)
    overrides = {
        k: v for k, v in {
            "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
            "seed": args.seed, "precision": args.precision, "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every, "log_every": args.log_every,
            "val_split": args.val_split, "normalization": args.normalization,
        }.items() if v is not None
    }
    recipe = replace(recipe, **overrides)
    if args.iterations is not None and args.epochs is not None:
        raise UsageError("give --iterations or --epochs, not both")
    if args.iterations is not None:
        recipe = recipe.with_iterations(args.iterations)
    data = load_dataset(args.data, val_split=recipe.val_split, seed=0,
                        skip_bad_images=args.skip_bad_images)
    if data.skipped_files:
        print(f"skipped {len(data.skipped_files)} bad images (--skip-bad-images): "
              + ", ".join(data.skipped_files[:5]) + (" ..." if len(data.skipped_files) > 5 else ""))
    if args.epochs is not None:
        recipe = recipe.with_epochs(args.epochs, len(data.train_images))
    spec = RunSpec(
        model=args.model, data=_data_spec(args.data), recipe=recipe, shortcut=args.shortcut,
        layout=args.layout, layers_per_block=args.layers_per_block,
        zero_init_residual=args.zero_init_residual, in_channels=args.in_channels,
        num_classes=args.num_classes,
    )
    try:
        summary = train(spec, args.out, data=data, options=_train_options(args))
    except TrainingStopped as e:
        print(f"stopped after iteration {e.step} ({e.checkpoint.name} saved). Resume with the "
              f"same command: reslab {' '.join(sys.argv[1:])}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        print(f"reslab train: error: {e}", file=sys.stderr)
        return 1
    print(f"final test error {100 * summary['final_test_error']:.2f}% "
          f"(train error {100 * summary['final_train_error']:.2f}%) after "
          f"{summary['iterations']} iterations; run folder {args.out}")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _data_spec(data: str) -> str:
    """Known names stay names; a folder is recorded as its absolute path."""
    from .data import DATASETS

    return data if data in DATASETS else str(Path(data).resolve())


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .evaluate import evaluate
    from .train import load_trained

    model, mean, std, spec = load_trained(args.run, device=args.device)
    data = load_dataset(args.data, skip_bad_images=args.skip_bad_images)
    if data.in_channels != model.conv1.in_channels:
        raise UsageError(f"{args.data} has {data.in_channels}-channel images but the model takes "
                         f"{model.conv1.in_channels}")
    classes = model.fc.out_features  # the training data's, unless --num-classes was given
    if data.num_classes > classes or (spec.num_classes is None and data.num_classes != classes):
        raise UsageError(f"{args.data} has {data.num_classes} classes but {args.run} was trained "
                         f"on {classes}; evaluate it on data with the same classes")
    if mean.ndim == 3 and tuple(mean.shape[1:]) != data.image_size:
        raise UsageError(f"{args.data} has {data.image_size[0]}x{data.image_size[1]} images but "
                         f"{args.run} was trained on {mean.shape[1]}x{mean.shape[2]} (per-pixel "
                         "mean); resize the images to the training size")
    precision = args.precision or spec.recipe.precision
    error, loss = evaluate(model, data.test_images, data.test_labels, mean, std,
                           precision=precision, memory_format=torch.channels_last)
    if args.json:
        print(json.dumps({"test_error": error, "test_loss": loss, "model": spec.model,
                          "data": args.data, "images": len(data.test_images),
                          "precision": precision}))
    else:
        print(f"{spec.model} on {args.data}: test error {100 * error:.2f}%, "
              f"test loss {loss:.4f} ({len(data.test_images)} images, {precision})")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`reproduce` (the paper's experiments) and `study` (the seed's questions) share a shape."""
    if args.command == "reproduce":
        from .reproduce import reproduce as run
    else:
        from .studies import run_study as run
    from .experiments import Experiment
    from .train import TrainingStopped

    exp = Experiment(
        data=_data_spec(args.data), out_dir=args.out, iterations=args.iterations,
        seeds=args.seeds, runs_dir=args.runs, report_only=args.report_only,
        options=_train_options(args), precision=args.precision,
    )
    try:
        report = run(args.experiment, exp, depths=args.depths)
    except TrainingStopped as e:
        print(f"stopped after iteration {e.step} of {e.checkpoint.parent.name} "
              f"({e.checkpoint.name} saved). Resume the whole study with the same command: "
              f"reslab {' '.join(sys.argv[1:])}", file=sys.stderr)
        return 128 + e.signum
    print(f"report: {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

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
    print(f"  reslab end to end      {r['images_per_second']:>8.0f} img/s "
          f"(warm-up incl. compile {r['warmup_s']:.1f} s)")
    print(f"  tutorial end to end    {r['reference_images_per_second']:>8.0f} img/s   "
          f"ratio x{r['ratio']:.2f}")
    print(f"  reslab model only      {r['model_only_images_per_second']:>8.0f} img/s")
    print(f"  eager fp32 model only  {r['reference_model_only_images_per_second']:>8.0f} img/s"
          f"   ratio x{r['model_only_ratio']:.2f}")
    print(f"  peak probe: fp32 {r['peak_fp32_madds_per_s'] / 1e9:.0f}, bf16 "
          f"{r['peak_bf16_madds_per_s'] / 1e9:.0f} G multiply-adds/s; achieved "
          f"{r['achieved_madds_per_s'] / 1e9:.0f} G = {100 * r['peak_fraction']:.0f}% of bf16")
    print("  step split (reslab): " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in r["step_split"].items()))
    k = r["kernel_split"]
    print(f"  convolutions take {100 * k['convolution_share']:.0f}% of a model-only step, at "
          f"{k['convolution_madds_per_s'] / 1e9:.0f} G multiply-adds/s "
          f"({100 * k['convolution_peak_fraction']:.0f}% of bf16 peak); the rest is BN, ReLU, "
          "additions")
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
    return 0


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
           f"{installed('torchvision')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Deep Residual Learning for Image Recognition (He et al. 2016), exactly.",
    )
    parser.add_argument("--version", action="version", version=_version(),
                        help="reslab's, torch's and torchvision's versions")
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

    p = sub.add_parser("train", help="train a model with the paper's recipe")
    p.add_argument("model", help="e.g. resnet20, plain56, resnet110")
    p.add_argument("--data", required=True,
                   help="fashion-mnist, mnist, cifar10, cifar100, cifar10-jpeg, or an "
                   "ImageFolder folder")
    p.add_argument("--out", required=True, type=Path, help="run folder (resumed if unfinished)")
    p.add_argument("--recipe", default="cifar10", help="named recipe (cifar10, quick)")
    p.add_argument("--iterations", type=int, help="scale the schedule to N iterations")
    p.add_argument("--epochs", type=float, help="the same in epochs of the training set")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--eval-every", type=int, help="evaluate every K iterations")
    p.add_argument("--log-every", type=int, help="log training error every K (0: 1%% of run)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every K iterations")
    p.add_argument("--val-split", type=int, help="hold out N training images for validation")
    p.add_argument("--normalization", choices=("pixel", "channel"))
    p.add_argument("--in-channels", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--zero-init-residual", action="store_true")
    _run_options(p)
    _model_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test error of a trained run")
    p.add_argument("run", type=Path, help="run folder or model.safetensors")
    p.add_argument("--data", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="evaluate in this precision (default: the run's training precision)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="the paper's Table 6, Figure 6 or Figure 7")
    p.add_argument("experiment", choices=("table6", "fig6", "fig7"))
    _study_options(p, depths_help="CIFAR depths 6n+2 (e.g. 20 56)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("study", help="beyond the paper: block depth, shortcut mappings")
    p.add_argument("experiment", choices=("block-depth", "shortcuts"), metavar="STUDY",
                   help="block-depth or shortcuts")
    _study_options(p, depths_help="total depths (default 56; shortcuts: 56 20)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="training or inference speed vs a plain reference")
    p.add_argument("mode", choices=("train", "infer"))
    p.add_argument("model")
    p.add_argument("--batch-size", type=int, help="default 128 (train), 1 (infer)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setup (train)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (train only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 for usage errors, 0 for --help
        return int(e.code or 0)
    try:
        return args.func(args)
    except (UsageError, ValueError) as e:
        print(f"reslab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
