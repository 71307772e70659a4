"""Where bf16 autocast loses gradient accuracy: relative error of each stage's gradients against
fp32 on one augmented batch, for the default path and three variants kept in fp32 in part.
Run from the repository root: python scripts/fashion_mnist/bf16_gradients.py
(Until it moved here the script was results/fashion-mnist/make-run-paths/bf16_gradients.py.)
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data import load_dataset, normalize, pad_crop_flip
from reslab.trained import load_trained


class InFP32(nn.Module):
    """Run the wrapped module in fp32 even inside autocast."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.module(x.float())


def gradients(model: nn.Module, x, y, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    saved = copy.deepcopy(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    model.load_state_dict(saved)  # undo the BN running-statistics update
    return {n.replace(".module", ""): p.grad.clone() for n, p in model.named_parameters()}


def stage_errors(grads, reference) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for name, ref in reference.items():
        stage = "stem" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
        s = sums.setdefault(stage, [0.0, 0.0])
        s[0] += (grads[name] - ref).pow(2).sum().item()
        s[1] += ref.pow(2).sum().item()
    return {stage: round((a / b) ** 0.5, 4) for stage, (a, b) in sums.items()}


def wrap_bns(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, InFP32(child))
        else:
            wrap_bns(child)


def main(batch: int = 128) -> None:
    data = load_dataset("fashion-mnist")
    model, mean, *_ = load_trained("results/fashion-mnist/make-run")
    model.train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(data.train_images), (batch,), generator=g)
    x = pad_crop_flip(normalize(data.train_images[idx], mean), 4, g)
    x, y = x.contiguous(memory_format=torch.channels_last), data.train_labels[idx]
    reference = gradients(model, x, y, bf16=False)
    variants = {"bf16 autocast": copy.deepcopy(model)}
    variants["bf16, every BN in fp32"] = copy.deepcopy(model)
    wrap_bns(variants["bf16, every BN in fp32"])
    stem = variants["bf16, stem in fp32"] = copy.deepcopy(model)
    stem.conv1, stem.bn1 = InFP32(stem.conv1), InFP32(stem.bn1)
    first = variants["bf16, stem and layer1 in fp32"] = copy.deepcopy(model)
    first.conv1, first.bn1, first.layer1 = (InFP32(first.conv1), InFP32(first.bn1),
                                            InFP32(first.layer1))
    for label, m in variants.items():
        print(f"{label:<32}", stage_errors(gradients(m, x, y, bf16=True), reference))


if __name__ == "__main__":
    main()
