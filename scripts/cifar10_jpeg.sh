#!/usr/bin/env bash
# Issue 21's CIFAR-10 (JPEG copy) runs on the CPU, in the order of value; each command reuses
# finished runs and resumes an unfinished one from its checkpoint, so rerunning this script after
# an interruption picks up where it stopped. Run it in the background from the repository root:
#   nohup bash scripts/cifar10_jpeg.sh > cifar10-jpeg.log 2>&1 &
# DRY_RUN=1 prints the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
reslab=${RESLAB:-.venv/bin/reslab}
out=results/cifar10-jpeg
run() { echo "+ $*"; if [ -z "${DRY_RUN:-}" ]; then "$reslab" "$@"; fi; }

# 1. ResNet-20 with the paper's full schedule: the figure comparable with Table 6's 8.75%.
run reproduce table6 --data cifar10-jpeg --out $out/table6-64k --runs $out/runs \
    --depths 20 --iterations 64000
# 2. Figure 6 at a quarter of the schedule: plain-20/56 and ResNet-20/56.
run reproduce fig6 --data cifar10-jpeg --out $out/fig6-16k --runs $out/runs \
    --depths 20 56 --iterations 16000
# 3. The Table 6 ladder at 16k (20 and 56 reused from Figure 6), ResNet-110 last (warm-up).
run reproduce table6 --data cifar10-jpeg --out $out/table6-16k --runs $out/runs \
    --depths 20 32 44 56 110 --iterations 16000
# 4. Figure 7 from those runs (no training): plain-20/56 and ResNet-20/56/110, as the paper's.
run reproduce fig7 --data cifar10-jpeg --out $out/fig7-16k --runs $out/runs \
    --depths 20 56 110 --iterations 16000
