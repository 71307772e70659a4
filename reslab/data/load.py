"""`load_dataset`: a known dataset by name or an ImageFolder-form folder, and the validation
hold-out of Sec. 4.2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .cifar import _CIFAR, _load_cifar
from .cifar10_jpeg import _load_cifar10_jpeg
from .dataset import DATASETS, DataError, Dataset
from .folder import _load_image_folder
from .idx import _IDX, _load_idx_dataset


def load_dataset(
    spec: str,
    *,
    val_split: int = 0,
    seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
) -> Dataset:
    """Load a known dataset by name or an ImageFolder-form folder; optionally hold out a val set."""
    if val_split < 0:
        raise DataError(f"--val-split {val_split} is negative; use 0 (no validation set) or more")
    if spec in _IDX:
        dataset = _load_idx_dataset(spec, download)
    elif spec in _CIFAR:
        dataset = _load_cifar(spec, download)
    elif spec == "cifar10-jpeg":
        dataset = _load_cifar10_jpeg(skip_bad_images)
    elif Path(spec).expanduser().is_dir():
        dataset = _load_image_folder(Path(spec).expanduser(), skip_bad_images)
    else:
        raise DataError(
            f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, or a folder with train/ "
            "and test/ (or val/) subfolders holding one folder of images per class"
        )
    return _hold_out(dataset, val_split, seed) if val_split else dataset


def _hold_out(dataset: Dataset, n: int, seed: int) -> Dataset:
    # Sec. 4.2: the schedule "is determined on a 45k/5k train/val split"; the seed picks the 5k.
    total = len(dataset.train_labels)
    if n >= total:
        raise DataError(f"--val-split {n} leaves no training images (there are {total}); use fewer")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n].sort().values, perm[n:].sort().values  # sorted: keep the file order
    return replace(
        dataset,
        train_images=dataset.train_images[train].contiguous(),
        train_labels=dataset.train_labels[train],
        val_images=dataset.train_images[val].contiguous(),
        val_labels=dataset.train_labels[val],
    )
