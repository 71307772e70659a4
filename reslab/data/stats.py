"""Normalisation: the per-pixel mean (Sec. 4.2) or per-channel mean and std of uint8 images, and
their subtraction; batched tensor ops on any device."""

from __future__ import annotations

import torch

from .dataset import DataError


def pixel_mean(images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-pixel mean (C, H, W) of uint8 images scaled to [0, 1], float64-accumulated in chunks."""
    # Sec. 4.2: "the per-pixel mean subtracted".
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) == 0:
        raise DataError(f"pixel_mean needs uint8 (N, C, H, W) images, got {images.dtype} "
                        f"{tuple(images.shape)}")
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for start in range(0, len(images), chunk):
        total += images[start : start + chunk].sum(0, dtype=torch.float64)
    return (total / (255.0 * len(images))).float()


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std (C,) of uint8 images scaled to [0, 1]."""
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) == 0:
        raise DataError(f"channel_stats needs uint8 (N, C, H, W) images, got {images.dtype} "
                        f"{tuple(images.shape)}")
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return (mean / 255).float(), (std / 255).float()


def mean_at(mean: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mean subtracted from images of `size`: a per-pixel mean (C, H, W) of another size
    (Sec. 3.4's whole images at several scales) becomes its per-channel average."""
    if mean.ndim == 3 and tuple(mean.shape[1:]) != tuple(size):
        return mean.mean((1, 2))
    return mean


def normalize(
    images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 images/255 - mean (mean (C, H, W) or (C,)), divided by std (C,) if given."""
    x = images_uint8.to(torch.float32).div_(255)
    mean = mean.to(x.device, torch.float32)
    x.sub_(mean if mean.ndim == 3 else mean[:, None, None])
    if std is not None:
        x.div_(std.to(x.device, torch.float32)[:, None, None])
    return x
