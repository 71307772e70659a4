"""The `cifar10-jpeg` dataset: CIFAR-10 as JPEG files in ImageFolder form, from its SHA-256-checked
archive or its extracted folder, checked to be the copy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .dataset import DataError, Dataset, data_home
from .download import file_sha256, safe_extract
from .folder import load_image_folder

# CIFAR-10 as JPEG files (quality about 75) in ImageFolder form, a public re-encoding of the
# 60,000 images; not the original pixels, so results on it are named "cifar10-jpeg".
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_SHA256 = "58c58e3af3ec7ed2054f439f35ad3c83dc1ab019f4af6037f60612ea098c8fa1"
CIFAR10_JPEG_SIZES = (50_000, 10_000)  # training and test images
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# `make data` extracts the archive here in a source checkout (an ignored folder): the data/
# folder at the repository root, beside the reslab/ package.
CHECKOUT_DATA = Path(__file__).resolve().parent.parent.parent / "data"


def cifar10_jpeg_folder() -> Path | None:
    """Where the extracted copy is: $RESLAB_DATA/cifar10-jpeg, then the checkout's data/."""
    for root in (data_home() / "cifar10-jpeg", CHECKOUT_DATA / "cifar10-jpeg"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def extract_copy(archive: str | Path, dest: str | Path) -> None:
    """Check the archive's SHA-256, then extract its train/ and test/ into `dest` (what
    `make data` runs, and the loader for an archive in $RESLAB_DATA/cifar10-jpeg)."""
    archive, dest = Path(archive), Path(dest)
    if (digest := file_sha256(archive)) != CIFAR10_JPEG_SHA256:
        raise DataError(f"{archive} has SHA-256 {digest}, not the copy's "
                        f"{CIFAR10_JPEG_SHA256}; replace it with the right archive")
    dest.mkdir(parents=True, exist_ok=True)
    safe_extract(archive, dest, ("train", "test"))


def load_cifar10_jpeg(skip_bad_images: bool) -> Dataset:
    """The JPEG copy as a Dataset, extracted first from its archive where only that is here."""
    root = data_home() / "cifar10-jpeg"
    archive = root / CIFAR10_JPEG_ARCHIVE
    if cifar10_jpeg_folder() is None and archive.is_file():
        extract_copy(archive, root)
    folder = cifar10_jpeg_folder()
    if folder is None:
        raise DataError(
            f"cifar10-jpeg not found: put {CIFAR10_JPEG_ARCHIVE} or its extracted train/ and "
            f"test/ in {root} (set RESLAB_DATA to use another folder); in a source checkout "
            f"`make data CIFAR10_JPEG=PATH/{CIFAR10_JPEG_ARCHIVE}` extracts it to "
            f"{CHECKOUT_DATA / 'cifar10-jpeg'}"
        )
    dataset = load_image_folder(folder, skip_bad_images)
    sizes = (len(dataset.train_labels), len(dataset.test_labels))
    shape = tuple(dataset.train_images.shape[1:])
    if dataset.classes != CIFAR10_CLASSES or shape != (3, 32, 32) or (
        not skip_bad_images and sizes != CIFAR10_JPEG_SIZES
    ):
        raise DataError(
            f"{folder} is not the CIFAR-10 JPEG copy: it has classes {', '.join(dataset.classes)},"
            f" {sizes[0]} training and {sizes[1]} test images of {shape}, where the copy has the "
            f"ten CIFAR-10 classes, {CIFAR10_JPEG_SIZES[0]} and {CIFAR10_JPEG_SIZES[1]} images of "
            "(3, 32, 32); extract the archive again into an empty folder"
        )
    return replace(dataset, name="cifar10-jpeg")
