# shellcheck shell=bash
# Helpers shared by the scripts for a lent H200 (scripts/h200/*.sh), sourced after they set
# T0 (start, in $SECONDS), OUT (what comes back), W (work folder, run pool $W/runs), PY and
# DRY_RUN. Nothing here runs on its own.

# reslab ARGS: `$PY -m reslab ARGS`, under `timeout $TIMEOUT` where TIMEOUT is set. DRY_RUN=1:
# print "+ ARGS" on fd 3, the script's stdout (also from lanes whose output goes to logs).
exec 3>&1
reslab() {
    echo "+ $*" >&3
    [ -n "$DRY_RUN" ] && return
    if [ -n "${TIMEOUT:-}" ]; then timeout "$TIMEOUT" $PY -m reslab "$@" 3>&-
    else $PY -m reslab "$@" 3>&-; fi
}

log() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/log.txt"; }

# The run pool $W/runs packed into $OUT/runs-N.tar.gz, for the device tool's limits on what
# comes back (at most 8 files, 16 MiB each, 64 MiB in all): a finished run keeps its weights
# and loses its checkpoints, an unfinished one keeps its newest checkpoint only; archives of at
# most PACK_KB (14000) of files each, at most PACK_PARTS (6) of them. A run that alone exceeds
# an archive, or would exceed PACK_PARTS, goes back without its weights and checkpoints (e.g.
# ResNet-1202: 78 MB of weights), named in log.txt. The lanes' logs are appended to log.txt.
pack() {
    local max_kb=${PACK_KB:-14000} max_parts=${PACK_PARTS:-6}
    cd "$W/runs" || return
    local part=1 size=0 batch=() run kb
    for run in */; do
        run=${run%/}
        if [ -f "$run/summary.json" ]; then rm -f "$run"/checkpoint-*.pt  # finished: weights kept
        else ls "$run"/checkpoint-*.pt 2>/dev/null | sort | head -n -1 | xargs -r rm -f; fi
        kb=$(du -sk "$run" | cut -f1)
        if [ "$kb" -gt "$max_kb" ] || { [ "$part" -ge "$max_parts" ] \
                && [ $((size + kb)) -gt "$max_kb" ]; }; then
            log "pack: $run ($kb KB) comes back without its weights and checkpoints"
            rm -f "$run"/checkpoint-*.pt "$run"/model.safetensors
            kb=$(du -sk "$run" | cut -f1)
        fi
        if [ ${#batch[@]} -gt 0 ] && [ $((size + kb)) -gt "$max_kb" ] \
                && [ "$part" -lt "$max_parts" ]; then
            tar czf "$OUT/runs-$part.tar.gz" "${batch[@]}"; part=$((part + 1)); size=0; batch=()
        fi
        batch+=("$run"); size=$((size + kb))
    done
    [ ${#batch[@]} -gt 0 ] && tar czf "$OUT/runs-$part.tar.gz" "${batch[@]}"
    for lane in "$W"/lane-*.log; do echo "== $lane"; cat "$lane"; done >> "$OUT/log.txt" 2>/dev/null
    cd - >/dev/null || return
}
