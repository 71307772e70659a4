"""Sec. 4.2's augmentation (zero padding, random crop, horizontal flip) as batched tensor ops on
any device, its random draws made on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dataset import DataError
from .stats import normalize


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor (indices, offsets) to `device` without waiting for the GPU:
    a plain copy from pageable memory synchronises the stream, pinned memory does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def crop_flip_draw(
    batch: int, pad: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of Sec. 4.2's augmentation, on the CPU: crop offsets (B, 2) in
    [0, 2 pad], then flip bits (B,) as bools."""
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.randint(0, 2, (batch,), generator=generator) == 1
    return offsets, flips


def crop_flip_apply(
    x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor, *, flip: bool = True
) -> torch.Tensor:
    """Zero-pad `pad` pixels a side and take each image's HxW window at `offsets`, of the padded
    image or, where `flips` (and `flip`) is set, of its mirror. Tensor ops only, no host work,
    so it can run inside a CUDA graph."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    # Column j of the flipped padded image is column (W + 2 pad - 1 - j) of the padded image.
    cols = torch.where(flips[:, None] & flip, w + 2 * pad - 1 - cols, cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def pad_crop_flip(
    x: torch.Tensor, pad: int, generator: torch.Generator, *, flip: bool = True
) -> torch.Tensor:
    """Sec. 4.2: zero-pad `pad` pixels a side, random HxW crop of the padded image or its flip.

    Offsets (B, 2) then flip bits (B,) are drawn on the CPU from `generator`, so the result
    depends only on its state; `flip=False` (e.g. for digits) draws the bits but ignores them.
    """
    if x.ndim != 4 or pad < 0:
        raise DataError(f"pad_crop_flip needs (B, C, H, W) and pad >= 0, got {tuple(x.shape)}, "
                        f"pad={pad}")
    offsets, flips = crop_flip_draw(len(x), pad, generator)
    return crop_flip_apply(x, pad, to_device(offsets, x.device), to_device(flips, x.device),
                           flip=flip)


def augment_generator(seed: int, step: int) -> torch.Generator:
    """Augmentation randomness is a pure function of (seed, step), so resume needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) ^ 0x5DEECE66D)


def augmented_batch(
    images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, *, mean: torch.Tensor,
    std: torch.Tensor | None, pad: int, offsets: torch.Tensor | None,
    flips: torch.Tensor | None, memory_format: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one batch: uint8 images at `idx`, normalised, padded, cropped and flipped
    (Sec. 4.2) with the drawn `offsets` and `flips`; all tensors on the training device."""
    x = normalize(images[idx], mean, std)
    if pad > 0:
        x = crop_flip_apply(x, pad, offsets, flips)
    return x.contiguous(memory_format=memory_format), labels[idx]


@dataclass
class IndexBatch:
    """A rank's share of one batch of the images resident on the device (Sec. 4.2): indices,
    crop offsets and flips on the CPU (a CUDA graph's inputs), drawn for the whole batch."""

    images: torch.Tensor
    labels: torch.Tensor
    idx: torch.Tensor
    offsets: torch.Tensor | None
    flips: torch.Tensor | None
    pad: int

    def tensors(self, mean: torch.Tensor, std: torch.Tensor | None,
                memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on the training device, augmented."""
        dev = self.images.device
        return augmented_batch(
            self.images, self.labels, to_device(self.idx, dev), mean=mean, std=std, pad=self.pad,
            offsets=None if self.offsets is None else to_device(self.offsets, dev),
            flips=None if self.flips is None else to_device(self.flips, dev),
            memory_format=memory_format)


def index_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, step: int, *,
                pad: int, seed: int, part: slice | None = None) -> IndexBatch:
    """The batch `idx` as iteration `step` trains on it: Sec. 4.2's crops and flips drawn for
    all of it from (seed, step), then the rank's `part` of the three (torchrun)."""
    offsets = flips = None
    if pad > 0:  # Sec. 4.2: pad 4, random crop of the image or its flip
        offsets, flips = crop_flip_draw(len(idx), pad, augment_generator(seed, step))
    if part is not None:
        idx = idx[part]
        if offsets is not None:
            offsets, flips = offsets[part], flips[part]
    return IndexBatch(images, labels, idx, offsets, flips, pad)
