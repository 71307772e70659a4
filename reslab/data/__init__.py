"""Datasets as uint8 tensors, batched augmentation (Sec. 4.2) and a resumable batch order.

Known datasets are read from their official files: IDX for (Fashion-)MNIST, the "python version"
pickles for CIFAR-10/100. Any other classification set comes as an ImageFolder-form folder of
small images. Files placed by the user are validated by format; downloads also by md5.

One concern per module, imports flowing one way: `dataset` (Dataset, DataError) <- `download` <-
the readers `idx`, `cifar`, `folder` <- `cifar10_jpeg`, `tree` <- `load` (`load_dataset`,
`open_data`); `stats`, `augment` and `order` need only `dataset`; `photo_augment` (Sec. 3.4) and
`stream` (worker-process batches of a tree) build on `tree` and `order`; `workers` bounds
the worker processes and ties them to their parent. This module
re-exports the public names; tests patch private ones in the module that looks them up.
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
from .load import LOADERS, load_dataset, open_data
from .order import BatchStream
from .stats import channel_stats, normalize, pixel_mean
from .tree import ImageTree, check_tree, open_tree

__all__ = [
    "CHECKOUT_DATA",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_ARCHIVE",
    "CIFAR10_JPEG_SHA256",
    "CIFAR10_JPEG_SIZES",
    "DATASETS",
    "LOADERS",
    "BatchStream",
    "DataError",
    "Dataset",
    "ImageTree",
    "cifar10_jpeg_folder",
    "channel_stats",
    "check_tree",
    "crop_flip_apply",
    "crop_flip_draw",
    "load_dataset",
    "normalize",
    "open_data",
    "open_tree",
    "pad_crop_flip",
    "pixel_mean",
    "read_idx",
    "to_device",
]
