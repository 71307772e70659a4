"""Beyond the paper's CNNs: deep fully connected and recurrent nets, plain and residual.

The paper's claim (Sec. 4.1, Fig. 4 and 6) is that deeper plain nets reach higher *training*
error and that identity shortcuts remove this degradation. These twins ask whether it carries to
other architectures, the way the paper builds its own twins: the residual net and its plain twin
have the same layers, parameters and initialisation and differ only by the shortcuts.

- `resmlpN` / `plainmlpN`: N weighted layers of one width, like the CIFAR nets' 6n+2: a fully
  connected stem (input -> width), (N - 2) / 2 blocks of two fully connected layers with BN and
  ReLU (the basic block of Fig. 2 with Linear for 3x3 conv: y = ReLU(F(x) + x)), and the
  classifier. N is even and >= 4.
- `reslstmN` / `plainlstmN`: N stacked LSTM layers reading an image row by row (a 28x28 image is
  28 steps of 28 values), the last step's output classified. Residual: each layer from the second
  on adds its input to its output, the form of deep recurrent translation models (GNMT, Wu et al.
  2016); the first cannot (its input is narrower). LSTM rather than GRU because that is the unit
  those models stack and the one the row-by-row benchmark is usually reported with.

This module imports only torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MLP_WIDTH = 128  # units per hidden layer
LSTM_HIDDEN = 64  # units per LSTM layer
_NAME = re.compile(r"^(res|plain)(mlp|lstm)(\d+)$")


def parse(name: str) -> tuple[bool, str, int] | None:
    """(residual, "mlp" | "lstm", depth) for a name of this module, else None."""
    m = _NAME.match(name) if isinstance(name, str) else None
    return None if m is None else (m.group(1) == "res", m.group(2), int(m.group(3)))


class MLPBlock(nn.Module):
    """Two fully connected layers with BN, merged with the identity shortcut (Eq. 1), then ReLU;
    the plain twin leaves the addition out."""

    num_layers = 2

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.linear1 = nn.Linear(width, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.linear2 = nn.Linear(width, width, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.linear2(F.relu(self.bn1(self.linear1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        return F.relu(out + x if self.residual else out)


class LSTMBlock(nn.Module):
    """One LSTM layer over the whole sequence; residual: its input added to its output."""

    num_layers = 1

    def __init__(self, in_features: int, hidden: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        return out + x if self.residual else out


class _Twin(nn.Module):
    """What every reslab net offers the rest of reslab: `stem`, `blocks` (the one stage), `fc`,
    forward_features, the parts --freeze takes, and the input size it is built for."""

    stem: nn.Module
    blocks: nn.Sequential
    fc: nn.Linear

    def __init__(self, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.input_size = tuple(input_size)  # fixed: the first layer's width depends on it
        self.frozen: tuple[str, ...] = ()

    def stages(self) -> list[nn.Sequential]:
        return [self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def part_names(self) -> list[str]:
        return ["stem", "blocks", "fc"]

    def freeze(self, parts: Sequence[str]) -> None:
        """Fix the named parts (no gradients; their BN layers stay in eval mode)."""
        if unknown := [p for p in parts if p not in self.part_names()]:
            raise ValueError(f"cannot freeze {unknown[0]!r}: the parts of this network are "
                             f"{', '.join(self.part_names())}")
        self.frozen = tuple(dict.fromkeys(parts))
        for name in self.frozen:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> _Twin:
        super().train(mode)
        for name in getattr(self, "frozen", ()):
            getattr(self, name).eval()
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{type(self).__name__} was built for {self.input_size[0]}x"
                             f"{self.input_size[1]} images, got {x.shape[2]}x{x.shape[3]}")


class MLP(_Twin):
    def __init__(self, depth: int, *, residual: bool, num_classes: int, in_channels: int,
                 input_size: tuple[int, int], width: int = MLP_WIDTH,
                 zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, input_size)
        in_features = in_channels * input_size[0] * input_size[1]
        self.stem = nn.Sequential(nn.Linear(in_features, width, bias=False),
                                  nn.BatchNorm1d(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*(MLPBlock(width, residual) for _ in range((depth - 2) // 2)))
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():  # He et al. 2015 (the paper's [13]), as the conv nets
            if isinstance(m, nn.Linear) and m is not self.fc:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if zero_init_residual:  # each residual block starts as the identity
            for b in self.blocks:
                nn.init.zeros_(b.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.blocks(self.stem(x.flatten(1)))


class LSTMStack(_Twin):
    def __init__(self, depth: int, *, residual: bool, num_classes: int, in_channels: int,
                 input_size: tuple[int, int], hidden: int = LSTM_HIDDEN,
                 zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, input_size)
        row = in_channels * input_size[1]  # one step: a row of pixels, all channels
        self.stem = LSTMBlock(row, hidden, residual=False)
        self.blocks = nn.Sequential(*(LSTMBlock(hidden, hidden, residual)
                                      for _ in range(depth - 1)))
        self.fc = nn.Linear(hidden, num_classes)
        if zero_init_residual:  # all-zero LSTM weights output exactly 0: each block the identity
            for b in self.blocks:
                for p in b.lstm.parameters():
                    nn.init.zeros_(p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # (batch, steps = rows, features)
        return self.blocks(self.stem(rows))[:, -1]


def build_twin(name: str, *, num_classes: int, in_channels: int,
               input_size: tuple[int, int] | None, shortcut: str | None,
               zero_init_residual: bool) -> MLP | LSTMStack:
    """The net `name` (resmlpN, plainmlpN, reslstmN, plainlstmN) for images of `input_size`
    (default 28x28, Fashion-MNIST's)."""
    residual, kind, depth = parse(name)
    if kind == "mlp" and (depth < 4 or depth % 2):
        raise ValueError(f"depth {depth} of {name!r}: MLP depths are even and >= 4 (a stem, "
                         "(N - 2) / 2 blocks of two layers, the classifier), e.g. 4, 20, 56")
    if kind == "lstm" and depth < 1:
        raise ValueError(f"depth {depth} of {name!r}: an LSTM stack has >= 1 layer")
    expected = "identity" if residual else "none"
    if shortcut not in (None, expected):
        raise ValueError(f"{name} has {'identity' if residual else 'no'} shortcuts; omit "
                         f"--shortcut (options A/B/C and the research mappings are for the "
                         "conv nets)")
    size = (28, 28) if input_size is None else tuple(int(s) for s in input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input size must be two positive integers, got {input_size!r}")
    cls = MLP if kind == "mlp" else LSTMStack
    return cls(depth, residual=residual, num_classes=num_classes, in_channels=in_channels,
               input_size=size, zero_init_residual=zero_init_residual)
