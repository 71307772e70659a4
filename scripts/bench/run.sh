#!/usr/bin/env bash
# The committed speed figures: run from the repo root with the project's venv.
# Every figure is a ratio measured side by side in one process (reslab bench).
set -euo pipefail
out=results/bench
R=".venv/bin/reslab"
{
  echo "commit: $(git rev-parse HEAD)"
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  echo "torch: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
} > $out/env.txt
start=$(date +%s)
$R bench train resnet20 --json > $out/train-resnet20.json
$R bench train resnet20 --in-channels 1 --input-size 28 --json --no-ablation > $out/train-resnet20-28px.json
$R bench train resnet56 --json --no-ablation > $out/train-resnet56.json
for spec in "resnet20 1" "resnet20 256" "resnet50 1" "resnet50 32"; do
  set -- $spec
  $R bench infer $1 --batch-size $2 --json > $out/infer-$1-b$2.json
done
echo "wall: $(( $(date +%s) - start )) s" >> $out/env.txt
