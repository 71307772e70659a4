"""reslab.data: every reader against files written here in the official formats, each bad input,
the batched augmentation of Sec. 4.2, and the resumable batch order."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import impossible_png
from reslab import data
from reslab.data import (
    DATASETS,
    BatchStream,
    DataError,
    channel_stats,
    load_dataset,
    normalize,
    pad_crop_flip,
    pixel_mean,
    read_idx,
)

REAL_FETCH = data.download._fetch  # the fixture below replaces it in every test


@pytest.fixture(autouse=True)
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty $RESLAB_DATA and no network."""
    root = tmp_path / "reslab-data"
    monkeypatch.setenv("RESLAB_DATA", str(root))

    def no_network(url: str, dest: Path) -> None:
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(data.download, "_fetch", no_network)
    return root


# ---------------------------------------------------------------------------------------------
# IDX


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    """The IDX layout: 0x0000, type code, ndim, big-endian uint32 dims, big-endian payload."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + ".gz" * gz), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32),
     (0x0E, np.float64)],
)
def test_read_idx_round_trip(tmp_path: Path, suffix: str, code: int, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) * 7 - 20).astype(dtype).reshape(2, 3, 4)
    tensor = read_idx(write_idx(tmp_path / f"x-idx3{suffix}", array, code))
    assert tensor.shape == (2, 3, 4)
    assert tensor.dtype == torch.from_numpy(array).dtype
    np.testing.assert_array_equal(tensor.numpy(), array)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "bad magic"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad magic"),
        (b"\x00\x00\x08\x00", "bad magic"),  # zero dims
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x07", "unknown IDX type code 0x0a"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x07", "truncated"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x00\x00\x07", "truncated"),  # int32 needs 4 bytes
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07\x07", "trailing bytes"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_malformed(tmp_path: Path, raw: bytes, message: str, gz: bool) -> None:
    path = tmp_path / ("bad-idx.gz" if gz else "bad-idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")[:-6])
    with pytest.raises(DataError, match="cannot read IDX file") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_fashion_mnist_from_debian_package(data_root: Path) -> None:
    if not data.idx._FASHION_MNIST_SYSTEM_DIR.is_dir():
        pytest.fail(f"{data.idx._FASHION_MNIST_SYSTEM_DIR} is missing: install the Debian "
                    "package dataset-fashion-mnist (`make data` does)")
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.is_contiguous()
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, (28, 28))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert ds.train_labels.bincount().tolist() == [6000] * 10
    assert ds.test_labels.bincount().tolist() == [1000] * 10


def test_reslab_data_is_searched_before_the_system_folder(data_root: Path) -> None:
    arrays = write_mnist(data_root / "fashion-mnist", gz=False)
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_image_and_label_counts_must_match(data_root: Path) -> None:
    write_mnist(data_root / "mnist")
    write_idx(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz holds \\(4,\\) labels for 5"):
        load_dataset("mnist")


def test_idx_labels_out_of_range(data_root: Path) -> None:
    write_mnist(data_root / "mnist")
    write_idx(data_root / "mnist" / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: labels span 10..10"):
        load_dataset("mnist")


def test_missing_idx_without_download_says_where(data_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", download=False)
    message = str(info.value)
    assert str(data_root / "mnist") in message and "RESLAB_DATA" in message
    assert "train-images-idx3-ubyte(.gz)" in message and "t10k-labels-idx1-ubyte(.gz)" in message


def test_idx_download_from_mirrors_with_checksums(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = tmp_path / "server"
    arrays = write_mnist(server)
    md5s = tuple(hashlib.md5((server / f"{f}.gz").read_bytes()).hexdigest()
                 for f in data.idx._IDX_FILES)
    # A dead first mirror, then a working one: the real _fetch, reading file:// URLs.
    mirrors = ((tmp_path / "dead").as_uri() + "/", server.as_uri() + "/")
    source = dataclasses.replace(data.idx.IDX_FILES["mnist"], mirrors=mirrors, md5=md5s)
    monkeypatch.setitem(data.idx.IDX_FILES, "mnist", source)
    monkeypatch.setattr(data.download, "_fetch", REAL_FETCH)
    ds = load_dataset("mnist")
    assert ds.classes == tuple("0123456789")
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert sorted(p.name for p in (data_root / "mnist").iterdir()) == sorted(
        f"{f}.gz" for f in data.idx._IDX_FILES)


def test_corrupted_download_fails_its_checksum(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = []

    def corrupted(url: str, dest: Path) -> None:
        urls.append(url)
        dest.write_bytes(b"not the file")

    monkeypatch.setattr(data.download, "_fetch", corrupted)
    with pytest.raises(DataError, match="md5 .* expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_dataset("mnist")
    assert urls == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
        "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz",
    ]
    assert list((data_root / "mnist").iterdir()) == []  # neither the file nor its .part remain


def test_unreachable_mirrors_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.download, "_fetch", offline)
    monkeypatch.setattr(data.idx, "_FASHION_MNIST_SYSTEM_DIR", Path("/nonexistent"))
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz") as info:
        load_dataset("fashion-mnist")
    for mirror in data.idx.IDX_FILES["fashion-mnist"].mirrors:
        assert mirror in str(info.value)


# ---------------------------------------------------------------------------------------------
# CIFAR


def write_cifar(folder: Path, name: str, n: int = 20) -> tuple[np.ndarray, ...]:
    """Batches as the official files hold them: dicts with bytes keys, pickled with protocol 2.
    Image i of the training set has first byte i % 256 so that tests can identify it."""
    source = data.cifar.CIFAR_FILES[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for files in (source.train, source.test):
        images = rng.integers(0, 256, (n * len(files), 3072), dtype=np.uint8)
        images[:, 0] = np.arange(len(images)) % 256
        labels = rng.integers(0, num_classes, len(images))
        for i, f in enumerate(files):
            batch = {b"batch_label": f.encode(), b"data": images[i * n : (i + 1) * n],
                     source.labels_key.encode(): labels[i * n : (i + 1) * n].tolist(),
                     b"filenames": [b"img_%d.png" % j for j in range(n)]}
            (folder / f).write_bytes(pickle.dumps(batch, protocol=2))
        out += [images, labels]
    names = [b"class%d" % i for i in range(num_classes)]
    (folder / source.meta).write_bytes(pickle.dumps({source.names_key.encode(): names}, protocol=2))
    return tuple(out)


def make_tar(archive: Path, folder: Path, extra: tarfile.TarInfo | None = None) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isfile() else None)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "tar.gz"])
def test_cifar_official_format(tmp_path: Path, data_root: Path, name: str, form: str) -> None:
    source = data.cifar.CIFAR_FILES[name]
    if form == "folder":
        expected = write_cifar(data_root / name / source.folder, name)
    else:
        expected = write_cifar(tmp_path / "src" / source.folder, name)
        make_tar(data_root / name / source.archive, tmp_path / "src" / source.folder)
    ds = load_dataset(name, download=False)
    n_train = 100 if name == "cifar10" else 20
    assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.test_images.shape == (20, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.classes[1] == "class1"
    np.testing.assert_array_equal(ds.train_images.reshape(n_train, -1).numpy(), expected[0])
    np.testing.assert_array_equal(ds.train_labels.numpy(), expected[1])
    np.testing.assert_array_equal(ds.test_images.reshape(20, -1).numpy(), expected[2])
    # Channel-major rows: byte 1024 is the first green value.
    assert ds.train_images[3, 1, 0, 0] == expected[0][3, 1024]


def test_cifar_python2_pickles_load(data_root: Path) -> None:
    """The official files were written by Python 2 and numpy 1: str keys, numpy.core globals."""
    folder = data_root / "cifar10" / "cifar-10-batches-py"
    images, labels, _, _ = write_cifar(folder, "cifar10")
    batch = {"data": images[:20], "labels": labels[:20].tolist()}
    raw = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n",
                                                   b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    (folder / "data_batch_1").write_bytes(raw)
    ds = load_dataset("cifar10")
    np.testing.assert_array_equal(ds.train_images[:20].reshape(20, -1).numpy(), images[:20])


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_cannot_run_code(tmp_path: Path, data_root: Path) -> None:
    folder = data_root / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    marker = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2.*refusing to load global (posix|nt).system"):
        load_dataset("cifar10")
    assert not marker.exists()


def test_cifar_batch_with_wrong_shape(data_root: Path) -> None:
    folder = data_root / "cifar100" / "cifar-100-python"
    write_cifar(folder, "cifar100")
    bad = {b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0] * 4}
    (folder / "test").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="test: 'data' is not a uint8 array of shape"):
        load_dataset("cifar100")


def _member(kind: str) -> tarfile.TarInfo:
    if kind == "dotdot":
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
    elif kind == "absolute":
        info = tarfile.TarInfo("/tmp/reslab-escaped")
    elif kind == "symlink":
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info = tarfile.TarInfo("cifar-10-batches-py/hard")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    else:
        info = tarfile.TarInfo("cifar-10-batches-py/dev")
        info.type = tarfile.CHRTYPE
    if info.isfile():
        info.size = 1
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_tar_members_are_refused(tmp_path: Path, data_root: Path, kind: str) -> None:
    write_cifar(tmp_path / "src" / "cifar-10-batches-py", "cifar10", n=2)
    member = _member(kind)
    make_tar(data_root / "cifar10" / "cifar-10-python.tar.gz", tmp_path / "src" /
             "cifar-10-batches-py", member)
    with pytest.raises(DataError, match="unsafe member") as info:
        load_dataset("cifar10")
    assert member.name in str(info.value)
    # Nothing was extracted: the check runs before any file is written.
    assert sorted(p.name for p in (data_root / "cifar10").iterdir()) == ["cifar-10-python.tar.gz"]
    assert not (data_root / "escaped").exists()


def test_cifar_download_verifies_md5(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar(tmp_path / "src" / "cifar-10-batches-py", "cifar10")
    archive = tmp_path / "served.tar.gz"
    make_tar(archive, tmp_path / "src" / "cifar-10-batches-py")
    urls = []

    def serve(url: str, dest: Path) -> None:
        urls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(data.download, "_fetch", serve)
    with pytest.raises(DataError, match="md5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10")  # our archive is not the official one
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    source = dataclasses.replace(data.cifar.CIFAR_FILES["cifar10"], md5=md5)
    monkeypatch.setitem(data.cifar.CIFAR_FILES, "cifar10", source)
    assert len(load_dataset("cifar10").train_labels) == 100
    assert (data_root / "cifar10" / "cifar-10-batches-py" / "batches.meta").is_file()


def test_missing_cifar_without_download_says_where(data_root: Path) -> None:
    with pytest.raises(DataError, match="cifar-100-python.tar.gz or its extracted") as info:
        load_dataset("cifar100", download=False)
    assert str(data_root / "cifar100") in str(info.value)


# ---------------------------------------------------------------------------------------------
# ImageFolder


def write_image(path: Path, size: int = 8, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return array


def image_folder(root: Path, test: str = "test", mode: str = "RGB") -> dict[str, list]:
    """train/{cat,dog,emu}/ with 3, 2, 2 images and test/ with 1 each; PNG except one JPEG."""
    arrays: dict[str, list] = {"train": [], "test": []}
    seed = 0
    for split, counts in (("train", (3, 2, 2)), (test, (1, 1, 1))):
        for name, count in zip(("dog", "cat", "emu"), counts, strict=True):
            for i in range(count):
                seed += 1
                suffix = ".jpg" if (split, name, i) == ("train", "emu", 1) else ".png"
                array = write_image(root / split / name / f"{i}{suffix}", mode=mode, seed=seed)
                arrays["train" if split == "train" else "test"].append((name, suffix, array))
    return arrays


def test_image_folder_classes_labels_and_pixels(tmp_path: Path) -> None:
    arrays = image_folder(tmp_path / "folder")
    ds = load_dataset(str(tmp_path / "folder"))
    assert ds.name == str((tmp_path / "folder").resolve())
    assert ds.classes == ("cat", "dog", "emu")  # sorted
    assert ds.train_images.shape == (7, 3, 8, 8) and ds.test_images.shape == (3, 3, 8, 8)
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert ds.test_labels.tolist() == [0, 1, 2]
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    # PNG is lossless: files are read in sorted order, cat/0.png first.
    cat0 = next(a for n, s, a in arrays["train"] if n == "cat")
    np.testing.assert_array_equal(ds.train_images[0].permute(1, 2, 0).numpy(), cat0)
    assert ds.skipped_files == ()


def test_image_folder_grayscale_and_val(tmp_path: Path) -> None:
    image_folder(tmp_path / "gray", test="val", mode="L")
    ds = load_dataset(str(tmp_path / "gray"))
    assert ds.in_channels == 1 and ds.test_images.shape == (3, 1, 8, 8)
    # One colour image makes the whole dataset RGB, grey images repeated over the channels.
    write_image(tmp_path / "gray" / "val" / "dog" / "rgb.png", mode="RGB", seed=99)
    ds = load_dataset(str(tmp_path / "gray"))
    assert ds.in_channels == 3 and ds.train_images.shape == (7, 3, 8, 8)
    assert torch.equal(ds.train_images[:, 0], ds.train_images[:, 2])


def test_image_folder_cache(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_folder(tmp_path / "folder")
    first = load_dataset(str(tmp_path / "folder"))
    assert len(list((data_root / "cache").glob("*.pt"))) == 1

    def must_not_decode(path: Path) -> np.ndarray:
        raise AssertionError(f"decoded {path} although the folder is unchanged")

    monkeypatch.setattr(data.folder, "decode_image", must_not_decode)
    second = load_dataset(str(tmp_path / "folder"))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.classes == first.classes
    # A changed file invalidates the cache.
    write_image(tmp_path / "folder" / "train" / "cat" / "0.png", seed=123)
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset(str(tmp_path / "folder"))


def _empty_class(root: Path) -> str:
    (root / "train" / "fox").mkdir()
    return str(root / "train" / "fox")


def _text_as_jpeg(root: Path) -> str:
    path = root / "train" / "dog" / "notes.jpg"
    path.write_text("this is not an image")
    return str(path)


def _truncated_jpeg(root: Path) -> str:
    path = root / "train" / "cat" / "cut.jpeg"
    write_image(path, size=32, seed=5)
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def _unknown_test_class(root: Path) -> str:
    write_image(root / "test" / "yak" / "0.png")
    return str(root / "test" / "yak")


def _mixed_sizes(root: Path) -> str:
    write_image(root / "test" / "cat" / "big.png", size=10)
    return str(root / "test" / "cat" / "big.png") + " is 10x10"


def _too_large(root: Path) -> str:
    for path in (root / "train").rglob("*.*"):
        path.unlink()
    write_image(root / "train" / "cat" / "huge.png", size=65)
    write_image(root / "train" / "dog" / "a.png", size=65)
    write_image(root / "train" / "emu" / "a.png", size=65)
    return "huge.png is 65x65"


def _empty_test_split(root: Path) -> str:
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    for path in (root / "test").iterdir():
        path.rmdir()
    return f"{root / 'test'} has no class subfolders"


def _no_test_split(root: Path) -> str:
    (root / "test").rename(root / "testing")
    return "needs train/ and test/ (or val/)"


@pytest.mark.parametrize(
    "fault",
    [_empty_class, _text_as_jpeg, _truncated_jpeg, _unknown_test_class, _mixed_sizes,
     _too_large, _empty_test_split, _no_test_split],
)
def test_image_folder_bad_input_names_the_file(tmp_path: Path, fault) -> None:
    image_folder(tmp_path / "folder")
    named = fault(tmp_path / "folder")
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "folder"))
    assert named in str(info.value)


def test_skip_bad_images(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    image_folder(root)
    bad = sorted([_text_as_jpeg(root), _truncated_jpeg(root)])
    ds = load_dataset(str(root), skip_bad_images=True)
    assert sorted(ds.skipped_files) == bad
    assert len(ds.train_labels) == 7
    # Skipping is part of the cache key: a strict load still fails.
    with pytest.raises(DataError, match="cannot decode image"):
        load_dataset(str(root))
    # An empty class folder is a layout error, not a bad image.
    empty = _empty_class(root)
    with pytest.raises(DataError, match="holds no images") as info:
        load_dataset(str(root), skip_bad_images=True)
    assert empty in str(info.value)


def test_skipping_every_image_of_a_class_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    image_folder(root)
    for path in (root / "train" / "cat").iterdir():  # both of cat's training images go bad
        path.write_text("not an image")
    with pytest.raises(DataError, match="every image in class folder .*cat is bad "
                       r"\(--skip-bad-images skipped them all\)"):
        load_dataset(str(root), skip_bad_images=True)


def test_files_that_are_not_images_are_counted_and_named(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    arrays = image_folder(root)
    write_image(root / "train" / "dog" / "extra.bmp", seed=99)  # torchvision's suffixes: read
    write_image(root / "test" / "emu" / "extra.webp", seed=98)
    (root / "train" / "cat" / "notes.txt").write_text("labelled by hand")
    Image.new("RGB", (8, 8)).save(root / "train" / "emu" / "anim.gif")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"")  # hidden: not the user's data
    ds = load_dataset(str(root))
    assert len(ds.train_labels) == len(arrays["train"]) + 1
    assert len(ds.test_labels) == len(arrays["test"]) + 1
    assert ds.ignored_files == (str(root / "train" / "cat" / "notes.txt"),
                                str(root / "train" / "emu" / "anim.gif"))
    assert load_dataset(str(root)).ignored_files == ds.ignored_files  # from the cache too


def test_decompression_bomb_is_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_folder(tmp_path / "folder")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 8x8 = 64 pixels > 2 * 20: a "bomb"
    with pytest.raises(DataError, match="cannot decode image .*decompression bomb"):
        load_dataset(str(tmp_path / "folder"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 > 40: PIL's warning, also refused
    with pytest.raises(DataError, match="cannot decode image .*decompression bomb"):
        load_dataset(str(tmp_path / "folder"))


# Images of any mode decode into the dataset's mode (16-bit greyscale, CMYK, palette, ...).


def _png16(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            arrays[split, label] = rng.integers(0, 65536, (8, 8))
            _png16(tmp_path / split / label / "0.png", arrays[split, label])
    ds = load_dataset(str(tmp_path))
    assert ds.in_channels == 1
    for i, label in enumerate(("a", "b")):
        expected = torch.from_numpy((arrays["train", label] >> 8).astype(np.uint8))
        assert torch.equal(ds.train_images[i, 0], expected)  # clipping gives 255 almost everywhere


def test_wrong_mode_images_decode_into_the_dataset_mode(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "base").mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / "base" / "0.png")
    odd = root / "train" / "odd"
    odd.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(odd / "a-cmyk.jpg", quality=100)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(odd / "b-palette.png")
    Image.new("RGBA", (8, 8), (40, 50, 60, 0)).save(odd / "c-rgba.png")
    _png16(odd / "d-grey16.png", np.full((8, 8), 0x8A00))
    Image.new("LA", (8, 8), (70, 128)).save(odd / "e-la.png")
    Image.new("1", (8, 8), 1).save(odd / "f-bilevel.png")
    ds = load_dataset(str(root))
    assert ds.in_channels == 3 and ds.train_labels.tolist() == [0, 1, 1, 1, 1, 1, 1]
    pixel = [tuple(ds.train_images[i, :, 4, 4].tolist()) for i in range(1, 7)]
    assert all(abs(a - b) <= 2 for a, b in zip(pixel[0], (255, 0, 255), strict=True)), pixel[0]
    assert pixel[1:] == [(200, 100, 50), (40, 50, 60), (0x8A,) * 3, (70,) * 3, (255,) * 3]


def test_unknown_spec_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar-10")
    for name in DATASETS:
        assert name in str(info.value)
    assert "train/" in str(info.value) and "test/ (or val/)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Validation split (Sec. 4.2: 45k/5k)


def test_val_split(data_root: Path) -> None:
    write_cifar(data_root / "cifar10" / "cifar-10-batches-py", "cifar10")
    full = load_dataset("cifar10")
    ds = load_dataset("cifar10", val_split=30, seed=3)
    assert len(ds.train_labels) == 70 and ds.val_images.shape == (30, 3, 32, 32)
    # The first byte of training image i is i: the two parts partition range(100).
    train_ids, val_ids = ds.train_images[:, 0, 0, 0].long(), ds.val_images[:, 0, 0, 0].long()
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(100))
    assert torch.equal(ds.val_labels, full.train_labels[val_ids])
    assert torch.equal(ds.train_labels, full.train_labels[train_ids])
    assert torch.equal(ds.test_images, full.test_images)
    again = load_dataset("cifar10", val_split=30, seed=3)
    assert torch.equal(again.val_images, ds.val_images)
    other = load_dataset("cifar10", val_split=30, seed=4)
    assert not torch.equal(other.val_images, ds.val_images)
    for n in (100, 101, -1):
        with pytest.raises(DataError, match=f"--val-split {n}"):
            load_dataset("cifar10", val_split=n)


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation


def test_pixel_mean_and_channel_stats() -> None:
    images = torch.tensor([[[[0, 255]], [[51, 51]]], [[[255, 255]], [[153, 51]]]])
    images = images.to(torch.uint8)
    expected = torch.tensor([[[0.5, 1.0]], [[0.4, 0.2]]])
    assert torch.allclose(pixel_mean(images), expected)
    assert torch.allclose(pixel_mean(images, chunk=1), expected)
    mean, std = channel_stats(images, chunk=1)
    assert torch.allclose(mean, torch.tensor([0.75, 0.3]))
    # channel 0: values 0, 1, 1, 1 -> std sqrt(3)/4; channel 1: 0.2, 0.2, 0.6, 0.2 -> sqrt(3)/10
    assert torch.allclose(std, torch.tensor([3**0.5 / 4, 3**0.5 / 10]))
    with pytest.raises(DataError):
        pixel_mean(images.float())


def test_normalize() -> None:
    images = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    out = normalize(images, torch.tensor([0.5, 0.2]))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[[[-0.5, 0.5]], [[0.0, 0.2]]]]))
    out = normalize(images, torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.1]))
    assert torch.allclose(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    per_pixel = torch.tensor([[[0.0, 1.0]], [[0.2, 0.4]]])
    assert torch.allclose(normalize(images, per_pixel), torch.zeros(1, 2, 1, 2), atol=1e-6)


def _draws(seed: int, b: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented draw order: offsets (B, 2), then flip bits (B,)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=g)
    return offsets, torch.randint(0, 2, (b,), generator=g) == 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size", [28, 32])
def test_pad_crop_flip_shape_and_dtype(dtype: torch.dtype, size: int) -> None:
    x = torch.randint(0, 256, (5, 3, size, size)).to(dtype)
    out = pad_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


def test_pad_crop_flip_identity_without_pad_or_flip() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(pad_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=False), x)
    # With flips, pad 0 gives each image or its mirror image, as the documented draws say.
    out = pad_crop_flip(x, 0, torch.Generator().manual_seed(7))
    _, flips = _draws(7, 16, 0)
    assert torch.equal(out, torch.where(flips[:, None, None, None], x.flip(-1), x))


def test_pad_crop_flip_crops_are_windows_of_the_padded_image() -> None:
    b, pad, h, w = 64, 2, 6, 5
    x = torch.randint(1, 256, (b, 2, h, w), dtype=torch.uint8)  # nonzero: padding is visible
    out = pad_crop_flip(x, pad, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets, flips = _draws(1, b, pad)
    seen = set()
    for i in range(b):
        source = padded[i].flip(-1) if flips[i] else padded[i]
        windows = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], source[:, dy : dy + h, dx : dx + w])]
        assert windows, f"crop {i} is no window of the padded image or its flip"
        seen.update(windows)
        oy, ox = offsets[i].tolist()
        assert (oy, ox) in windows
    assert len(seen) > 15  # offsets vary over the 25 positions


def test_pad_crop_flip_flips_half_the_images() -> None:
    x = torch.randint(0, 256, (4000, 1, 4, 4), dtype=torch.uint8)
    out = pad_crop_flip(x, 0, torch.Generator().manual_seed(2))
    flipped = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.45 < flipped < 0.55


def test_pad_crop_flip_depends_only_on_the_generator() -> None:
    x = torch.randn(32, 3, 8, 8)
    a = pad_crop_flip(x, 4, torch.Generator().manual_seed(5))
    b = pad_crop_flip(x, 4, torch.Generator().manual_seed(5))
    c = pad_crop_flip(x, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # flip=False consumes the same random numbers, so the crops still line up.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pad_crop_flip(x, 4, g1)
    pad_crop_flip(x, 4, g2, flip=False)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_matches_cpu() -> None:
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = pad_crop_flip(x, 4, torch.Generator().manual_seed(3))
    cuda = pad_crop_flip(x.cuda(), 4, torch.Generator().manual_seed(3))
    assert cuda.is_cuda and torch.equal(cuda.cpu(), cpu)
    mean = pixel_mean(x)
    assert torch.allclose(pixel_mean(x.cuda()).cpu(), mean)
    # x/255 may round differently on the GPU: one float32 step at 1.0 is 1.2e-7.
    assert torch.allclose(normalize(x.cuda(), mean).cpu(), normalize(x, mean), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# BatchStream


def test_batch_stream_epochs() -> None:
    stream = BatchStream(10, 3, seed=4)
    batches = [stream.next() for _ in range(10)]  # 30 indices: exactly 3 epochs
    assert all(b.shape == (3,) and b.dtype == torch.int64 for b in batches)
    flat = torch.cat(batches)
    for e in range(3):
        permutation = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 1_000_003 + e))
        assert torch.equal(flat[10 * e : 10 * (e + 1)], permutation)
    assert stream.state_dict() == {"epoch": 3, "position": 0}  # batch 3 spanned epochs 0 and 1


def test_batch_stream_resumes_exactly() -> None:
    for steps in (0, 3, 7, 10):
        stream = BatchStream(10, 4, seed=1)
        for _ in range(steps):
            stream.next()
        state = stream.state_dict()
        expected = [stream.next() for _ in range(6)]
        resumed = BatchStream(10, 4, seed=1)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next() for _ in range(6)],
                                                      strict=True))


def test_batch_stream_bad_arguments() -> None:
    for batch_size in (0, 11):
        with pytest.raises(DataError, match=f"batch_size={batch_size}"):
            BatchStream(10, batch_size, seed=0)
    with pytest.raises(DataError, match="does not fit n=10"):
        BatchStream(10, 2, seed=0).load_state_dict({"epoch": 0, "position": 10})


# ---------------------------------------------------------------------------------------------
# cifar10-jpeg: CIFAR-10 as JPEG files in ImageFolder form (an archive or its extraction)


def write_cifar10_jpeg(root: Path, per_class: tuple[int, int] = (2, 1)) -> None:
    """The copy's layout with a few generated JPEGs per class: train/<class>/, test/<class>/."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for name in data.CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=75)


@pytest.fixture
def jpeg_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small generated copy; the real one's sizes and checksum are patched to match it."""
    checkout = tmp_path / "checkout-data"  # not the real one
    monkeypatch.setattr(data.cifar10_jpeg, "CHECKOUT_DATA", checkout)
    monkeypatch.setattr(data.cifar10_jpeg, "CIFAR10_JPEG_SIZES", (20, 10))
    src = tmp_path / "src"
    write_cifar10_jpeg(src)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
        tar.add(src / "test", arcname="test")
    monkeypatch.setattr(data.cifar10_jpeg, "CIFAR10_JPEG_SHA256",
                        hashlib.sha256(archive.read_bytes()).hexdigest())
    return archive


def test_cifar10_jpeg_from_its_archive(jpeg_copy: Path, data_root: Path) -> None:
    (data_root / "cifar10-jpeg").mkdir(parents=True)
    archive = data_root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    archive.write_bytes(jpeg_copy.read_bytes())
    ds = load_dataset("cifar10-jpeg")
    assert ds.name == "cifar10-jpeg" and ds.classes == data.CIFAR10_CLASSES
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    assert ds.train_labels.tolist() == [i // 2 for i in range(20)]
    assert ds.test_labels.tolist() == list(range(10))
    # Decoded as the ImageFolder reader decodes the extracted files.
    with Image.open(data_root / "cifar10-jpeg" / "train" / "bird" / "0001.jpg") as image:
        np.testing.assert_array_equal(ds.train_images[5].permute(1, 2, 0).numpy(),
                                      np.asarray(image.convert("RGB")))
    archive.unlink()  # extracted once: the folder alone serves from now on
    assert torch.equal(load_dataset("cifar10-jpeg").train_images, ds.train_images)


def test_cifar10_jpeg_archive_with_another_checksum_is_refused(
    jpeg_copy: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data.cifar10_jpeg, "CIFAR10_JPEG_SHA256", "0" * 64)
    (data_root / "cifar10-jpeg").mkdir(parents=True)
    archive = data_root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    archive.write_bytes(jpeg_copy.read_bytes())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=f"cifar10-jpeg.tar.gz has SHA-256 {digest}, not"):
        load_dataset("cifar10-jpeg")
    assert sorted(p.name for p in (data_root / "cifar10-jpeg").iterdir()) == [archive.name]


def test_cifar10_jpeg_in_the_checkout_data_folder(
    jpeg_copy: Path, tmp_path: Path, data_root: Path
) -> None:
    """`make data` extracts the archive into the checkout's ignored data/ folder."""
    write_cifar10_jpeg(tmp_path / "checkout-data" / "cifar10-jpeg")
    assert data.cifar10_jpeg_folder() == tmp_path / "checkout-data" / "cifar10-jpeg"
    assert load_dataset("cifar10-jpeg").train_images.shape == (20, 3, 32, 32)
    # $RESLAB_DATA comes first.
    write_cifar10_jpeg(data_root / "cifar10-jpeg")
    assert data.cifar10_jpeg_folder() == data_root / "cifar10-jpeg"


def test_missing_cifar10_jpeg_says_where_to_put_it(jpeg_copy: Path, data_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10-jpeg")
    message = str(info.value)
    assert "cifar10-jpeg not found: put cifar10-jpeg.tar.gz" in message
    assert str(data_root / "cifar10-jpeg") in message and "make data CIFAR10_JPEG=" in message


@pytest.mark.parametrize("damage", ["class", "count", "size"])
def test_a_folder_that_is_not_the_copy_is_refused(
    jpeg_copy: Path, data_root: Path, damage: str
) -> None:
    root = data_root / "cifar10-jpeg"
    write_cifar10_jpeg(root)
    if damage == "class":
        for split in ("train", "test"):
            (root / split / "truck").rename(root / split / "lorry")
    elif damage == "count":
        Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "0009.jpg")
    else:
        for split in ("train", "test"):
            for path in (root / split).rglob("*.jpg"):
                Image.new("RGB", (28, 28)).save(path)
    with pytest.raises(DataError, match="is not the CIFAR-10 JPEG copy") as info:
        load_dataset("cifar10-jpeg")
    assert str(root) in str(info.value)


def test_skipping_cannot_leave_a_split_empty(tmp_path: Path) -> None:
    root = tmp_path / "only-bad"
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True)
        impossible_png(root / split / "x" / "0.png")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_dataset(str(root), skip_bad_images=True)
