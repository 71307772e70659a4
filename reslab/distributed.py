"""Training past one process: `torchrun ... -m reslab train ...` (PyTorch's own distributed
engine), with single process as the one-rank case of the same code path.

The recipe's batch is the global batch: every rank draws the same global batch from the same
BatchStream and the same augmentation, and trains on its contiguous slice, so the global
batches, their order and their augmentation do not depend on the number of ranks. DDP averages
the ranks' gradients, which is the gradient of the global batch's mean loss. BN statistics are
per rank (the paper's 8 GPUs, 32 images each), or synchronised with --sync-bn: torch's
SyncBatchNorm on GPUs; on CPUs (gloo), where torch's refuses to run, SyncBatchNorm2d below.

Rank 0 alone writes the run folder; it loads the checkpoint and broadcasts it, so every rank
resumes from the same state without a shared file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started: rank, world size, local rank
    (its GPU on the node). World() is the single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """This rank's contiguous slice of a global batch of `batch` items."""
        if batch % self.size:
            raise ValueError(f"the batch size {batch} does not divide among {self.size} ranks; "
                             f"use a --batch-size that is a multiple of {self.size}")
        per = batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def world_from_env() -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; else one process."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e}); launch with "
                         "torchrun") from None


def rank_device(world: World, device: torch.device) -> torch.device:
    """A rank's device: its local GPU (cuda:LOCAL_RANK) for a CUDA run, else `device`."""
    if world.size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The default process group for a multi-rank run (NCCL on GPUs, gloo on CPUs), destroyed
    on exit; nothing for one process."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun's store, keyed by its restart count: on this torch the default env:// set-up of a
    # group restarted by --max-restarts reads the dead group's addresses and times out
    # ("Gloo connectFullMesh failed ... Connection refused"); a prefix per attempt does not.
    store, _, _ = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore(f"reslab/attempt_{attempt}", store),
                            rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_sum(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64); the values themselves for one process (or
    outside a process group: one rank simulated in a test)."""
    if world.size == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(world: World, obj: Any, device: torch.device) -> Any:
    """Rank 0's `obj` on every rank (pickled; tensors come back on the CPU)."""
    if world.size == 1 or not dist.is_initialized():
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of the ranks' gradients (the objective
    is the sum of the ranks' losses). torch.distributed.nn's is deprecated in this torch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the whole global batch, on any device:
    the per-rank sums of x, then of its squared deviations from the global mean, are all-reduced
    with autograd (_AllReduceSum), so the gradient flows through the global mean and
    variance as in one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        # Two passes, as a single process's BN computes them: the global mean, then the global
        # mean squared deviation from it (E[x^2] - E[x]^2 in fp32 would cancel digits).
        xf = x.float()
        c = self.num_features
        n = x.numel() / c * dist.get_world_size()  # every rank trains an equal share
        mean = all_reduce(xf.sum((0, 2, 3))) / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce(centred.square().sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` synchronised across ranks (--sync-bn), its parameters and
    statistics kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            sync_batch_norm(child, device)
    return model
