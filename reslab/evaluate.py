"""Test error and loss of a model on held-in-memory uint8 images (the single original view,
Sec. 4.2), in the same precision as training so `reslab eval` equals the logged figure."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    loss_sum = 0.0
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            x = x.contiguous(memory_format=memory_format)
            y = labels[start : start + batch_size].to(device)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            wrong += (logits.argmax(1) != y).sum().item()
    finally:
        model.train(was_training)
    n = len(images)
    return wrong / n, loss_sum / n
