"""Parameters, multiply-adds and per-stage output sizes of a network, as in Table 1.

Counting runs on the meta device, so even ResNet-1202 or ResNet-152 at 224x224 is counted in
well under a second without allocating real tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import ResNet, build_model, model_family


@dataclass(frozen=True)
class Complexity:
    name: str
    family: str
    input_size: int
    in_channels: int
    num_classes: int
    params: int
    multiply_adds: int
    stages: tuple[tuple[str, tuple[int, ...]], ...]  # (stage name, (C, H, W)); MLP (width,)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = {name: list(shape) for name, shape in self.stages}
        return d


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_multiply_adds(model: nn.Module, x: torch.Tensor) -> int:
    """One per multiply-add (the paper's "FLOPs"); FlopCounterMode counts two, so halve it."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def stage_shapes(model: nn.Module, x: torch.Tensor) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Output (C, H, W) of the stem and each stage; names as Table 1 (conv1, conv2_x, ...).
    The MLP/LSTM twins: their stem's and blocks' outputs (per image, per step for an LSTM)."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if isinstance(model, ResNet):
        taps = [("conv1", model.relu)] + [
            (f"conv{s + 2}_x", stage) for s, stage in enumerate(model.stages())
        ]
    else:
        taps = [("stem", model.stem), ("blocks", model.blocks)]
    handles = []
    for label, module in taps:
        def hook(_m, _i, out, label=label):
            if not any(n == label for n, _ in shapes):
                shapes.append((label, tuple(out.shape[1:])))
        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return tuple(shapes)


def lstm_multiply_adds(model: nn.Module, rows: int
                       ) -> tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]:
    """Multiply-adds and stage outputs of an LSTM stack (mlp_rnn.LSTMStack) reading `rows`
    steps, counted as FlopCounterMode counts them: each step of each layer, four gates of
    input and recurrent matrix products; then the classifier."""
    lstms = [m for m in model.modules() if isinstance(m, nn.LSTM)]
    macs = sum(rows * 4 * m.hidden_size * (m.input_size + m.hidden_size) for m in lstms)
    macs += model.fc.in_features * model.fc.out_features
    shape = (rows, lstms[0].hidden_size)
    return macs, (("stem", shape), ("blocks", shape))


def describe(
    name: str,
    *,
    input_size: int | None = None,
    in_channels: int = 3,
    num_classes: int | None = None,
    shortcut: str | None = None,
    layout: str | None = None,
    layers_per_block: int | None = None,
) -> Complexity:
    """Parameters, multiply-adds per image and stage output sizes of the named network."""
    family = model_family(name)
    if input_size is None:
        input_size = {"cifar": 32, "imagenet": 224}.get(family, 28)  # twins: Fashion-MNIST
    if input_size < 1:
        raise ValueError(f"input size must be a positive number of pixels, got {input_size}")
    with torch.device("meta"):
        model = build_model(
            name, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut,
            layout=layout, layers_per_block=layers_per_block,
            input_size=(input_size, input_size),
        )
        x = torch.empty(1, in_channels, input_size, input_size)
    model.eval()
    if family == "lstm":  # an LSTM on the meta device runs step by step in Python: seconds
        macs, stages = lstm_multiply_adds(model, input_size)
    else:
        with torch.no_grad():
            macs = count_multiply_adds(model, x)
            stages = stage_shapes(model, x)
    return Complexity(
        name=name, family=family, input_size=input_size, in_channels=in_channels,
        num_classes=model.fc.out_features, params=count_params(model), multiply_adds=macs,
        stages=stages,
    )
