"""Peak memory of one ResNet-1202 training step (bf16 autocast, SGD), with and without gradient
checkpointing. Each case runs in its own process so its peak RSS is its own.

    .venv/bin/python results/memory/resnet1202.py > results/memory/resnet1202.json
"""

import json
import resource
import subprocess
import sys
import time

CASE = """
import resource, time, torch, torch.nn.functional as F
from reslab import build_model
torch.manual_seed(0)
model = build_model("resnet1202", gradient_checkpointing={ckpt})
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

rows = []
for ckpt, batch in ((True, 128), (False, 16), (False, 32)):
    out = subprocess.run([sys.executable, "-c", CASE.format(ckpt=ckpt, batch=batch)],
                         capture_output=True, text=True, check=True).stdout.split()
    before, peak, seconds = int(out[0]), int(out[1]), float(out[2])
    rows.append({"gradient_checkpointing": ckpt, "batch_size": batch,
                 "peak_rss_gib": peak / 2**20, "rss_before_step_gib": before / 2**20,
                 "step_seconds": seconds})
# Without checkpointing, activation memory grows linearly with the batch: extrapolate to 128.
a, b = rows[1], rows[2]
per_image = (b["peak_rss_gib"] - a["peak_rss_gib"]) / (b["batch_size"] - a["batch_size"])
est = b["peak_rss_gib"] + per_image * (128 - b["batch_size"])
print(json.dumps({"model": "resnet1202", "measured": rows,
                  "no_checkpointing_batch128_estimate_gib": est,
                  "date": time.strftime("%Y-%m-%d"),
                  "note": "peak RSS of the whole process (torch, model, optimizer, activations)"},
                 indent=2))
