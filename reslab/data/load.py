"""`load_dataset`: a known dataset by name or an ImageFolder-form folder, and the validation
hold-out of Sec. 4.2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .cifar import CIFAR_FILES, load_cifar
from .cifar10_jpeg import load_cifar10_jpeg
from .dataset import DATASETS, DataError, Dataset, hold_out
from .folder import MAX_SIDE, load_image_folder
from .idx import IDX_FILES, load_idx_dataset
from .tree import ImageTree, hold_out_tree, open_tree

LOADERS = ("auto", "memory", "stream")


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
    if spec in IDX_FILES:
        dataset = load_idx_dataset(spec, download)
    elif spec in CIFAR_FILES:
        dataset = load_cifar(spec, download)
    elif spec == "cifar10-jpeg":
        dataset = load_cifar10_jpeg(skip_bad_images)
    elif Path(spec).expanduser().is_dir():
        dataset = load_image_folder(Path(spec).expanduser(), skip_bad_images)
    else:
        raise DataError(
            f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, or a folder with train/ "
            "and test/ (or val/) subfolders holding one folder of images per class"
        )
    return _hold_out(dataset, val_split, seed) if val_split else dataset


def _hold_out(dataset: Dataset, n: int, seed: int) -> Dataset:
    train, val = hold_out(len(dataset.train_labels), n, seed)
    return replace(
        dataset,
        train_images=dataset.train_images[train].contiguous(),
        train_labels=dataset.train_labels[train],
        val_images=dataset.train_images[val].contiguous(),
        val_labels=dataset.train_labels[val],
    )


def open_data(
    spec: str, *, val_split: int = 0, seed: int = 0, skip_bad_images: bool = False,
    loader: str = "auto",
) -> Dataset | ImageTree:
    """The data of `spec` held in memory (load_dataset) or, for an image folder, as files
    streamed by workers (an ImageTree). "auto" streams a folder whose first training image is
    larger than the in-memory path takes (64 px a side); "memory" and "stream" force either."""
    if loader not in LOADERS:
        raise DataError(f"--loader {loader!r} is not one of {', '.join(LOADERS)}")
    folder = spec not in DATASETS and Path(spec).expanduser().is_dir()
    if loader == "stream" and not folder:
        raise DataError(f"--loader stream reads image folders; --data {spec} is held in memory "
                        "(use --loader auto)")
    if folder and loader != "memory":
        tree = open_tree(Path(spec))
        if loader == "stream" or _larger_than_memory(tree):
            return hold_out_tree(tree, val_split, seed) if val_split else tree
    return load_dataset(spec, val_split=val_split, seed=seed, skip_bad_images=skip_bad_images)


def _larger_than_memory(tree: ImageTree) -> bool:
    from PIL import Image

    try:
        with Image.open(tree.train[0][0]) as image:  # the header only: no decoding
            return max(image.size) > MAX_SIDE
    except OSError:
        return False  # a bad first image: the in-memory path names it
