"""Is bf16's test-error cost in the BN running statistics? Re-estimate every BN layer's
statistics in fp32 (cumulative average over augmented training batches, train mode, no weight
update) for a bf16-trained model, then evaluate in fp32 and bf16.
Run from the repository root: python scripts/fashion_mnist/bn_recalibration.py RUN
(Until it moved here the script was results/fashion-mnist/make-run-paths/bn_recalibration.py.)
"""

import sys

import torch
from torch import nn

from reslab.data import load_dataset, normalize, pad_crop_flip
from reslab.evaluate import evaluate
from reslab.trained import load_trained


@torch.no_grad()
def recalibrate(model: nn.Module, images, mean, std, batches: int, bf16: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    model.train()
    g = torch.Generator().manual_seed(2)
    for _ in range(batches):
        idx = torch.randint(0, len(images), (128,), generator=g)
        x = pad_crop_flip(normalize(images[idx], mean, std), 4, g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "results/fashion-mnist/make-run"
    data = load_dataset("fashion-mnist")
    model, mean, std, *_ = load_trained(run)
    for p in ("fp32", "bf16"):
        err, _ = evaluate(model, data.test_images, data.test_labels, mean, std, precision=p)
        print(f"as trained, eval {p}: {100 * err:.2f}%")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bf16 in (False, True):
        model.load_state_dict(state)
        recalibrate(model, data.train_images, mean, std, batches=200, bf16=bf16)
        for p in ("fp32", "bf16"):
            err, _ = evaluate(model, data.test_images, data.test_labels, mean, std, precision=p)
            print(f"BN stats re-estimated in {'bf16' if bf16 else 'fp32'}, eval {p}: "
                  f"{100 * err:.2f}%")


if __name__ == "__main__":
    main()
