"""A reslab ResNet as a detector's backbone: its stage outputs (conv2_x ... conv5_x), optionally
through a feature pyramid, in the form torchvision's detection models take (an OrderedDict of
maps and an `out_channels` attribute). The paper's detection results (Sec. 4.3 and the appendix)
replace VGG-16 by ResNet-101 in Faster R-CNN; torchvision's FasterRCNN and FPN are used here as
they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .models import ResNet


class StageBackbone(nn.Module):
    """The named stage outputs of `model` (its classifier unused), keyed "0", "1", ... in order;
    out_channels: the channels of each (a list) or, with a pyramid, its common width."""

    def __init__(self, model: ResNet, stages: Sequence[str] = ("conv2_x", "conv3_x", "conv4_x",
                                                                "conv5_x"),
                 fpn_channels: int | None = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body, self.stages = model, tuple(stages)
        valid = ["conv1", *model.stage_names()]
        if unknown := [s for s in self.stages if s not in valid]:
            raise ValueError(f"unknown stage {unknown[0]!r}; valid: {', '.join(valid)}")
        channels = [model.stage_channels().get(s, model.conv1.out_channels) for s in self.stages]
        self.fpn = None
        if fpn_channels is None:
            self.out_channels: int | list[int] = channels
        else:
            self.fpn = FeaturePyramidNetwork(channels, fpn_channels, LastLevelMaxPool())
            self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_stages(x, self.stages)
        out = OrderedDict((str(i), maps[s]) for i, s in enumerate(self.stages))
        return out if self.fpn is None else self.fpn(out)
