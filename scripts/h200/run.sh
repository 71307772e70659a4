#!/usr/bin/env bash
# Everything this project does on a lent H200 (issues #4 and #5), as one call of the device tool:
#   bash scripts/h200/run.sh            (from the repository root; $OUT receives the results)
# 1. the CUDA tests; 2. the paper's full schedule (64,000 iterations) on Fashion-MNIST in two
# lanes sharing the GPU, ResNet-56 first (its wall time is #4's figure), until a deadline, when
# unfinished runs are stopped with SIGTERM (each saves a checkpoint that resumes it); 3. `reslab
# bench train resnet50` at 224x224 on synthetic data; 4. `reslab bench photos resnet50` from
# JPEG files; 5. the run folders packed into $OUT.
# Fashion-MNIST travels with the call in .data/fashion-mnist (git-ignored; the device has no
# network). LIMIT is the whole script's budget in seconds. DRY_RUN=1 prints each reslab command's
# arguments ("+ ARGS") instead of running anything (no tests, no training, no archives).
set -u
cd "$(dirname "$0")/../.."
T0=$SECONDS
LIMIT=${LIMIT:-530}
BENCH_S=${BENCH_S:-120}
OUT=${OUT:-/tmp/h200-out}
W=${WORK:-/tmp/h200}
PY=${PY:-python3}
ITERATIONS=${ITERATIONS:-64000}
DEVICE=${DEVICE:-cuda}
BENCH_MODEL=${BENCH_MODEL:-resnet50}
LANES=${LANES:-ab}      # lanes: a, b (the paper's runs below), s, t, k (issue #7's studies)
SEEDS=${SEEDS:-1}       # seeds per study arm (lanes s, t, k)
SEED_RUNS=${SEED_RUNS:-}  # run folders to resume (e.g. carried from an earlier call)
DRY_RUN=${DRY_RUN:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RESLAB_DATA=$PWD/.data
# perf_hints: torch.compile says when and why it skips CUDA graphs (results/h200/README.md).
export TORCH_LOGS=${TORCH_LOGS:-perf_hints}
. scripts/h200/lib.sh  # reslab (DRY_RUN-aware), log, pack
mkdir -p "$OUT" "$W/runs"
[ -n "$SEED_RUNS" ] && cp -r "$SEED_RUNS"/* "$W/runs/"
CG=""
if [ -z "$DRY_RUN" ]; then
  trap pack EXIT
  { nvidia-smi; nproc; free -g
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  } > "$OUT/machine.txt" 2>&1
  log "$(tail -1 "$OUT/machine.txt")"
  log "CUDA tests"
  $PY -m pytest -q -p no:cacheprovider -rA tests/test_data.py tests/test_train.py -k cuda \
      > "$W/tests.txt" 2>&1
  tail -25 "$W/tests.txt" | tee -a "$OUT/log.txt"
  # The whole step as one CUDA graph is reslab's CUDA default; if its test fails, train without.
  grep -q "^PASSED.*test_cuda_graphed" "$W/tests.txt" \
      || { CG="--cuda-graphs off"; log "CUDA-graph test did not pass: training with $CG"; }
else
  CG=${DRY_RUN_CG:-}  # the tests' stand-in for the fallback above
fi

# 2. Two lanes: the GPU is far from full with one small-image run, and one lane compiles while
# the other trains. A: ResNet-56, plain-56, ResNet-110. B: ResNet-20, plain-20.
F="--data fashion-mnist --runs $W/runs --iterations $ITERATIONS --device $DEVICE $CG"
log "training lanes start ($ITERATIONS iterations per run)"
A=0 B=0
if [[ $LANES == *a* ]]; then
  ( reslab reproduce table6 --out "$W/a" $F --depths 56 && reslab reproduce fig6 --out "$W/a" $F --depths 56 \
    && reslab reproduce table6 --out "$W/a" $F --depths 110 ) > "$W/lane-a.log" 2>&1 &
  A=$!
fi
if [[ $LANES == *b* ]]; then
  ( reslab reproduce table6 --out "$W/b" $F --depths 20 && reslab reproduce fig6 --out "$W/b" $F --depths 20 \
    ) > "$W/lane-b.log" 2>&1 &
  B=$!
fi
# Issue #7's studies (run with ITERATIONS=8000): shortcut mappings at 56 (s) and 20 (t); layers
# per block (k).
S=0 T=0 K=0
if [[ $LANES == *s* ]]; then
  reslab study shortcuts --out "$W/s" $F --depths 56 --seeds $SEEDS > "$W/lane-s.log" 2>&1 &
  S=$!
fi
if [[ $LANES == *t* ]]; then
  reslab study shortcuts --out "$W/t" $F --depths 20 --seeds $SEEDS > "$W/lane-t.log" 2>&1 &
  T=$!
fi
if [[ $LANES == *k* ]]; then
  reslab study block-depth --out "$W/k" $F --seeds $SEEDS > "$W/lane-k.log" 2>&1 &
  K=$!
fi
DEADLINE=$((LIMIT - BENCH_S - 30))
alive() { [ "$1" != 0 ] && kill -0 "$1" 2>/dev/null; }
while alive $A || alive $B || alive $S || alive $T || alive $K; do
    if [ $((SECONDS - T0)) -ge $DEADLINE ]; then
        log "deadline: stopping unfinished runs (SIGTERM: checkpoint, then exit)"
        pkill -TERM -f "reslab (reproduce|study).*--runs $W/runs"  # this call's runs only
        break
    fi
    sleep 2
done
[ $A != 0 ] && { wait $A; log "lane A exit $?"; }
[ $B != 0 ] && { wait $B; log "lane B exit $?"; }
[ $S != 0 ] && { wait $S; log "lane S exit $?"; }
[ $T != 0 ] && { wait $T; log "lane T exit $?"; }
[ $K != 0 ] && { wait $K; log "lane K exit $?"; }
grep -h "^== \|final\|finished\|error\|Error\|stopped" "$W"/lane-*.log | tail -30 | tee -a "$OUT/log.txt"
for s in "$W"/runs/*/summary.json; do
    [ -f "$s" ] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['model'], \
'train %.2f%% test %.2f%% wall %.0f s' % (100*d['final_train_error'], 100*d['final_test_error'], \
d['wall_time_s']))" "$s" | tee -a "$OUT/log.txt"
done

# 3. ResNet-50 training at 224x224 on synthetic data, with whatever budget is left.
left=$((LIMIT - (SECONDS - T0) - 25))
[ "$BENCH_S" -gt 0 ] || exit 0
log "bench $BENCH_MODEL (budget $left s)"
TIMEOUT=$left reslab bench train $BENCH_MODEL --device $DEVICE --steps 30 --no-ablation --json \
    > "$W/bench.json" 2> "$W/bench.err" && cp "$W/bench.json" "$OUT/bench-train-resnet50-224.json" \
    || { log "bench did not finish"; tail -5 "$W/bench.err" | tee -a "$OUT/log.txt"; }

# 4. ResNet-50 trained from JPEG files (issue 24, item 6): photograph-like files written here,
# decoded by PHOTO_WORKERS loader processes, against torchvision's loader and a plain loop; first
# the loader alone at those workers (can the host's cores feed ResNet-50's step on the GPU? the
# measurement that decides whether decoding on the GPU is needed). The JPEG region decoder is
# built here if the machine has a compiler and libjpeg's headers (no network for apt); without
# it JPEGs are decoded whole (the same views, slower), and the loader's JSON says which.
left=$((LIMIT - (SECONDS - T0) - 25))
PHOTO_WORKERS=${PHOTO_WORKERS:-14}
if [ "$left" -gt 60 ]; then
    log "bench photos resnet50 (budget $left s)"
    if [ -z "$DRY_RUN" ]; then
      cc -O2 -shared -fPIC -o reslab/data/_jpeg_region.so reslab/data/jpeg_region.c -ljpeg \
          >> "$OUT/log.txt" 2>&1 || log "JPEG region decoder not built: whole-image decoding"
      $PY -c "import sys; from reslab.bench.photos import write_photo_tree; \
write_photo_tree(sys.argv[1], classes=8, per_class=160, val_per_class=2)" "$W/photos"
    fi
    TIMEOUT=$((left / 3)) reslab data bench "$W/photos" --workers $PHOTO_WORKERS --json \
        > "$W/loader.json" 2> "$W/loader.err" && cp "$W/loader.json" "$OUT/bench-loader.json" \
        || { log "loader bench did not finish"; tail -5 "$W/loader.err" | tee -a "$OUT/log.txt"; }
    left=$((LIMIT - (SECONDS - T0) - 25))
    TIMEOUT=$left reslab bench photos resnet50 --data "$W/photos" --device $DEVICE \
        --workers $PHOTO_WORKERS --batch-size 256 --steps 10 --json > "$W/photos.json" \
        2> "$W/photos.err" && cp "$W/photos.json" "$OUT/bench-photos-resnet50-224.json" \
        || { log "photo bench did not finish"; tail -5 "$W/photos.err" | tee -a "$OUT/log.txt"; }
fi

# 5. One GPU alone against the same command under torchrun (issue 25): the launcher's and DDP's
# cost on one rank; a scaling figure needs several GPUs, which this machine does not have.
left=$((LIMIT - (SECONDS - T0) - 25))
if [ "$left" -gt 90 ]; then
    log "one GPU, plain and under torchrun (budget $left s)"
    TORCHRUN_ARGS=(train resnet20 --data fashion-mnist --iterations 2000 --eval-every 2000
                   --compile off --no-progress $CG)
    TIMEOUT=$((left / 2)) reslab "${TORCHRUN_ARGS[@]}" --out "$W/plain-gpu" > "$W/plain-gpu.log" 2>&1
    echo "+ ${TORCHRUN_ARGS[*]} --out $W/torchrun-gpu" >&3
    [ -n "$DRY_RUN" ] || timeout $((left / 2)) $PY -m torch.distributed.run --nproc-per-node 1 \
        -m reslab "${TORCHRUN_ARGS[@]}" --out "$W/torchrun-gpu" > "$W/torchrun-gpu.log" 2>&1
    for run in plain-gpu torchrun-gpu; do
        [ -f "$W/$run/summary.json" ] && cp "$W/$run/summary.json" "$OUT/$run-summary.json"
    done
fi
log "done"
