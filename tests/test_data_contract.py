"""The data interface's contract (issue 37): both regimes, a folder held in memory (Dataset) and
the same folder streamed from its files (ImageTree), run through the same checks, asked only
through the interface (train_size, view_size, augmentations, protocols, fits, feed, evaluate).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_dataset, write_image_folder
from reslab.data import BatchStream, DataError, open_data
from reslab.data.folder import scan_folder
from reslab.distributed import World
from reslab.models import build_model
from reslab.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("quiet_machine")
REGIMES = ("memory", "stream")
N_TRAIN, N_TEST, CLASSES = 36, 12, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("contract") / "imgs",
                              make_dataset(n_train=N_TRAIN, n_test=N_TEST, classes=CLASSES,
                                           channels=3, size=16))


def _recipe(data):  # noqa: ANN001, ANN202
    """The recipe each regime trains with: Sec. 4.2's where the data takes it, else Sec. 3.4's;
    small batches, fp32."""
    name = "cifar10" if "pad-crop-flip" in data.augmentations else "imagenet"
    return replace(RECIPES[name], batch_size=8, precision="fp32", seed=3)


def _feed(data):  # noqa: ANN001, ANN202
    return data.feed(_recipe(data), torch.device("cpu"), workers=0, skip_bad_images=False,
                     world=World())


@pytest.mark.parametrize("loader", REGIMES)
def test_sizes_classes_and_fits(folder, loader):
    data = open_data(str(folder), loader=loader)
    assert data.train_size == N_TRAIN and data.num_classes == CLASSES and data.in_channels == 3
    assert data.fits(None, None, 8) == (3, CLASSES)
    with pytest.raises(ValueError, match="larger than the 36 training images"):
        data.fits(None, None, 37)
    with pytest.raises(ValueError, match="--in-channels 1"):
        data.fits(1, None, 8)
    with pytest.raises(ValueError, match="omit it to follow the data"):
        data.fits(None, CLASSES - 1, 8)


@pytest.mark.parametrize("loader", REGIMES)
def test_statistics_fit_the_views(folder, loader):
    data = open_data(str(folder), loader=loader)
    mean, std = _feed(data).stats()  # Sec. 4.2's per-pixel mean of the training split
    assert std is None and tuple(mean.shape) == (3, *data.view_size)
    assert mean.dtype == torch.float32 and 0 < mean.mean() < 1  # in [0, 1] units


@pytest.mark.parametrize("loader", REGIMES)
def test_batches_follow_the_runs_order_and_resume_mid_epoch(folder, loader):
    data = open_data(str(folder), loader=loader)
    labels = torch.tensor([label for _, label in scan_folder(folder).train])  # the one scanner
    feed, stream = _feed(data), BatchStream(data.train_size, 8, seed=3)
    order = BatchStream(data.train_size, 8, seed=3)
    seen = []
    for k in range(6):  # 48 images: the second epoch starts inside batch 5
        expected = labels[order.next()]
        got = feed.batch_labels(feed.next(stream, k)).cpu()
        assert torch.equal(got, expected)
        seen.append(got)
    # Resume after batch 3 (mid-epoch): a new feed from the stream's state gives the rest.
    again = BatchStream(data.train_size, 8, seed=3)
    for _ in range(3):
        again.next()
    restored = BatchStream(data.train_size, 8, seed=3)
    restored.load_state_dict(again.state_dict())
    fresh = _feed(data)
    assert all(torch.equal(fresh.batch_labels(fresh.next(restored, k)).cpu(), seen[k])
               for k in range(3, 6))


@pytest.mark.parametrize("loader", REGIMES)
def test_one_record_for_every_protocol(folder, loader):
    data = open_data(str(folder), loader=loader)
    model = build_model("resnet8", num_classes=CLASSES, in_channels=3).eval()
    mean, std = _feed(data).stats()
    for protocol in (None, *data.protocols):
        r = data.evaluate(model, mean, std, protocol=protocol, precision="fp32", workers=0,
                          skip_bad_images=False)
        assert set(r) == {"test_error", "test_top5_error", "test_loss", "protocol", "images",
                          "skipped"}
        assert r["images"] == N_TEST and r["skipped"] == [] and 0 <= r["test_error"] <= 1
        assert r["test_top5_error"] is None  # 3 classes: every label is in the top 5
        assert r["protocol"] == (protocol or ("centre" if data.protocols else "single view"))


def test_the_hold_out_is_one_rule(folder):
    memory, stream = (open_data(str(folder), loader=loader, val_split=9, seed=5)
                      for loader in REGIMES)
    assert memory.train_size == stream.train_size == N_TRAIN - 9
    assert torch.equal(memory.val_labels, torch.tensor([label for _, label in stream.val]))
    with pytest.raises(DataError, match="leaves no training images"):
        open_data(str(folder), loader="stream", val_split=N_TRAIN)
    with pytest.raises(DataError, match="leaves no training images"):
        open_data(str(folder), loader="memory", val_split=N_TRAIN)


@pytest.mark.parametrize("loader", REGIMES)
def test_a_bad_file_is_named_before_or_during_the_first_epoch(folder, tmp_path, loader):
    import shutil

    bad_folder = tmp_path / "bad"
    shutil.copytree(folder, bad_folder)
    bad = bad_folder / "train" / "c0" / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="broken.png"):
        data = open_data(str(bad_folder), loader=loader)
        feed, stream = _feed(data), BatchStream(data.train_size, 8, seed=3)
        for k in range(data.train_size // 8 + 1):
            feed.next(stream, k)
