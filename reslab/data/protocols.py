"""The paper's testing protocols on an ImageTree (Sec. 3.4, Tables 3-5): top-1 and top-5 error
from softmax scores averaged over each image's views, streamed through worker processes.

- "centre": the centre 224x224 crop, shorter side 256 (torchvision's reference protocol);
- "10-crop": "for comparison studies we adopt the standard 10-crop testing" (four corners and
  the centre, and their flips);
- "multi-scale": "the fully-convolutional form ... average the scores at multiple scales
  (images are resized such that the shorter side is in {224, 256, 384, 480, 640})". With global
  average pooling the whole image through the network is the fully convolutional form (the fc
  layer is linear, so averaging the score map equals classifying the pooled features); each
  scale and its flip, as VGG's dense evaluation that the paper follows.

A per-pixel mean (3, 224, 224) fits the 224 views; for whole images of other sizes its
per-channel average is subtracted instead (stats.mean_at), here and in predict and export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast
from .dataset import DataError
from .stats import mean_at, normalize
from .stream import test_batches

PROTOCOLS = ("centre", "10-crop", "multi-scale")


def prepare_views(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None,
                  device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """uint8 views (N, C, H, W) as the network takes them, on `device`."""
    mean = mean_at(mean, tuple(views.shape[-2:]))
    return normalize(views.to(device), mean, std).contiguous(memory_format=memory_format)


@torch.no_grad()
def evaluate_tree(
    model: nn.Module, items: tuple[tuple[str, int], ...], mean: torch.Tensor,
    std: torch.Tensor | None, *, protocol: str = "centre", precision: str = "fp32",
    workers: int = 0, batch_size: int = 50, skip_bad_images: bool = False,
    memory_format: torch.memory_format = torch.channels_last,
) -> dict[str, Any]:
    """Top-1 and top-5 error and the loss of the averaged scores over `items` ((path, label)
    pairs), model in eval mode; a bad image is a DataError naming it, or with
    `skip_bad_images` left out and listed under "skipped"."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    top1 = top5 = n = outputs = 0
    loss_sum = 0.0
    skipped: list[str] = []

    def scores(views: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            logits = model(prepare_views(views, mean, std, device, memory_format))
        return logits.float().softmax(1)

    try:
        for batch in test_batches(items, protocol, batch_size=1 if protocol == "multi-scale"
                                  else batch_size, workers=workers):
            good = []
            for entry in batch:
                if isinstance(entry, str):
                    if not skip_bad_images:  # eval and train have the flag (predict not)
                        raise DataError(f"{entry}, or pass --skip-bad-images")
                    skipped.append(entry)
                else:
                    good.append(entry)
            if not good:
                continue
            labels = torch.tensor([label for _, label in good], device=device)
            if protocol == "multi-scale":
                probs = torch.stack([
                    torch.cat([scores(s[None]), scores(s[None].flip(-1))]).mean(0)
                    for s in good[0][0]
                ]).mean(0, keepdim=True)
            else:
                views = torch.stack([v for v, _ in good])  # (B, V, 3, 224, 224)
                b, v = views.shape[:2]
                probs = scores(views.flatten(0, 1)).view(b, v, -1).mean(1)
            outputs = probs.shape[1]
            k = min(5, outputs)
            best = probs.topk(k, dim=1).indices
            top1 += (best[:, 0] == labels).sum().item()
            top5 += (best == labels[:, None]).any(1).sum().item()
            loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").item()
            n += len(labels)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("no test image could be evaluated (all were bad)")
    # With 5 classes or fewer every label is in the top 5: no error to report (None), not 0.
    top5_error = 1 - top5 / n if outputs > 5 else None
    return {"protocol": protocol, "top1_error": 1 - top1 / n, "top5_error": top5_error,
            "loss": loss_sum / n, "images": n, "skipped": skipped}
