"""The in-memory Dataset every reader returns, the DataError every reader raises, and the data
root ($RESLAB_DATA, else ~/.cache/reslab) where readers look for files and the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # the feed imports evaluation, which imports this package
    from torch import nn

    from ..distributed import World
    from ..recipes import Recipe
    from .feed import MemoryFeed


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

    # The interface both regimes give (ImageTree's in tree.py): what train(), eval and the
    # experiments ask of their data, never which regime it is.
    augmentations: ClassVar[tuple[str, ...]] = ("pad-crop-flip",)  # Sec. 4.2's, on the device
    protocols: ClassVar[tuple[str, ...]] = ()  # tested on the single view (Sec. 4.2)

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def view_size(self) -> tuple[int, int]:
        """The size of the views the net trains on: the images' own."""
        return self.image_size

    def fits(self, in_channels: int | None, num_classes: int | None, batch_size: int
             ) -> tuple[int, int]:
        """(in_channels, num_classes) of a run on this data (None: the data's), or a clear
        error before any work is done."""
        channels = self.in_channels if in_channels is None else in_channels
        classes = self.num_classes if num_classes is None else num_classes
        if classes < 1:
            raise ValueError(f"--num-classes must be >= 1 (got {classes}); omit it to follow "
                             "the data")
        if channels != self.in_channels:
            raise ValueError(f"--in-channels {channels} but {self.name} has {self.in_channels}-"
                             "channel images; omit --in-channels to follow the data")
        top = int(max(self.train_labels.max(), self.test_labels.max()))
        if top >= classes:
            raise ValueError(f"{self.name} has labels up to {top} but the model has {classes} "
                             f"classes; use --num-classes {top + 1} or omit it to follow the data")
        check_batch_size(batch_size, self.train_size)
        return channels, classes

    def feed(self, recipe: Recipe, device: torch.device, *, workers: int | None,
             skip_bad_images: bool, world: World) -> MemoryFeed:
        """The training images resident on `device`; batches are index tensors."""
        from .feed import MemoryFeed

        return MemoryFeed(self, recipe, device, world)

    def test_logits(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None, *,
                    precision: str) -> torch.Tensor | None:
        """Every test image's logits (an ensemble's members are combined from them)."""
        from .feed import memory_test_logits

        return memory_test_logits(self, model, mean, std, precision=precision)

    def evaluate(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None, *,
                 protocol: str | None, precision: str, workers: int | None,
                 skip_bad_images: bool, logits: torch.Tensor | None = None) -> dict[str, Any]:
        """The test record: error, top-5 error, loss, protocol, images, skipped (a list)."""
        from .feed import memory_record

        return memory_record(self, model, mean, std, precision=precision, logits=logits)


def check_batch_size(batch_size: int, train_size: int) -> None:
    """A batch no larger than the training set (both regimes)."""
    if batch_size > train_size:
        raise ValueError(f"batch size {batch_size} is larger than the {train_size} training "
                         "images; use a smaller --batch-size")


def data_home() -> Path:
    return Path(os.environ.get("RESLAB_DATA") or Path.home() / ".cache" / "reslab").expanduser()


def check_labels(labels: torch.Tensor, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {int(labels.min())}..{int(labels.max())}, "
                        f"outside 0..{num_classes - 1}; the file is corrupted")
