"""`reslab bench`: training and inference speed, every figure a ratio taken in the same run.

These machines are shared and noisy: absolute times drift, ratios measured side by side hold.
The reference is the trainer a user writes from the PyTorch CIFAR tutorial: eager fp32, NCHW,
torchvision transforms per sample (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
Normalize) through a DataLoader with 2 workers, same model, batch size and optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .complexity import describe
from .data import BatchStream, crop_flip_draw, normalize, pad_crop_flip, pixel_mean, to_device
from .evaluate import autocast
from .models import build_model
from .recipes import get_recipe
from .runtime import resolve_precision
from .step import MEMORY_FORMAT, GraphedStep, Step, Window, build_step, make_optimizer
from .train import COMPILE_MODES


@dataclass(frozen=True)
class Setup:
    """One way to run a training step."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    batched_aug: bool = True  # reslab's tensor augmentation (else torchvision per sample)
    device: str = "cpu"
    compile_mode: str | None = None  # torch.compile's; "reduce-overhead" adds CUDA graphs
    whole_step_graph: bool = False  # reslab's CUDA path: the whole step as one CUDA graph
    fused_sgd: bool = False  # one kernel for the whole update, as train() runs SGD

    @property
    def cuda_graphs(self) -> bool:
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")


def _sync(device: torch.device) -> None:
    """Wait for the device: GPU work is queued, so a timer must wait for it to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int | None = None, seconds: float = 1.0,
                device: str = "cpu") -> float:
    """Achievable multiply-adds/s of a large square matrix product in `dtype` (the peak probe)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)  # a GPU needs a larger product to fill it
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    a @ b
    _sync(dev)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        _sync(dev)
    return reps * n**3 / (time.perf_counter() - t0)


def _images(n: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


class _TutorialDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset that hands out PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        arr = self.images[i]
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        return self.transform(img), self.labels[i]


def tutorial_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    size: int, workers: int = 2):
    import torchvision.transforms as T

    c = images.shape[1]
    transform = T.Compose([
        T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize((0.5,) * c, (0.25,) * c),
    ])
    ds = _TutorialDataset(images, labels, transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def _model(name: str, channels: int, setup: Setup) -> tuple[nn.Module, Callable]:
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=10).to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not setup.compile:
        return model, model
    return model, torch.compile(model, mode=setup.compile_mode)


def _step_fn(model, forward, setup: Setup):
    dev = torch.device(setup.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          fused=setup.fused_sgd or dev.type == "cuda")
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format

    def step(x: torch.Tensor, y: torch.Tensor, timings: dict[str, list[float]] | None = None):
        t0 = time.perf_counter()
        # The tutorial's batches come from the DataLoader on the host, as its `.to(device)`.
        x = x.to(dev, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(dev, non_blocking=True)
        if setup.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(dev, setup.precision):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        if timings is not None:
            _sync(dev)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if timings is not None:
            _sync(dev)
        t2 = time.perf_counter()
        opt.step()
        if timings is not None:
            _sync(dev)
        t3 = time.perf_counter()
        if timings is not None:
            timings["forward"].append(t1 - t0)
            timings["backward"].append(t2 - t1)
            timings["optimizer"].append(t3 - t2)
        return loss

    return step


def _batched_batches(images, labels, batch_size: int, pad: int):
    """reslab's data path: uint8 in memory (on the training device), whole-batch augmentation."""
    mean = images[:1024].float().mean(0) / 255
    n, i = len(images), 0
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=torch.Generator().manual_seed(i))
        idx = to_device(idx, images.device)
        x = normalize(images[idx], mean)
        x = pad_crop_flip(x, pad, torch.Generator().manual_seed(i + 1))
        yield x, labels[idx]
        i += 1


def time_training(name: str, images, labels, setup: Setup, batch_size: int, steps: int,
                  warmup: int = 3, model_only: bool = False) -> dict[str, Any]:
    """Steady-state images/s of one setup; warm-up (and compile) time reported apart."""
    if setup.whole_step_graph:
        return _time_graphed(name, images, labels, setup, batch_size, steps, warmup, model_only)
    model, forward = _model(name, images.shape[1], setup)
    step = _step_fn(model, forward, setup)
    size = images.shape[-1]
    dev = torch.device(setup.device)
    if model_only:
        x0, y0 = images[:batch_size].to(dev).float().div(255), labels[:batch_size].to(dev)
        batches = iter(lambda: (x0, y0), None)
        loader = None
    elif setup.batched_aug:  # the data set resident on the device, augmented there
        batches, loader = _batched_batches(images.to(dev), labels.to(dev), batch_size, 4), None
    else:
        loader = tutorial_loader(images, labels, batch_size, size)
        batches = _forever(loader)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(*next(batches))
    _sync(dev)
    warm = time.perf_counter() - t0

    def timed_pass(n: int, timings: dict[str, list[float]] | None) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            td = time.perf_counter()
            x, y = next(batches)
            if timings is not None:
                _sync(dev)
                timings["data"].append(time.perf_counter() - td)
            step(x, y, timings)
        _sync(dev)
        return time.perf_counter() - t0

    timings: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    if dev.type == "cuda":
        # A GPU runs ahead of Python: images/s from a pass without waits, the split from a
        # second pass that waits at each phase's end (and so runs slower).
        total = timed_pass(steps, None)
        split_total = timed_pass(max(steps // 4, 3), timings)
    else:
        total = split_total = timed_pass(steps, timings)
    del loader
    split = {k: sum(v) / split_total for k, v in timings.items()}
    return {"images_per_second": steps * batch_size / total, "warmup_s": warm,
            "step_split": split}


def reslab_step(name: str, images: torch.Tensor, labels: torch.Tensor, *, device: str,
                batch_size: int, compile_model: bool, model_only: bool = False,
                cuda_graphs: bool | None = None) -> tuple[Step, BatchStream]:
    """train()'s own step for `name` on these images, built by the function train() uses
    (step.build_step), with the paper's recipe at `batch_size`; model only: no augmentation."""
    dev = torch.device(device)
    recipe = replace(get_recipe("cifar10"), batch_size=batch_size, pad=0 if model_only else 4)
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, dev))
    torch.manual_seed(0)
    model = build_model(name, in_channels=images.shape[1], num_classes=10).to(dev)
    model = model.to(memory_format=MEMORY_FORMAT).train()
    window = Window.start(dev, warmup=False, warmup_window=recipe.warmup_window)
    step = build_step(
        model, make_optimizer(model, recipe, dev), images.to(dev), labels.to(dev),
        pixel_mean(images).to(dev), None, recipe, window, compile_model=compile_model,
        compile_mode=COMPILE_MODES.get(dev.type), cuda_graphs=cuda_graphs,
    )
    return step, BatchStream(len(images), batch_size, seed=0)


def time_reslab(name: str, images, labels, *, device: str, batch_size: int, steps: int,
                compile_model: bool, warmup: int = 3, model_only: bool = False
                ) -> dict[str, Any]:
    """Steady-state images/s of train()'s step (reslab_step); its batch order apart in the
    split. Model only: the same batch every step, not augmented."""
    dev = torch.device(device)
    step, stream = reslab_step(name, images, labels, device=device, batch_size=batch_size,
                               compile_model=compile_model, model_only=model_only)
    fixed = torch.arange(batch_size)
    i = 0

    def run(n: int, timings: dict[str, list[float]] | None = None) -> float:
        nonlocal i
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            td = time.perf_counter()
            idx = fixed if model_only else stream.next()
            t1 = time.perf_counter()
            step(idx, i)
            i += 1
            if timings is not None:
                timings["batch order"].append(t1 - td)
        _sync(dev)
        return time.perf_counter() - t0

    # A graphed step captures after its eager warm-up: warm up past it.
    warm = run(max(warmup, step.graphed.warmup + 1) if step.graphed else warmup)
    timings: dict[str, list[float]] = {"batch order": []}
    total = run(steps, timings)
    order = sum(timings["batch order"]) / total
    return {"images_per_second": steps * batch_size / total, "warmup_s": warm,
            "step_split": {"batch order": order,
                           "step (augmentation, forward, backward, SGD)": 1 - order}}


def _time_graphed(name: str, images, labels, setup: Setup, batch_size: int, steps: int,
                  warmup: int, model_only: bool) -> dict[str, Any]:
    """As time_training, for train()'s CUDA path: data resident on the GPU, the whole step
    (batch, augmentation, forward, backward, SGD) one CUDA graph. Model only: a fixed batch,
    no augmentation. The graph cannot be split into phases, so the split is one entry."""
    dev = torch.device(setup.device)
    model, forward = _model(name, images.shape[1], setup)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          fused=True)
    images, labels = images.to(dev), labels.to(dev)
    pad = 0 if model_only else 4
    sums = {"loss": torch.zeros((), dtype=torch.float64, device=dev),
            "wrong": torch.zeros((), dtype=torch.float64, device=dev),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=dev)}
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    step = GraphedStep(forward=forward, optimizer=opt, images=images, labels=labels,
                       mean=images[:1024].float().mean(0) / 255, std=None, pad=pad,
                       precision=setup.precision, memory_format=fmt, batch_size=batch_size,
                       sums=sums)

    def draw(i: int):
        g = torch.Generator().manual_seed(i)
        if model_only:
            return torch.arange(batch_size), None, None
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        return (idx, *crop_flip_draw(batch_size, pad, g))

    t0 = time.perf_counter()
    for i in range(max(warmup, step.warmup) + 1):  # the eager warm-up, then the capture
        step(*draw(i))
    _sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(*draw(i))
    _sync(dev)
    total = time.perf_counter() - t0
    return {"images_per_second": steps * batch_size / total, "warmup_s": warm,
            "step_split": {"whole step (one CUDA graph)": 1.0}}


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
    step, _ = reslab_step(name, images, labels, device=device, batch_size=batch_size,
                          compile_model=compile_model, model_only=True, cuda_graphs=False)
    idx = torch.arange(batch_size)
    for i in range(3):
        step(idx, i)
    _sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with _quiet_stderr(), profile(activities=activities) as prof:
        for i in range(steps):
            step(idx, 3 + i)
        _sync(dev)
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


def _forever(loader):
    while True:
        yield from loader


def bench_train(name: str, *, batch_size: int = 128, steps: int = 20, input_size: int | None = None,
                in_channels: int = 3, compile_model: bool = True,
                ablation: bool = True, device: str = "cpu") -> dict[str, Any]:
    """reslab's default path vs the tutorial reference, peak fraction, step split, ablation."""
    info = describe(name, input_size=input_size, in_channels=in_channels)
    size = info.input_size
    dev = torch.device(device)
    images, labels = _images(max(4 * batch_size, 2048), in_channels, size)
    peak_fp32 = matmul_peak(torch.float32, device=device)
    peak_bf16 = matmul_peak(torch.bfloat16, device=device)
    ref = Setup(device=device)
    out: dict[str, Any] = {"model": name, "batch_size": batch_size, "input_size": size,
                           "steps": steps, "threads": torch.get_num_threads(),
                           "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                      else "cpu"),
                           "compile_mode": COMPILE_MODES.get(dev.type) if compile_model else None,
                           "whole_step_cuda_graph": dev.type == "cuda",
                           "multiply_adds_per_image": info.multiply_adds,
                           "peak_fp32_madds_per_s": peak_fp32, "peak_bf16_madds_per_s": peak_bf16}
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
    out["peak_fraction"] = achieved / peak_bf16
    out["peak_fraction_fp32"] = achieved / peak_fp32
    split = kernel_split(name, images, labels, device=device, compile_model=compile_model,
                         batch_size=batch_size, steps=max(steps // 2, 2),
                         multiply_adds=info.multiply_adds)
    split["convolution_peak_fraction"] = split["convolution_madds_per_s"] / peak_bf16
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
            with _threads(1):
                one = time_training(name, images, labels, Setup(), batch_size,
                                    max(steps // 2, 3), model_only=True)["images_per_second"]
            out["ablation_threads"] = {"1 thread": one,
                                       f"{torch.get_num_threads()} threads": base,
                                       "gain": base / one}
    return out


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy for inference with every BatchNorm folded into the conv before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .models import ResidualBlock

    m = copy.deepcopy(model).eval()

    def fold(owner: nn.Module, conv_name: str, bn_name: str) -> None:
        setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name),
                                                    getattr(owner, bn_name)))
        setattr(owner, bn_name, nn.Identity())

    fold(m, "conv1", "bn1")
    for block in m.modules():
        if isinstance(block, ResidualBlock):
            for i in range(1, block.num_layers + 1):
                fold(block, f"conv{i}", f"bn{i}")
            if isinstance(block.downsample, nn.Sequential):
                fold(block.downsample, "0", "1")
    return m


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
    folded = fold_bn(model).to(memory_format=torch.channels_last)
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
        "peak_fraction": info.multiply_adds * rows[best] / matmul_peak(torch.bfloat16),
    }
    if compile_model:
        out["compile_s"] = compile_s
    return out
