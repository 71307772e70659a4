"""A region of a JPEG decoded without the rest: libjpeg-turbo's cropped and skipped scanlines
(jpeg_region.c, built by `pip install` (setup.py) or `make` into _jpeg_region.so beside this
file, called through ctypes).

Sec. 3.4's 224x224 training window of an image scaled to a shorter side in [256, 480] is
resampled from about a third of an ImageNet-sized photograph's pixels; decoding only those
(widened by MARGIN pixels, inside which the chroma upsampling sees the same neighbours as in a
full decode) gives the very pixels of the full decode in ~0.6x its time. torchvision's and
PIL's decoders decode whole images only. Where the library is not built, or libjpeg cannot
take a file here (CMYK, a corrupt stream), callers decode the whole image instead: the same
views, slower (`reslab data bench` says which decoder ran).
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from pathlib import Path

import torch

LIBRARY = Path(__file__).with_name("_jpeg_region.so")
MARGIN = 2  # pixels around the region, inside which its pixels equal the full decode's
_MESSAGE = 256
_RGB_SPACES = (1, 2, 3)  # libjpeg's JCS_GRAYSCALE, JCS_RGB, JCS_YCbCr: converted to RGB by it
_NOTED = False


@cache
def _library() -> ctypes.CDLL | None:
    if not LIBRARY.exists():
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:  # built, but libjpeg is not loadable here: decode whole images
        return None
    c_int_p = ctypes.POINTER(ctypes.c_int)
    lib.reslab_jpeg_header.argtypes = [ctypes.c_char_p, ctypes.c_ulong, c_int_p, c_int_p,
                                       c_int_p, ctypes.c_char_p, ctypes.c_int]
    lib.reslab_jpeg_region.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_void_p, c_int_p, c_int_p, ctypes.c_char_p,
                                       ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the region decoder is built (`make` builds it: gcc and libjpeg's headers)."""
    return _library() is not None


def note_fallback() -> None:
    """Say once per process, on stderr, that whole JPEGs are decoded because the region
    decoder is not built (pip builds it where a compiler and libjpeg's headers exist)."""
    global _NOTED
    if available() or _NOTED:
        return
    _NOTED = True
    print(f"reslab: note: the JPEG region decoder is not built ({LIBRARY.name} is missing or "
          "cannot load libjpeg): decoding whole JPEGs instead, the same views, slower; install "
          "gcc and libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev) and reinstall reslab "
          "(pip install . or make)", file=sys.stderr)


def read_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG whose region libjpeg can decode to RGB (greyscale, YCbCr or
    RGB), read without decoding; None for anything else (not a JPEG, CMYK, unreadable)."""
    lib = _library()
    if lib is None or data[:2] != b"\xff\xd8":
        return None
    w, h, space = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(_MESSAGE)
    if lib.reslab_jpeg_header(data, len(data), ctypes.byref(w), ctypes.byref(h),
                              ctypes.byref(space), message, _MESSAGE) != 0:
        return None
    return (h.value, w.value) if space.value in _RGB_SPACES else None


def decode_region(data: bytes, size: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> torch.Tensor | None:
    """uint8 (3, bottom - top, right - left) of rows [top, bottom) and columns [left, right) of
    the JPEG of `size` (read_header's (height, width)), equal to that region of the full
    decode, as a view of (H, W, 3) memory; None where libjpeg fails on the file (the caller
    decodes it whole, which names what is wrong)."""
    (top, bottom), (left, right), (h, w) = rows, cols, size
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"region [{top}, {bottom}) x [{left}, {right}) is not inside the "
                         f"{w}x{h} image")
    lib = _library()
    if lib is None:
        return None
    t, b = max(0, top - MARGIN), min(h, bottom + MARGIN)
    le, r = max(0, left - MARGIN), min(w, right + MARGIN)
    out = torch.empty((b - t) * (r - le + 32) * 3, dtype=torch.uint8)
    x0, width = ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(_MESSAGE)
    if lib.reslab_jpeg_region(data, len(data), t, b, le, r, out.data_ptr(), ctypes.byref(x0),
                              ctypes.byref(width), message, _MESSAGE) != 0:
        return None
    pixels = out[:(b - t) * width.value * 3].view(b - t, width.value, 3)
    return pixels[top - t:bottom - t, left - x0.value:right - x0.value].permute(2, 0, 1)
