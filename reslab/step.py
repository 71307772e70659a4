"""One training step of Sec. 4.2 (augmented batch, loss, SGD update) and, on a GPU, the whole
step captured once as a CUDA graph and replayed.

On a GPU a small-image step is a few hundred small kernels whose launches cost more than their
work: on the H200, ResNet-56 ran at the same 122-132 iterations/s alone or beside a second run
(results/h200), so the host, not the GPU, set the pace. torch.compile's own CUDA graphs
("reduce-overhead") skip any graph that mutates its inputs, and BN's running statistics are
such mutations in training, so here the step is captured with torch.cuda.graph around the
default compiled model: one launch per step, BN updates included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import crop_flip_apply, normalize
from .evaluate import autocast


def augmented_batch(
    images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, *, mean: torch.Tensor,
    std: torch.Tensor | None, pad: int, offsets: torch.Tensor | None,
    flips: torch.Tensor | None, memory_format: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one batch: uint8 images at `idx`, normalised, padded, cropped and flipped
    (Sec. 4.2) with the drawn `offsets` and `flips`; all tensors on the training device."""
    x = normalize(images[idx], mean, std)
    if pad > 0:
        x = crop_flip_apply(x, pad, offsets, flips)
    return x.contiguous(memory_format=memory_format), labels[idx]


def forward_loss(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    device: torch.device, precision: str, *, autocast_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, cross-entropy loss, number of wrong predictions) of one batch."""
    with autocast(device, precision, cache=autocast_cache):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y)
    return logits, loss, (logits.argmax(1) != y).sum()


def add_to_window(sums: dict[str, torch.Tensor], loss: torch.Tensor, wrong: torch.Tensor,
                  batch: int) -> None:
    """Accumulate the logged training loss and error on the device, in place (no host sync)."""
    sums["loss"].add_(loss.detach().double() * batch)
    sums["wrong"].add_(wrong)
    sums["nonfinite"].add_(~torch.isfinite(loss.detach()))


class GraphedStep:
    """The whole training step as one CUDA graph, replayed every iteration.

    The batch's indices, crop offsets and flips are the step's only inputs: they are copied
    into one static device buffer before each replay. The first `warmup` calls run eagerly on
    a side stream (compilation, cuDNN's algorithm search and the momentum buffers happen
    there; they are real training steps, and SGD's momentum buffers must exist before a
    capture, or every replay would be a "first step"). The optimizer's learning rates are baked
    into the captured update, so a new rate (a milestone, the end of ResNet-110's warm-up) is
    a new capture.
    """

    def __init__(
        self, *, forward: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
        mean: torch.Tensor, std: torch.Tensor | None, pad: int, precision: str,
        memory_format: torch.memory_format, batch_size: int, sums: dict[str, torch.Tensor],
        warmup: int = 3,
    ) -> None:
        if warmup < 1:
            raise ValueError("GraphedStep needs >= 1 eager warm-up step before its capture")
        self.forward, self.optimizer = forward, optimizer
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.pad, self.precision, self.memory_format = pad, precision, memory_format
        self.batch, self.sums, self.warmup = batch_size, sums, warmup
        self.device = images.device
        # idx (B) | crop offsets (2B) | flips (B), one int64 buffer: one copy per step.
        self.inputs = torch.zeros(4 * batch_size if pad > 0 else batch_size, dtype=torch.int64,
                                  device=self.device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lrs: tuple[float, ...] | None = None

    def _body(self) -> None:
        b = self.batch
        idx = self.inputs[:b]
        offsets = self.inputs[b : 3 * b].view(b, 2) if self.pad > 0 else None
        flips = self.inputs[3 * b :].bool() if self.pad > 0 else None
        x, y = augmented_batch(self.images, self.labels, idx, mean=self.mean, std=self.std,
                               pad=self.pad, offsets=offsets, flips=flips,
                               memory_format=self.memory_format)
        # Autocast's weight cache must be off inside a captured graph (CUDA graphs notes).
        _, loss, wrong = forward_loss(self.forward, x, y, self.device, self.precision,
                                      autocast_cache=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        add_to_window(self.sums, loss, wrong, b)

    def __call__(self, idx: torch.Tensor, offsets: torch.Tensor | None,
                 flips: torch.Tensor | None) -> None:
        """One iteration on the batch `idx` with crops `offsets` and `flips` (CPU tensors), at
        the learning rates the optimizer's groups hold now."""
        parts = [idx] if self.pad == 0 else [idx, offsets.flatten(), flips.long()]
        self.inputs.copy_(torch.cat(parts).pin_memory(), non_blocking=True)
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        lrs = tuple(group["lr"] for group in self.optimizer.param_groups)
        if self.graph is None or lrs != self.graph_lrs:
            self.graph = None  # release the old graph's memory before the new capture
            graph = torch.cuda.CUDAGraph()
            # A recompile cannot run inside a capture: fail with torch.compile's own message.
            with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph):
                self._body()
            self.graph, self.graph_lrs = graph, lrs
        self.graph.replay()
