"""Sec. 3.4's augmentation and test views for photographs of any size, on uint8 (3, H, W)
tensors in the loader's workers.

Training (Sec. 3.4): "The image is resized with its shorter side randomly sampled in [256, 480]
for scale augmentation. A 224x224 crop is randomly sampled from an image or its horizontal flip,
with the per-pixel mean subtracted. The standard color augmentation in [AlexNet] is used." The
colour augmentation is AlexNet's PCA lighting noise with fb.resnet.torch's ImageNet eigenvalues
and eigenvectors and standard deviation 0.1; it adds one RGB offset per image, returned here and
added on the device after the mean is subtracted, so batches travel as uint8. torchvision's recipe
(RandomResizedCrop 224, flip, per-channel mean/std) is the named variant "torchvision".

Every random draw comes from a generator seeded by (seed, epoch, index): an image's view is a
pure function of those, so a run resumed mid-epoch, or split across ranks, sees the same views.

Testing (Sec. 3.4): the centre 224 crop of the image with its shorter side at 256; the 10-crop
protocol (four corners and the centre, and their flips); the fully convolutional form at
shorter sides {224, 256, 384, 480, 640}, whole image and its flip, scores averaged.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

from .dataset import DataError

AUGMENTATIONS = ("pad-crop-flip", "scale", "torchvision")
SCALE_RANGE = (256, 480)
CROP = 224
TEST_SIZE = 256
MULTI_SCALES = (224, 256, 384, 480, 640)
LIGHTING_STD = 0.1
# AlexNet's PCA of ImageNet's RGB pixels (in [0, 1]), as fb.resnet.torch uses them.
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])
MIN_SIDE = 16  # an image smaller than this a side holds too little to crop from: a bad image
MAX_ASPECT = 20  # resizing a 1x5000 strip to a 256 shorter side would take gigabytes


def view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The randomness of one training view: a pure function of (seed, epoch, index)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index)
                                         ^ 0x5DEECE66D)


def check_size(image: torch.Tensor | tuple[int, int], path: str) -> None:
    """A DataError naming the file for an image (or an (H, W) size) too small or too elongated
    to crop from."""
    h, w = image if isinstance(image, tuple) else image.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"image {path} is {w}x{h}, smaller than {MIN_SIDE} px a side: too small "
                        "to crop from; remove it")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise DataError(f"image {path} is {w}x{h}, more than {MAX_ASPECT}:1; crop or remove it")


def shorter_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(H, W) of an image scaled so that its shorter side is `side` pixels."""
    if height <= width:
        return side, max(1, round(width * side / height))
    return max(1, round(height * side / width)), side


def _resize(image: torch.Tensor, size: tuple[int, int] | list[int]) -> torch.Tensor:
    """torchvision's resize (antialiased bilinear) of a uint8 (3, H, W) image, computed on an
    (H, W, 3)-ordered copy: torch's vectorised uint8 kernel is ~1.7x faster on that layout than
    on planes or on a strided view, which TF.resize passes it as they come."""
    batch = image[None].contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(batch, size=list(size), mode="bilinear",
                                           antialias=True)[0]


def resize_shorter(image: torch.Tensor, side: int) -> torch.Tensor:
    """The image scaled (antialiased bilinear) so that its shorter side is `side` pixels."""
    h, w = image.shape[-2:]
    if min(h, w) == side:
        return image
    return _resize(image, shorter_size(h, w, side))


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform in [low, high], both included."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def draw_side(g: torch.Generator, scale: tuple[int, int] = SCALE_RANGE) -> int:
    """Sec. 3.4's shorter side, uniform in [256, 480]: scale_draws's first draw."""
    return _randint(*scale, g)


def scale_draws(height: int, width: int, g: torch.Generator,
                scale: tuple[int, int] = SCALE_RANGE,
                crop: int = CROP) -> tuple[int, int, int, bool]:
    """Sec. 3.4's draws for an image of this size: the shorter side uniform in [256, 480], the
    window's top row and left column in the image scaled to it, and the flip, in that order."""
    side = draw_side(g, scale)
    h, w = shorter_size(height, width, side)
    top, left = _randint(0, h - crop, g), _randint(0, w - crop, g)
    return side, top, left, bool(_randint(0, 1, g))


def _span(start: int, crop: int, size: int, scaled: int) -> tuple[int, int, int]:
    """The source rows (or columns) [first, last) that the scaled image's [start, start + crop)
    is resampled from, with the antialiasing filter's support, and `first`'s place in the
    scaled image."""
    step = size / scaled  # source pixels per scaled pixel
    reach = max(step, 1.0) + 1  # the filter's support, and a pixel for rounding
    first = max(0, int((start + 0.5) * step - 0.5 - reach))
    last = min(size, int((start + crop - 0.5) * step - 0.5 + reach) + 2)
    return first, last, round(first / step)


def window_source(height: int, width: int, scaled: tuple[int, int], top: int, left: int,
                  crop: int = CROP) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rows [r0, r1) and columns [c0, c1) of a height x width image that the crop x crop
    window at (top, left) of the image scaled to `scaled` is resampled from (the filter's
    support included): all a decoder needs to produce for that view (data/jpeg.py)."""
    if (height, width) == scaled:
        return (top, top + crop), (left, left + crop)
    r0, r1, _ = _span(top, crop, height, scaled[0])
    c0, c1, _ = _span(left, crop, width, scaled[1])
    return (r0, r1), (c0, c1)


def window_of_source(source: torch.Tensor, height: int, width: int, scaled: tuple[int, int],
                     top: int, left: int, crop: int = CROP) -> torch.Tensor:
    """The crop x crop window at (top, left) of the height x width image scaled to `scaled`,
    from `source`: the image's window_source region, alone (1.2-2x faster to resize than the
    whole image, which is then mostly thrown away). Equal to cropping the whole scaled image up
    to a shift of the sampling grid by at most one scaled pixel (the region's start falls
    between scaled pixels)."""
    if (height, width) == scaled:
        return source
    r0, r1, y = _span(top, crop, height, scaled[0])
    c0, c1, x = _span(left, crop, width, scaled[1])
    size = [max(crop, round((r1 - r0) * scaled[0] / height)),
            max(crop, round((c1 - c0) * scaled[1] / width))]
    region = _resize(source, size)
    y, x = min(top - y, size[0] - crop), min(left - x, size[1] - crop)
    return region[:, y:y + crop, x:x + crop]


def scale_view(image: torch.Tensor, g: torch.Generator, scale: tuple[int, int] = SCALE_RANGE,
               crop: int = CROP) -> torch.Tensor:
    """Sec. 3.4: shorter side uniform in [256, 480], a random crop x crop window, flipped with
    probability 1/2 (scale_draws)."""
    h, w = image.shape[-2:]
    side, top, left, flip = scale_draws(h, w, g, scale, crop)
    scaled = shorter_size(h, w, side)
    (r0, r1), (c0, c1) = window_source(h, w, scaled, top, left, crop)
    view = window_of_source(image[:, r0:r1, c0:c1], h, w, scaled, top, left, crop)
    return view.flip(-1) if flip else view


def resized_crop_box(height: int, width: int, g: torch.Generator,
                     scale: tuple[float, float] = (0.08, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of RandomResizedCrop's box, drawn from `g` exactly as
    torchvision's RandomResizedCrop.get_params draws from the global generator: ten tries at
    an area fraction and a log-uniform aspect ratio, else the centre crop within the ratios."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=g)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def torchvision_view(image: torch.Tensor, g: torch.Generator, crop: int = CROP) -> torch.Tensor:
    """torchvision's RandomResizedCrop(224) then RandomHorizontalFlip, drawn from `g`."""
    box = resized_crop_box(*image.shape[-2:], g)
    view = TF.resized_crop(image, *box, [crop, crop], antialias=True)
    return view.flip(-1) if _randint(0, 1, g) else view


def lighting(g: torch.Generator, std: float = LIGHTING_STD) -> torch.Tensor:
    """AlexNet's PCA colour noise: the RGB offset (3,) to add to an image scaled to [0, 1]
    (as normalize() scales it): eigvec @ (alpha * eigval) with alpha ~ N(0, std)."""
    alpha = torch.randn(3, generator=g) * std
    return IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)


def centre_view(image: torch.Tensor, side: int = TEST_SIZE, crop: int = CROP) -> torch.Tensor:
    """The centre crop x crop window of the image with its shorter side at `side`."""
    image = resize_shorter(image, side)
    h, w = image.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top:top + crop, left:left + crop]


def ten_views(image: torch.Tensor, side: int = TEST_SIZE, crop: int = CROP) -> torch.Tensor:
    """The 10-crop protocol: the four corners and the centre of the image with its shorter
    side at `side`, and their flips: (10, 3, crop, crop)."""
    image = resize_shorter(image, side)
    h, w = image.shape[-2:]
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop),
               ((h - crop) // 2, (w - crop) // 2)]
    views = torch.stack([image[:, t:t + crop, left:left + crop] for t, left in corners])
    return torch.cat([views, views.flip(-1)])
