"""The streamed-photograph path's speed, measured side by side in one run (issue 24, item 6):
reslab's loader alone (decode, Sec. 3.4's scale augmentation, crop, flip, lighting, batch
assembly) against the loader a user writes from torchvision (`datasets.ImageFolder` +
`transforms.v2` + `DataLoader`, the same workers, files and output size), and end-to-end
training at 224 (reslab's train() step fed by its loader against a plain PyTorch loop fed by
torchvision's).

The files are photograph-like, not noise: each image is a 1/f ("pink") random field, the
spectrum of natural images, whose JPEG size per pixel is that of a photograph; sizes are drawn
around ImageNet's mean of about 470x400 pixels and 110 KB, with one in twenty much larger.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DataError
from ..data.workers import DieWithParent

# ImageNet's training JPEGs: ~110 KB and ~470x400 px on average; a few are several megapixels.
PHOTO_SIZE = (470, 400)


def _pink(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB 1/f random field in [0, 255]: amplitude falling as 1/frequency^1.15 (at quality
    90 a 470x400 field is ~98 KB, as a photograph), channels correlated as a photograph's."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w)) ** 1.15
    common = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    channels = []
    for _ in range(3):
        own = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
        field = np.fft.irfft2((0.8 * common + 0.45 * own) * amplitude, s=(h, w))
        channels.append((field - field.mean()) / (field.std() + 1e-9))
    image = np.stack(channels, -1) * 48 + rng.uniform(80, 170, 3)
    return image.clip(0, 255).astype(np.uint8)


def write_photo_tree(root: Path, classes: int = 4, per_class: int = 40, val_per_class: int = 4,
                     seed: int = 0, quality: int = 90) -> dict[str, float]:
    """Write a train/ and val/ tree of photograph-like JPEGs; returns their mean width, height
    and file size (KB), to be quoted beside any figure measured on them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    widths, heights, sizes = [], [], []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                scale = 2 if rng.random() < 0.05 else 1  # 1.05x the nominal side on average
                w = int(rng.normal(PHOTO_SIZE[0] / 1.05, 70)) * scale
                h = int(rng.normal(PHOTO_SIZE[1] / 1.05, 60)) * scale
                w, h = max(w, 200), max(h, 160)
                path = folder / f"{i:05d}.JPEG"
                Image.fromarray(_pink(h, w, rng)).save(path, quality=quality)
                widths.append(w)
                heights.append(h)
                sizes.append(path.stat().st_size / 1024)
    return {"mean_width": statistics.mean(widths), "mean_height": statistics.mean(heights),
            "mean_kb": statistics.mean(sizes), "images": len(sizes)}


class _Named(torch.utils.data.Dataset):
    """A dataset of files whose bad images come back as a message naming the file, raised in
    the main process by _checked: raised in a worker, it would come back as the worker's whole
    traceback."""

    def __init__(self, data: torch.utils.data.Dataset, paths: list[str]) -> None:
        self.data, self.paths = data, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from ..data.folder import BAD_IMAGE

        try:
            return self.data[index]
        except BAD_IMAGE as e:  # DataError (a ValueError) names the file already
            return str(e) if isinstance(e, DataError) else \
                f"cannot decode image {self.paths[index]}: {e}"


def _collate_named(samples: list):
    bad = [s for s in samples if isinstance(s, str)]
    return bad if bad else torch.utils.data.default_collate(samples)


def _checked(batches, root: Path):
    """The batches, or a DataError naming the first bad image: the benchmark needs them all."""
    for batch in batches:
        bad = getattr(batch, "bad", None) or (batch if isinstance(batch, list) and batch
                                              and isinstance(batch[0], str) else None)
        if bad:
            raise DataError(f"{bad[0]}; a benchmark reads every image: `reslab data check "
                            f"{root}` lists the bad ones")
        yield batch


def _reference_loader(root: Path, batch_size: int, workers: int):
    """What a torchvision user writes for Sec. 3.4's training views (without the lighting noise,
    which torchvision does not have)."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.PILToTensor(), v2.RandomShortestSize(list(range(256, 481)), antialias=True),
        v2.RandomCrop(224), v2.RandomHorizontalFlip(),
    ])
    data = datasets.ImageFolder(str(Path(root) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(_Named(data, [p for p, _ in data.samples]),
                                         batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0,
                                         collate_fn=_collate_named,
                                         worker_init_fn=DieWithParent())
    while True:  # epoch after epoch, as a training loop draws them
        yield from _checked(loader, root)


def _reslab_loader(root: Path, batch_size: int, workers: int, regions: bool = True):
    from ..data import BatchStream, open_tree
    from ..data.stream import train_batches

    tree = open_tree(Path(root))
    stream = BatchStream(len(tree.train), batch_size, seed=0)
    return _checked(train_batches(tree.train, stream, seed=0, augmentation="scale", colour=True,
                                  workers=workers, skip_bad_images=False, regions=regions), root)


class _DecodeOnly:
    """The ceiling a loader approaches: each file read and decoded (reslab's decoder), nothing
    else; a label per image comes back, no pixels."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        from ..data.tree import decode_rgb

        decode_rgb(self.paths[index])
        return 0


def _decode_loader(root: Path, batch_size: int, workers: int):
    from ..data import open_tree

    paths = [p for p, _ in open_tree(Path(root)).train]
    loader = torch.utils.data.DataLoader(_Named(_DecodeOnly(paths), paths),
                                         batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0,
                                         collate_fn=_collate_named,
                                         worker_init_fn=DieWithParent())
    while True:
        for batch in _checked(loader, root):
            yield batch, batch


def _images_per_second(batches, count: int, warmup: int = 2) -> float:
    it = iter(batches)
    for _ in range(warmup):  # worker start-up and the first prefetch
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(count):
        b = next(it)
        n += len(b[1] if isinstance(b, list | tuple) else b.labels)
    return n / (time.perf_counter() - t0)


def bench_loader(root: Path, *, workers: int, batch_size: int = 64, batches: int = 12,
                 rounds: int = 5) -> dict[str, Any]:
    """Images/s of reslab's loader and torchvision's on the same files, of reslab's loader
    decoding every JPEG whole (what decoding only the window's region buys), and of decoding
    whole images alone (the ceiling of a loader that decodes them), alternated `rounds` times
    (medians quoted), and per worker process."""
    from ..data import jpeg

    ours, whole, theirs, decoding = [], [], [], []
    for _ in range(rounds):
        ours.append(_images_per_second(_reslab_loader(root, batch_size, workers), batches))
        whole.append(_images_per_second(_reslab_loader(root, batch_size, workers, False),
                                        batches))
        theirs.append(_images_per_second(_reference_loader(root, batch_size, workers), batches))
        decoding.append(_images_per_second(_decode_loader(root, batch_size, workers), batches))
    mine, mine_whole, ref, ceiling = (statistics.median(r)
                                      for r in (ours, whole, theirs, decoding))
    per = max(workers, 1)
    return {"workers": workers, "batch_size": batch_size, "batches": batches,
            "region_decoder": jpeg.available(),
            "reslab_images_per_second": mine, "torchvision_images_per_second": ref,
            "reslab_whole_decode_images_per_second": mine_whole,
            "decode_only_images_per_second": ceiling,
            "reslab_per_worker": mine / per, "torchvision_per_worker": ref / per,
            "ratio": mine / ref, "whole_decode_ratio": mine_whole / ref,
            "decode_only_ratio": ceiling / ref, "of_decode_only": mine / ceiling,
            "rounds": {"reslab": ours, "reslab_whole_decode": whole, "torchvision": theirs,
                       "decode_only": decoding}}


def bench_train_photos(root: Path, model: str, *, workers: int, batch_size: int = 32,
                       steps: int = 6, device: str = "cpu") -> dict[str, Any]:
    """Training images/s at 224: train()'s step (its precision, channels_last) fed by reslab's
    loader, against eager fp32 PyTorch fed by torchvision's loader, same model and batch."""
    from dataclasses import replace

    from ..data import BatchStream, open_tree
    from ..data.stream import train_batches, tree_stats
    from ..models import build_model
    from ..recipes import RECIPES
    from ..runtime import resolve_device, resolve_precision
    from ..step import MEMORY_FORMAT, Window, build_step, make_optimizer

    dev = resolve_device(device)
    tree = open_tree(Path(root))
    recipe = replace(RECIPES["imagenet"], batch_size=batch_size)
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, dev))
    mean, _ = tree_stats(tree.train, "pixel", workers=workers, sample=256)
    torch.manual_seed(0)
    net = build_model(model, num_classes=len(tree.classes)).to(dev).to(memory_format=MEMORY_FORMAT)
    window = Window.start(dev, warmup=False, warmup_window=recipe.warmup_window)
    step = build_step(net, make_optimizer(net, recipe, dev), None, None, mean.to(dev), None,
                      recipe, window, compile_model=False, compile_mode=None, cuda_graphs=None)
    stream = BatchStream(len(tree.train), batch_size, seed=0)
    batches = _checked(train_batches(tree.train, stream, seed=0, augmentation="scale",
                                     colour=True, workers=workers, skip_bad_images=False), root)

    def ours() -> float:
        for i in range(2):
            step(next(batches), i)
        t0 = time.perf_counter()
        for i in range(steps):
            step(next(batches), i + 2)
        return steps * batch_size / (time.perf_counter() - t0)

    torch.manual_seed(0)
    ref_net = build_model(model, num_classes=len(tree.classes)).to(dev)
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_mean = mean.mean((1, 2)).to(dev)[:, None, None]
    loader = iter(_reference_loader(root, batch_size, workers))

    def theirs() -> float:
        def one() -> None:
            x, y = next(loader)
            x = x.to(dev).float().div_(255).sub_(ref_mean)
            loss = torch.nn.functional.cross_entropy(ref_net(x), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        for _ in range(2):
            one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        return steps * batch_size / (time.perf_counter() - t0)

    mine, ref = ours(), theirs()
    return {"model": model, "batch_size": batch_size, "steps": steps, "workers": workers,
            "precision": recipe.precision, "reslab_images_per_second": mine,
            "reference_images_per_second": ref, "ratio": mine / ref,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
