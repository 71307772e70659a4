"""The ImageNet path (issue 24) on image trees these tests generate: scanning a tree, decoding
any mode to RGB, Sec. 3.4's augmentation as a pure function of (seed, epoch, index), the
worker-process loader in the run's resumable order, the plateau schedule, gradient
accumulation, the testing protocols (centre, 10-crop, multi-scale; top-1 and top-5), and bad
images met mid-run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

import reslab
from conftest import Crashed, crash_after_checkpoint
from reslab.cli import main
from reslab.data import BatchStream, DataError, Dataset, ImageTree, open_data, open_tree
from reslab.data.augment import index_batch
from reslab.data.photo_augment import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    centre_view,
    lighting,
    resize_shorter,
    resized_crop_box,
    scale_draws,
    scale_view,
    ten_views,
    view_generator,
)
from reslab.data.protocols import evaluate_tree
from reslab.data.stream import train_batches
from reslab.data.tree import decode_rgb
from reslab.models import build_model
from reslab.recipes import RECIPES, Plateau, Recipe, learning_rate
from reslab.step import Window, build_step, make_optimizer
from reslab.train import RunSpec, TrainOptions, train

pytestmark = pytest.mark.usefixtures("quiet_machine")
CLASSES = ("ant", "bee", "cat")


def photo_tree(root: Path, train: int = 6, val: int = 2, seed: int = 0) -> Path:
    """Colour-coded JPEGs of varied sizes (70-140 px, any aspect): learnable, and larger than
    the in-memory path takes, so the tree is streamed."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(70, 141, 2))
                image = rng.integers(0, 60, (h, w, 3))
                image[..., c] += 180
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return photo_tree(tmp_path_factory.mktemp("tree") / "photos")


SPEC = RunSpec(model="resnet8", data="photos", recipe=replace(
    RECIPES["imagenet"], batch_size=6, iterations=6, eval_every=3, checkpoint_every=2,
    log_every=1))
OPTIONS = TrainOptions(tensorboard=False, workers=0)


# ---------------------------------------------------------------------------------------------
# 1: the tree, scanned and decoded


def test_a_tree_of_photographs_is_streamed_and_small_images_stay_in_memory(tree, tmp_path):
    data = open_data(str(tree))
    assert isinstance(data, ImageTree) and data.classes == CLASSES
    assert (len(data.train), len(data.test)) == (18, 6)
    assert [label for _, label in data.train] == [0] * 6 + [1] * 6 + [2] * 6
    assert len(open_data(str(tree), val_split=4).val) == 4
    small = tmp_path / "small"
    for split in ("train", "test"):
        for name in CLASSES:
            (small / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(small / split / name / "0.png")
    assert isinstance(open_data(str(small)), Dataset)  # held in memory, as before
    assert isinstance(open_data(str(small), loader="stream"), ImageTree)  # unless told
    with pytest.raises(DataError, match="--loader stream reads image folders; --data cifar10"):
        open_data("cifar10", loader="stream")


def test_a_tree_that_cannot_be_trained_on_is_refused_by_name(tree, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tree, bad)
    (bad / "val" / "dog").mkdir()
    Image.new("RGB", (80, 80)).save(bad / "val" / "dog" / "0.jpg")
    # One class rule for both regimes (issue 37): a test class must be a training class.
    with pytest.raises(DataError, match=f"class folder {bad / 'val' / 'dog'} has no counterpart "
                       f"in {bad / 'train'}; test classes must be training classes"):
        open_tree(bad)
    shutil.rmtree(bad / "val" / "dog")
    (bad / "train" / "bee" / "notes.txt").write_text("x")
    assert open_tree(bad).ignored_files == (str(bad / "train" / "bee" / "notes.txt"),)
    for p in (bad / "train" / "ant").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=f"class folder {bad / 'train' / 'ant'} holds no images"):
        open_tree(bad)


def test_both_regimes_read_a_folder_alike(tmp_path):
    """One scanner (issue 37): with test/ and val/ both present, both regimes test on test/;
    a test split without some training class is accepted by both, with train/'s labels."""
    root = tmp_path / "both"
    for split, names, n in (("train", CLASSES, 2), ("test", CLASSES[1:], 3), ("val", CLASSES, 5)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / name / f"{i}.png")
    memory, tree = open_data(str(root)), open_data(str(root), loader="stream")
    assert isinstance(memory, Dataset) and isinstance(tree, ImageTree)
    assert len(memory.test_labels) == len(tree.test) == 3 * (len(CLASSES) - 1)
    assert memory.classes == tree.classes == tuple(CLASSES)
    assert memory.test_labels.tolist() == [label for _, label in tree.test]
    assert all(Path(f).parent.parent.name == "test" for f, _ in tree.test)
    # One hold-out (Sec. 4.2's validation split): the same images held out in both regimes.
    memory, tree = open_data(str(root), val_split=2, seed=3), open_data(
        str(root), val_split=2, seed=3, loader="stream")
    assert memory.val_labels.tolist() == [label for _, label in tree.val]
    assert memory.train_labels.tolist() == [label for _, label in tree.train]
    held = [int(Path(f).stem) for f, _ in tree.val]  # image i of a class has red value i
    assert memory.val_images[:, 0, 0, 0].tolist() == held
    for loader in ("memory", "stream"):
        with pytest.raises(DataError, match="--val-split -1 is negative"):
            open_data(str(root), val_split=-1, loader=loader)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit greyscale PNG
    else:
        image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    image.save(path)
    out = decode_rgb(str(path))
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8
    if mode == "I;16":
        assert torch.equal(out[0], torch.from_numpy(rgb[..., 0]))  # the high byte, not clipped


def test_jpegs_decode_to_pils_pixels_and_large_ones_at_a_dct_scale(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(rgb).save(path, quality=90, progressive=True)
    with Image.open(path) as image:
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_rgb(str(path)), expected)  # libjpeg-turbo either way
    assert torch.equal(decode_rgb(str(path), shorter_at_least=256), expected)  # not 4x: full
    # 300 px >= 4 x 70: decoded at 1/4 (libjpeg's scaled IDCT), the shorter side still >= 70.
    small = decode_rgb(str(path), shorter_at_least=70)
    assert small.shape == (3, 75, 103)
    with Image.open(path) as image:
        image.draft("RGB", (96, 70))  # 70 / 300 of each side, rounded up
        assert torch.equal(small, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    path.write_bytes(path.read_bytes()[:2000])  # truncated: torchvision refuses, PIL names it
    with pytest.raises(DataError, match=f"cannot decode image {path}: image file is truncated"):
        decode_rgb(str(path))


# ---------------------------------------------------------------------------------------------
# 2: Sec. 3.4's augmentation, a pure function of (seed, epoch, index)


def test_scale_augmentation_is_sec_3_4_and_a_pure_function_of_seed_epoch_index():
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    a = scale_view(image, view_generator(1, 2, 3))
    assert a.shape == (3, 224, 224)
    assert torch.equal(a, scale_view(image, view_generator(1, 2, 3)))
    assert not torch.equal(a, scale_view(image, view_generator(1, 3, 3)))
    # The draws, replayed: the shorter side in [256, 480], the window, the flip.
    g = view_generator(1, 2, 3)
    side = int(torch.randint(256, 481, (1,), generator=g))
    resized = resize_shorter(image, side)
    assert min(resized.shape[1:]) == side and 256 <= side <= 480
    top = int(torch.randint(0, resized.shape[1] - 224 + 1, (1,), generator=g))
    left = int(torch.randint(0, resized.shape[2] - 224 + 1, (1,), generator=g))
    flip = bool(torch.randint(0, 2, (1,), generator=g))
    assert scale_draws(100, 150, view_generator(1, 2, 3)) == (side, top, left, flip)
    sides = {min(resize_shorter(image, int(torch.randint(256, 481, (1,), generator=g))).shape[1:])
             for _ in range(400)}
    assert min(sides) < 270 and max(sides) > 465  # the whole range is drawn


@pytest.mark.parametrize("size", [(100, 150), (61, 60), (400, 470), (480, 480), (1500, 2000),
                                  (300, 5000)])
def test_the_view_is_the_window_of_the_whole_rescaled_image(size):
    # Only the window's source region is resized: on a smooth image (a shift of the sampling
    # grid by a scaled pixel moves a value by under 1/255 of its range per pixel) the view is
    # within 2 levels of the window cut from the whole rescaled image, flipped as drawn; a
    # window 12 rows off is not.
    h, w = size
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = (torch.stack([y * x, y, x]) * 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    image = image.permute(2, 0, 1)  # over HWC memory, as decode_rgb returns JPEGs
    for i in range(12):
        view = scale_view(image, view_generator(0, 0, i)).float()
        side, top, left, flip = scale_draws(h, w, view_generator(0, 0, i))
        whole = resize_shorter(image, side)
        window = whole[:, top:top + 224, left:left + 224]
        window = (window.flip(-1) if flip else window).float()
        assert view.shape == (3, 224, 224)
        assert (view - window).abs().max() <= 2
        if whole.shape[1] >= 224 + 12:
            off = whole[:, top + 12:top + 236, left:left + 224] if top + 236 <= whole.shape[1] \
                else whole[:, top - 12:top + 212, left:left + 224]
            off = (off.flip(-1) if flip else off).float()
            assert (view - off).abs().max() > 2


def test_lighting_is_alexnets_pca_noise():
    g = view_generator(0, 0, 7)
    offset = lighting(g)
    alpha = torch.randn(3, generator=view_generator(0, 0, 7)) * 0.1
    assert torch.allclose(offset, IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL))
    offsets = torch.stack([lighting(view_generator(0, 0, i)) for i in range(2000)])
    assert offsets.mean(0).abs().max() < 0.003 and 0.01 < offsets.std(0).max() < 0.05


def test_torchvision_variant_draws_random_resized_crops_as_torchvision_does():
    image = torch.zeros(3, 120, 200, dtype=torch.uint8)
    for seed in range(50):
        torch.manual_seed(seed)
        theirs = RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        assert resized_crop_box(120, 200, torch.Generator().manual_seed(seed)) == theirs


def test_ten_crops_are_the_corners_the_centre_and_their_flips():
    image = torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8)
    views = ten_views(image)
    assert views.shape == (10, 3, 224, 224)
    assert torch.equal(views[0], image[:, :224, :224])
    assert torch.equal(views[3], image[:, -224:, -224:])
    assert torch.equal(views[4], centre_view(image))
    assert torch.equal(views[5:], views[:5].flip(-1))


# ---------------------------------------------------------------------------------------------
# 1 and 2: the loader, in the run's order, whatever the workers


def _batches(items, state_steps: int, count: int, workers: int):
    stream = BatchStream(len(items), 4, seed=3)
    for _ in range(state_steps):
        stream.next()
    it = train_batches(items, stream, seed=3, augmentation="scale", colour=True,
                       workers=workers, skip_bad_images=False)
    return [next(it) for _ in range(count)]


def test_the_loader_resumes_mid_epoch_exactly_with_or_without_workers(tree):
    items = open_tree(tree).train
    whole = _batches(items, 0, 7, workers=2)  # 7 batches of 4 span two epochs of 18
    resumed = _batches(items, 3, 4, workers=0)
    for a, b in zip(whole[3:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.lighting, b.lighting)
    order = BatchStream(len(items), 4, seed=3)
    assert torch.equal(whole[0].labels, torch.tensor([items[i][1] for i in order.next()]))


# ---------------------------------------------------------------------------------------------
# 3: the imagenet recipes, the plateau schedule, gradient accumulation


def test_imagenet_recipes_are_sec_3_4():
    r = RECIPES["imagenet"]
    assert (r.lr, r.momentum, r.weight_decay, r.batch_size) == (0.1, 0.9, 1e-4, 256)
    assert (r.iterations, r.lr_policy, r.augmentation) == (600_000, "plateau", "scale")
    step = RECIPES["imagenet-step"]
    assert step.milestones == (150_120, 300_240) and step.iterations == 450_360  # 30, 60 of 90
    assert step.with_epochs(90, 1000).milestones == (117, 235)  # epochs 30, 60 of 1000 images


def test_the_plateau_divides_after_patience_evaluations_without_a_new_best():
    p = Plateau(patience=2)
    assert [p.update(e) for e in (0.5, 0.4, 0.41, 0.40, 0.39, 0.39, 0.39)] == [
        False, False, False, True, False, False, True]
    assert p.divisions == 2
    q = Plateau(patience=2)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()
    r = replace(Recipe(), lr_policy="plateau")
    assert learning_rate(r, 10**6, divisions=2) == pytest.approx(0.001)


def test_accumulation_sums_micro_batch_gradients_with_bn_per_micro_batch():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 3
    mean = torch.zeros(3)

    def stepped(accumulate: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("resnet8", num_classes=3)
        recipe = replace(Recipe(), batch_size=8, pad=0, precision="fp32", accumulate=accumulate)
        window = Window.start(torch.device("cpu"), warmup=False, warmup_window=20)
        step = build_step(model, make_optimizer(model, recipe, torch.device("cpu")), x, y, mean,
                          None, recipe, window, compile_model=False, compile_mode=None,
                          cuda_graphs=None)
        step(index_batch(x, y, torch.arange(8), 0, pad=0, seed=0), 0)
        return {k: v.clone() for k, v in model.state_dict().items()}

    # By hand: two halves, each through the model in training mode, gradients averaged.
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=3)
    opt = make_optimizer(model, replace(Recipe(), batch_size=8), torch.device("cpu"))
    inputs = x.float() / 255
    for half in (slice(0, 4), slice(4, 8)):
        loss = torch.nn.functional.cross_entropy(model(inputs[half]), y[half])
        (loss / 2).backward()
    opt.step()
    two = stepped(2)
    assert all(torch.allclose(two[k].float(), v.float(), atol=1e-6)
               for k, v in model.state_dict().items())
    one = stepped(1)
    assert not torch.allclose(one["fc.weight"], two["fc.weight"])  # BN saw other batches


# ---------------------------------------------------------------------------------------------
# 4: the testing protocols


def test_protocols_average_softmax_scores_and_report_top1_and_top5(tree):
    items = open_tree(tree).test
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=3).eval()
    mean = torch.full((3, 224, 224), 0.5)
    centre = evaluate_tree(model, items, mean, None, protocol="centre")
    by_hand = 0
    for path, label in items:
        view = centre_view(decode_rgb(path))[None].float() / 255 - 0.5
        by_hand += int(model(view.contiguous(memory_format=torch.channels_last)).argmax() != label)
    assert centre["top1_error"] == pytest.approx(by_hand / len(items))
    for protocol in ("10-crop", "multi-scale"):
        r = evaluate_tree(model, items, mean, None, protocol=protocol)
        assert r["images"] == len(items) and r["protocol"] == protocol
        # 3 classes: the true one is always in the top 5, so no top-5 error (not 0.00%)
        assert r["top5_error"] is None
        assert 0 <= r["top1_error"] <= 1 and r["loss"] > 0
    seven = evaluate_tree(build_model("resnet8", num_classes=7).eval(), items, mean, None,
                          protocol="centre")
    assert 0 <= seven["top5_error"] <= seven["top1_error"]
    with pytest.raises(ValueError, match="unknown --protocol 'five'"):
        evaluate_tree(model, items, mean, None, protocol="five")


# ---------------------------------------------------------------------------------------------
# Training on a tree: the end to end path, resume, bad images


def test_training_on_a_tree_resumes_bitwise_and_reports_top5(tree, tmp_path, monkeypatch):
    data = open_data(str(tree))
    whole = train(SPEC, tmp_path / "whole", data=data, options=OPTIONS)
    assert "final_test_error" in whole
    records = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").open()]
    assert [r["step"] for r in records if "test_top5_error" in r] == [3, 6]
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Crashed):
        train(SPEC, tmp_path / "cut", data=data, options=OPTIONS)
    monkeypatch.undo()
    train(SPEC, tmp_path / "cut", data=data, options=replace(OPTIONS, workers=2))
    a = (tmp_path / "whole/model.safetensors").read_bytes()
    assert (tmp_path / "cut/model.safetensors").read_bytes() == a
    assert reslab.load_trained(tmp_path / "whole").classes == CLASSES


def test_a_streaming_run_killed_with_kill_9_mid_epoch_reruns_to_the_same_weights(tree, tmp_path):
    # A real SIGKILL from outside while two loader workers prefetch (3 steps an epoch: step 5 is
    # mid-epoch), then the same command; against the uninterrupted command's weights.
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "reslab", "train", "resnet8", "--data", str(tree),
                "--recipe", "imagenet", "--iterations", "12", "--batch-size", "6",
                "--workers", "2", "--checkpoint-every", "2", "--eval-every", "6",
                "--log-every", "1", "--deterministic", "--no-progress", "--out", str(out)]

    reference = subprocess.Popen(command(tmp_path / "whole"), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    cut = subprocess.Popen(command(tmp_path / "cut"), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        assert cut.poll() is None and time.time() < deadline, cut.communicate()
        time.sleep(0.01)
    cut.kill()
    cut.communicate(timeout=60)
    assert cut.returncode == -signal.SIGKILL
    assert 5 <= json.loads(metrics.read_text().splitlines()[-1])["step"] < 12
    rerun = subprocess.run(command(tmp_path / "cut"), env=env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout, rerun.stderr
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    assert (tmp_path / "cut/model.safetensors").read_bytes() == \
        (tmp_path / "whole/model.safetensors").read_bytes()


# One streaming epoch in a fresh process, two loader workers: the largest resident memory of the
# process and of a worker, in KiB, sampled at each batch (ru_maxrss would report the imports'
# peak, ~700 MB of libraries, which hides the epoch's).
EPOCH = r"""
import os, sys
from reslab.data import BatchStream, open_tree
from reslab.data.stream import train_batches

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

tree = open_tree(sys.argv[1])
batches = train_batches(tree.train, BatchStream(len(tree.train), 16, seed=0), seed=0,
                        augmentation="scale", colour=True, workers=2, skip_bad_images=False)
seen, process, worker = 0, 0, 0
while seen < len(tree.train):
    seen += len(next(batches).labels)
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        workers = f.read().split()
    assert len(workers) == 2, workers
    process, worker = max(process, rss("self")), max([worker] + [rss(w) for w in workers])
print(process, worker)
"""


def test_a_streaming_epochs_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # 40 and 400 images of 320x320 (300 KB each decoded): holding the decoded images, or the
    # batches, would add ~55 MB or more to the larger epoch's peak in a worker or the process.
    import subprocess
    import sys

    peaks = {}
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:320, 0:320]
    for n in (40, 400):
        root = tmp_path / f"n{n}"
        for split, count in (("train", n // 2), ("val", 1)):
            for c, name in enumerate(CLASSES[:2]):
                folder = root / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    shift = rng.integers(0, 64, 3)
                    image = np.stack([(x + y + s) % 256 for s in shift], -1).astype(np.uint8)
                    image[..., c] //= 2
                    Image.fromarray(image).save(folder / f"{i}.jpg", quality=85)
        out = subprocess.run([sys.executable, "-c", EPOCH, str(root)], capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ,
                                                          "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        peaks[n] = [int(v) for v in out.stdout.split()]
    (main_small, worker_small), (main_large, worker_large) = peaks[40], peaks[400]
    print("peak RSS KiB (process, a worker) at 40 and 400 images:", peaks)
    assert worker_small > 50_000 and main_small > 50_000  # measured, not zero
    assert main_large - main_small < 20_000 and worker_large - worker_small < 20_000, peaks


def test_a_bad_image_mid_run_names_the_file_and_saves_a_checkpoint(tree, tmp_path, capsys):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(tree, photos)
    bad = photos / "train" / "bee" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: found only when decoded
    args = ["train", "resnet8", "--data", str(photos), "--out", str(tmp_path / "run"),
            "--recipe", "imagenet", "--iterations", "9", "--batch-size", "6", "--workers", "0",
            "--eval-every", "9", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"cannot decode image {bad}" in err[0]
    assert "saved checkpoint-0000000" in err[0]
    assert main([*args, "--skip-bad-images"]) == 0  # resumes there, the image left out
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert records[-1]["skipped_images"] >= 1
    assert "resuming" in capsys.readouterr().out


def test_reslab_eval_protocols_and_data_check_from_the_command_line(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "resnet8", "--data", str(tree), "--out", str(run), "--recipe",
                 "imagenet", "--iterations", "3", "--batch-size", "6", "--workers", "0",
                 "--no-progress"]) == 0
    recipe = json.loads((run / "recipe.json").read_text())["recipe"]
    assert recipe["augmentation"] == "scale" and recipe["lr_policy"] == "plateau"
    capsys.readouterr()
    for protocol in ("centre", "10-crop", "multi-scale"):
        assert main(["eval", str(run), "--data", str(tree), "--protocol", protocol, "--json",
                     "--workers", "0"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["protocol"] == protocol and out["images"] == 6
        assert out["test_top5_error"] is None  # 3 classes: no top-5 error (issue 38)
        # One record for every data source (issue 37): the keys of an in-memory eval.
        assert set(out) == {"test_error", "test_top5_error", "test_loss", "protocol", "images",
                            "skipped", "model", "precision", "data"}
    assert main(["data", "check", str(tree), "--workers", "1"]) == 0
    broken = tmp_path / "broken"
    photo_tree(broken, train=2, val=1)
    (broken / "val" / "ant" / "0.jpg").write_text("not an image")
    assert main(["data", "check", str(broken), "--workers", "1"]) == 2
    assert f"cannot decode image {broken / 'val' / 'ant' / '0.jpg'}" in capsys.readouterr().out
    # Sec. 4.2's pad-crop-flip is for small images in memory, not for photographs.
    assert main(["train", "resnet8", "--data", str(tree), "--out", str(tmp_path / "x"),
                 "--iterations", "3", "--batch-size", "6"]) == 2
    assert "use --recipe imagenet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resizing_keeps_the_shorter_side_and_the_aspect():
    image = torch.zeros(3, 100, 250, dtype=torch.uint8)
    assert resize_shorter(image, 256).shape == (3, 256, 640)
    assert TF.get_size(resize_shorter(image.transpose(1, 2), 300)) == [750, 300]


# ---------------------------------------------------------------------------------------------
# 5: the ImageNet experiments as commands


def test_imagenet_experiments_have_the_papers_arms():
    from reslab.experiments import Experiment
    from reslab.reproduce import imagenet_arms as arms_for

    exp = Experiment(data="photos", out_dir=Path("out"), iterations=10)
    table3 = arms_for("table3", exp, None)
    assert [(a.label, a.spec.model, a.spec.shortcut) for a in table3] == [
        ("plain-34", "plain34", None), ("ResNet-34 A", "resnet34", "A"),
        ("ResNet-34 B", "resnet34", "B"), ("ResNet-34 C", "resnet34", "C"),
        ("ResNet-50", "resnet50", "B"), ("ResNet-101", "resnet101", "B"),
        ("ResNet-152", "resnet152", "B")]
    assert all(a.spec.recipe.lr_policy == "plateau" and a.spec.recipe.augmentation == "scale"
               for a in table3)
    assert [a.label for a in arms_for("table4", exp, [50])] == ["ResNet-50"]
    with pytest.raises(ValueError, match="--depths 20 selects no arm of fig4; its depths are "
                       "18, 34"):
        arms_for("fig4", exp, [20])


def test_reproduce_table2_on_a_tree_writes_the_report_beside_the_papers(tmp_path, capsys):
    photos = photo_tree(tmp_path / "photos", train=3, val=1)
    out = tmp_path / "table2"
    args = ["reproduce", "table2", "--data", str(photos), "--out", str(out), "--depths", "18",
            "--iterations", "2", "--batch-size", "6", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "| plain-18 | 11,004,227 | 2 |" in report and "| 27.94 |" in report  # the paper's
    assert "| ResNet-18 | 11,004,227 | 2 |" in report and "| 27.88 |" in report
    assert report.count("| n/a (≤ 5 classes) |") == 2  # not 0.00% beside the paper's top-5
    assert "degradation" not in report  # needs 34-layer nets
    assert "the cure" not in report
    cached = json.loads((out / "protocols.json").read_text())
    assert sorted(cached) == ["plain18-b6-2it-seed0 10-crop", "resnet18-A-b6-2it-seed0 10-crop"]
    summary = json.loads((out / "summary.json").read_text())
    assert all("10-crop_top5_error" in r for r in summary)
    (out / "report.md").unlink()
    assert main([*args, "--report-only"]) == 0  # from protocols.json: nothing evaluated again
    assert (out / "report.md").read_text().splitlines()[5:] == report.splitlines()[5:]
    assert (out / "fig4.png").exists()


# ---------------------------------------------------------------------------------------------
# 6: the speed benchmark's parts (the figures themselves are committed under results/)


def test_photo_like_files_and_the_side_by_side_benchmarks_run(tmp_path, capsys):
    from reslab.bench.photos import bench_loader, bench_train_photos, write_photo_tree

    stats = write_photo_tree(tmp_path / "photos", classes=2, per_class=4, val_per_class=1)
    assert stats["images"] == 10 and 250 < stats["mean_width"] < 700
    assert 30 < stats["mean_kb"] < 400  # JPEGs of a photograph's size, not of noise
    r = bench_loader(tmp_path / "photos", workers=0, batch_size=4, batches=1, rounds=1)
    assert r["reslab_images_per_second"] > 0 and r["torchvision_images_per_second"] > 0
    assert r["of_decode_only"] == r["reslab_images_per_second"] / r[
        "decode_only_images_per_second"] and len(r["rounds"]["decode_only"]) == 1
    t = bench_train_photos(tmp_path / "photos", "resnet8", workers=0, batch_size=4, steps=1)
    assert t["ratio"] > 0 and t["model"] == "resnet8"
    assert main(["data", "bench", str(tmp_path / "photos"), "--workers", "0", "--batch-size",
                 "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == 0


def test_bombs_tiny_and_elongated_images_are_bad_images_by_name(tmp_path, monkeypatch):
    from reslab.data.photo_augment import check_size

    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10,000 px is a bomb now
    with pytest.raises(DataError, match=f"cannot decode image {path}: .*decompression bomb"):
        decode_rgb(str(path))
    with pytest.raises(DataError, match="is 10x40, smaller than 16 px a side"):
        check_size(torch.zeros(3, 40, 10), "tiny.png")
    with pytest.raises(DataError, match="is 2100x100, more than 20:1"):
        check_size(torch.zeros(3, 100, 2100), "strip.png")
