"""Worker processes and the odd inputs they meet (issue 38, items 2, 6 and 8): every worker
count bounded by the machine, no worker outliving its parent, `data bench` naming a bad image
in one line, `data check --json`, broken links named as bad images, float TIFFs decoded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reslab.data.tree
from reslab.cli import main
from reslab.data import check_tree, open_tree
from reslab.data.folder import decode_image
from reslab.data.tree import decode_rgb
from reslab.data.workers import check_workers
from reslab.train import RunSpec, TrainOptions, train

REPO = Path(__file__).resolve().parent.parent


def photos(root: Path, per_class: int = 2) -> Path:
    """A streamed tree of tiny JPEGs: train/ and val/, classes a and b."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    folder / f"{i}.jpg")
    return root


def test_worker_counts_are_bounded_by_the_machine(tmp_path, monkeypatch):
    cores = os.cpu_count()
    assert check_workers(cores) == cores
    with pytest.raises(ValueError, match=f"--workers {cores + 1} is more worker processes than "
                       f"this machine's {cores} cores"):
        check_workers(cores + 1)
    with pytest.raises(ValueError, match="--workers 1000 is more"):  # the Python API as well
        train(RunSpec(model="resnet8", data="x"), tmp_path / "run",
              data=None, options=TrainOptions(workers=1000))
    assert not (tmp_path / "run").exists()
    # data check never starts more processes than there are images.
    started = []

    class Pool(reslab.data.tree.ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            started.append(max_workers)
            super().__init__(max_workers=1, **kwargs)

    monkeypatch.setattr(reslab.data.tree, "ProcessPoolExecutor", Pool)
    tree = photos(tmp_path / "photos", per_class=1)
    check_tree(tree, workers=0)
    assert started == [min(cores, 4)]


# A parent that starts two workers as reslab's loaders and pools do (DieWithParent first),
# prints their pids and waits to be killed; workers.py loaded alone, so no torch import.
WORKERS_THEN_SLEEP = """
import importlib.util, multiprocessing, sys, time
spec = importlib.util.spec_from_file_location("workers", sys.argv[1])
workers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workers)
def work(init):
    init(0)
    time.sleep(60)
if __name__ == "__main__":
    init = workers.DieWithParent()
    children = [multiprocessing.get_context("fork").Process(target=work, args=(init,))
                for _ in range(2)]
    for c in children:
        c.start()
    time.sleep(0.3)
    print(*[c.pid for c in children], flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_their_parent(tmp_path):
    """A parent killed with SIGKILL (as the out-of-memory killer does) takes its workers with
    it at once: torch's own check leaves a loader's worker up to 5 s, or for ever when it is
    blocked writing to the dead parent's queue, and a process pool's has none."""
    script = REPO / "reslab" / "data" / "workers.py"
    parent = subprocess.Popen([sys.executable, "-c", WORKERS_THEN_SLEEP, str(script)],
                              stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(map(_alive, pids))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 2
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # leave nothing behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a worker outlived its parent"


def test_every_loader_and_pool_starts_its_workers_with_die_with_parent(tmp_path, monkeypatch):
    import reslab.data.stream
    from reslab.data import BatchStream
    from reslab.data.workers import DieWithParent

    loaders = []

    class Loader(reslab.data.stream.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaders.append(self)

    monkeypatch.setattr(reslab.data.stream, "DataLoader", Loader)
    items = open_tree(photos(tmp_path / "photos")).train
    reslab.data.stream.train_batches(items, BatchStream(len(items), 2, seed=0), seed=0,
                                     augmentation="scale", colour=False, workers=0,
                                     skip_bad_images=False)
    reslab.data.stream.test_batches(items, "centre", batch_size=2, workers=0)
    assert len(loaders) == 2
    assert all(isinstance(loader.worker_init_fn, DieWithParent) for loader in loaders)
    initialisers = []

    class Pool(reslab.data.tree.ProcessPoolExecutor):
        def __init__(self, max_workers, initializer=None):
            initialisers.append(initializer)
            super().__init__(max_workers=1)

    monkeypatch.setattr(reslab.data.tree, "ProcessPoolExecutor", Pool)
    check_tree(tmp_path / "photos")
    assert isinstance(initialisers[0], DieWithParent)


def test_data_bench_names_a_bad_image_in_one_line(tmp_path, capsys):
    tree = photos(tmp_path / "photos")
    bad = tree / "train" / "a" / "1.jpg"
    bad.write_text("a text file named .jpg")
    assert main(["data", "bench", str(tree), "--workers", "1", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"cannot decode image {bad}" in err[0], err
    assert f"`reslab data check {tree}` lists the bad ones" in err[0]
    assert "Traceback" not in err[0] and "--skip-bad-images" not in err[0]
    assert len(err[0]) < 400
    # torchvision's loader, which the benchmark runs beside reslab's, says the same.
    from reslab.bench.photos import _reference_loader
    from reslab.data import DataError

    batches = _reference_loader(tree, 2, 1)
    with pytest.raises(DataError, match=f"cannot decode image {bad}: .*data check"):
        for _ in range(2):  # an epoch of the 4 training images
            next(batches)


def test_broken_links_are_named_as_bad_images(tmp_path, capsys):
    tree = photos(tmp_path / "photos")
    (tree / "train" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    loop = tree / "train" / "b" / "loop.jpg"
    loop.symlink_to(loop)
    names = {p for p, _ in open_tree(tree).train}
    assert {str(tree / "train" / "a" / "gone.jpg"), str(loop)} <= names
    assert main(["data", "check", str(tree), "--workers", "1", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)  # --json: one JSON document on stdout
    assert report["images"] == 10 and report["classes"] == 2 and len(report["bad"]) == 2
    assert any(str(loop) in m and "Too many levels of symbolic links" in m
               for m in report["bad"])
    assert any("gone.jpg" in m and "No such file" in m for m in report["bad"])


def test_float_images_are_scaled_not_clipped_to_black(tmp_path):
    """A float TIFF (mode F) of values 0-1 decodes as 0-255, in memory and streamed; one of
    values 0-255 as it is."""
    ramp = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "bytes.tif")
    want = np.rint(ramp * 255).astype(np.uint8)
    for name in ("unit.tif", "bytes.tif"):
        assert Image.open(tmp_path / name).mode == "F"
        assert np.array_equal(decode_image(tmp_path / name), want)
        rgb = decode_rgb(str(tmp_path / name)).numpy()
        assert all(np.array_equal(channel, want) for channel in rgb)
