"""An ImageFolder tree of images of any size, read as files, never held in memory: the data of
the paper's ImageNet experiments (Sec. 3.4) or a user's photos. `train/` and `val/` (or
`test/`), one folder per class; JPEG, PNG and torchvision's other suffixes; greyscale, CMYK,
palette and 16-bit images become RGB. Images are decoded in the loader's worker processes
(data/stream.py) while the model trains, so memory stays flat however many there are.
"""

from __future__ import annotations

import io
import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .dataset import DataError, check_batch_size, hold_out
from .folder import BAD_IMAGE, deep_grey, scan_folder
from .workers import DieWithParent, check_workers, max_workers

if TYPE_CHECKING:  # the feed imports evaluation, which imports this package
    from torch import nn

    from ..distributed import World
    from ..recipes import Recipe
    from .feed import TreeFeed

# Larger than any photograph; a file claiming more pixels is a decompression bomb (PIL's own
# limit is ~89 Mpx, with a warning from half of it, which reslab treats as an error).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ImageTree:
    """The files of a tree: (path, label) per image of each split, the class names (train/'s
    folders, sorted; label i is classes[i]) and the files that are not images."""

    name: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]
    ignored_files: tuple[str, ...] = ()
    val: tuple[tuple[str, int], ...] = ()  # held out of train/ (--val-split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    in_channels = 3  # every image is decoded to RGB
    skipped_files: ClassVar[tuple[str, ...]] = ()  # its bad images are met as it streams
    image_size = None  # photographs have no one size; the views are cropped (Sec. 3.4)

    # The interface both regimes give (Dataset's in dataset.py).
    augmentations: ClassVar[tuple[str, ...]] = ("scale", "torchvision")  # in the workers
    protocols: ClassVar[tuple[str, ...]] = ("centre", "10-crop", "multi-scale")  # Sec. 3.4

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def view_size(self) -> tuple[int, int]:
        """The size of the views the net trains on: Sec. 3.4's 224 crops."""
        from .photo_augment import CROP

        return (CROP, CROP)

    def fits(self, in_channels: int | None, num_classes: int | None, batch_size: int
             ) -> tuple[int, int]:
        """(in_channels, num_classes) of a run on this tree (None: the tree's), or a clear
        error before any work is done."""
        classes = self.num_classes if num_classes is None else num_classes
        if classes < self.num_classes:
            raise ValueError(f"{self.name} has {self.num_classes} classes but --num-classes is "
                             f"{classes}; omit it to follow the data")
        if in_channels not in (None, 3):
            raise ValueError(f"--in-channels {in_channels} but images of a tree are decoded "
                             "to RGB; omit --in-channels")
        check_batch_size(batch_size, self.train_size)
        return 3, classes

    def feed(self, recipe: Recipe, device: torch.device, *, workers: int | None,
             skip_bad_images: bool, world: World) -> TreeFeed:
        """Views decoded and augmented by worker processes (default: one per core, at most 8)."""
        from .feed import TreeFeed
        from .workers import default_workers

        return TreeFeed(self, recipe, device, default_workers() if workers is None else workers,
                        skip_bad_images, world)

    def test_logits(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None, *,
                    precision: str) -> torch.Tensor | None:
        """None: a tree's test views are streamed, not held (an ensemble is run as one)."""
        return None

    def evaluate(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None, *,
                 protocol: str | None, precision: str, workers: int | None,
                 skip_bad_images: bool, logits: torch.Tensor | None = None) -> dict[str, Any]:
        """The test record of `protocol`'s views (default the centre crop); as Dataset's."""
        from .feed import tree_record

        return tree_record(self, model, mean, std, protocol=protocol, precision=precision,
                           workers=workers, skip_bad_images=skip_bad_images)


def open_tree(root: Path) -> ImageTree:
    """Scan `root` (no decoding) with folder.scan_folder, the in-memory reader's scanner: the
    same test split, class rule and errors in both regimes."""
    scan = scan_folder(root)
    return ImageTree(str(Path(root).expanduser().resolve()), tuple(scan.classes),
                     tuple((str(p), label) for p, label in scan.train),
                     tuple((str(p), label) for p, label in scan.test),
                     tuple(str(p) for p in scan.ignored))


def hold_out_tree(tree: ImageTree, n: int, seed: int) -> ImageTree:
    """Sec. 4.2's validation hold-out for a tree (dataset.hold_out, as in memory)."""
    from dataclasses import replace

    train, val = hold_out(len(tree.train), n, seed)
    return replace(tree, train=tuple(tree.train[i] for i in train.tolist()),
                   val=tuple(tree.train[i] for i in val.tolist()))


def _decode_jpeg(data: bytes) -> torch.Tensor | None:
    """libjpeg-turbo through torchvision.io: the same pixels as PIL's decoder (both are
    libjpeg-turbo with its default IDCT and upsampling) in ~0.8x its time, as (3, H, W) over
    HWC memory, the layout torch's uint8 antialiased resize runs fastest on. None where it
    refuses the file (PIL then decodes it, or names what is wrong with it)."""
    from torchvision import io

    try:
        with warnings.catch_warnings():  # 0.29 deprecates it for torchcodec: still the fastest
            warnings.simplefilter("ignore", DeprecationWarning)
            return io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                  mode=io.ImageReadMode.RGB)
    except RuntimeError:
        return None


def decode_rgb(path: str, shorter_at_least: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W) of any image PIL reads: greyscale, CMYK, palette and RGBA become RGB,
    16-bit images keep their high byte. Raises DataError naming the file for a bad image (a
    text file, a truncated JPEG, a decompression bomb, a mode no decoder has). The result may
    be a view of (H, W, 3) memory (not contiguous).

    `shorter_at_least`: the shorter side the image is about to be scaled to. A JPEG at least
    twice that is decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain (libjpeg's scaled
    IDCT, through PIL's draft mode), its shorter side still at least that: a 2-8x cheaper
    decode for the few large photographs, which cost most of a loader's time."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as image:  # the header: size, mode, bomb check
                jpeg = image.format == "JPEG" and image.mode in ("L", "RGB", "CMYK")
                w, h = image.size
                if jpeg and shorter_at_least and min(w, h) >= 4 * shorter_at_least:
                    f = shorter_at_least / min(w, h)
                    image.draft(image.mode, (math.ceil(w * f), math.ceil(h * f)))
                elif jpeg:
                    decoded = _decode_jpeg(data)
                    if decoded is not None:
                        return decoded
                if (deep := deep_grey(image)) is not None:  # PIL's convert() would clip
                    array = np.repeat(deep[..., None], 3, 2)
                else:
                    array = np.array(image.convert("RGB"))
    except BAD_IMAGE as e:
        raise DataError(f"cannot decode image {path}: {e}; fix or delete it") from e
    return torch.from_numpy(array).permute(2, 0, 1)


def _check_one(path: str) -> str | None:
    try:
        decode_rgb(path)
    except DataError as e:
        return str(e)
    return None


def check_tree(root: Path, workers: int = 0) -> tuple[ImageTree, list[str]]:
    """Decode every image of the tree in `workers` processes (0: one per core; never more
    than the images): the tree and one message per bad image, so a multi-day run does not meet
    them on day two."""
    tree = open_tree(root)
    paths = [p for p, _ in tree.train + tree.test]
    workers = min(check_workers(workers) or max_workers(), len(paths))
    with ProcessPoolExecutor(max_workers=workers, initializer=DieWithParent()) as pool:
        problems = [m for m in pool.map(_check_one, paths, chunksize=64) if m is not None]
    return tree, problems
