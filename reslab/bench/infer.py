"""Inference speed of an exported model, side by side in one run: ONNX Runtime on the .onnx file
(uint8 in), eager PyTorch fp32 (the plain model, NCHW) and reslab's fastest PyTorch path, each
call including the normalisation of uint8 images, so every path does the same work.

reslab's candidates are all BN-folded (export.fold_batch_norm), channels_last, under
torch.inference_mode: fp32 and bf16 autocast, eager and torch.compile'd; the best measured one
is reported as reslab's. The figures are medians over rounds taken in turn (each round runs
every path once, in a rotated order), so a slow spell of a shared machine hits all paths alike.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset, load_dataset, normalize, pixel_mean
from ..export import export_onnx, fold_batch_norm, input_size_of, load_onnx
from ..models import build_model, model_family
from ..runfolder import RunSpec
from ..runtime import autocast, require
from ..runtime import threads as torch_threads
from ..trained import Trained, load_trained

__all__ = ["agreement_on_run", "bench_inference", "markdown_tables", "random_images", "stand_in",
           "top1_agreement"]

CPU = torch.device("cpu")
ORT, EAGER = "ONNX Runtime (uint8 in)", "eager fp32 (NCHW)"
AGREEMENT_IMAGES = {"cifar": 512, "imagenet": 64}  # random images for the top-1 agreement


def random_images(n: int, channels: int, size: tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    """uint8 images, each a random colour plus uniform noise of a random amplitude: unlike pure
    noise (to which a network answers nearly alike for every image), they spread a network's
    outputs as different photographs do."""
    colour = torch.randint(0, 256, (n, channels, 1, 1), generator=generator).float()
    amplitude = torch.randint(8, 128, (n, 1, 1, 1), generator=generator).float()
    noise = torch.rand(n, channels, *size, generator=generator) * 2 - 1
    return (colour + amplitude * noise).round().clamp(0, 255).to(torch.uint8)


def stand_in(name: str, *, in_channels: int = 3, num_classes: int | None = None,
             mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
             layout: str | None = None, seed: int = 0) -> Trained:
    """A Trained with random weights and BN statistics as a trained net has them: running
    statistics gathered on random_images (so activations keep a trained net's scale), random
    affine BN parameters (so folding changes every weight), and a standardised head (logits
    of mean 0 and std 1 over random_images: a random head alone gives nearly every image
    the same top-1 class, and an agreement count would be trivially 100%). The mean defaults
    to the per-pixel mean of random_images at the family's size; classes are "class0", ..."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, layout=layout)
    side = 32 if model_family(name) == "cifar" else 224
    if mean is None:
        mean = pixel_mean(random_images(16, in_channels, (side, side), g))
    size = tuple(mean.shape[1:]) if mean.ndim == 3 else (side, side)
    n = 16 if model_family(name) == "cifar" else 8
    images = random_images(n, in_channels, size, g)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(normalize(images, mean, std))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=g))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
        model.eval()
        z = model(normalize(images, mean, std))
        # One scale for all classes: per-class ones from a few images blow some classes up.
        mu = z.mean(0)
        sd = (z - mu).std().clamp_min(1e-6)
        model.fc.weight.div_(sd)
        model.fc.bias.sub_(mu).div_(sd)
    model = model.to(memory_format=torch.channels_last)
    spec = RunSpec(model=name, data="random", layout=layout)
    classes = tuple(f"class{i}" for i in range(model.fc.out_features))
    return Trained(model, mean, std, spec, classes)




def _pytorch_paths(trained: Trained, compile_model: bool
                   ) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """name -> (uint8 images -> logits, precision), the reference first."""
    mean, std = trained.mean, trained.std
    plain = _contiguous(trained.model)
    folded = fold_batch_norm(trained.model).to(memory_format=torch.channels_last)

    def eager(x: torch.Tensor) -> torch.Tensor:
        return plain(normalize(x, mean, std))

    def reslab(x: torch.Tensor) -> torch.Tensor:
        return folded(normalize(x, mean, std).contiguous(memory_format=torch.channels_last))

    paths = {EAGER: (eager, "fp32"),
             "BN folded + channels_last, fp32": (reslab, "fp32"),
             "BN folded + channels_last, bf16": (reslab, "bf16")}
    if compile_model:  # one compiled function per precision: autocast is traced in
        paths["BN folded + compile, fp32"] = (torch.compile(reslab, dynamic=False), "fp32")
        paths["BN folded + compile, bf16"] = (torch.compile(reslab, dynamic=False), "bf16")
    return paths


def _contiguous(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return time.perf_counter() - t0


def _run(fn: Callable[[torch.Tensor], torch.Tensor], precision: str, reference: bool = False
         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn under no_grad (the reference, as a plain script runs a model) or inference_mode
    (reslab's: no version counters, no views tracked), and autocast for bf16."""
    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if reference else torch.inference_mode(), autocast(CPU, precision):
            return fn(x).float()
    return call


def _logits(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            batch: int) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


def top1_agreement(paths: dict[str, Callable[[torch.Tensor], torch.Tensor]], reference: str,
                   images: torch.Tensor, batch: int, labels: torch.Tensor | None = None
                   ) -> dict[str, Any]:
    """Each path's top-1 class against `reference`'s on `images` (uint8), the largest logit
    difference, and how hard the images are to agree on (distinct classes, top-1 margins);
    with `labels`, every path's top-1 error too."""
    ref = _logits(paths[reference], images, batch)
    top2 = ref.topk(2, dim=1).values
    out: dict[str, Any] = {
        "images": len(images), "reference": reference,
        "distinct_top1_classes": int(ref.argmax(1).unique().numel()),
        "median_top1_margin": (top2[:, 0] - top2[:, 1]).median().item(),
        "max_abs_logit": ref.abs().max().item(), "paths": {},
    }
    if labels is not None:
        out["reference_top1_error"] = (ref.argmax(1) != labels).float().mean().item()
    for name, fn in paths.items():
        if name != reference:
            logits = _logits(fn, images, batch)
            row = out["paths"][name] = {
                "top1_agreement": (logits.argmax(1) == ref.argmax(1)).float().mean().item(),
                "max_abs_logit_difference": (logits - ref).abs().max().item(),
            }
            if labels is not None:
                row["top1_error"] = (logits.argmax(1) != labels).float().mean().item()
    return out


def agreement_on_run(source: Path, data: str | Dataset, *, batch: int = 250,
                     threads: int | None = None) -> dict[str, Any]:
    """A trained run's test split (`data`: a data set's name or a Dataset) through every
    uncompiled path and its ONNX export on ONNX Runtime: top-1 agreement with eager fp32 and
    each path's top-1 error."""

    threads = threads or len(os.sched_getaffinity(0))
    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        trained = load_trained(Path(source))
        test = load_dataset(data) if isinstance(data, str) else data
        ort = load_onnx(export_onnx(trained, Path(tmp) / "model.onnx"), threads=threads)
        paths = {ORT: ort, **{k: _run(fn, p, k == EAGER) for k, (fn, p)
                              in _pytorch_paths(trained, compile_model=False).items()}}
        out = top1_agreement(paths, EAGER, test.test_images, batch, test.test_labels)
    return {"run": str(source), "data": test.name, "model": trained.spec.model, **out}


def _rates(paths: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int,
           round_s: float) -> dict[str, dict[str, Any]]:
    """Median images/s per path over `rounds` rounds taken in turn, after a warm-up."""
    warmup, calls = {}, {}
    for name, fn in paths.items():  # warm-up: compilation, oneDNN's first-call set-up
        t0 = time.perf_counter()
        for _ in range(3):
            fn(x)
        warmup[name] = time.perf_counter() - t0
        calls[name] = max(1, math.ceil(round_s / _timed(fn, x, 1)))
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(len(x) * calls[name] / _timed(paths[name], x, calls[name]))
    return {k: {"images_per_second": statistics.median(v), "rounds": v,
                "calls_per_round": calls[k], "warmup_s": warmup[k]} for k, v in times.items()}


def bench_inference(model: str, batch_sizes: tuple[int, ...] = (1, 32), *,
                    threads: int | None = None, rounds: int = 5, round_s: float = 0.5,
                    compile_model: bool = True) -> dict[str, Any]:
    """Images/s of ONNX Runtime, eager PyTorch fp32 and reslab's best PyTorch path for `model`
    (stand_in weights, 3 channels, the family's input size and class count), at each batch
    size on `threads` threads (default: all this process may use); and, at the largest batch,
    each path's top-1 agreement with eager fp32 on random images."""
    onnxruntime = require("onnxruntime", "bench onnx")

    threads = threads or len(os.sched_getaffinity(0))
    out: dict[str, Any] = {
        "model": model, "threads": threads, "rounds": rounds, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "batches": {},
    }
    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        trained = stand_in(model)
        size = input_size_of(trained)
        out["input_size"], out["num_classes"] = list(size), trained.model.fc.out_features
        t0 = time.perf_counter()
        onnx_path = export_onnx(trained, Path(tmp) / "model.onnx")
        out["onnx_export_s"] = time.perf_counter() - t0
        out["onnx_bytes"] = onnx_path.stat().st_size
        ort = load_onnx(onnx_path, threads=threads)
        g = torch.Generator().manual_seed(1)
        for batch in batch_sizes:
            x = random_images(batch, 3, size, g)
            pytorch = _pytorch_paths(trained, compile_model)
            paths = {ORT: ort, **{k: _run(fn, p, k == EAGER) for k, (fn, p) in pytorch.items()}}
            rates = _rates(paths, x, rounds, round_s)
            ref = rates[EAGER]["images_per_second"]
            for r in rates.values():
                r["vs_eager_fp32"] = r["images_per_second"] / ref
            best = max((k for k in pytorch if k != EAGER),
                       key=lambda k: rates[k]["images_per_second"])
            out["batches"][str(batch)] = {
                "batch_size": batch, "paths": rates, "reslab_best_path": best,
                "reslab_best_images_per_second": rates[best]["images_per_second"],
                "onnxruntime_images_per_second": rates[ORT]["images_per_second"],
                "eager_fp32_images_per_second": ref,
            }
            if batch == max(batch_sizes):  # the compiled paths are compiled for this shape
                n = AGREEMENT_IMAGES[model_family(model)] // batch * batch or batch
                probe = random_images(n, 3, size, g)
                out["top1_vs_eager_fp32_random_images"] = top1_agreement(paths, EAGER, probe,
                                                                         batch)
    return out


def _ips(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown_tables(results: list[dict[str, Any]],
                    runs: list[dict[str, Any]] = ()) -> str:
    """The README's tables from bench_inference's results (and agreement_on_run's)."""
    lines = ["| model, input | batch | eager fp32 img/s | reslab's best img/s (path) | "
             "ONNX Runtime img/s | best / eager | ONNX Runtime / eager | ONNX Runtime / best |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        h, w = r["input_size"]
        for row in r["batches"].values():
            eager, best = row["eager_fp32_images_per_second"], row["reslab_best_images_per_second"]
            ort = row["onnxruntime_images_per_second"]
            lines.append(f"| {r['model']}, {h}x{w} | {row['batch_size']} | {_ips(eager)} | "
                         f"{_ips(best)} ({row['reslab_best_path']}) | {_ips(ort)} | "
                         f"{best / eager:.2f}x | {ort / eager:.2f}x | {ort / best:.2f}x |")
    lines += ["", "| model, images | distinct top-1 classes | path | top-1 agreement with eager "
              "fp32 | max abs logit difference | top-1 error |", "|---|---|---|---|---|---|"]
    for r, what in [(r, f"{r['model']}, {r['top1_vs_eager_fp32_random_images']['images']} "
                     "random") for r in results] + [(r, f"{r['model']} ({r['data']} test split),"
                                                     f" {r['images']}") for r in runs]:
        a = r.get("top1_vs_eager_fp32_random_images", r)
        for name, p in a["paths"].items():
            error = f"{100 * p['top1_error']:.2f}% (fp32 {100 * a['reference_top1_error']:.2f}%)" \
                if "top1_error" in p else "-"
            lines.append(f"| {what} | {a['distinct_top1_classes']} | {name} | "
                         f"{100 * p['top1_agreement']:.2f}% | {p['max_abs_logit_difference']:.1e} "
                         f"| {error} |")
    return "\n".join(lines) + "\n"
