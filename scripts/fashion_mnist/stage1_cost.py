"""What running the first stage (stem and layer1) in fp32 costs: eager bf16 ResNet-20 steps
on 28x28 images, batch 128, the two variants alternated, median of 12 steps each.
Run from the repository root: python scripts/fashion_mnist/stage1_cost.py
(Until it moved here the script was results/fashion-mnist/make-run-paths/stage1_cost.py.)
"""

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from bf16_gradients import InFP32

from reslab.models import build_model


def main(batch: int = 128, steps: int = 12) -> None:
    torch.manual_seed(0)
    base = build_model("resnet20", in_channels=1).to(memory_format=torch.channels_last)
    alt = copy.deepcopy(base)
    alt.conv1, alt.bn1, alt.layer1 = InFP32(alt.conv1), InFP32(alt.bn1), InFP32(alt.layer1)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step(model) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        return time.perf_counter() - t0

    variants = {"bf16": base, "bf16 + stage 1 fp32": alt}
    for model in variants.values():
        step(model), step(model)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps):
        for label, model in variants.items():
            times[label].append(step(model))
    med = {k: statistics.median(v) for k, v in times.items()}
    print({k: f"{1000 * v:.1f} ms" for k, v in med.items()},
          f"ratio {med['bf16 + stage 1 fp32'] / med['bf16']:.2f}")


if __name__ == "__main__":
    main()
