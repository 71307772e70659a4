#!/usr/bin/env bash
# Issue 25's speed figure: the same `reslab train` as 1 process x 2 threads and as 2 processes x
# 1 thread under torchrun (gloo), ResNet-20 on Fashion-MNIST, 400 iterations of the global batch
# of 128, each run's images/s from its summary.json. Run from the repository root on a quiet
# machine:   bash scripts/bench/torchrun.sh
# DRY_RUN=1 prints each reslab command's arguments ("+ ARGS") and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench-torchrun
work=${WORK:-/tmp/reslab-torchrun}
PY=${PY:-.venv/bin/python}
dry=${DRY_RUN:-}
args=(train resnet20 --data fashion-mnist --iterations 400 --eval-every 400 --compile off
      --no-progress)
launch() {  # launch NPROC THREADS RUN: one process, or torchrun with NPROC processes
    local nproc=$1 threads=$2 run=$3
    echo "+ ${args[*]} --out $work/$run"
    [ -n "$dry" ] && return
    if [ "$nproc" = 1 ]; then OMP_NUM_THREADS=$threads $PY -m reslab "${args[@]}" --out "$work/$run"
    else OMP_NUM_THREADS=$threads $PY -m torch.distributed.run --nproc-per-node "$nproc" \
        --master-addr 127.0.0.1 --master-port 29400 -m reslab "${args[@]}" --out "$work/$run"; fi
}
[ -n "$dry" ] || { rm -rf "$work"; mkdir -p "$out"; }
launch 1 2 one-process-2-threads
launch 2 1 two-processes-1-thread
launch 1 1 one-process-1-thread
[ -n "$dry" ] && exit 0
{
  echo "commit: $(git rev-parse HEAD)"
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
} > $out/env.txt
for run in one-process-2-threads two-processes-1-thread one-process-1-thread; do
  $PY -c "import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps({'run': \
sys.argv[2], 'images_per_second': s['images_per_second'], 'wall_time_s': s['wall_time_s'], \
'final_test_error': s['final_test_error']}))" "$work/$run/summary.json" "$run"
done > $out/runs.jsonl
