"""Test error and loss of a model on held-in-memory uint8 images (the single original view,
Sec. 4.2), in the same precision as training so `reslab eval` equals the logged figure."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize
from .runtime import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | None,
    *,
    precision: str,
    batch_size: int = 500,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[float, float]:
    """(error, mean cross-entropy loss) over the whole set, model in eval mode (BN statistics)."""
    logits = test_logits(model, images, mean, std, precision=precision, batch_size=batch_size,
                         memory_format=memory_format)
    return error_and_loss(logits, labels, batch_size=batch_size)


@torch.no_grad()
def test_logits(
    model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None, *,
    precision: str, batch_size: int = 500,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """float32 logits (N, classes) of every image, on the model's device, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            x = x.contiguous(memory_format=memory_format)
            with autocast(device, precision):
                out.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def error_and_loss(logits: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500
                   ) -> tuple[float, float]:
    """(error, mean cross-entropy loss) of logits, summed batch by batch as evaluation always
    has, so the logged figures stay bit for bit what they were."""
    wrong, loss_sum = 0, 0.0
    for start in range(0, len(logits), batch_size):
        z = logits[start : start + batch_size]
        y = labels[start : start + batch_size].to(z.device)
        loss_sum += F.cross_entropy(z, y, reduction="sum").item()
        wrong += (z.argmax(1) != y).sum().item()
    n = len(logits)
    return wrong / n, loss_sum / n


def top5_error(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The fraction whose label is not among the 5 highest logits; None for 5 classes or fewer,
    where every label is (as protocols.evaluate_tree reports it)."""
    if logits.shape[1] <= 5:
        return None
    top5 = logits.topk(5, dim=1).indices
    return 1 - (top5 == labels.to(logits.device)[:, None]).any(1).float().mean().item()


@torch.no_grad()
def layer_responses(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | None,
    *,
    batch_size: int = 500,
) -> list[float]:
    """Fig. 7: the std of each 3x3 layer's response after BN and before ReLU/addition, on
    `images`, in layer order. Per channel over images and positions, then averaged over
    channels (BN gives each channel its own scale). fp32, eval mode, forward hooks."""
    from .blocks import ResidualBlock

    bns: list[nn.Module] = []
    if model.conv1.kernel_size == (3, 3):  # the CIFAR stem is a 3x3 layer too
        bns.append(model.bn1)
    for m in model.modules():
        if isinstance(m, ResidualBlock):
            for i in range(1, m.num_layers + 1):
                if getattr(m, f"conv{i}").kernel_size == (3, 3):
                    bns.append(getattr(m, f"bn{i}"))
    sums: list[list[torch.Tensor]] = [[] for _ in bns]

    def hook(index: int):
        def fn(_m, _i, out):
            x = out.detach().double()
            sums[index].append(torch.stack([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                                            torch.full_like(x[0, :, 0, 0], x[:, 0].numel())]))
        return fn

    handles = [bn.register_forward_hook(hook(i)) for i, bn in enumerate(bns)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size].to(device), mean, std))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for acc in sums:
        total, squares, count = torch.stack(acc).sum(0)
        var = (squares / count - (total / count).square()).clamp_min(0)
        out.append(var.sqrt().mean().item())
    return out
