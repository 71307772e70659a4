"""Shared fixtures: tiny data sets written by the tests, never downloaded."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.data import Dataset
from reslab.recipes import Recipe
from reslab.train import RunSpec, TrainOptions, train

# The run of the reliability tests (test_checkpoint, test_resume, test_faults).
RELIABILITY_TINY = replace(Recipe(), batch_size=16, eval_every=10, checkpoint_every=5,
                           log_every=2)
RELIABILITY_SPEC = RunSpec(model="resnet8", data="synthetic",
                           recipe=RELIABILITY_TINY.with_iterations(20))


def make_dataset(n_train: int = 96, n_test: int = 40, size: int = 12, classes: int = 3,
                 channels: int = 1, seed: int = 0) -> Dataset:
    """Learnable synthetic images: each class is a brightness band plus noise."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % classes
        base = (labels.float() + 0.5) / classes * 200
        noise = torch.randint(0, 56, (n, channels, size, size), generator=g).float()
        images = (base.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
        return images, labels

    tr, trl = split(n_train)
    te, tel = split(n_test)
    return Dataset(name="synthetic", train_images=tr, train_labels=trl, test_images=te,
                   test_labels=tel, classes=tuple(f"c{i}" for i in range(classes)))


def write_image_folder(root: Path, dataset: Dataset) -> Path:
    """Write a Dataset as PNGs in ImageFolder form (train/, test/, one folder per class)."""
    for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                  ("test", dataset.test_images, dataset.test_labels)):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / dataset.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            arr = img.numpy()
            pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1))
            pil.save(folder / f"{i:05d}.png")
    return root


def impossible_png(path: Path) -> str:
    """Write a 16-bit palette PNG, a mode no decoder has, at `path`; returns the path."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 12, 12, 16, 3, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 12 * 25)) + chunk(b"IEND", b""))
    return str(path)


class Crashed(BaseException):
    """Stands in for a kill right after a checkpoint: nothing after it runs."""


def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """train() raises Crashed right after writing the checkpoint of iteration `step`."""
    import reslab.loop

    real = reslab.loop.save_checkpoint

    def save(run_dir, at, state, keep=2):
        path = real(run_dir, at, state, keep=keep)
        if at == step:
            raise Crashed
        return path

    monkeypatch.setattr(reslab.loop, "save_checkpoint", save)


@pytest.fixture
def tiny_data() -> Dataset:
    return make_dataset()


@pytest.fixture(scope="module")
def quiet_machine(tmp_path_factory):
    """ImageFolder caches go to a folder of this module, never to ~/.cache; one thread, as the
    subprocesses (OMP_NUM_THREADS=1), so a loaded machine is not oversubscribed. Both are
    restored after the module, whatever happens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RESLAB_DATA", str(tmp_path_factory.mktemp("reslab-data")))
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, quiet_machine):
    """An uninterrupted 20-iteration run of RELIABILITY_SPEC, and its data as an ImageFolder."""
    root = tmp_path_factory.mktemp("finished")
    data = make_dataset()
    train(RELIABILITY_SPEC, root / "run", data=data, options=TrainOptions(tensorboard=False))
    folder = write_image_folder(root / "imgs", data)
    return SimpleNamespace(run=root / "run", weights=(root / "run/model.safetensors").read_bytes(),
                           folder=folder)
