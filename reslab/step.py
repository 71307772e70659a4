"""One training step of Sec. 4.2 (augmented batch, loss, SGD update), built once by
`build_step` for train() and the benchmark alike, with one call signature whatever the path:
eager, compiled, skipping non-finite losses, or on a GPU the whole step captured once as a CUDA
graph and replayed.

On a GPU a small-image step is a few hundred small kernels whose launches cost more than their
work: on the H200, ResNet-56 ran at the same 122-132 iterations/s alone or beside a second run
(results/h200), so the host, not the GPU, set the pace. torch.compile's own CUDA graphs
("reduce-overhead") skip any graph that mutates its inputs, and BN's running statistics are
such mutations in training, so here the step is captured with torch.cuda.graph around the
default compiled model: one launch per step, BN updates included.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import IndexBatch, augmented_batch
from .data.stream import StreamedBatch
from .distributed import World, all_sum
from .recipes import Recipe
from .runtime import MEMORY_FORMAT, autocast

# Devices where the NaN check waits for the next log line: a host sync per step idles a GPU.
DEFERRED_NAN_CHECK = ("cuda",)


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device
                   ) -> torch.optim.Optimizer:
    """Sec. 3.4/4.2: SGD with momentum and weight decay (or Adam, recipe.optimizer, for the LSTM
    twins). fused=True: one kernel for the whole update; on a CPU the optimizer is ~0.5% of a
    step either way (results/bench: fused SGD alone 0.98x), on a GPU it saves launches."""
    params = [p for p in model.parameters() if p.requires_grad]  # --freeze: no decay either
    fused = device.type in ("cpu", "cuda")
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                fused=fused)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, fused=fused)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """recipe.grad_clip: the gradients' global L2 norm clipped to `max_norm` (no host sync)."""
    if max_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


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


@dataclass
class Window:
    """The training window between two log lines (loss and error sums, images seen) and the
    state later steps depend on: the warm-up (Sec. 4.2, ResNet-110) and the non-finite streak.
    The sums live on the device (a .item() per step would idle a GPU) and are updated in place:
    a captured CUDA graph adds to these very tensors."""

    sums: dict[str, torch.Tensor]
    seen: int = 0
    warmup: bool = False
    recent_errors: deque[float] = field(default_factory=deque)
    nonfinite_in_a_row: int = 0
    # The iteration the warm-up ended, until a metrics record has named it (saved with the
    # window, so a resume between the two still names it).
    warmup_over_at: int | None = None

    @classmethod
    def start(cls, device: torch.device, *, warmup: bool, warmup_window: int,
              state: dict[str, Any] | None = None,
              world: World = World()) -> Window:  # noqa: B008 (frozen)
        """A new window, or the one a checkpoint saved (`state` as state_dict() wrote it): its
        sums are every rank's, so rank 0 alone resumes with them and the others from zero."""
        sums = {"loss": 0.0, "wrong": 0.0, "seen": 0}
        recent: deque[float] = deque(maxlen=warmup_window)
        streak, over_at = 0, None
        if state is not None:
            warmup, streak = state["warmup"], state.get("nonfinite_in_a_row", 0)
            if world.main:
                sums = dict(state["window"])
            over_at = state.get("warmup_over_at")  # absent from checkpoints before it was kept
            recent.extend(state["recent_errors"])
        tensors = {k: torch.tensor(float(sums[k]), dtype=torch.float64, device=device)
                   for k in ("loss", "wrong")}
        tensors["nonfinite"] = torch.zeros((), dtype=torch.int64, device=device)
        return cls(tensors, int(sums["seen"]), warmup, recent, streak, over_at)

    def state_dict(self, world: World = World()) -> dict[str, Any]:  # noqa: B008 (frozen)
        """The checkpoint's entries for the window (their names are the checkpoint format), its
        sums over every rank (a collective: every rank calls it): a checkpoint between two log
        lines holds the whole open window, not rank 0's share of it."""
        loss, wrong, seen = all_sum(world, [self.sums["loss"].item(), self.sums["wrong"].item(),
                                            float(self.seen)], self.sums["loss"].device)
        return {
            "warmup": self.warmup, "recent_errors": list(self.recent_errors),
            "window": {"loss": loss, "wrong": wrong, "seen": int(seen)},
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "warmup_over_at": self.warmup_over_at,
        }

    def take(self, world: World = World()) -> tuple[float, float]:  # noqa: B008 (frozen)
        """(mean loss, error) over the window, summed over the ranks, then start a new one."""
        loss, wrong, seen = all_sum(world, [self.sums["loss"].item(), self.sums["wrong"].item(),
                                            float(self.seen)], self.sums["loss"].device)
        self.sums["loss"].zero_()
        self.sums["wrong"].zero_()
        self.seen = 0
        return loss / max(seen, 1), wrong / max(seen, 1)

    def nonfinite_since_check(self) -> int:
        return int(self.sums["nonfinite"])


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
        warmup: int = 3, grad_clip: float = 0.0,
    ) -> None:
        if warmup < 1:
            raise ValueError("GraphedStep needs >= 1 eager warm-up step before its capture")
        self.forward, self.optimizer = forward, optimizer
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.pad, self.precision, self.memory_format = pad, precision, memory_format
        self.batch, self.sums, self.warmup = batch_size, sums, warmup
        self.grad_clip = grad_clip
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
        clip_gradients(self.optimizer, self.grad_clip)
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


class Step:
    """One iteration: `step(batch, i)` trains on the batch its data's feed gave for the run's
    i-th iteration (0-based) at the learning rates the optimizer holds, adds to the window, and
    returns a line to print or None. The batch brings its own tensors (`batch.tensors`); the
    step never asks where it came from.

    The eager path checks the loss (at once, or on a GPU at the next log line: `deferred`),
    skips a non-finite step with `skip_nonfinite` (no update; BN statistics restored) and ends
    the warm-up; a GraphedStep, where given, takes over once the warm-up is over.
    """

    def __init__(
        self, *, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer, mean: torch.Tensor, std: torch.Tensor | None,
        recipe: Recipe, window: Window, skip_nonfinite: int, deferred: bool,
        compiler_graphs: bool,
        graphed: GraphedStep | None, world: World = World(),  # noqa: B008 (frozen)
    ) -> None:
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.mean, self.std = mean, std
        self.recipe, self.window, self.graphed = recipe, window, graphed
        self.skip_nonfinite, self.deferred = skip_nonfinite, deferred
        self.compiler_graphs = compiler_graphs
        self.device, self.world = mean.device, world

    def __call__(self, batch: IndexBatch | StreamedBatch, i: int) -> str | None:
        r, window, dev = self.recipe, self.window, self.device
        if self.graphed is not None and not window.warmup:
            self.graphed(batch.idx, batch.offsets, batch.flips)  # adds to the window's sums
            window.seen += r.batch_size
            return None
        x, y = batch.tensors(self.mean, self.std, MEMORY_FORMAT)
        # A skipped step leaves the model as it was, BN statistics included.
        buffers = [b.clone() for b in self.model.buffers()] if self.skip_nonfinite else []
        if self.compiler_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # Gradient accumulation: `accumulate` equal micro-batches (Sec. 3.4's batch on a small
        # device), each with its own BN statistics, their gradients summed with weights.
        self.optimizer.zero_grad(set_to_none=True)
        loss, wrong = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.int64)
        for xk, yk in zip(x.chunk(r.accumulate), y.chunk(r.accumulate), strict=True):
            # wrong is counted before backward: a CUDA graph's outputs are only safe to read
            # until it runs again.
            _, loss_k, wrong_k = forward_loss(self.forward, xk, yk, dev, r.precision)
            weight = len(yk) / len(y)
            (loss_k * weight if r.accumulate > 1 else loss_k).backward()
            loss, wrong = loss + loss_k.detach() * weight, wrong + wrong_k
        finite = True
        if not (self.deferred and not window.warmup):
            finite = bool(torch.isfinite(loss))
            if self.world.size > 1:  # every rank skips or stops at the same iteration
                finite = all_sum(self.world, [float(not finite)], dev)[0] == 0
        window.nonfinite_in_a_row = 0 if finite else window.nonfinite_in_a_row + 1
        if window.nonfinite_in_a_row > self.skip_nonfinite:
            streak = f" ({window.nonfinite_in_a_row} in a row)" if self.skip_nonfinite else ""
            raise NonFiniteLoss(f"loss is {loss.item()} at iteration {i + 1}{streak}")
        if not finite:  # --skip-nonfinite: no update; the iteration still counts
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            return (f"skipped iteration {i + 1}: loss is {loss.item()} "
                    f"({window.nonfinite_in_a_row} in a row, --skip-nonfinite "
                    f"{self.skip_nonfinite})")
        clip_gradients(self.optimizer, r.grad_clip)
        self.optimizer.step()
        # Training error on the augmented batch: the paper's dashed curves (Fig. 6).
        add_to_window(window.sums, loss, wrong, len(y))
        window.seen += len(y)
        if window.warmup:  # the global batch's error, so every rank ends the warm-up together
            wrong_all, n_all = all_sum(self.world, [float(wrong), float(len(y))], dev)
            window.recent_errors.append(wrong_all / n_all)
            full = len(window.recent_errors) == window.recent_errors.maxlen
            if full and sum(window.recent_errors) / len(window.recent_errors) < \
                    r.warmup_until_error:
                window.warmup = False  # the paper's ResNet-110: back to 0.1 (Sec. 4.2)
                window.warmup_over_at = i + 1
                return (f"warm-up over at iteration {i + 1}: training error below "
                        f"{r.warmup_until_error:.0%}, lr back to {r.lr}")
        return None


def build_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor | None,
    labels: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor | None, recipe: Recipe,
    window: Window, *, compile_model: bool, compile_mode: str | None, cuda_graphs: bool | None,
    skip_nonfinite: int = 0, gradient_checkpointing: bool = False,
    world: World = World(), forward_module: nn.Module | None = None,  # noqa: B008 (frozen)
) -> Step:
    """The step train() runs (and the benchmark times): `model` (on its device, channels_last)
    compiled or not, the in-memory data resident on the same device (None for streamed
    batches), and on a GPU, unless `cuda_graphs` is False, the whole step as one CUDA graph
    (in-memory data, no accumulation)."""
    dev = mean.device
    # On a GPU the NaN check waits for the next log line or checkpoint instead of syncing every
    # step; a NaN step then updates the weights, but no checkpoint is written after it. Skipping
    # (--skip-nonfinite) and the warm-up's per-step error need the per-step check.
    deferred = dev.type in DEFERRED_NAN_CHECK and skip_nonfinite == 0
    compiler_graphs = compile_model and compile_mode in ("reduce-overhead", "max-autotune")
    # forward_module: the model as trained, e.g. wrapped in DistributedDataParallel.
    trained = model if forward_module is None else forward_module
    forward = torch.compile(trained, mode=compile_mode) if compile_model else trained
    # A graphed step cannot skip itself (--skip-nonfinite), nest torch.compile's own graphs,
    # or read the RNG state as activation checkpointing does (not allowed while capturing).
    # Its inputs are indices into images resident on the device (an IndexBatch's).
    can_graph = (dev.type == "cuda" and deferred and not compiler_graphs
                 and not gradient_checkpointing and images is not None and recipe.accumulate == 1
                 and world.size == 1)
    if cuda_graphs and not can_graph:
        raise ValueError("--cuda-graphs on does not go with --skip-nonfinite, "
                         "--gradient-checkpointing, --accumulate, streamed images or a compile "
                         "mode that makes its own CUDA graphs")
    graphed = None
    if can_graph and cuda_graphs is not False:
        graphed = GraphedStep(
            forward=forward, optimizer=optimizer, images=images, labels=labels, mean=mean,
            std=std, pad=recipe.pad, precision=recipe.precision, memory_format=MEMORY_FORMAT,
            batch_size=recipe.batch_size, sums=window.sums, grad_clip=recipe.grad_clip,
        )
    return Step(model=model, forward=forward, optimizer=optimizer, mean=mean, std=std,
                recipe=recipe, window=window, skip_nonfinite=skip_nonfinite, deferred=deferred,
                compiler_graphs=compiler_graphs, graphed=graphed, world=world)
