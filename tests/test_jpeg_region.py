"""Decoding only the region of a JPEG under Sec. 3.4's window (reslab/data/jpeg.py, built by
make from jpeg_region.c): its pixels are the full decode's, for every chroma subsampling,
progressive files, greyscale and regions at the image's edges; the loader's views from it equal
the views cut from the whole decoded image; what it cannot take is decoded whole, and a broken
file is an error, never a crash or grey pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from reslab.data import BatchStream, DataError, jpeg
from reslab.data.photo_augment import scale_draws, scale_view, view_generator
from reslab.data.stream import _region_view, train_batches
from reslab.data.tree import decode_rgb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields with noise: chroma that the upsampling has to interpolate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / (7 + c) + y / (11 - c) + c) for c in range(3)], -1)
    return (base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _full(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                       mode=ImageReadMode.RGB)


def test_the_region_decoder_is_built():
    assert jpeg.available(), f"{jpeg.LIBRARY} is missing: `make` builds it (gcc, libjpeg headers)"


KINDS = {
    "4:2:0": ((203, 301), {"subsampling": 2}),
    "4:2:2": ((150, 237), {"subsampling": 1}),
    "4:4:4": ((97, 130), {"subsampling": 0}),
    "progressive 4:2:0": ((241, 179), {"subsampling": 2, "progressive": True}),
    "greyscale": ((120, 161), {}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_region_has_the_full_decodes_pixels(kind):
    (h, w), options = KINDS[kind]
    array = _photo(h, w, seed=len(kind))
    data = _jpeg(array[..., 0] if kind == "greyscale" else array, **options)
    full = _full(data)
    assert jpeg.read_header(data) == (h, w)
    rng = np.random.default_rng(0)
    regions = [((0, h), (0, w)), ((0, 1), (0, 1)), ((h - 1, h), (w - 1, w)), ((h - 9, h), (3, 20)),
               ((5, 6), (0, w))]
    for _ in range(40):
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        regions.append(((top, int(rng.integers(top + 1, h + 1))),
                        (left, int(rng.integers(left + 1, w + 1)))))
    for rows, cols in regions:
        region = jpeg.decode_region(data, (h, w), rows, cols)
        assert region is not None and region.shape == (3, rows[1] - rows[0], cols[1] - cols[0])
        assert torch.equal(region, full[:, rows[0]:rows[1], cols[0]:cols[1]]), (rows, cols)


def test_what_it_cannot_take_is_none_and_a_broken_stream_is_not_a_crash():
    array = _photo(120, 200, seed=3)
    data = _jpeg(array)
    cmyk = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg.read_header(cmyk.getvalue()) is None  # libjpeg has no CMYK -> RGB: whole decode
    png = io.BytesIO()
    Image.fromarray(array).save(png, "PNG")
    assert jpeg.read_header(png.getvalue()) is None
    assert jpeg.read_header(b"\xff\xd8" + bytes(200)) is None  # libjpeg's error, returned
    truncated = data[:len(data) // 2]
    assert jpeg.read_header(truncated) == (120, 200)
    assert jpeg.decode_region(truncated, (120, 200), (0, 120), (0, 200)) is None  # not grey
    assert jpeg.decode_region(truncated, (120, 200), (0, 8), (0, 200)) is not None  # above it
    for rows, cols in (((0, 121), (0, 200)), ((100, 50), (0, 200)), ((0, 5), (-1, 3))):
        with pytest.raises(ValueError, match="is not inside the 200x120 image"):
            jpeg.decode_region(data, (120, 200), rows, cols)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """JPEGs of the sizes the loader meets: smaller than the drawn side, ImageNet-like, and
    large (the largest is decoded whole at a DCT scale instead), progressive and greyscale."""
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, ((h, w), options) in enumerate([((90, 140), {}), ((396, 466), {}),
                                           ((500, 375), {"progressive": True}),
                                           ((333, 500), {"subsampling": 0}),
                                           ((1300, 1100), {}), ((300, 420), {})]):
        array = _photo(h, w, seed=i)
        path = root / f"{i}.jpg"
        path.write_bytes(_jpeg(array[..., 1] if i == 5 else array, **options))
        paths.append(str(path))
    return paths


def test_the_loaders_views_from_regions_equal_views_of_the_whole_image(files):
    for i, path in enumerate(files):
        h, w = decode_rgb(path).shape[1:]
        for epoch in range(12):
            view = _region_view(path, view_generator(4, epoch, i))
            side = scale_draws(h, w, view_generator(4, epoch, i))[0]
            if min(h, w) >= 4 * side:  # 1,100 px and a side <= 275: decoded whole, DCT-scaled
                assert view is None
                continue
            assert torch.equal(view, scale_view(decode_rgb(path), view_generator(4, epoch, i)))
    # And through the loader: the same batches with and without regions, labels and lighting.
    items = tuple((p, k % 2) for k, p in enumerate(files[:4] + files[5:]))
    a, b = (train_batches(items, BatchStream(len(items), 3, seed=1), seed=1,
                          augmentation="scale", colour=True, workers=0, skip_bad_images=False,
                          regions=regions) for regions in (True, False))
    for _ in range(4):
        x, y = next(a), next(b)
        assert x.images.shape == (3, 3, 224, 224)
        assert x.images.permute(0, 2, 3, 1).is_contiguous()  # channels-last, as the model runs
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.lighting, y.lighting)


def test_a_truncated_jpeg_is_named_bad_whatever_its_window(files, tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(Path(files[1]).read_bytes()[:30_000])  # rows near the top still decode
    for epoch in range(4):
        assert _region_view(str(path), view_generator(0, epoch, 0)) is None  # no end marker
    with pytest.raises(DataError, match=f"cannot decode image {path}"):
        decode_rgb(str(path))
    tiny = tmp_path / "tiny.jpg"
    tiny.write_bytes(_jpeg(_photo(10, 40, seed=0)))
    message = _region_view(str(tiny), view_generator(0, 0, 0))
    assert isinstance(message, str) and f"image {tiny} is 40x10, smaller than 16 px" in message
