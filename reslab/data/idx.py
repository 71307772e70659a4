"""IDX files: MNIST and Fashion-MNIST, read from their official files and validated by format."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, Dataset, check_labels, data_home
from .download import download_file

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


IDX_FILES = {
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


def load_idx_dataset(name: str, download: bool) -> Dataset:
    source, root = IDX_FILES[name], data_home() / name
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
            download_file([m + gz for m in source.mirrors], root / gz, source.md5[i])
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
        check_labels(labels, len(source.classes), paths[i + 1])
    return Dataset(
        name, tensors[0].unsqueeze(1).contiguous(), tensors[1].long(),
        tensors[2].unsqueeze(1).contiguous(), tensors[3].long(), source.classes,
    )
