#!/usr/bin/env bash
# Issue 36, item 4: as much of CIFAR-10 (JPEG copy) Table 6 at the paper's schedule (64,000
# iterations) as fits in one call of the device tool on a lent H200, sized from a measured speed.
#
# 1. Data: the archive, SHA-256-checked, extracted and decoded once (reslab caches the decoded
#    images under $RESLAB_DATA/cache, so the lanes below do not decode again).
# 2. Probe, about PROBE_S (30) seconds: the whole training step as one CUDA graph (reslab's own,
#    reslab/step.py GraphedStep, without torch.compile: quick to build, and no faster than the
#    compiled step the runs use) timed for ResNet-110 and ResNet-56 on random 32x32 images,
#    batch 128, then ResNet-1202 only if even twice ResNet-110's speed per layer could finish
#    it in the time left. Each net's seconds per step and iterations left go to $OUT/probe.json.
# 3. Lanes on the one GPU, each `reslab reproduce table6 --depths D --iterations 64000` into the
#    run pool $W/runs (folders named resnet110-64000it-seed0, as in results/cifar10-jpeg/runs):
#    ResNet-110 (with Sec. 4.2's warm-up, the recipe's for depth >= 110) and ResNet-56 at once;
#    ResNet-1202 (paper: 7.93%) beside them if the measured speeds say all three finish before
#    the deadline (the lanes share the GPU: their iterations x seconds per step are summed), or
#    after them if it then fits alone; otherwise not at all. It trains with --compile off (its
#    compile time is unmeasured and its speed is the probe's), and it is only ever started when
#    it can finish: its checkpoint (over 150 MB) cannot come back through $OUT or travel back in,
#    so a stopped ResNet-1202 could not be resumed. Its finished weights (78 MB) cannot come
#    back either: its metrics, recipe, env and summary do.
# 4. At the deadline (LIMIT - PACK_S seconds after the start) unfinished runs get SIGTERM: each
#    finishes its step, saves a checkpoint and exits, and resumes from it in a later call.
# 5. The run pool packed into $OUT/runs-N.tar.gz (scripts/h200/lib.sh's pack: finished runs
#    with weights, unfinished ones with their newest checkpoint, archives of <= 14 MB), with
#    log.txt (the lanes' logs at its end), machine.txt and probe.json: at most 8 files.
#
# On the device (the run pool and data travel in the git-ignored .data/, named in `carry`):
#   Once, here, in the repository root:
#     echo /.data/ >> .git/info/exclude
#     mkdir -p .data/cifar10-jpeg && cp ../shared/data/cifar10-jpeg.tar.gz .data/cifar10-jpeg/
#   (the archive is 19.6 MB of the 64 MiB that may travel: extracted it is 237 MB, so the
#   archive travels and is extracted there.) Then one call of the device tool:
#     run  command: LIMIT=560 bash scripts/h200/table6_64k.sh
#          carry: [".data"]   timeout_s: 600
#   To resume from an earlier call, unpack its runs-*.tar.gz into .data/table6-runs/ (here) and
#     run  command: SEED_RUNS=.data/table6-runs LIMIT=560 bash scripts/h200/table6_64k.sh
#          carry: [".data"]   timeout_s: 600
#   (.data/ must stay under about 44 MB with the archive: ResNet-110's checkpoint is ~14 MB,
#   ResNet-56's ~7 MB.) Finished run folders then go to results/cifar10-jpeg/runs/, and
#   `reslab reproduce table6 --data cifar10-jpeg --out results/cifar10-jpeg/table6-64k --runs
#   results/cifar10-jpeg/runs --depths 20 56 110 --iterations 64000 --report-only` reports them.
#
# Knobs: LIMIT (whole script, s; leave the call's timeout_s 40 s above it), PACK_S (60, kept
# for stopping and packing), PROBE_S (30), START_S (90, allowed per run for start, compile,
# capture and warm-up), ITERATIONS (64000), DEVICE (cuda), DATA (cifar10-jpeg, or an image
# folder), DEPTHS ("110 56", the first lanes, in order of value), BIG ("1202"; empty: never),
# COMPILE (auto, for the first lanes), TESTS (1 on cuda: the whole-step graph's CUDA test first;
# if it fails, every lane trains with --cuda-graphs off), SEED_RUNS, OUT, WORK, PY. DRY_RUN=1
# prints each reslab command ("+ ARGS") and runs nothing. On a CPU, e.g.:
#   ITERATIONS=40 DEVICE=cpu DATA=/tmp/tiny DEPTHS="8 14" BIG=20 PROBE_S=6 START_S=20 \
#     LIMIT=240 OUT=/tmp/o WORK=/tmp/w PY=python bash scripts/h200/table6_64k.sh
set -u
cd "$(dirname "$0")/../.."
T0=$SECONDS
LIMIT=${LIMIT:-560}
PACK_S=${PACK_S:-60}
PROBE_S=${PROBE_S:-30}
START_S=${START_S:-90}
ITERATIONS=${ITERATIONS:-64000}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-cifar10-jpeg}
DEPTHS=${DEPTHS:-110 56}
BIG=${BIG-1202}
COMPILE=${COMPILE:-auto}
TESTS=${TESTS:-$([ "$DEVICE" = cuda ] && echo 1)}
SEED_RUNS=${SEED_RUNS:-}
OUT=${OUT:-/tmp/h200-out}
W=${WORK:-/tmp/h200-table6}
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RESLAB_DATA=${RESLAB_DATA:-$PWD/.data}
export TORCH_LOGS=${TORCH_LOGS:-perf_hints}
. scripts/h200/lib.sh  # reslab (DRY_RUN-aware), log, pack
export PACK_PARTS=${PACK_PARTS:-5}  # + log.txt, machine.txt, probe.json: the 8 files that come back
DEADLINE=$((LIMIT - PACK_S))
RUNS=$W/runs
POOL="--data $DATA --runs $RUNS --iterations $ITERATIONS --device $DEVICE"

if [ -n "$DRY_RUN" ]; then  # the commands a call with nothing done yet would start
  CG=${DRY_RUN_CG:-}
  for d in $DEPTHS; do
    reslab reproduce table6 --out "$W/report-$d" $POOL --depths "$d" --compile "$COMPILE" $CG
  done
  [ -n "$BIG" ] && reslab reproduce table6 --out "$W/report-$BIG" $POOL --depths "$BIG" \
      --compile off $CG
  exit 0
fi

mkdir -p "$OUT" "$RUNS"
[ -n "$SEED_RUNS" ] && cp -r "$SEED_RUNS"/. "$RUNS/"
trap pack EXIT
{ nvidia-smi 2>&1 | head -20; nproc; free -g
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/machine.txt" 2>&1
log "$(tail -1 "$OUT/machine.txt"); limit $LIMIT s, deadline $DEADLINE s; runs: $(ls "$RUNS" | xargs)"

# 1. Data, once (the archive's SHA-256 checked, extracted into $RESLAB_DATA, decoded, cached).
$PY -c "import sys, time; from reslab.data import load_dataset; t = time.time(); \
d = load_dataset(sys.argv[1]); print(f'{sys.argv[1]}: {len(d.train_labels)} training and \
{len(d.test_labels)} test images ready in {time.time() - t:.0f} s')" "$DATA" > "$W/data.txt" 2>&1
rc=$?; log "$(tail -1 "$W/data.txt")"
[ $rc = 0 ] || { log "no data: nothing trained"; exit 1; }

CG=""
if [ -n "$TESTS" ]; then
  timeout 120 $PY -m pytest -q -p no:cacheprovider -rA tests/test_train.py -k cuda_graphed \
      > "$W/tests.txt" 2>&1
  tail -3 "$W/tests.txt" | tee -a "$OUT/log.txt"
  grep -q "^PASSED.*test_cuda_graphed" "$W/tests.txt" \
      || { CG="--cuda-graphs off"; log "CUDA-graph test did not pass: training with $CG"; }
fi

# 2. The probe: seconds per step of each unfinished net, and its iterations left (plan.txt:
# "DEPTH ITERATIONS_LEFT MS_PER_STEP", 0 ms where not measured).
log "probe (${PROBE_S} s)"
$PY - "$DEVICE" "$PROBE_S" "$ITERATIONS" "$RUNS" "$((DEADLINE - (SECONDS - T0) - PROBE_S))" \
    "$START_S" "${CG:+off}" "$BIG" $DEPTHS > "$W/plan.txt" 2> "$W/probe.err" <<'EOF'
import json, re, sys, time
from pathlib import Path

import torch

from reslab.bench.reference import bench_images
from reslab.bench.train import reslab_step

device, probe_s, iterations, runs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
budget, start_s, graphs_off, big = float(sys.argv[5]), float(sys.argv[6]), sys.argv[7], sys.argv[8]
depths = [int(d) for d in sys.argv[9:]]
dev = torch.device(device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
images, labels = bench_images(2048, 3, 32)


def left(depth):
    run = Path(runs) / f"resnet{depth}-{iterations}it-seed0"
    if (run / "summary.json").is_file():
        return 0
    steps = [int(m[1]) for p in run.glob("checkpoint-*.pt")
             if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", p.name))]
    return iterations - max(steps, default=0)


def probe(depth, seconds):
    """Seconds per step of train()'s own step (the whole-step CUDA graph on CUDA), batch 128."""
    t0 = time.perf_counter()
    step, stream = reslab_step(f"resnet{depth}", images, labels, device=device, batch_size=128,
                               compile_model=False, cuda_graphs=False if graphs_off else None)
    i = 0
    for _ in range(step.graphed.warmup + 1 if step.graphed else 2):  # past the capture
        step(stream.next(), i)
        i += 1
    sync()
    built, t1, n = time.perf_counter() - t0, time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t1 < seconds:
        for _ in range(10 if dev.type == "cuda" else 1):
            step(stream.next(), i)
            i, n = i + 1, n + 1
        sync()
    s = (time.perf_counter() - t1) / n
    print(f"resnet{depth}: {1000 * s:.2f} ms per step ({n} steps), built and captured in "
          f"{built:.1f} s", file=sys.stderr)
    del step
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return s


t_start = time.perf_counter()
todo = [d for d in depths if left(d) > 0]
plan = {d: {"left": left(d), "s_per_step": None} for d in depths}
for d in todo:
    plan[d]["s_per_step"] = probe(d, probe_s / (len(todo) + (1 if big else 0)))
if big:
    big = int(big)
    plan[big] = {"left": left(big), "s_per_step": None}
    need = sum(plan[d]["left"] * plan[d]["s_per_step"] for d in todo)
    ref = max(todo, default=None)
    if plan[big]["left"] == 0:
        plan[big]["note"] = "finished earlier"
    elif ref is not None:
        # Even at twice the probed net's speed per layer, can it finish in the time left?
        floor = plan[ref]["s_per_step"] * (big - 2) / (ref - 2) / 2
        if plan[big]["left"] * floor + start_s > budget:
            plan[big]["note"] = (f"not probed: at least {floor * 1000:.1f} ms per step "
                                 f"(half ResNet-{ref}'s time per layer), so at least "
                                 f"{plan[big]['left'] * floor + start_s:.0f} s, over the "
                                 f"{budget:.0f} s left")
    if plan[big]["left"] and "note" not in plan[big]:
        rest = max(probe_s - (time.perf_counter() - t_start), probe_s / 3)
        try:
            plan[big]["s_per_step"] = probe(big, rest)
        except Exception as e:  # e.g. out of memory: then it does not run
            plan[big]["note"] = f"probe failed: {type(e).__name__}: {e}"
for d, p in plan.items():
    ms = 0 if p["s_per_step"] is None else round(1000 * p["s_per_step"], 3)
    print(d, p["left"], ms)
    if p.get("note"):
        print(f"resnet{d}: {p['note']}", file=sys.stderr)
json.dump({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "whole_step_cuda_graph": dev.type == "cuda" and not graphs_off,
           "compile": False, "batch_size": 128, "iterations": iterations,
           "probe_wall_s": time.perf_counter() - t_start,
           "nets": {f"resnet{d}": p for d, p in plan.items()}},
          open(Path(runs).parent / "probe.json", "w"), indent=1)
EOF
rc=$?
cat "$W/probe.err" | grep -v "^\s*$" | tail -8 | tee -a "$OUT/log.txt"
cp "$W/probe.json" "$OUT/probe.json" 2>/dev/null
[ $rc = 0 ] || { log "probe failed (exit $rc): nothing trained"; exit 1; }

# need_s DEPTH: seconds DEPTH needs at its probed speed, with START_S to start; "" unmeasured.
need_s() { awk -v d="$1" -v s="$START_S" '$1 == d && $3 > 0 { printf "%d", $2 * $3 / 1000 + s }
                                           $1 == d && $2 == 0 { print 0 }' "$W/plan.txt"; }
left_s() { echo $((DEADLINE - (SECONDS - T0))); }
PIDS=() NAMES=()
lane() {  # lane DEPTH EXTRA...: its reproduce command in the background, its pid kept
  local d=$1; shift
  echo "+ reproduce table6 --out $W/report-$d $POOL --depths $d $* $CG" >&3
  $PY -m reslab reproduce table6 --out "$W/report-$d" $POOL --depths "$d" "$@" $CG \
      > "$W/lane-$d.log" 2>&1 3>&- &
  PIDS+=($!) NAMES+=("ResNet-$d")
}

# 3. The lanes.
total=0
for d in $DEPTHS; do
  n=$(need_s "$d")
  if [ "$n" = 0 ]; then log "ResNet-$d: finished earlier"; continue; fi
  log "ResNet-$d: $(awk -v d="$d" '$1 == d { print $2 " iterations left at " $3 " ms" }' \
      "$W/plan.txt"): ~${n:-?} s"
  lane "$d" --compile "$COMPILE"
  total=$((total + ${n:-0}))
done
BIG_STATE=none
if [ -n "$BIG" ]; then
  n=$(need_s "$BIG")
  if [ "$n" = 0 ]; then BIG_STATE=done; log "ResNet-$BIG: finished earlier"
  elif [ -z "$n" ]; then log "ResNet-$BIG: not started (its speed was not measured)"
  elif [ $((total + n)) -le "$(left_s)" ]; then
    log "ResNet-$BIG: ~$n s; with the others ~$((total + n)) s of $(left_s) s left: started"
    lane "$BIG" --compile off; BIG_STATE=started
  else
    BIG_STATE=waiting
    log "ResNet-$BIG: ~$n s; with the others ~$((total + n)) s, over the $(left_s) s left:" \
        "starts after them only if it then fits alone"
  fi
fi

# 4. Until every lane ends or the deadline; a waiting ResNet-1202 starts when the GPU is free
# and it still fits.
alive() { local p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
ENDED=()
reap() {  # log each lane's exit as it ends; reap all: wait for every lane
  local i
  for i in "${!PIDS[@]}"; do
    if [ -z "${ENDED[$i]:-}" ] && { [ -n "${1:-}" ] || ! kill -0 "${PIDS[$i]}" 2>/dev/null; }; then
      wait "${PIDS[$i]}"; log "${NAMES[$i]}: exit $?"; ENDED[$i]=1
    fi
  done
}
while true; do
  reap
  if ! alive; then
    if [ $BIG_STATE = waiting ] && [ "$(need_s "$BIG")" -le "$(left_s)" ]; then
      log "ResNet-$BIG: the others ended; ~$(need_s "$BIG") s of $(left_s) s left: started"
      lane "$BIG" --compile off; BIG_STATE=started
    else
      [ $BIG_STATE = waiting ] && log "ResNet-$BIG: not started (~$(need_s "$BIG") s needed," \
          "$(left_s) s left)"
      break
    fi
  fi
  if [ $((SECONDS - T0)) -ge $DEADLINE ]; then
    log "deadline: SIGTERM to the unfinished runs (each saves a checkpoint, then exits)"
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -TERM "$p"; done
    for _ in $(seq $((PACK_S / 2 / 2))); do alive || break; sleep 2; done
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && { log "pid $p: SIGKILL"; kill -KILL "$p"; }; done
    break
  fi
  sleep 2
done
reap all
grep -h "finished\|Error\|stopped\|Traceback" "$W"/lane-*.log | tail -20 | tee -a "$OUT/log.txt"
for s in "$RUNS"/*/summary.json; do
  [ -f "$s" ] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['model'], \
'train %.2f%% test %.2f%% wall %.0f s' % (100*d['final_train_error'], 100*d['final_test_error'], \
d['wall_time_s']))" "$s" | tee -a "$OUT/log.txt"
done
for r in "$RUNS"/*/; do
  c=$(ls "$r"checkpoint-*.pt 2>/dev/null | sort | tail -1)
  [ -n "$c" ] && [ ! -f "$r/summary.json" ] && log "unfinished: $(basename "$r") at $(basename "$c")"
done
log "packing"
