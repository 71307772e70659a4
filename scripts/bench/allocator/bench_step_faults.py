"""Page faults per step of the benchmark's own ResNet-20 step (28x28x1, bf16, channels_last,
compiled, end to end), SGD fused as train() runs it or unfused as the benchmark did before
458128c, glibc's and torch's defaults. A first short timing compiles; the second is counted.
Run from the repo root, alternating:
    for i in 1 2; do for m in fused unfused; do
      .venv/bin/python scripts/bench/allocator/bench_step_faults.py $m; done; done
(Until it moved here the script was results/bench/allocator/bench_step_faults.py.)
"""

import json
import resource
import sys

import torch

from reslab.bench.reference import Setup, bench_images, time_training


def main(argv: list[str] | None = None) -> None:
    mode = (sys.argv[1:] if argv is None else argv)[0]  # fused or unfused
    torch.set_num_threads(2)
    images, labels = bench_images(2048, 1, 28)
    setup = Setup(precision="bf16", channels_last=True, compile=True, fused_sgd=mode == "fused")
    time_training("resnet20", images, labels, setup, 128, 5, warmup=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    r = time_training("resnet20", images, labels, setup, 128, 30, warmup=3)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(mode, json.dumps({"images_per_second": round(r["images_per_second"], 1),
                            "faults_per_step": faults // 33}))


if __name__ == "__main__":
    main()
