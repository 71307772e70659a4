#!/usr/bin/env bash
# The committed speed figures (results/bench): run from the repo root with the project's venv:
#   bash scripts/bench/run.sh
# Every figure is a ratio measured side by side in one process (reslab bench).
# DRY_RUN=1 prints each reslab command's arguments ("+ ARGS") and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench
R=${RESLAB:-.venv/bin/reslab}
dry=${DRY_RUN:-}
# run FILE ARGS...: `reslab ARGS > FILE`
run() { local file=$1; shift; if [ -n "$dry" ]; then echo "+ $*"; else "$R" "$@" > "$file"; fi; }

if [ -z "$dry" ]; then
  {
    echo "commit: $(git rev-parse HEAD)"
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
    echo "torch: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  } > $out/env.txt
fi
start=$(date +%s)
run $out/train-resnet20.json bench train resnet20 --json
run $out/train-resnet20-28px.json bench train resnet20 --in-channels 1 --input-size 28 --json \
    --no-ablation
run $out/train-resnet56.json bench train resnet56 --json --no-ablation
for spec in "resnet20 1" "resnet20 256" "resnet50 1" "resnet50 32"; do
  set -- $spec
  run $out/infer-$1-b$2.json bench infer $1 --batch-size $2 --json
done
[ -n "$dry" ] || echo "wall: $(( $(date +%s) - start )) s" >> $out/env.txt
