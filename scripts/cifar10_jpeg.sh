#!/usr/bin/env bash
# The CIFAR-10 (JPEG copy) runs on the CPU, in the order of value; each command reuses finished
# runs and resumes an unfinished one from its checkpoint, so rerunning this script after an
# interruption picks up where it stopped. Run it in the background from the repository root:
#   nohup nice bash scripts/cifar10_jpeg.sh > cifar10-jpeg.log 2>&1 &
# DRY_RUN=1 prints the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
reslab=${RESLAB:-.venv/bin/reslab}
out=results/cifar10-jpeg
run() { echo "+ $*"; if [ -z "${DRY_RUN:-}" ]; then "$reslab" "$@"; fi; }

# Issue 36: Table 6 at the paper's schedule (64k iterations), ResNet-56 first (ResNet-20 reused).
run reproduce table6 --data cifar10-jpeg --out $out/table6-64k --runs $out/runs \
    --depths 20 56 --iterations 64000
# Seed luck against the slow start: ResNet-56 at 16k for seeds 1 and 2 beside the committed seed 0.
run reproduce table6 --data cifar10-jpeg --out $out/resnet56-seeds-16k --runs $out/runs \
    --depths 56 --iterations 16000 --seeds 3
# The rest of the 64k ladder: 32 and 44, then ResNet-110 with Sec. 4.2's warm-up.
run reproduce table6 --data cifar10-jpeg --out $out/table6-64k --runs $out/runs \
    --depths 20 32 44 56 --iterations 64000
run reproduce table6 --data cifar10-jpeg --out $out/table6-64k --runs $out/runs \
    --depths 20 32 44 56 110 --iterations 64000

# Issue 21 (finished; rerunning only rewrites the reports): Figure 6 at a quarter of the schedule,
# the Table 6 ladder at 16k, and Figure 7 from those runs.
run reproduce fig6 --data cifar10-jpeg --out $out/fig6-16k --runs $out/runs \
    --depths 20 56 --iterations 16000
run reproduce table6 --data cifar10-jpeg --out $out/table6-16k --runs $out/runs \
    --depths 20 32 44 56 110 --iterations 16000
run reproduce fig7 --data cifar10-jpeg --out $out/fig7-16k --runs $out/runs \
    --depths 20 56 110 --iterations 16000
