"""The blocks of Sec. 3.2-3.3: F(x) of 1-3 conv-BN layers or a bottleneck (Fig. 5), merged with
its shortcut (Eq. 1 and 2): options A (zero-padding identity), B and C (projections), plain (no
shortcut) and the seed's research mappings (gated, scaled, fixed). This module imports only
torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GATE_BIAS = -3.0  # sigmoid(-3) = 0.047: a gated block starts ~95% on its shortcut (highway-style)
FIXED_SCALE = 0.5  # the "fixed" mapping: y = F(x) + 0.5 * x


class ZeroPadShortcut(nn.Module):
    """Option A (Sec. 3.3): identity with stride-2 subsampling and zero-padded extra channels.

    Parameter-free, so a ResNet with option A has exactly the parameters of its plain twin.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class ResidualBlock(nn.Module):
    """conv-BN(-ReLU) layers forming F(x), merged with the shortcut, then ReLU (Eq. 1 and 2).

    One class covers the basic block of 1-3 3x3 layers and the bottleneck (1x1, 3x3, 1x1).
    `mapping` says how F(x) and the shortcut s(x) merge: "add" (y = F + s), "none" (plain:
    y = F), "gated" (y = T F + (1 - T) s, T = sigmoid(1x1 conv of x)), "scaled" (y = F + λ s,
    λ learned from 1) or "fixed" (y = F + 0.5 s).
    """

    def __init__(
        self,
        in_planes: int,
        widths: Sequence[int],
        kernels: Sequence[int],
        strides: Sequence[int],
        mapping: str,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.num_layers = len(widths)
        self.mapping = mapping
        channels = in_planes
        for i, (width, k, s) in enumerate(zip(widths, kernels, strides, strict=True), start=1):
            conv = nn.Conv2d(channels, width, k, stride=s, padding=k // 2, bias=False)
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(width))
            channels = width
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if mapping == "gated":
            # Highway-style transform gate; zero weights and a negative bias open it to 0.047.
            self.gate = nn.Conv2d(in_planes, channels, 1, stride=max(strides), bias=True)
        if mapping == "scaled":
            self.shortcut_scale = nn.Parameter(torch.ones(()))

    def reset_gate(self) -> None:
        if self.mapping == "gated":
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, GATE_BIAS)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.num_layers + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.num_layers:
                out = self.relu(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.mapping == "none":
            return self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.mapping == "gated":
            t = torch.sigmoid(self.gate(x))
            out = t * out + (1 - t) * shortcut
        elif self.mapping == "scaled":
            out = out + self.shortcut_scale * shortcut
        elif self.mapping == "fixed":
            out = out + FIXED_SCALE * shortcut
        else:
            out = out + shortcut
        return self.relu(out)


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """During checkpoint recomputation, keep BN running statistics from updating a second time."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class RecomputeContexts:
    """context_fn for torch.utils.checkpoint: plain forward, BN-frozen recomputation."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self):
        return contextlib.nullcontext(), frozen_bn_stats(self.block)


def block_out_channels(block: ResidualBlock) -> int:
    return getattr(block, f"conv{block.num_layers}").out_channels


def make_block(
    in_planes: int,
    planes: int,
    stride: int,
    kind: str,
    layers: int,
    mapping: str,
    projection: str,
    layout: str,
) -> ResidualBlock:
    if kind == "bottleneck":  # Fig. 5 right: 1x1 reduce, 3x3, 1x1 restore (x4)
        widths, kernels = (planes, planes, 4 * planes), (1, 3, 1)
        # v1 (paper): stride on the first 1x1; v1.5 (torchvision): stride on the 3x3.
        strides = (stride, 1, 1) if layout == "v1" else (1, stride, 1)
    else:
        widths, kernels = (planes,) * layers, (3,) * layers
        strides = (stride,) + (1,) * (layers - 1)
    out = widths[-1]
    grows = stride != 1 or in_planes != out
    downsample: nn.Module | None = None
    if mapping != "none":
        if projection == "C" or (projection == "B" and grows):
            downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        elif projection == "A" and grows:
            downsample = ZeroPadShortcut(stride, out - in_planes)
    return ResidualBlock(in_planes, widths, kernels, strides, mapping, downsample)
