#!/usr/bin/env bash
# Inference speed of an exported model, side by side in one run per model (reslab.bench_infer):
# ONNX Runtime on the exported .onnx (uint8 in), eager PyTorch fp32 and reslab's fastest PyTorch
# path, ResNet-20 at 32x32 and ResNet-50 at 224x224, batch 1 and 32, on every core; bf16's and
# ONNX Runtime's top-1 against fp32 on random images and on the Fashion-MNIST test split with
# the make-run weights. A `reslab reproduce` training on this machine is paused (SIGSTOP) for
# the measurements and resumed (SIGCONT) afterwards, also when they fail. From the repo root:
#   bash scripts/bench/inference.sh
# DRY_RUN=1 prints each measurement's Python call ("python: CALL") and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench-inference
PY=${PY:-.venv/bin/python}
dry=${DRY_RUN:-}
# measure FILE CALL: the JSON of reslab.bench_infer.CALL into FILE
measure() {
  if [ -n "$dry" ]; then echo "python: $2"; return; fi
  "$PY" -c "import json, reslab.bench_infer as b; print(json.dumps(b.$2, indent=2))" > "$1"
}

paused=""
resume() { [ -z "$paused" ] || kill -CONT $paused 2>/dev/null || true; }
if [ -z "$dry" ]; then
  mkdir -p $out
  # By process id: a training started after this line is neither paused nor resumed.
  paused=$(pgrep -f "reslab reproduce" | tr '\n' ' ' || true)
  trap resume EXIT
  trap 'resume; exit 130' INT TERM HUP
  {
    echo "commit: $(git rev-parse HEAD)"
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
    echo "flags: $(grep -m1 -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | xargs)"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__)')"
    echo "onnxruntime: $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')"
    echo "paused during the run: ${paused:-nothing}"
  } > $out/env.txt
  [ -z "$paused" ] || kill -STOP $paused
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/env.txt
fi
start=$(date +%s)
measure $out/resnet20.json 'bench_inference("resnet20", (1, 32))'
measure $out/resnet50.json 'bench_inference("resnet50", (1, 32))'
measure $out/make-run-fashion-mnist.json \
    'agreement_on_run("results/fashion-mnist/make-run", "fashion-mnist")'
if [ -z "$dry" ]; then
  echo "wall: $(( $(date +%s) - start )) s" >> $out/env.txt
  # With the training paused, a high figure means something else ran during the measurements.
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/env.txt
  resume
  paused=""
  "$PY" -c "import json, sys; from reslab.bench_infer import markdown_tables; \
print(markdown_tables([json.load(open(f)) for f in sys.argv[1:3]], [json.load(open(sys.argv[3]))]), \
end='')" $out/resnet20.json $out/resnet50.json $out/make-run-fashion-mnist.json > $out/tables.md
fi
