"""`reslab info`, `data`, `reproduce`, `study` and `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from .options import PAPER, UsageError, this_command, train_options
from .run import data_spec


def cmd_info(args: argparse.Namespace) -> int:
    from .. import models
    from ..complexity import describe

    if args.pretrained:
        from ..pretrained import info_pretrained

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


def bench_onnx(args: argparse.Namespace) -> int:
    """`reslab bench onnx MODEL`: ONNX Runtime against eager and reslab's best PyTorch path."""
    from ..bench.infer import bench_inference

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
    from ..data import check_tree

    if args.action == "bench":
        from ..bench.photos import bench_loader
        from ..data.workers import default_workers

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
    if args.command == "reproduce":
        from ..reproduce import reproduce as run
    else:
        from ..studies import run_study as run
    from ..depth_studies import DEPTH_STUDIES
    from ..experiments import Experiment
    from ..train import TrainingStopped

    iterations = args.iterations or (DEPTH_STUDIES[args.experiment].iterations
                                     if args.experiment in DEPTH_STUDIES else PAPER.iterations)
    exp = Experiment(
        data=data_spec(args.data), out_dir=args.out, iterations=iterations,
        seeds=args.seeds, runs_dir=args.runs, report_only=args.report_only,
        options=train_options(args), precision=args.precision, batch_size=args.batch_size,
    )
    try:
        report = run(args.experiment, exp, depths=args.depths)
    except TrainingStopped as e:
        print(f"stopped after iteration {e.step} of {e.checkpoint.parent.name} "
              f"({e.checkpoint.name} saved). Resume the whole study with the same command: "
              f"{this_command()}", file=sys.stderr)
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
    from ..bench import train as bench

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
        return bench_onnx(args)
    if args.mode == "photos":
        from ..bench.photos import bench_train_photos
        from ..data.workers import default_workers

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
    print_bench_train(r)
    return 0


def print_bench_train(r: dict) -> None:
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
