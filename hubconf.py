"""torch.hub entry points: every network of the paper, with reslab's released weights where it
has them (`reslab info --pretrained` lists them).

    model = torch.hub.load("path/to/reslab", "resnet56", source="local", pretrained=True)
    model = torch.hub.load("OWNER/reslab", "resnet56", pretrained=True)   # from GitHub

Each entry takes build_model's options (num_classes, in_channels, shortcut, layout,
layers_per_block) and `pretrained`: False (He init), True (the longest released run of that
net) or a released name (`"resnet20.cifar10jpeg_16k"`). A pretrained model carries
`model.pretrained_cfg`: its normalisation (x / 255 - mean), class names, input size and card.
torchvision's ImageNet weights come by torchvision's own name:
`reslab.load_pretrained("torchvision:ResNet50_Weights.IMAGENET1K_V1")`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from reslab.models import list_models as _list_models
from reslab.pretrained import hub_model

dependencies = ["torch", "torchvision", "safetensors"]


def _entry(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool | str = False, *, num_classes: int | None = None,
              in_channels: int = 3, shortcut: str | None = None, layout: str | None = None,
              layers_per_block: int | None = None,
              input_size: tuple[int, int] | None = None) -> nn.Module:
        options = {k: v for k, v in {
            "num_classes": num_classes, "in_channels": in_channels if in_channels != 3 else None,
            "shortcut": shortcut, "layout": layout, "layers_per_block": layers_per_block,
            "input_size": input_size,
        }.items() if v is not None}
        return hub_model(name, pretrained, **options)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{name} of the paper (reslab.build_model({name!r}, **options)); "
                     "pretrained=True for reslab's released weights where they exist.")
    return entry


# CIFAR-10 family (Sec. 4.2, Table 6)
resnet20 = _entry("resnet20")
resnet32 = _entry("resnet32")
resnet44 = _entry("resnet44")
resnet56 = _entry("resnet56")
resnet110 = _entry("resnet110")
resnet1202 = _entry("resnet1202")
plain20 = _entry("plain20")
plain32 = _entry("plain32")
plain44 = _entry("plain44")
plain56 = _entry("plain56")
plain110 = _entry("plain110")
# ImageNet family (Sec. 3-4.1, Table 1)
resnet18 = _entry("resnet18")
resnet34 = _entry("resnet34")
resnet50 = _entry("resnet50")
resnet101 = _entry("resnet101")
resnet152 = _entry("resnet152")
plain18 = _entry("plain18")
plain34 = _entry("plain34")
# Beyond the paper: the fully connected and LSTM twins (reslab/mlp_rnn.py), built for one
# input_size (default 28x28)
for _name in _list_models():
    if "mlp" in _name or "lstm" in _name:
        globals()[_name] = _entry(_name)
