#!/usr/bin/env bash
# reslab's malloc setting (reslab/allocator.py) in real training runs: ResNet-20 on Fashion-MNIST,
# 600 iterations, the same seed, alternating three processes so all see the same machine: glibc's
# and torch's defaults (RESLAB_KEEP_FREED_MEMORY=0 THP_MEM_ALLOC_ENABLE=0), freed memory kept only
# (THP_MEM_ALLOC_ENABLE=0), and both (kept, on huge pages: reslab's default at e6f7c84).
# Each line: wall time, minor page faults (GNU time), steady-state iterations/s from metrics.jsonl
# (iterations 120-594), final test error. Run from the repo root of a checkout of e6f7c84: the
# settings it compares (and the env.json keys it reads) were reverted in 458128c. e6f7c84 has this
# script at results/bench/allocator/run.sh (it moved here later); its output, in
# results/bench/allocator/output.txt, is what it prints: bash scripts/bench/allocator/run.sh
# DRY_RUN=1 prints each `reslab train`'s arguments ("+ ARGS") and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=${RESLAB:-.venv/bin/reslab}
work=${WORK:-/tmp/reslab-allocator}
rounds=${ROUNDS:-3}
memories=${MEMORIES:-defaults kept kept+huge}
mkdir -p "$work"
echo "commit $(git rev-parse HEAD), $(date -u +%FT%TZ), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for i in $(seq 1 "$rounds"); do
  for compile in off on; do
    for memory in $memories; do
      run=$work/$compile-$memory
      args=(train resnet20 --data fashion-mnist --out "$run" --iterations 600 --eval-every 600
            --checkpoint-every 600 --compile $compile --no-progress)
      if [ -n "${DRY_RUN:-}" ]; then echo "+ ${args[*]}"; continue; fi
      rm -rf "$run"
      case $memory in
        defaults) export RESLAB_KEEP_FREED_MEMORY=0 THP_MEM_ALLOC_ENABLE=0 ;;
        kept) unset RESLAB_KEEP_FREED_MEMORY; export THP_MEM_ALLOC_ENABLE=0 ;;
        kept+huge) unset RESLAB_KEEP_FREED_MEMORY THP_MEM_ALLOC_ENABLE ;;
      esac
      /usr/bin/time -o "$work.time" -f "%e s wall, %R minor faults" \
        $R "${args[@]}" > /dev/null 2>&1
      .venv/bin/python - "$run" "$i" "$compile" "$memory" "$(cat "$work.time")" <<'PY'
import json, sys
run, i, compile_, memory, timing = sys.argv[1:]
recs = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
a = [r for r in recs if 120 <= r["step"] <= 594]
rate = (a[-1]["step"] - a[0]["step"]) / (a[-1]["time"] - a[0]["time"])
err = json.load(open(f"{run}/summary.json"))["final_test_error"]
env = json.load(open(f"{run}/env.json"))
flags = f"kept={env['malloc_keeps_freed_memory']} huge={env['huge_pages']}"
print(f"round {i} compile {compile_:3s} {memory:9s} ({flags}): {timing}, {rate:.2f} it/s, "
      f"test error {100 * err:.2f}%", flush=True)
PY
    done
  done
done
