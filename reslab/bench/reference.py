"""What `reslab bench` compares reslab's training step against, in the same run: the trainer a
user writes from the PyTorch CIFAR tutorial (eager fp32, NCHW, torchvision transforms per sample
— RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize — through a DataLoader
with 2 workers, same model, batch size and optimizer), and the ablation's one-change-at-a-time
setups (bf16, channels_last, torch.compile, fused SGD, CUDA graphs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import crop_flip_draw, normalize, pad_crop_flip, to_device
from ..models import build_model
from ..runtime import autocast
from ..step import GraphedStep


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


def sync_device(device: torch.device) -> None:
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
    sync_device(dev)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        sync_device(dev)
    return reps * n**3 / (time.perf_counter() - t0)


def bench_images(n: int, channels: int, size: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
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
            sync_device(dev)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if timings is not None:
            sync_device(dev)
        t2 = time.perf_counter()
        opt.step()
        if timings is not None:
            sync_device(dev)
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
    sync_device(dev)
    warm = time.perf_counter() - t0

    def timed_pass(n: int, timings: dict[str, list[float]] | None) -> float:
        sync_device(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            td = time.perf_counter()
            x, y = next(batches)
            if timings is not None:
                sync_device(dev)
                timings["data"].append(time.perf_counter() - td)
            step(x, y, timings)
        sync_device(dev)
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
    sync_device(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(*draw(i))
    sync_device(dev)
    total = time.perf_counter() - t0
    return {"images_per_second": steps * batch_size / total, "warmup_s": warm,
            "step_split": {"whole step (one CUDA graph)": 1.0}}


def _forever(loader):
    while True:
        yield from loader
