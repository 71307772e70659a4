"""CIFAR-10/100: the official "python version" pickles, read with an unpickler that can only
build arrays, never run code."""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, Dataset, check_labels, data_home
from .download import download_file, safe_extract


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
CIFAR_FILES = {
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
    check_labels(labels, num_classes, path)
    # Rows hold 1024 red, 1024 green, then 1024 blue values, each plane row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def load_cifar(name: str, download: bool) -> Dataset:
    source, root = CIFAR_FILES[name], data_home() / name
    folder = root / source.folder
    if not (folder / source.meta).is_file():
        archive = root / source.archive
        if not archive.is_file():
            if not download:
                raise DataError(f"{name} not found: put {source.archive} or its extracted "
                                f"{source.folder}/ in {root} (set RESLAB_DATA to use another "
                                "folder), or allow downloading")
            download_file([_CIFAR_URL + source.archive], archive, source.md5)
        safe_extract(archive, root, (source.folder,))
    names = _unpickle(folder / source.meta).get(source.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / source.meta} has no '{source.names_key}' list")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for files in (source.train, source.test):
        batches = [_cifar_batch(folder / f, source.labels_key, len(classes)) for f in files]
        splits += [torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])]
    return Dataset(name, *splits, classes)
