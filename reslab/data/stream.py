"""Batches of an ImageTree, decoded and augmented in worker processes while the model trains
(torch.utils.data.DataLoader), in the run's resumable order (order.BatchStream).

The loader's sampler is a second BatchStream started from the run's state: it runs ahead of
training by the prefetched batches, while the run's own stream advances one batch per step, so
a checkpoint records exactly the batches trained. An image's view depends only on (seed, epoch,
index) (photo_augment.view_generator), so a resumed run sees the very views it would have seen.

A bad image met mid-epoch (one that cannot be decoded, or is too small or too elongated to crop)
comes back to the main process as its message: train() saves a checkpoint and stops with that
message, naming the file; with --skip-bad-images it is left out of its batch and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import jpeg
from .dataset import DataError
from .order import BatchStream
from .photo_augment import (
    CROP,
    TEST_SIZE,
    centre_view,
    check_size,
    draw_side,
    lighting,
    scale_draws,
    scale_view,
    shorter_size,
    torchvision_view,
    view_generator,
    window_of_source,
    window_source,
)
from .stats import normalize
from .tree import MAX_PIXELS, decode_rgb
from .workers import DieWithParent


@dataclass
class StreamedBatch:
    """One training batch from the workers: uint8 views (B, 3, crop, crop) over channels-last
    memory, labels, each view's lighting offset (B, 3) in [0, 1] units (None without colour
    augmentation), and the messages of the images left out (--skip-bad-images) or, without
    skipping, of the first bad one."""

    images: torch.Tensor
    labels: torch.Tensor
    lighting: torch.Tensor | None
    bad: list[str] = field(default_factory=list)
    skipping: bool = True

    def tensors(self, mean: torch.Tensor, std: torch.Tensor | None,
                memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on the training device: the views normalised there, plus each view's PCA
        lighting offset (Sec. 3.4)."""
        device = mean.device
        x = normalize(self.images.to(device, non_blocking=True), mean, std)
        if self.lighting is not None:
            offset = self.lighting.to(device)[:, :, None, None]
            x.add_(offset if std is None else offset / std.to(device)[:, None, None])
        return x.contiguous(memory_format=memory_format), self.labels.to(device)


def _decoded(path: str, shorter_at_least: int | None = None) -> torch.Tensor | str:
    """The image, or the message naming why it is bad (sent back to the main process)."""
    try:
        image = decode_rgb(path, shorter_at_least)
        check_size(image, path)
    except DataError as e:
        return str(e)
    return image


def _region_view(path: str, g: torch.Generator) -> torch.Tensor | str | None:
    """Sec. 3.4's view of a JPEG with only the region under its window decoded (data/jpeg.py):
    the same view as scale_view of the whole decoded image, drawn from `g`, in ~0.6x the time.
    None where the image is to be decoded whole (not a JPEG libjpeg's region decoder takes, a
    decompression bomb for decode_rgb to name, or large enough for decode_rgb's DCT scaling);
    a message for an image too small to crop."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None  # decode_rgb names it
    size = jpeg.read_header(data)
    if size is None or size[0] * size[1] > MAX_PIXELS or not data.endswith(b"\xff\xd9"):
        return None  # a truncated file (no end marker) is named bad whatever its window
    h, w = size
    try:
        check_size(size, path)
    except DataError as e:
        return str(e)
    side, top, left, flip = scale_draws(h, w, g)
    if min(h, w) >= 4 * side:
        return None
    scaled = shorter_size(h, w, side)
    rows, cols = window_source(h, w, scaled, top, left)
    source = jpeg.decode_region(data, size, rows, cols)
    if source is None:
        return None
    view = window_of_source(source, h, w, scaled, top, left)
    return view.flip(-1) if flip else view


class _TrainViews(torch.utils.data.Dataset):
    """(index, epoch) -> (view, label, lighting) or the bad image's message."""

    def __init__(self, items: tuple[tuple[str, int], ...], seed: int, augmentation: str,
                 colour: bool, regions: bool = True) -> None:
        self.items, self.seed, self.augmentation, self.colour = items, seed, augmentation, colour
        self.regions = regions

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.items[index]
        g = view_generator(self.seed, epoch, index)
        scale = self.augmentation == "scale"
        if scale and self.regions:
            view = _region_view(path, g)
            if isinstance(view, str):
                return view
            if view is not None:
                return view, label, lighting(g) if self.colour else None
            g = view_generator(self.seed, epoch, index)  # decoded whole below: the same draws
        # The shorter side scale_view will draw first (a generator replayed), so that a large
        # JPEG is decoded only as large as that needs.
        side = draw_side(view_generator(self.seed, epoch, index)) if scale else None
        image = _decoded(path, side)
        if isinstance(image, str):
            return image
        view = (scale_view if scale else torchvision_view)(image, g)
        return view, label, lighting(g) if self.colour else None


class _Order:
    """The loader's batch sampler: (index, epoch) pairs of a BatchStream from a given state,
    this rank's `part` of each global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, state: dict[str, int],
                 part: slice) -> None:
        self.stream, self.part = BatchStream(n, batch_size, seed), part
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            idx, epochs = self.stream.next_with_epochs()
            yield list(zip(idx[self.part].tolist(), epochs[self.part].tolist(), strict=True))


def _collate(samples: list, skipping: bool) -> StreamedBatch:
    good = [s for s in samples if not isinstance(s, str)]
    bad = [s for s in samples if isinstance(s, str)]
    if not good:
        return StreamedBatch(torch.empty(0, 3, CROP, CROP, dtype=torch.uint8),
                             torch.empty(0, dtype=torch.int64), None, bad, skipping)
    light = None if good[0][2] is None else torch.stack([s[2] for s in good])
    # Channels-last (B, H, W, 3) memory, the views' own layout and the model's: ~10x cheaper to
    # fill than planes (a copy per row of pixels, not a transpose).
    images = torch.empty(len(good), CROP, CROP, 3, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        # In a worker, straight into shared memory (as default_collate does): sending the batch
        # to the main process then copies no pixels.
        images.share_memory_()
    for slot, sample in zip(images, good, strict=True):
        slot.copy_(sample[0].permute(1, 2, 0))
    return StreamedBatch(images.permute(0, 3, 1, 2), torch.tensor([s[1] for s in good]), light,
                         bad, skipping)


class _Collate:  # a class, not a closure: worker processes pickle it
    def __init__(self, skipping: bool) -> None:
        self.skipping = skipping

    def __call__(self, samples: list) -> StreamedBatch:
        return _collate(samples, self.skipping)


def train_batches(items: tuple[tuple[str, int], ...], stream: BatchStream, *, seed: int,
                  augmentation: str, colour: bool, workers: int, skip_bad_images: bool,
                  pin_memory: bool = False, part: slice = slice(None),
                  regions: bool = True) -> Iterator[StreamedBatch]:
    """Endless training batches in `stream`'s order from its current state (the run's stream
    is not advanced here: train() advances it as it trains); `part`: a rank's slice of each
    global batch (distributed.World.shard); `regions=False` decodes every JPEG whole (the same
    views, slower: for the benchmark)."""
    if regions:
        jpeg.note_fallback()  # once, here in the main process: not in each worker
    order = _Order(len(items), stream.batch_size, stream.seed, stream.state_dict(), part)
    loader = DataLoader(
        _TrainViews(items, seed, augmentation, colour, regions), batch_sampler=order,
        num_workers=workers, collate_fn=_Collate(skip_bad_images), pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=DieWithParent(),
    )
    return iter(loader)


class _TestViews(torch.utils.data.Dataset):
    """index -> (views, label): the protocol's views of one test image, or its message."""

    def __init__(self, items: tuple[tuple[str, int], ...], protocol: str) -> None:
        self.items, self.protocol = items, protocol

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from .photo_augment import MULTI_SCALES, resize_shorter, ten_views

        path, label = self.items[index]
        image = _decoded(path)
        if isinstance(image, str):
            return image
        if self.protocol == "centre":
            return centre_view(image, TEST_SIZE, CROP)[None], label
        if self.protocol == "10-crop":
            return ten_views(image, TEST_SIZE, CROP), label
        # Multi-scale: whole images of different sizes, one list entry per scale.
        return [resize_shorter(image, s) for s in MULTI_SCALES], label


def test_batches(items: tuple[tuple[str, int], ...], protocol: str, *, batch_size: int,
                 workers: int) -> Iterator[list]:
    """Lists of (views, label) or bad-image messages, in file order, decoded in workers."""
    loader = DataLoader(_TestViews(items, protocol), batch_size=batch_size, num_workers=workers,
                        collate_fn=list, prefetch_factor=2 if workers > 0 else None,
                        worker_init_fn=DieWithParent())
    return iter(loader)


def tree_stats(items: tuple[tuple[str, int], ...], normalization: str, *, workers: int,
               sample: int = 10_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sec. 3.4's per-pixel mean (3, 224, 224) in [0, 1] units, or the per-channel mean and std,
    of the centre views of a fixed sample of up to `sample` training images (the mean of 10,000
    images is within ~0.1% of the whole set's; a pass over ImageNet's 1.28M would cost an hour
    of decoding). Bad images in the sample are left out here; training meets them by name."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(items), generator=g)[:sample].sort().values.tolist()
    total = torch.zeros(3, CROP, CROP, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    n = 0
    for batch in test_batches(tuple(items[i] for i in chosen), "centre", batch_size=64,
                              workers=workers):
        views = [v[0] for v in batch if not isinstance(v, str)]
        if views:
            x = torch.stack([v[0] for v in views]).double() / 255
            total += x.sum(0)
            squares += x.square().sum((0, 2, 3))
            n += len(views)
    if n == 0:
        raise DataError("no image of the training sample could be decoded")
    pixel = (total / n).float()
    if normalization == "pixel":
        return pixel, None
    mean = pixel.mean((1, 2))
    var = squares / (n * CROP * CROP) - mean.double().square()
    return mean, var.clamp_min(1e-12).sqrt().float()
