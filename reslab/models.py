"""Every network of the paper: CIFAR ResNets (Sec. 4.2), ImageNet ResNets (Sec. 3.4, Table 1),
their plain twins, shortcut options A/B/C (Sec. 3.3) and the seed's research mappings.

State-dict keys follow torchvision's ResNet (`conv1`, `bn1`, `layerN.i.convK`, `layerN.i.bnK`,
`layerN.i.downsample.0/1`, `fc`), so torchvision weights load with `strict=True` into the v1.5,
option-B models. This module imports only torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import mlp_rnn
from .blocks import RecomputeContexts, ResidualBlock, block_out_channels, make_block

SHORTCUTS = ("A", "B", "C", "gated", "scaled", "fixed", "none")
LAYOUTS = ("v1", "v1.5")

# ImageNet family, Table 1: (block kind, blocks per stage conv2_x..conv5_x)
IMAGENET_STAGES: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_PLAIN = (18, 34)  # Table 2 trains plain-18 and plain-34
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)  # Table 6
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)  # Fig. 6
MLP_DEPTHS = (4, 8, 14, 20, 32, 56)  # mlp_rnn: the fully connected twins' study depths
LSTM_DEPTHS = (1, 2, 4, 8, 16)  # and the recurrent twins'


class ResNet(nn.Module):
    """Stem, stages of residual (or plain) blocks, global average pooling, fully connected."""

    def __init__(
        self,
        *,
        stem: str,
        stage_blocks: Sequence[int],
        stage_widths: Sequence[int],
        block_kind: str,
        layers_per_block: int,
        mapping: str,
        projection: str,
        layout: str,
        num_classes: int,
        in_channels: int,
        zero_init_residual: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        width0 = stage_widths[0]
        if stem == "cifar":  # Sec. 4.2: one 3x3 conv, 16 filters
            self.conv1 = nn.Conv2d(in_channels, width0, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:  # Table 1: 7x7/2 conv 64, then 3x3/2 max pool
            self.conv1 = nn.Conv2d(in_channels, width0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width0)
        self.relu = nn.ReLU(inplace=True)

        planes_in = width0
        self.num_stages = len(stage_blocks)
        for s, (n, width) in enumerate(zip(stage_blocks, stage_widths, strict=True), start=1):
            blocks = []
            for i in range(n):
                # Sec. 3.4/4.2: the first block of stages 2.. subsamples with stride 2.
                stride = 2 if (s > 1 and i == 0) else 1
                block = make_block(
                    planes_in, width, stride, block_kind, layers_per_block, mapping,
                    projection, layout,
                )
                blocks.append(block)
                planes_in = block_out_channels(block)
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes_in, num_classes)
        self.num_features = planes_in

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 init, as the paper (Sec. 3.4) and fb.resnet.torch / torchvision.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                m.reset_gate()
                if zero_init_residual and m.mapping != "none":
                    nn.init.zeros_(getattr(m, f"bn{m.num_layers}").weight)

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s}") for s in range(1, self.num_stages + 1)]

    def stage_names(self) -> list[str]:
        """The paper's names of the stages' outputs (Table 1): conv2_x, conv3_x, ... (a CIFAR
        net's three stages are conv2_x to conv4_x)."""
        return [f"conv{s + 1}_x" for s in range(1, self.num_stages + 1)]

    def stage_channels(self) -> dict[str, int]:
        """Channels of each stage's output, by stage name."""
        return {name: block_out_channels(stage[-1])
                for name, stage in zip(self.stage_names(), self.stages(), strict=True)}

    def forward_stages(self, x: torch.Tensor, stages: Sequence[str] | None = None
                       ) -> dict[str, torch.Tensor]:
        """The outputs of the named stages (default: all), in order: conv1 (the stem's conv,
        BN and ReLU), conv2_x (from the max pool on, as Table 1 counts it), ...: the feature
        maps a detector's backbone hands on (Sec. 4.3, the appendix's Faster R-CNN)."""
        names = ["conv1", *self.stage_names()]
        wanted = names if stages is None else list(stages)
        if unknown := [n for n in wanted if n not in names]:
            raise ValueError(f"unknown stage {unknown[0]!r} of {self.num_stages + 1}-stage "
                             f"network; valid: {', '.join(names)}")
        out: dict[str, torch.Tensor] = {}
        if not wanted:
            return out
        x = self.relu(self.bn1(self.conv1(x)))
        if "conv1" in wanted:
            out["conv1"] = x
        x = self.maxpool(x)
        last = max(names.index(n) for n in wanted)
        for name, stage in zip(names[1:last + 1], self.stages(), strict=False):
            x = self._run_stage(stage, x)
            if name in wanted:
                out[name] = x
        return out

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False, context_fn=RecomputeContexts(block))
            return x
        return stage(x)

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature maps, before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = self._run_stage(stage, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N, num_features): what the classifier sees."""
        return torch.flatten(self.avgpool(self.forward_maps(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    # Fine-tuning: parts by the paper's names.
    def part_names(self) -> list[str]:
        """What freeze() takes: stem (conv1 and its BN), the stages, fc."""
        return ["stem", *self.stage_names(), "fc"]

    def _part(self, name: str) -> list[nn.Module]:
        if name == "stem":
            return [self.conv1, self.bn1]
        if name == "fc":
            return [self.fc]
        return [self.stages()[self.stage_names().index(name)]]

    def freeze(self, parts: Sequence[str]) -> None:
        """Fix the named parts: no gradients, and their BN layers stay in eval mode (running
        statistics unchanged, the stored ones used) however train() is called."""
        if unknown := [p for p in parts if p not in self.part_names()]:
            raise ValueError(f"cannot freeze {unknown[0]!r}: the parts of this network are "
                             f"{', '.join(self.part_names())}")
        self.frozen = tuple(dict.fromkeys(parts))
        for name in self.frozen:
            for module in self._part(name):
                module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for name in getattr(self, "frozen", ()):
            for module in self._part(name):
                module.eval()
        return self


_NAME = re.compile(r"^(cifar_)?(resnet|plain)(\d+)$")


def list_models() -> list[str]:
    """The paper's named networks (any CIFAR depth 6n+2 also builds, e.g. `resnet8`)."""
    names = [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
    names += [f"resnet{d}" for d in IMAGENET_STAGES] + [f"plain{d}" for d in IMAGENET_PLAIN]
    names += [f"{k}mlp{d}" for d in MLP_DEPTHS for k in ("res", "plain")]
    names += [f"{k}lstm{d}" for d in LSTM_DEPTHS for k in ("res", "plain")]
    return names


def model_family(name: str) -> str:
    """"cifar" or "imagenet" for a valid model name; "mlp" or "lstm" for the twins of mlp_rnn."""
    if (twin := mlp_rnn.parse(name)) is not None:
        return twin[1]
    m = _NAME.match(name)
    if m is None:
        raise ValueError(_unknown(name))
    prefix, _, depth = m.groups()
    return "imagenet" if prefix is None and int(depth) in IMAGENET_STAGES else "cifar"


def default_shortcut(name: str) -> str:
    """"none" for plain nets, else option A on CIFAR and B on ImageNet (as the paper); the
    MLP/LSTM twins' shortcuts are "identity"."""
    if (twin := mlp_rnn.parse(name)) is not None:
        return "identity" if twin[0] else "none"
    m = _NAME.match(name)
    if m is None:
        raise ValueError(_unknown(name))
    if m.group(2) == "plain":
        return "none"
    return "A" if model_family(name) == "cifar" else "B"


# The largest input side an export or a weights file may name: 6x the paper's largest testing
# scale (640, Sec. 3.4); a larger one is a typo that would allocate gigabytes.
MAX_INPUT_SIDE = 4096


def check_input_size(name: str, size: object, what: str) -> tuple[int, int]:
    """(H, W) of `size` if `name` can take images of that size, else a ValueError naming
    `what` (the option or metadata field and its value): each side at least the net's
    down-sampling (Table 1: 32 on ImageNet nets, 224 -> 7x7; Sec. 4.2: 4 on CIFAR nets,
    32 -> 8x8), below which the last stage sees less than one pixel of the image, and at most
    MAX_INPUT_SIDE."""
    low = 32 if model_family(name) == "imagenet" else 4
    sides = list(size) if isinstance(size, list | tuple) else []
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool)
                                  and low <= s <= MAX_INPUT_SIDE for s in sides):
        raise ValueError(f"{what} is not an image size {name} can take: two sides (H W) of "
                         f"{low} to {MAX_INPUT_SIDE} pixels ({name} down-samples by {low})")
    return int(sides[0]), int(sides[1])


def part_names(name: str) -> list[str]:
    """The parts of a named network that --freeze takes (ResNet.part_names), without building
    it: stem, its stages (three on CIFAR, four on ImageNet), fc; stem, blocks, fc for the
    MLP/LSTM twins."""
    if mlp_rnn.parse(name) is not None:
        return ["stem", "blocks", "fc"]
    stages = 3 if model_family(name) == "cifar" else 4
    return ["stem", *(f"conv{s + 1}_x" for s in range(1, stages + 1)), "fc"]


def _unknown(name: str) -> str:
    return (
        f"unknown model {name!r}; valid names: {', '.join(list_models())}, or resnetN / plainN "
        "for any CIFAR depth N = 6n+2 (e.g. resnet8); prefix cifar_ for a CIFAR net whose depth "
        "collides with an ImageNet one (cifar_resnet50); resmlpN / plainmlpN (N even >= 4) and "
        "reslstmN / plainlstmN (N >= 1) for the fully connected and recurrent twins"
    )


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int = 3,
    shortcut: str | None = None,
    layout: str | None = None,
    layers_per_block: int | None = None,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
    input_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Build a network of the paper by name.

    CIFAR family (`resnet20` ... `resnet1202`, any `resnetN` with N = 6n+2, `plainN`): 32x32
    inputs, 10 classes, shortcut option A. ImageNet family (`resnet18/34/50/101/152`,
    `plain18/34`): 224x224 inputs, 1000 classes, option B. `shortcut` is one of
    "A" | "B" | "C" | "gated" | "scaled" | "fixed" | "none"; `layout` "v1" (paper) or "v1.5"
    (torchvision: stride on the bottleneck's 3x3); `layers_per_block` 1, 2 or 3 for basic blocks
    (CIFAR nets keep their depth by changing n), 3 for bottlenecks.

    The MLP and LSTM twins (`resmlpN`, `plainmlpN`, `reslstmN`, `plainlstmN`, mlp_rnn.py) are
    built for one `input_size` (H, W), default 28x28; the conv nets take any size and ignore it.
    """
    if mlp_rnn.parse(name) is not None:
        if layout is not None or layers_per_block not in (None, 2 if "mlp" in name else 1):
            raise ValueError(f"{name} takes no --layout or --layers-per-block (conv nets only)")
        if gradient_checkpointing:
            raise ValueError(f"--gradient-checkpointing is for the conv nets, not {name}")
        _check_counts(num_classes, in_channels)
        return mlp_rnn.build_twin(
            name, num_classes=10 if num_classes is None else num_classes,
            in_channels=in_channels, input_size=input_size, shortcut=shortcut,
            zero_init_residual=zero_init_residual)
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(_unknown(str(name)))
    prefix, kind, depth_str = m.groups()
    depth = int(depth_str)
    family = model_family(name)
    plain = kind == "plain"
    if plain and family == "imagenet" and depth not in IMAGENET_PLAIN:
        raise ValueError(
            f"unknown model {name!r}: ImageNet plain nets are plain18 and plain34 (Table 2)"
        )

    shortcut = default_shortcut(name) if shortcut is None else shortcut
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
    if plain and shortcut != "none":
        raise ValueError(f"{name} is a plain net (no shortcuts); use --shortcut none or omit it")
    layout = "v1" if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    num_classes = (10 if family == "cifar" else 1000) if num_classes is None else num_classes
    _check_counts(num_classes, in_channels)

    # Research mappings keep the family's projection where dimensions grow (A on CIFAR, B on
    # ImageNet); options A/B/C are themselves the projection choice.
    if shortcut in ("A", "B", "C"):
        mapping, projection = "add", shortcut
    else:
        mapping, projection = shortcut, ("A" if family == "cifar" else "B")

    if family == "cifar":
        n, k = _cifar_blocks(name, depth, layers_per_block)
        return ResNet(
            stem="cifar", stage_blocks=(n, n, n), stage_widths=(16, 32, 64), block_kind="basic",
            layers_per_block=k, mapping=mapping, projection=projection, layout=layout,
            num_classes=num_classes, in_channels=in_channels,
            zero_init_residual=zero_init_residual, gradient_checkpointing=gradient_checkpointing,
        )
    block_kind, stage_blocks = IMAGENET_STAGES[depth]
    k = _imagenet_layers(name, block_kind, layers_per_block)
    return ResNet(
        stem="imagenet", stage_blocks=stage_blocks, stage_widths=(64, 128, 256, 512),
        block_kind=block_kind, layers_per_block=k, mapping=mapping, projection=projection,
        layout=layout, num_classes=num_classes, in_channels=in_channels,
        zero_init_residual=zero_init_residual, gradient_checkpointing=gradient_checkpointing,
    )


def _cifar_blocks(name: str, depth: int, layers_per_block: int | None) -> tuple[int, int]:
    """(blocks per stage n, layers per block k) of a CIFAR net: depth = 3kn + 2 (Sec. 4.2)."""
    k = 2 if layers_per_block is None else layers_per_block
    if k not in (1, 2, 3):
        raise ValueError(
            f"--layers-per-block must be 1, 2 or 3 for CIFAR basic blocks, got {k!r}"
        )
    if (depth - 2) % (3 * k) != 0 or depth <= 2:
        if k == 2:
            raise ValueError(
                f"depth {depth} of {name!r} is not 6n+2; valid CIFAR depths: 8, 14, 20, 26, "
                f"32, ... (6n+2), e.g. {', '.join(map(str, CIFAR_DEPTHS))}"
            )
        raise ValueError(
            f"depth {depth} of {name!r} does not fit {k}-layer blocks: with "
            f"--layers-per-block {k} the depth must be {3 * k}n+2 (three stages of n blocks)"
        )
    return (depth - 2) // (3 * k), k


def _imagenet_layers(name: str, block_kind: str, layers_per_block: int | None) -> int:
    """The conv layers of an ImageNet net's blocks: exactly Table 1's."""
    needed = 3 if block_kind == "bottleneck" else 2
    k = needed if layers_per_block is None else layers_per_block
    if k != needed:
        raise ValueError(
            f"--layers-per-block {layers_per_block!r} does not fit {name}: its {block_kind} blocks "
            f"have exactly {needed} conv layers (Table 1); use a CIFAR net to vary it"
        )
    return k


def _check_counts(num_classes: int | None, in_channels: int) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")


def layers_per_block(model: nn.Module) -> int:
    """Layers in the net's residual function: 1-3 for a conv basic block, 3 for a bottleneck,
    2 for an MLP block, 1 for an LSTM layer."""
    return max((b.num_layers for b in model.modules() if hasattr(b, "num_layers")
                and isinstance(b.num_layers, int)), default=1)
