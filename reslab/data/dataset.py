"""The in-memory Dataset every reader returns, the DataError every reader raises, and the data
root ($RESLAB_DATA, else ~/.cache/reslab) where readers look for files and the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """Missing or malformed input data; the message names the file or value and the fix."""


DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar10-jpeg")


def hold_out(total: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 4.2's validation split ("determined on a 45k/5k train/val split"), one rule for both
    regimes: (training, held-out) indices of `total` training images, `n` held out, drawn by
    `seed`; each sorted, so the files keep their order."""
    if n < 0:
        raise DataError(f"--val-split {n} is negative; use 0 (no validation set) or more")
    if n >= total:
        raise DataError(f"--val-split {n} leaves no training images (there are {total}); use fewer")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[n:].sort().values, perm[:n].sort().values


@dataclass(frozen=True)
class Dataset:
    """A whole classification dataset in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    skipped_files: tuple[str, ...] = ()  # bad images left out by --skip-bad-images
    ignored_files: tuple[str, ...] = ()  # files in class folders that are not images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train_images.shape[2], self.train_images.shape[3])


def _data_root() -> Path:
    return Path(os.environ.get("RESLAB_DATA") or Path.home() / ".cache" / "reslab").expanduser()


def _check_labels(labels: torch.Tensor, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {int(labels.min())}..{int(labels.max())}, "
                        f"outside 0..{num_classes - 1}; the file is corrupted")
