#!/usr/bin/env bash
# Issue 37's behaviour check for a refactor: the same fixed-seed run in each data regime
# (Fashion-MNIST in memory; a generated photo tree streamed) with two checkouts' code, which
# must end with bitwise-equal weights, equal metrics.jsonl (times aside) and equal `reslab eval
# --json` (the tree's with 10 crops).
#   scripts/refactor_check.sh OLD_CHECKOUT NEW_CHECKOUT [WORK_DIR]
# Each checkout needs reslab/data/_jpeg_region.so built (make) for the same JPEG decoding.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); work=${3:-$(mktemp -d)}
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")  # absolute; a venv's link kept as it is
mkdir -p "$work"
PYTHONPATH=$new "$py" - "$work/tree" <<'PY'
import sys
from pathlib import Path
from PIL import Image
import numpy as np
g = np.random.default_rng(0)
for split, n in (("train", 48), ("test", 12)):
    for i in range(n):
        folder = Path(sys.argv[1]) / split / f"c{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
PY
run() {  # CODE OUT
  export PYTHONPATH=$1 OMP_NUM_THREADS=1
  (cd "$work" &&
   "$py" -m reslab train resnet20 --data fashion-mnist --out "$2/mem" --iterations 40 \
     --batch-size 64 --precision fp32 --deterministic --no-progress --eval-every 20 \
     --checkpoint-every 20 > "$2/mem.log" &&
   "$py" -m reslab train resnet8 --data "$work/tree" --loader stream --recipe imagenet \
     --out "$2/tree" --iterations 6 --batch-size 8 --precision fp32 --deterministic \
     --no-progress --eval-every 3 --workers 1 > "$2/tree.log" &&
   "$py" -m reslab eval "$2/mem" --data fashion-mnist --json > "$2/mem-eval.json" &&
   "$py" -m reslab eval "$2/tree" --data "$work/tree" --protocol 10-crop --json \
     > "$2/tree-eval.json")
}
mkdir -p "$work/old" "$work/new"
run "$old" "$work/old"
run "$new" "$work/new"
for r in mem tree; do
  cmp "$work/old/$r/model.safetensors" "$work/new/$r/model.safetensors"
  strip='import json,sys; [print({k: v for k, v in json.loads(l).items() if k not in ("time", "wall_time_s", "images_per_s")}) for l in open(sys.argv[1])]'
  diff <("$py" -c "$strip" "$work/old/$r/metrics.jsonl") <("$py" -c "$strip" "$work/new/$r/metrics.jsonl")
  cmp "$work/old/$r-eval.json" "$work/new/$r-eval.json"
  echo "$r: weights bitwise equal, metrics.jsonl equal (times aside), eval --json equal"
done
