"""What train() and eval need of their data, for both regimes: images held in memory on the
device (Sec. 4.2's small images: the step indexes them and augments whole batches as tensor
ops), or an ImageTree streamed through worker processes (Sec. 3.4's photographs). Dataset and
ImageTree hand out their own (`data.feed(...)`, `data.evaluate(...)`), so no caller asks which
one it holds. Each feed gives the
training size and classes, the normalisation statistics, the next batch in the run's order
(advancing the run's BatchStream by exactly the batches trained), and the evaluation record:
under torchrun each rank evaluates its share of the test images and the counts are summed, so
every rank reports the same error.
"""


from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..distributed import World, all_sum
from ..evaluate import error_and_loss, evaluate, test_logits, top5_error
from ..recipes import Recipe
from ..runtime import MEMORY_FORMAT
from .augment import IndexBatch, index_batch
from .dataset import DataError, Dataset
from .order import BatchStream
from .protocols import evaluate_tree
from .stats import channel_stats, pixel_mean
from .stream import StreamedBatch, train_batches, tree_stats
from .tree import ImageTree
from .workers import default_workers


def _shard(n: int, world: World) -> slice:
    """A rank's contiguous share of n test items (the first n % size ranks take one more)."""
    per, extra = divmod(n, world.size)
    start = world.rank * per + min(world.rank, extra)
    return slice(start, start + per + (world.rank < extra))


class BadImage(DataError):
    """A bad image met mid-run without --skip-bad-images; the run's stream is at the batch
    that holds it, so a checkpoint saved now resumes at that batch."""


class MemoryFeed:
    """A Dataset resident on the device; batches are index tensors the step gathers."""

    def __init__(self, data: Dataset, recipe: Recipe, device: torch.device,
                 world: World = World()) -> None:  # noqa: B008 (frozen)
        if recipe.augmentation != "pad-crop-flip":
            raise DataError(f"--augmentation {recipe.augmentation} is for photographs streamed "
                            f"from an image folder; {data.name} is held in memory: use "
                            "pad-crop-flip (the cifar10 recipe)")
        self.data, self.recipe, self.world = data, recipe, world
        self.images, self.labels = data.train_images.to(device), data.train_labels.to(device)
        self.n_train, self.classes, self.skipped = len(data.train_images), data.classes, 0

    def stats(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sec. 4.2: the per-pixel mean of the training split (or per-channel mean/std)."""
        if self.recipe.normalization == "pixel":
            return pixel_mean(self.data.train_images), None
        return channel_stats(self.data.train_images)

    def next(self, stream: BatchStream, step: int) -> IndexBatch:
        """The batch of iteration `step` (0-based): the stream's next indices, this rank's
        share of them, and their crops and flips."""
        part = self.world.shard(stream.batch_size) if self.world.size > 1 else None
        return index_batch(self.images, self.labels, stream.next(), step, pad=self.recipe.pad,
                           seed=self.recipe.seed, part=part)

    def batch_labels(self, batch: IndexBatch) -> torch.Tensor:
        """The labels of a batch `next` gave (the images stay on the device until the step)."""
        return self.labels[batch.idx.to(self.labels.device)]

    def evaluate(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None
                 ) -> dict[str, float]:
        d, record = self.data, {}
        for split, images, labels in (("test", d.test_images, d.test_labels),
                                      ("val", d.val_images, d.val_labels)):
            if images is None:
                continue
            part = _shard(len(images), self.world)
            n = len(images[part])
            error, loss = evaluate(model, images[part], labels[part], mean, std,
                                   precision=self.recipe.precision,
                                   memory_format=MEMORY_FORMAT) if n else (0.0, 0.0)
            wrong, loss_sum = all_sum(self.world, [round(error * n), loss * n],
                                      mean.device)
            record[f"{split}_error"], record[f"{split}_loss"] = (wrong / len(images),
                                                                 loss_sum / len(images))
        return record


class TreeFeed:
    """An ImageTree decoded and augmented by `workers` processes (Sec. 3.4's views); evaluated
    with the centre-crop protocol, top-1 and top-5, during training. Nothing is resident."""

    images = labels = None

    def __init__(self, tree: ImageTree, recipe: Recipe, device: torch.device, workers: int,
                 skip_bad_images: bool, world: World = World()) -> None:  # noqa: B008
        if recipe.augmentation == "pad-crop-flip":
            raise DataError(f"{tree.name} holds photographs streamed from files: Sec. 4.2's "
                            "pad-crop-flip is for small images in memory; use --recipe imagenet "
                            "(Sec. 3.4's scale augmentation) or --augmentation torchvision")
        self.tree, self.recipe, self.device, self.world = tree, recipe, device, world
        self.workers, self.skip_bad_images = workers, skip_bad_images
        self.n_train, self.classes = len(tree.train), tree.classes
        self.skipped, self._loader = 0, None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tree_stats(self.tree.train, self.recipe.normalization, workers=self.workers)

    def next(self, stream: BatchStream, step: int) -> StreamedBatch:
        """The next batch of views the workers made (an image's view is drawn from (seed,
        epoch, index), so `step` is not needed)."""
        if self._loader is None:  # started at the run's (restored) position
            self._loader = train_batches(
                self.tree.train, stream, seed=self.recipe.seed,
                augmentation=self.recipe.augmentation,
                colour=self.recipe.augmentation == "scale", workers=self.workers,
                skip_bad_images=self.skip_bad_images, pin_memory=self.device.type == "cuda",
                part=self.world.shard(stream.batch_size))
        batch = next(self._loader)
        failing = bool(batch.bad) and not self.skip_bad_images
        if all_sum(self.world, [float(failing)], self.device)[0]:  # every rank stops together
            raise BadImage(f"{batch.bad[0]}, or pass --skip-bad-images" if failing else
                           "a bad image in another rank's share of the batch (named in that "
                           "rank's output)")
        stream.next()
        self.skipped += len(batch.bad)
        if not len(batch.labels):
            raise DataError(f"every image of a batch was bad ({batch.bad[0]}, ...); check the "
                            f"tree with `reslab data check {self.tree.name}`")
        return batch

    def batch_labels(self, batch: StreamedBatch) -> torch.Tensor:
        """The labels of a batch `next` gave (its good images')."""
        return batch.labels

    def evaluate(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor | None
                 ) -> dict[str, Any]:
        record = {}
        for split, items in (("test", self.tree.test), ("val", self.tree.val)):
            if items:
                r = evaluate_tree(model, items[_shard(len(items), self.world)], mean, std,
                                  protocol="centre", precision=self.recipe.precision,
                                  workers=self.workers, skip_bad_images=self.skip_bad_images)
                n, no_top5 = r["images"], r["top5_error"] is None  # no_top5: <= 5 classes
                top1, top5, loss, total = all_sum(self.world, [
                    round(r["top1_error"] * n), 0 if no_top5 else round(r["top5_error"] * n),
                    r["loss"] * n, n], mean.device)
                record[f"{split}_error"] = top1 / total
                record[f"{split}_top5_error"] = None if no_top5 else top5 / total
                record[f"{split}_loss"] = loss / total
        return record


SINGLE_VIEW = "single view"  # images held in memory are tested as they are (Sec. 4.2)


def memory_test_logits(data: Dataset, model: nn.Module, mean: torch.Tensor,
                       std: torch.Tensor | None, *, precision: str) -> torch.Tensor:
    return test_logits(model, data.test_images, mean, std, precision=precision,
                       memory_format=MEMORY_FORMAT)


def memory_record(data: Dataset, model: nn.Module, mean: torch.Tensor,
                  std: torch.Tensor | None, *, precision: str,
                  logits: torch.Tensor | None = None) -> dict[str, Any]:
    """The test record of the single view (from `logits` where given: an ensemble's)."""
    if logits is None:
        logits = memory_test_logits(data, model, mean, std, precision=precision)
    error, loss = error_and_loss(logits, data.test_labels)
    return {"test_error": error, "test_top5_error": top5_error(logits, data.test_labels),
            "test_loss": loss, "protocol": SINGLE_VIEW, "images": len(data.test_images),
            "skipped": []}


def tree_record(tree: ImageTree, model: nn.Module, mean: torch.Tensor,
                std: torch.Tensor | None, *, protocol: str | None, precision: str,
                workers: int | None, skip_bad_images: bool) -> dict[str, Any]:
    """The test record of a protocol's views (Sec. 3.4; default the centre crop)."""
    r = evaluate_tree(model, tree.test, mean, std, protocol=protocol or "centre",
                      precision=precision, skip_bad_images=skip_bad_images,
                      workers=default_workers() if workers is None else workers)
    return {"test_error": r["top1_error"], "test_top5_error": r["top5_error"],
            "test_loss": r["loss"], "protocol": r["protocol"], "images": r["images"],
            "skipped": r["skipped"]}
