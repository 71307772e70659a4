#!/usr/bin/env bash
# The streamed-photograph path's speed (issue 24, item 6), side by side in one run each, on
# photograph-like JPEGs (reslab.bench.photos: ~470x400 px and ~110 KB on average): the loader
# alone with 1 and 2 workers, and ResNet-18/50 training at 224, against torchvision's loader and
# a plain PyTorch loop. Run from the repository root on a quiet machine:
#   bash scripts/bench/photos.sh
# DRY_RUN=1 prints each reslab command's arguments ("+ ARGS") and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench-photos
tree=${PHOTOS:-/tmp/reslab-photos}
R=${RESLAB:-.venv/bin/reslab}
dry=${DRY_RUN:-}
run() { local file=$1; shift; if [ -n "$dry" ]; then echo "+ $*"; else "$R" "$@" > "$file"; fi; }

if [ -z "$dry" ]; then
  mkdir -p $out
  rm -rf "$tree"
  .venv/bin/python -c "import json, sys; from reslab.bench.photos import write_photo_tree; \
print(json.dumps(write_photo_tree(sys.argv[1], classes=8, per_class=64, val_per_class=4)))" \
    "$tree" > $out/files.json
  {
    echo "commit: $(git rev-parse HEAD)"
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
    echo "torch: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  } > $out/env.txt
fi
start=$(date +%s)
run $out/loader-w1.json data bench "$tree" --workers 1 --json
run $out/loader-w2.json data bench "$tree" --workers 2 --json
run $out/train-resnet18.json bench photos resnet18 --data "$tree" --workers 2 --steps 4 --json
run $out/train-resnet50.json bench photos resnet50 --data "$tree" --workers 2 --steps 3 \
    --batch-size 16 --json
[ -n "$dry" ] || echo "wall: $(( $(date +%s) - start )) s" >> $out/env.txt
