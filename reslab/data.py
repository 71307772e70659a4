"""Datasets as uint8 tensors, batched augmentation (Sec. 4.2) and a resumable batch order.

Known datasets are read from their official files: IDX for (Fashion-)MNIST, the "python version"
pickles for CIFAR-10/100. Any other classification set comes as an ImageFolder-form folder of
small images. Files placed by the user are validated by format; downloads also by md5.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class DataError(ValueError):
    """Missing or malformed input data; the message names the file or value and the fix."""


DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar10-jpeg")


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
    skipped_files: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train_images.shape[2], self.train_images.shape[3])


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
        raise DataError(f"val_split={val_split} is negative; use 0 (no validation set) or more")
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
        raise DataError(f"val_split={n} leaves no training images (there are {total}); use fewer")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n].sort().values, perm[n:].sort().values  # sorted: keep the file order
    return replace(
        dataset,
        train_images=dataset.train_images[train].contiguous(),
        train_labels=dataset.train_labels[train],
        val_images=dataset.train_images[val].contiguous(),
        val_labels=dataset.train_labels[val],
    )


def _data_root() -> Path:
    return Path(os.environ.get("RESLAB_DATA") or Path.home() / ".cache" / "reslab").expanduser()


# ---------------------------------------------------------------------------------------------
# Downloads


def _fetch(url: str, dest: Path) -> None:
    """Copy `url` to `dest`: reslab's only network access (tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(urls: list[str], dest: Path, md5: str) -> None:
    """Try each mirror; only a file whose md5 matches is moved into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            _fetch(url, part)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts
            errors.append(f"{url}: {e}")
            continue
        got = _md5(part)
        if got == md5:
            part.replace(dest)
            return
        errors.append(f"{url}: md5 {got}, expected {md5} (corrupted or incomplete download)")
    part.unlink(missing_ok=True)
    raise DataError(
        f"could not download {dest.name}:\n  " + "\n  ".join(errors)
        + f"\nCheck the network, or put the file in {dest.parent} yourself."
    )


# ---------------------------------------------------------------------------------------------
# IDX files: MNIST and Fashion-MNIST

# Type codes of the IDX format (third byte of the magic number); multi-byte types are big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
# Debian's package dataset-fashion-mnist installs the original .gz files here.
_FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class _IdxSource:
    mirrors: tuple[str, ...]
    md5: tuple[str, ...]  # of the .gz files in _IDX_FILES order, as listed by torchvision
    classes: tuple[str, ...]


_IDX = {
    "fashion-mnist": _IdxSource(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "mnist": _IdxSource(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        tuple("0123456789"),
    ),
}


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (optionally .gz) as a tensor of its dtype and dims, validating it all."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; delete it and download again") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}, "
            "expected 0000 + type code + number of dims; delete it and download again"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: unknown IDX type code 0x{code:02x} (known: "
            f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}); the file is corrupted"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dims need {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected, payload = math.prod(dims) * dtype.itemsize, len(raw) - header
    if payload != expected:
        fault = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{path} {fault}: dims {dims} need {expected} bytes of data, found {payload}; "
            "delete it and download again"
        )
    array = np.frombuffer(raw, dtype, math.prod(dims), header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find_idx(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _load_idx_dataset(name: str, download: bool) -> Dataset:
    source, root = _IDX[name], _data_root() / name
    folders = [root, _FASHION_MNIST_SYSTEM_DIR] if name == "fashion-mnist" else [root]
    for folder in folders:
        paths = [_find_idx(folder, f) for f in _IDX_FILES]
        if all(paths):
            break
    else:
        missing = [i for i, f in enumerate(_IDX_FILES) if _find_idx(root, f) is None]
        if not download:
            debian = " or install Debian's dataset-fashion-mnist," * (name == "fashion-mnist")
            files = ", ".join(_IDX_FILES[i] + "(.gz)" for i in missing)
            raise DataError(
                f"{name} not found: put {files} in {root} "
                f"(set RESLAB_DATA to use another folder),{debian} or allow downloading"
            )
        for i in missing:
            gz = _IDX_FILES[i] + ".gz"
            _download([m + gz for m in source.mirrors], root / gz, source.md5[i])
        paths = [_find_idx(root, f) for f in _IDX_FILES]
    tensors = [read_idx(p) for p in paths]
    for i in (0, 2):
        images, labels = tensors[i], tensors[i + 1]
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise DataError(f"{paths[i]} holds {images.dtype} {tuple(images.shape)}, not uint8 "
                            "(N, H, W) images; it is not an image file of this dataset")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{paths[i + 1]} holds {tuple(labels.shape)} labels for "
                            f"{len(images)} images in {paths[i]}; the files do not belong together")
        _check_labels(labels, len(source.classes), paths[i + 1])
    return Dataset(
        name, tensors[0].unsqueeze(1).contiguous(), tensors[1].long(),
        tensors[2].unsqueeze(1).contiguous(), tensors[3].long(), source.classes,
    )


def _check_labels(labels: torch.Tensor, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {int(labels.min())}..{int(labels.max())}, "
                        f"outside 0..{num_classes - 1}; the file is corrupted")


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100: the official "python version" pickles


@dataclass(frozen=True)
class _CifarSource:
    folder: str
    archive: str
    md5: str  # of the archive, as listed by torchvision
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    labels_key: str


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR = {
    "cifar10": _CifarSource(
        "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "label_names", "labels",
    ),
    "cifar100": _CifarSource(
        "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), "meta", "fine_label_names", "fine_labels",
    ),
}
# Everything the official pickles (Python 2 or 3, numpy 1 or 2) reference; nothing that runs code.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores Python 3 bytes
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _PICKLE_GLOBALS[(module, name)]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing; delete {path.parent} so that it is extracted again")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a malformed pickle can fail in many ways; all mean "bad file"
        raise DataError(f"cannot read {path}: {e}; it is not an official CIFAR python-version "
                        "file, download it again") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR file")
    # Python 2 wrote str keys, Python 3 writes bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, labels_key: str, num_classes: int) -> tuple[torch.Tensor, ...]:
    batch = _unpickle(path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
        raise DataError(f"{path}: 'data' is not a uint8 array of shape (N, 3072); download again")
    try:
        labels = torch.from_numpy(np.asarray(batch.get(labels_key), dtype=np.int64))
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{labels_key}' is not a list of class indices") from e
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {tuple(labels.shape)} '{labels_key}' for {len(data)} images")
    _check_labels(labels, num_classes, path)
    # Rows hold 1024 red, 1024 green, then 1024 blue values, each plane row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _safe_extract(archive: Path, dest: Path, folders: tuple[str, ...]) -> None:
    """Extract `folders` from a tar after refusing links, devices, absolute paths and `..`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or (
                    ".." in PurePosixPath(m.name).parts
                ):
                    raise DataError(f"{archive} holds an unsafe member {m.name!r} (a link, device, "
                                    "absolute path or '..'); refusing it: use the official archive")
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                # The stdlib "data" filter is a second guard where this Python has it.
                guard = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **guard)
                for folder in folders:
                    if not (tmp / folder).is_dir():
                        raise DataError(f"{archive} has no {folder}/ folder; use the official "
                                        "archive")
                for folder in folders:  # all checked first: a bad archive leaves nothing behind
                    (tmp / folder).replace(dest / folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive}: {e}; delete it (and what it left in {dest}) "
                        "and download again") from e


def _load_cifar(name: str, download: bool) -> Dataset:
    source, root = _CIFAR[name], _data_root() / name
    folder = root / source.folder
    if not (folder / source.meta).is_file():
        archive = root / source.archive
        if not archive.is_file():
            if not download:
                raise DataError(f"{name} not found: put {source.archive} or its extracted "
                                f"{source.folder}/ in {root} (set RESLAB_DATA to use another "
                                "folder), or allow downloading")
            _download([_CIFAR_URL + source.archive], archive, source.md5)
        _safe_extract(archive, root, (source.folder,))
    names = _unpickle(folder / source.meta).get(source.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / source.meta} has no '{source.names_key}' list")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for files in (source.train, source.test):
        batches = [_cifar_batch(folder / f, source.labels_key, len(classes)) for f in files]
        splits += [torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])]
    return Dataset(name, *splits, classes)


# CIFAR-10 as JPEG files (quality about 75) in ImageFolder form, a public re-encoding of the
# 60,000 images; not the original pixels, so results on it are named "cifar10-jpeg".
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_SHA256 = "58c58e3af3ec7ed2054f439f35ad3c83dc1ab019f4af6037f60612ea098c8fa1"
CIFAR10_JPEG_SIZES = (50_000, 10_000)  # training and test images
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# `make data` extracts the archive here in a source checkout (an ignored folder).
CHECKOUT_DATA = Path(__file__).resolve().parent.parent / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cifar10_jpeg_folder() -> Path | None:
    """Where the extracted copy is: $RESLAB_DATA/cifar10-jpeg, then the checkout's data/."""
    for root in (_data_root() / "cifar10-jpeg", CHECKOUT_DATA / "cifar10-jpeg"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def _load_cifar10_jpeg(skip_bad_images: bool) -> Dataset:
    root = _data_root() / "cifar10-jpeg"
    archive = root / CIFAR10_JPEG_ARCHIVE
    if cifar10_jpeg_folder() is None and archive.is_file():
        if (digest := _sha256(archive)) != CIFAR10_JPEG_SHA256:
            raise DataError(f"{archive} has SHA-256 {digest}, not the copy's "
                            f"{CIFAR10_JPEG_SHA256}; replace it with the right archive")
        _safe_extract(archive, root, ("train", "test"))
    folder = cifar10_jpeg_folder()
    if folder is None:
        raise DataError(
            f"cifar10-jpeg not found: put {CIFAR10_JPEG_ARCHIVE} or its extracted train/ and "
            f"test/ in {root} (set RESLAB_DATA to use another folder); in a source checkout "
            f"`make data CIFAR10_JPEG=PATH/{CIFAR10_JPEG_ARCHIVE}` extracts it to "
            f"{CHECKOUT_DATA / 'cifar10-jpeg'}"
        )
    dataset = _load_image_folder(folder, skip_bad_images)
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


# ---------------------------------------------------------------------------------------------
# ImageFolder form: <root>/train/<class>/*.png and <root>/test/ (or val/)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MAX_SIDE = 64  # larger images would not fit in memory as a whole dataset of uint8 tensors
_CACHE_VERSION = 2  # 2: 16-bit greyscale scaled to 8 bits, no longer clipped
_BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)


def _decode_image(path: Path) -> np.ndarray:
    """uint8 (H, W) for grayscale files, else (H, W, 3); raises one of _BAD_IMAGE if bad."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is a bad image
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit greyscale PNG: PIL's convert("L") clips it
                return (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            gray = image.mode in ("1", "L", "LA", "F")
            return np.asarray(image.convert("L" if gray else "RGB"))


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(split: Path, names: list[str], classes: list[str]) -> list[tuple[Path, int]]:
    items = []
    for name in names:
        files = sorted(
            p for p in (split / name).rglob("*")
            if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(split).parts)
        )
        if not files:
            raise DataError(f"class folder {split / name} holds no .jpg/.jpeg/.png images; add "
                            "images or remove the folder")
        items += [(p, classes.index(name)) for p in files]
    return items


def _decode_split(
    split: Path, items: list[tuple[Path, int]], skip_bad: bool
) -> tuple[list, list, list[str]]:
    arrays, labels, skipped, first = [], [], [], None
    for path, label in items:
        try:
            array = _decode_image(path)
        except _BAD_IMAGE as e:
            if not skip_bad:
                raise DataError(f"cannot decode image {path}: {e}; fix or delete it, or pass "
                                "skip_bad_images=True") from e
            skipped.append(str(path))
            continue
        h, w = array.shape[:2]
        if max(h, w) > _MAX_SIDE:
            raise DataError(f"{path} is {w}x{h}: images are held in memory only up to {_MAX_SIDE} "
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
    return arrays, labels, skipped


def _load_image_folder(root: Path, skip_bad_images: bool) -> Dataset:
    train = root / "train"
    test = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise DataError(f"{root} is not in ImageFolder form: it needs train/ and test/ (or val/), "
                        "each with one subfolder of images per class")
    classes, test_names = _class_folders(train), _class_folders(test)
    for split, names in ((train, classes), (test, test_names)):
        if not names:
            raise DataError(f"{split} has no class subfolders; put each class's images in its own")
    if unknown := sorted(set(test_names) - set(classes)):
        raise DataError(f"class folder {test / unknown[0]} has no counterpart in {train}; "
                        "test classes must be training classes")
    splits = {train: _list_images(train, classes, classes),
              test: _list_images(test, test_names, classes)}

    # Keyed by every file's relative path, size and mtime: any change means decoding again.
    key = hashlib.sha256(f"{_CACHE_VERSION} {skip_bad_images}\n".encode())
    for path, _ in sorted(splits[train] + splits[test]):
        stat = path.stat()
        key.update(f"{path.relative_to(root).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n"
                   .encode())
    cache = _data_root() / "cache" / f"{key.hexdigest()[:32]}.pt"
    try:
        c = torch.load(cache, weights_only=True)
        return Dataset(str(root.resolve()), c["train_images"], c["train_labels"], c["test_images"],
                       c["test_labels"], tuple(c["classes"]), skipped_files=tuple(c["skipped"]))
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
    return Dataset(str(root.resolve()), *tensors, tuple(classes), skipped_files=tuple(skipped))


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation: batched tensor ops on any device


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


# ---------------------------------------------------------------------------------------------
# Data order


class BatchStream:
    """Endless stream of index batches: each epoch a fresh permutation of range(n); a batch may span
    two epochs so every batch has exactly batch_size indices. The permutation of epoch e comes from
    torch.Generator().manual_seed(seed * 1_000_003 + e), so the state is just (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= n:
            raise DataError(f"batch_size={batch_size} must be between 1 and the number of "
                            f"training images ({n}); use a smaller batch or more data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self._position)
            parts.append(self._perm[self._position : self._position + take])
            self._position += take
            need -= take
            if self._position == self.n:
                self._epoch, self._position = self._epoch + 1, 0
                self._perm = self._permutation(self._epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n:
            raise DataError(f"BatchStream state {state} does not fit n={self.n}; the checkpoint "
                            "belongs to another dataset")
        if epoch != self._epoch:
            self._perm = self._permutation(epoch)
        self._epoch, self._position = epoch, position
