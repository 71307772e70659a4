"""Datasets as uint8 tensors, batched augmentation (Sec. 4.2) and a resumable batch order.

Known datasets are read from their official files: IDX for (Fashion-)MNIST, the "python version"
pickles for CIFAR-10/100. Any other classification set comes as an ImageFolder-form folder of
small images. Files placed by the user are validated by format; downloads also by md5.

One concern per module, imports flowing one way: `dataset` (Dataset, DataError) <- `download` <-
the readers `idx`, `cifar`, `folder` <- `cifar10_jpeg` <- `load` (`load_dataset`); `stats`,
`augment` and `order` need only `dataset`. This module re-exports the public names; tests patch
private ones in the module that looks them up.
"""

from .augment import crop_flip_apply, crop_flip_draw, pad_crop_flip, to_device
from .cifar10_jpeg import (
    CHECKOUT_DATA,
    CIFAR10_CLASSES,
    CIFAR10_JPEG_ARCHIVE,
    CIFAR10_JPEG_SHA256,
    CIFAR10_JPEG_SIZES,
    cifar10_jpeg_folder,
)
from .dataset import DATASETS, DataError, Dataset
from .idx import read_idx
from .load import load_dataset
from .order import BatchStream
from .stats import channel_stats, normalize, pixel_mean

__all__ = [
    "CHECKOUT_DATA",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_ARCHIVE",
    "CIFAR10_JPEG_SHA256",
    "CIFAR10_JPEG_SIZES",
    "DATASETS",
    "BatchStream",
    "DataError",
    "Dataset",
    "cifar10_jpeg_folder",
    "channel_stats",
    "crop_flip_apply",
    "crop_flip_draw",
    "load_dataset",
    "normalize",
    "pad_crop_flip",
    "pixel_mean",
    "read_idx",
    "to_device",
]
