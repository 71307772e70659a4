"""ImageFolder form: <root>/train/<class>/*.png and <root>/test/ (or val/), any classification set
of small images, decoded once and cached as uint8 tensors."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import DataError, Dataset, data_home

# torchvision's ImageFolder's extensions (PIL decodes them all); other files are counted and
# named (Dataset.ignored_files), never dropped silently.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_SIDE = 64  # larger images would not fit in memory as a whole dataset of uint8 tensors
# 2: 16-bit greyscale scaled to 8 bits, no longer clipped; 3: more suffixes; 4: float images
# scaled, broken links listed
_CACHE_VERSION = 4
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)


def deep_grey(image: Image.Image) -> np.ndarray | None:
    """uint8 (H, W) of a greyscale image deeper than 8 bits, which PIL's convert() would clip
    rather than scale (None for other modes): integers (16-bit PNG and TIFF, modes I;16 and I)
    keep the high byte of 16 bits; floats (mode F, e.g. a float TIFF) are 0-1 if no value
    exceeds 1, else 0-255, scaled and rounded (NaN as 0)."""
    if image.mode.startswith("I"):
        return (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.size and values.max() <= 1 else 1.0
        return np.rint(values * scale).clip(0, 255).astype(np.uint8)
    return None


def decode_image(path: Path) -> np.ndarray:
    """uint8 (H, W) for grayscale files, else (H, W, 3); raises one of BAD_IMAGE if bad."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is a bad image
        with Image.open(path) as image:
            if (deep := deep_grey(image)) is not None:
                return deep
            gray = image.mode in ("1", "L", "LA")
            return np.asarray(image.convert("L" if gray else "RGB"))


def _splits(root: Path, test_names: tuple[str, str]) -> tuple[Path, Path]:
    """train/ and the first of `test_names` that exists, or an error saying what is missing."""
    train = root / "train"
    test = next((root / s for s in test_names if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise DataError(f"{root} is not in ImageFolder form: it needs train/ and {test_names[0]}/ "
                        f"(or {test_names[1]}/), each with one subfolder of images per class")
    return train, test


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_listed(path: Path, split: Path) -> bool:
    """Whether a path found under a split is one of its files: not hidden, and a file or a link
    that leads to none (dangling or looping), which is listed so that decoding names it as a bad
    image: left out, it would be neither counted nor named."""
    return not any(part.startswith(".") for part in path.relative_to(split).parts) and \
        (path.is_file() or (path.is_symlink() and not path.exists()))


def _list_images(split: Path, names: list[str], classes: list[str],
                 ignored: list[str]) -> list[tuple[Path, int]]:
    """The image files of each class folder; files of other types are appended to `ignored`."""
    items = []
    for name in names:
        files = []
        for p in sorted((split / name).rglob("*")):
            if not is_listed(p, split):
                continue
            (files if p.suffix.lower() in IMAGE_SUFFIXES else ignored).append(p)
        if not files:
            raise DataError(f"class folder {split / name} holds no images "
                            f"({'/'.join(IMAGE_SUFFIXES)}); add images or remove the folder")
        items += [(p, classes.index(name)) for p in files]
    return items


def _decode_split(
    split: Path, items: list[tuple[Path, int]], skip_bad: bool
) -> tuple[list, list, list[str]]:
    arrays, labels, skipped, first = [], [], [], None
    for path, label in items:
        try:
            array = decode_image(path)
        except BAD_IMAGE as e:
            if not skip_bad:
                raise DataError(f"cannot decode image {path}: {e}; fix or delete it, or pass "
                                "--skip-bad-images") from e
            skipped.append(str(path))
            continue
        h, w = array.shape[:2]
        if max(h, w) > MAX_SIDE:
            raise DataError(f"{path} is {w}x{h}: images are held in memory only up to {MAX_SIDE} "
                            "px a side; resize the folder first (e.g. to 32x32)")
        if first is None:
            first = path
        elif array.shape[:2] != arrays[0].shape[:2]:
            h0, w0 = arrays[0].shape[:2]
            raise DataError(f"{path} is {w}x{h} but {first} is {w0}x{h0}; resize all images "
                            "of a split to one size")
        arrays.append(array)
        labels.append(label)
    if not arrays:
        raise DataError(f"none of the {len(items)} image files in {split} could be decoded")
    emptied = sorted({label for _, label in items} - set(labels))
    if emptied:  # a class with no images left would train (or test) silently without it
        folder = next(path.parent for path, label in items if label == emptied[0])
        raise DataError(f"every image in class folder {folder} is bad (--skip-bad-images "
                        "skipped them all); fix them or remove the folder")
    return arrays, labels, skipped


# The test split of a folder: test/, else val/. One rule for both regimes (held in memory here,
# streamed by tree.py), which both scan with scan_folder.
TEST_SPLITS = ("test", "val")


@dataclass(frozen=True)
class Scan:
    """A folder's files, not decoded: (path, label) per image of train/ and of the test split,
    the class names (train/'s folders, sorted; label i is classes[i]), the other files."""

    train_dir: Path
    test_dir: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    ignored: list[Path]


def scan_folder(root: Path) -> Scan:
    """Scan an ImageFolder tree: a clear error naming the folder when it cannot be trained on
    (no train/, no test/ or val/, no class folders, a class folder without images, a test class
    that is not a training class). The test split may lack some training classes."""
    train, test = _splits(Path(root).expanduser(), TEST_SPLITS)
    classes, test_names = _class_folders(train), _class_folders(test)
    for split, names in ((train, classes), (test, test_names)):
        if not names:
            raise DataError(f"{split} has no class subfolders; put each class's images in its own")
    if unknown := sorted(set(test_names) - set(classes)):
        raise DataError(f"class folder {test / unknown[0]} has no counterpart in {train}; "
                        "test classes must be training classes")
    ignored: list[Path] = []
    return Scan(train, test, classes, _list_images(train, classes, classes, ignored),
                _list_images(test, test_names, classes, ignored), ignored)


def load_image_folder(root: Path, skip_bad_images: bool) -> Dataset:
    scan = scan_folder(root)
    train, test, classes = scan.train_dir, scan.test_dir, scan.classes
    splits = {train: scan.train, test: scan.test}
    ignored_files = tuple(str(p) for p in scan.ignored)

    # Keyed by every file's relative path, size and mtime: any change means decoding again.
    key = hashlib.sha256(f"{_CACHE_VERSION} {skip_bad_images}\n".encode())
    for path, _ in sorted(splits[train] + splits[test]):
        stat = path.stat() if path.exists() else path.lstat()  # a broken link: its own
        key.update(f"{path.relative_to(root).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n"
                   .encode())
    cache = data_home() / "cache" / f"{key.hexdigest()[:32]}.pt"
    try:
        c = torch.load(cache, weights_only=True)
        return Dataset(str(root.resolve()), c["train_images"], c["train_labels"], c["test_images"],
                       c["test_labels"], tuple(c["classes"]), skipped_files=tuple(c["skipped"]),
                       ignored_files=ignored_files)
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
        pass  # no cache yet, or an unreadable one: decode

    decoded = [_decode_split(split, items, skip_bad_images) for split, items in splits.items()]
    gray = all(a.ndim == 2 for arrays, _, _ in decoded for a in arrays)
    tensors = []
    for arrays, labels, _ in decoded:
        if gray:
            images = np.stack(arrays)[:, None]
        else:
            images = np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, 2) for a in arrays])
            images = images.transpose(0, 3, 1, 2)
        tensors += [torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(labels)]
    skipped = decoded[0][2] + decoded[1][2]
    names = ("train_images", "train_labels", "test_images", "test_labels")
    part = cache.with_suffix(f".{os.getpid()}.part")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(zip(names, tensors, strict=True), classes=classes, skipped=skipped), part)
        part.replace(cache)  # atomic: a concurrent reader sees no cache or the whole file
    except OSError as e:  # a cache is an optimisation: failing to write one is no reason to stop
        warnings.warn(f"could not cache {root} in {cache}: {e}", stacklevel=2)
    return Dataset(str(root.resolve()), *tensors, tuple(classes), skipped_files=tuple(skipped),
                   ignored_files=ignored_files)
