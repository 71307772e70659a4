"""`reslab bench`: training and inference speed, every figure a ratio taken in the same run.

These machines are shared and noisy: absolute times drift, ratios measured side by side hold.
reslab's training path is train()'s own step (step.build_step); the reference and the ablation's
setups are in reference.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..complexity import describe
from ..data import BatchStream, pixel_mean
from ..data.augment import IndexBatch, index_batch
from ..export import fold_batch_norm
from ..models import build_model
from ..recipes import get_recipe
from ..runtime import autocast, resolve_precision, threads
from ..step import MEMORY_FORMAT, Step, Window, build_step, make_optimizer
from ..train import COMPILE_MODES
from .reference import Setup, bench_images, matmul_peak, sync_device, time_training


def reslab_step(name: str, images: torch.Tensor, labels: torch.Tensor, *, device: str,
                batch_size: int, compile_model: bool, model_only: bool = False,
                cuda_graphs: bool | None = None
                ) -> tuple[Step, BatchStream, Callable[[torch.Tensor, int], IndexBatch]]:
    """train()'s own step for `name` on these images, built by the function train() uses
    (step.build_step), with the paper's recipe at `batch_size`, its batch order, and the batch
    of indices `idx` at iteration i as train()'s feed makes it; model only: no augmentation."""
    dev = torch.device(device)
    recipe = replace(get_recipe("cifar10"), batch_size=batch_size, pad=0 if model_only else 4)
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, dev))
    torch.manual_seed(0)
    model = build_model(name, in_channels=images.shape[1], num_classes=10).to(dev)
    model = model.to(memory_format=MEMORY_FORMAT).train()
    window = Window.start(dev, warmup=False, warmup_window=recipe.warmup_window)
    resident = images.to(dev), labels.to(dev)
    step = build_step(
        model, make_optimizer(model, recipe, dev), *resident,
        pixel_mean(images).to(dev), None, recipe, window, compile_model=compile_model,
        compile_mode=COMPILE_MODES.get(dev.type), cuda_graphs=cuda_graphs,
    )

    def batch(idx: torch.Tensor, i: int) -> IndexBatch:
        return index_batch(*resident, idx, i, pad=recipe.pad, seed=recipe.seed)

    return step, BatchStream(len(images), batch_size, seed=0), batch


def time_reslab(name: str, images, labels, *, device: str, batch_size: int, steps: int,
                compile_model: bool, warmup: int = 3, model_only: bool = False
                ) -> dict[str, Any]:
    """Steady-state images/s of train()'s step (reslab_step); its batch order apart in the
    split. Model only: the same batch every step, not augmented."""
    dev = torch.device(device)
    step, stream, batch = reslab_step(name, images, labels, device=device,
                                      batch_size=batch_size, compile_model=compile_model,
                                      model_only=model_only)
    fixed = torch.arange(batch_size)
    i = 0

    def run(n: int, timings: dict[str, list[float]] | None = None) -> float:
        nonlocal i
        sync_device(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            td = time.perf_counter()
            idx = fixed if model_only else stream.next()
            t1 = time.perf_counter()
            step(batch(idx, i), i)
            i += 1
            if timings is not None:
                timings["batch order"].append(t1 - td)
        sync_device(dev)
        return time.perf_counter() - t0

    # A graphed step captures after its eager warm-up: warm up past it.
    warm = run(max(warmup, step.graphed.warmup + 1) if step.graphed else warmup)
    timings: dict[str, list[float]] = {"batch order": []}
    total = run(steps, timings)
    order = sum(timings["batch order"]) / total
    return {"images_per_second": steps * batch_size / total, "warmup_s": warm,
            "step_split": {"batch order": order,
                           "step (augmentation, forward, backward, SGD)": 1 - order}}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ chatter (stage lines, a CUDA probe on CPU-only machines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def kernel_split(name: str, images: torch.Tensor, labels: torch.Tensor, *, device: str,
                 compile_model: bool, batch_size: int, steps: int,
                 multiply_adds: int) -> dict[str, Any]:
    """Where train()'s model-only step's time goes: convolutions (forward and backward) vs the
    rest.

    The rest is mostly BN, ReLU and the shortcut additions, which are bound by memory, not by
    multiply-adds; the convolutions' own rate shows how close they run to the matmul peak.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    # The profiler cannot see inside a CUDA graph's replay: the same step without graphs.
    step, _, batch = reslab_step(name, images, labels, device=device, batch_size=batch_size,
                                 compile_model=compile_model, model_only=True, cuda_graphs=False)
    idx = torch.arange(batch_size)
    for i in range(3):
        step(batch(idx, i), i)
    sync_device(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with _quiet_stderr(), profile(activities=activities) as prof:
        for i in range(steps):
            step(batch(idx, 3 + i), 3 + i)
        sync_device(dev)
    wall = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":  # GPU time of the convolutions' kernels, forward and backward
        conv = sum(e.device_time_total for e in prof.key_averages()
                   if e.key in ("aten::convolution", "aten::convolution_backward")) / 1e6 / steps
    else:
        conv = sum(e.self_cpu_time_total for e in prof.key_averages()
                   if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward",
                                "aten::_convolution", "aten::convolution")) / 1e6 / steps
    return {"step_s": wall, "convolution_s": conv, "convolution_share": conv / wall,
            "convolution_madds_per_s": 3 * multiply_adds * batch_size / conv}


def _peaks(dev: torch.device) -> dict[str, Any]:
    """The precision reslab trains in here, and the fp32 and bf16 matmul peaks: bf16's only
    where it runs natively (emulated, one 2048^3 product alone takes about a minute and is no
    peak of anything)."""
    precision = resolve_precision("auto", dev)
    return {"precision": precision,
            "peak_fp32_madds_per_s": matmul_peak(torch.float32, device=str(dev)),
            "peak_bf16_madds_per_s": matmul_peak(torch.bfloat16, device=str(dev))
            if precision == "bf16" else None}


def bench_train(name: str, *, batch_size: int = 128, steps: int = 20, input_size: int | None = None,
                in_channels: int = 3, compile_model: bool = True,
                ablation: bool = True, device: str = "cpu") -> dict[str, Any]:
    """reslab's default path vs the tutorial reference, peak fraction, step split, ablation."""
    info = describe(name, input_size=input_size, in_channels=in_channels)
    dev = torch.device(device)
    images, labels = bench_images(max(4 * batch_size, 2048), in_channels, info.input_size)
    peaks = _peaks(dev)
    peak = peaks[f"peak_{peaks['precision']}_madds_per_s"]
    ref = Setup(device=device)
    out: dict[str, Any] = {
        "model": name, "batch_size": batch_size, "input_size": info.input_size, "steps": steps,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "compile_mode": COMPILE_MODES.get(dev.type) if compile_model else None,
        "whole_step_cuda_graph": dev.type == "cuda", "multiply_adds_per_image": info.multiply_adds,
        "threads": torch.get_num_threads(), **peaks}
    # reslab's path is train()'s own step, so the benchmark cannot drift from training.
    ours = time_reslab(name, images, labels, device=device, batch_size=batch_size,
                       steps=steps, compile_model=compile_model)
    ours_model = time_reslab(name, images, labels, device=device, batch_size=batch_size,
                             steps=steps, compile_model=compile_model, model_only=True)
    ref_e2e = time_training(name, images, labels, replace(ref, batched_aug=False), batch_size,
                            steps)
    ref_model = time_training(name, images, labels, ref, batch_size, steps, model_only=True)
    out.update({
        "images_per_second": ours["images_per_second"],
        "warmup_s": ours["warmup_s"],
        "step_split": ours["step_split"],
        "model_only_images_per_second": ours_model["images_per_second"],
        "reference_images_per_second": ref_e2e["images_per_second"],
        "reference_step_split": ref_e2e["step_split"],
        "reference_model_only_images_per_second": ref_model["images_per_second"],
    })
    out["ratio"] = out["images_per_second"] / out["reference_images_per_second"]
    out["model_only_ratio"] = (out["model_only_images_per_second"]
                               / out["reference_model_only_images_per_second"])
    # Training costs ~3x the forward multiply-adds (forward, two backward products).
    achieved = 3 * info.multiply_adds * out["model_only_images_per_second"]
    out["achieved_madds_per_s"] = achieved
    out["peak_fraction"] = achieved / peak
    out["peak_fraction_fp32"] = achieved / peaks["peak_fp32_madds_per_s"]
    split = kernel_split(name, images, labels, device=device, compile_model=compile_model,
                         batch_size=batch_size, steps=max(steps // 2, 2),
                         multiply_adds=info.multiply_adds)
    split["convolution_peak_fraction"] = split["convolution_madds_per_s"] / peak
    out["kernel_split"] = split
    if ablation:
        base = ref_model["images_per_second"]
        rows = {"eager fp32 NCHW (baseline)": base}
        alone = [("bf16 autocast", replace(ref, precision="bf16")),
                 ("channels_last", replace(ref, channels_last=True)),
                 ("torch.compile", replace(ref, compile=True))]
        if dev.type == "cpu":  # a GPU runs every optimizer fused, the reference's too
            alone.append(("fused SGD", replace(ref, fused_sgd=True)))
        if dev.type == "cuda":
            alone.append(("torch.compile + CUDA graphs",
                          replace(ref, compile=True, compile_mode="reduce-overhead")))
            alone.append(("whole step as one CUDA graph", replace(ref, whole_step_graph=True)))
        for label, setup in alone:
            if setup.compile and not compile_model:
                continue
            rows[label] = time_training(name, images, labels, setup, batch_size, steps,
                                        model_only=True)["images_per_second"]
        out["ablation_model_only"] = {k: {"images_per_second": v, "gain": v / base}
                                      for k, v in rows.items()}
        # Data: batched tensor augmentation vs per-sample torchvision, same eager fp32 model.
        batched = time_training(name, images, labels, ref, batch_size, steps)
        out["ablation_data"] = {
            "per-sample torchvision + DataLoader(2 workers)": ref_e2e["images_per_second"],
            "batched tensor augmentation": batched["images_per_second"],
            "gain": batched["images_per_second"] / ref_e2e["images_per_second"],
        }
        if dev.type == "cpu":  # host threads matter little when a GPU runs the step
            with threads(1):
                one = time_training(name, images, labels, Setup(), batch_size,
                                    max(steps // 2, 3), model_only=True)["images_per_second"]
            out["ablation_threads"] = {"1 thread": one,
                                       f"{torch.get_num_threads()} threads": base,
                                       "gain": base / one}
    return out




def time_inference(forward: Callable, x: torch.Tensor, precision: str,
                   seconds: float = 2.0) -> float:
    """Median images/s over repeated calls, after warm-up."""
    dev = torch.device("cpu")
    with torch.no_grad(), autocast(dev, precision):
        for _ in range(3):
            forward(x)
        times, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 5:
            t0 = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def bench_infer(name: str, *, batch_size: int = 1, input_size: int | None = None,
                in_channels: int = 3, compile_model: bool = True) -> dict[str, Any]:
    """Eager fp32 vs bf16, BN folding, channels_last and compile, at one batch size."""
    info = describe(name, input_size=input_size, in_channels=in_channels)
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels).eval()
    x = torch.randn(batch_size, in_channels, info.input_size, info.input_size)
    xl = x.contiguous(memory_format=torch.channels_last)
    folded = fold_batch_norm(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        err = (folded(xl) - model(x)).abs().max().item()
    rows = {"eager fp32": time_inference(model, x, "fp32")}
    rows["bf16"] = time_inference(model, x, "bf16")
    rows["BN folded + channels_last fp32"] = time_inference(folded, xl, "fp32")
    rows["BN folded + channels_last bf16"] = time_inference(folded, xl, "bf16")
    if compile_model:
        t0 = time.perf_counter()
        compiled = torch.compile(folded)
        time_inference(compiled, xl, "fp32", seconds=0.1)
        compile_s = time.perf_counter() - t0
        rows["BN folded + compile fp32"] = time_inference(compiled, xl, "fp32")
        t0 = time.perf_counter()
        compiled_bf16 = torch.compile(copy.deepcopy(folded))
        time_inference(compiled_bf16, xl, "bf16", seconds=0.1)
        compile_s += time.perf_counter() - t0
        rows["BN folded + compile bf16"] = time_inference(compiled_bf16, xl, "bf16")
        # Inductor's freezing: weights become constants, so oneDNN can pre-pack them once.
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            t0 = time.perf_counter()
            frozen = torch.compile(copy.deepcopy(folded))
            time_inference(frozen, xl, "bf16", seconds=0.1)
            compile_s += time.perf_counter() - t0
            rows["BN folded + compile + freezing bf16"] = time_inference(frozen, xl, "bf16")
    base = rows["eager fp32"]
    best = max(rows, key=rows.get)
    out = {
        "model": name, "batch_size": batch_size, "input_size": info.input_size,
        "images_per_second": rows[best], "best_path": best,
        "reference_images_per_second": base, "ratio": rows[best] / base,
        "folding_max_abs_error": err,
        "paths": {k: {"images_per_second": v, "gain": v / base} for k, v in rows.items()},
        # Of the best path's precision (bench_train: bf16's peak only where it is native).
        "peak_fraction": info.multiply_adds * rows[best] / matmul_peak(
            torch.bfloat16 if "bf16" in best else torch.float32),
    }
    if compile_model:
        out["compile_s"] = compile_s
    return out
