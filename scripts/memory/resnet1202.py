"""Peak memory of one ResNet-1202 training step (bf16 autocast, SGD), with and without gradient
checkpointing. Each case runs in its own process so its peak RSS is its own.

    .venv/bin/python scripts/memory/resnet1202.py > results/memory/resnet1202.json

(Until it moved here the script was results/memory/resnet1202.py.)
"""

import json
import subprocess
import sys
import time

MODEL = "resnet1202"
# One training step in a fresh process; prints RSS before the step, peak RSS (KiB), seconds.
CASE = """
import resource, time, torch, torch.nn.functional as F
from reslab import build_model
torch.manual_seed(0)
model = build_model("{model}", gradient_checkpointing={ckpt})
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x, y = torch.randn({batch}, 3, 32, 32), torch.randint(0, 10, ({batch},))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = F.cross_entropy(model(x).float(), y)
loss.backward()
opt.step()
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time() - t0)
"""


def measure(ckpt: bool, batch: int, model: str = MODEL) -> dict:
    out = subprocess.run([sys.executable, "-c", CASE.format(model=model, ckpt=ckpt, batch=batch)],
                         capture_output=True, text=True, check=True).stdout.split()
    before, peak, seconds = int(out[0]), int(out[1]), float(out[2])
    return {"gradient_checkpointing": ckpt, "batch_size": batch,
            "peak_rss_gib": peak / 2**20, "rss_before_step_gib": before / 2**20,
            "step_seconds": seconds}


def batch128_estimate(a: dict, b: dict) -> float:
    """Without checkpointing, activation memory grows linearly with the batch: extrapolate to
    128 from two measured batches."""
    per_image = (b["peak_rss_gib"] - a["peak_rss_gib"]) / (b["batch_size"] - a["batch_size"])
    return b["peak_rss_gib"] + per_image * (128 - b["batch_size"])


def main() -> None:
    rows = [measure(ckpt, batch) for ckpt, batch in ((True, 128), (False, 16), (False, 32))]
    note = "peak RSS of the whole process (torch, model, optimizer, activations)"
    print(json.dumps({"model": MODEL, "measured": rows,
                      "no_checkpointing_batch128_estimate_gib": batch128_estimate(*rows[1:]),
                      "date": time.strftime("%Y-%m-%d"), "note": note}, indent=2))


if __name__ == "__main__":
    main()
