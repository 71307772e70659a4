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

import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data.workers import signal_on_parent_death


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


RENDEZVOUS_TIMEOUT = 300.0  # seconds a rank waits for the others (--rendezvous-timeout)
_REFUSED = "reslab/refused"  # torchrun's store: the user's error that ended an attempt


class RendezvousError(ValueError):
    """The ranks did not meet: a wrong address or port, or a rank that never started."""


def under_torchrun() -> bool:
    """Whether torchrun's agent started this process (it names the run in the environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@functools.cache  # read while the agent lives (process_group): a dead one's pid says nothing
def launcher_command() -> list[str] | None:
    """The command that started this worker's torchrun agent, its parent (read from /proc), as
    a user types it: what resumes the run, and what env.json records. None outside torchrun or
    where /proc cannot tell."""
    if not under_torchrun():
        return None
    try:
        argv = [a.decode(errors="replace") for a in
                Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return None
    for i, word in enumerate(argv[:3]):  # torchrun, a console script run by python, python -m
        if Path(word).name in ("torchrun", "reslab"):  # reslab: `reslab torchrun` (launch.py)
            return [Path(word).name, *argv[i + 1:]]
    return argv or None  # `python -m torch.distributed.run ...`, its interpreter's full path


def _group_store(world: World, store: dist.Store, deadline: float) -> dist.Store:
    """This group's own namespace in torchrun's store. The store outlives a group restarted by
    --max-restarts, so the dead group's addresses are still in it (gloo then fails with
    "connectFullMesh ... Connection refused"); torchrun's restart count cannot name the group,
    as two agents count their restarts apart. Rank 0 names the group afresh; every other rank
    reads the name and joins with a token of its own until rank 0 acknowledges that token, so
    neither a name nor an acknowledgement left by a dead group is ever taken for this one."""
    if world.main:
        name = uuid.uuid4().hex
        store.set("reslab/group", name)
        group = dist.PrefixStore(f"reslab/{name}", store)
        joins = [f"join/{r}" for r in range(1, world.size)]
        group.wait(joins, timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        for key in joins:
            group.set(f"ack/{group.get(key).decode()}", "1")
        return group
    token = uuid.uuid4().hex
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        store.wait(["reslab/group"], timedelta(seconds=left))
        group = dist.PrefixStore(f"reslab/{store.get('reslab/group').decode()}", store)
        group.set(f"join/{world.rank}", token)
        try:  # rank 0 may still be starting; a dead one never answers: read the name again
            group.wait([f"ack/{token}"], timedelta(seconds=min(2.0, max(left, 0.001))))
            return group
        except dist.DistStoreError:
            continue


@contextmanager
def _c10d_quiet() -> Iterator[None]:
    """Standard error muted: c10d logs every failed try to reach the store itself, each with a
    C++ stack trace; the RendezvousError says it once."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else "timed out"


@contextmanager
def process_group(world: World, device: torch.device,
                  timeout: float = RENDEZVOUS_TIMEOUT) -> Iterator[None]:
    """The default process group for a multi-rank run (NCCL on GPUs, gloo on CPUs), destroyed
    on exit; nothing for one process. The ranks meet within `timeout` seconds, else a
    RendezvousError. Under torchrun a worker gets SIGTERM when its agent dies (even by kill -9),
    so every rank stops after the same step with a checkpoint (runtime.stop_signals), rather
    than training on unsupervised."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    if under_torchrun():
        launcher_command()
        signal_on_parent_death(signal.SIGTERM)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    deadline = time.monotonic() + timeout
    try:
        with _c10d_quiet():
            root, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
            refused = root.get(_REFUSED).decode() if root.check([_REFUSED]) else None
            store = None if refused else _group_store(world, root, deadline)
    except (TimeoutError, dist.DistError) as e:
        raise RendezvousError(
            f"rank {world.rank} of {world.size} did not meet the other ranks at {where} within "
            f"{timeout:g} s ({first_line(e)}); check that "
            "every node was given the same address and port and that every rank started, or "
            "wait longer with --rendezvous-timeout") from None
    if refused:  # an earlier attempt of this job met a user's error
        raise ValueError(f"{refused} (met before torchrun restarted the ranks; an error in the "
                         "command or its files is not retried)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=world.rank, world_size=world.size)
    try:
        yield
    except ValueError as e:  # --max-restarts would rerun the same command into the same error
        # (or, once a folder in use is free, into another outcome than the one refused)
        root.set(_REFUSED, str(e))
        raise
    finally:
        dist.destroy_process_group()


def resume_notes(starts: list[dict[str, Any]], size: int, sync_bn: bool) -> list[str]:
    """What changes at a resume on `size` ranks (with --sync-bn or not) after the starts
    env.json records (the first, then each resume's, this one last)."""
    if len(starts) < 2:
        return []
    before, was_sync = starts[-2].get("world_size", 1), starts[-2].get("sync_bn", False)
    notes = []
    per_rank = (not was_sync and before > 1, not sync_bn and size > 1)
    if before != size and any(per_rank):
        notes.append(f"note: trained on {before} rank(s) until now, {size} from here: the same "
                     "global batches, but each rank's BN statistics come from another share of "
                     "them (--sync-bn would make them the whole batch's)")
    if was_sync != sync_bn and before > 1 and size > 1:
        how = ("over the global batch", "per rank")
        notes.append(f"note: BN statistics were computed {how[not was_sync]} until now, "
                     f"{how[not sync_bn]} from here (--sync-bn {'given' if sync_bn else 'left out'}"
                     "): the rest of the run trains another net than its start")
    return notes


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
