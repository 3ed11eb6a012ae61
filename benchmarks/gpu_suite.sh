#!/usr/bin/env bash
# The GPU checks and benchmarks, by stage, each stage's output kept in OUTDIR/<stage>.log and its
# last JSON line in OUTDIR/<stage>.json.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [stage ...]      # default: every stage, in this order
#
# Stages: tests, host, queue, queue-shared, gen, gen-sampled, gen-real (needs GEN_WEIGHTS: a copy of
# SmolLM2-135M-Instruct's GGUF file, for a host without the weights package), variants (the
# classifier's precisions and quantizations, MiniLM-L6's shape, raw forwards against fp32 and bf16). Set PYTHON to the
# interpreter (default python3). Stages run under `timeout` (STAGE_TIMEOUT_S, default 540 s), so
# one that hangs does not take the rest with it; the exit status is the number of stages that failed.
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [stage ...]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${STAGE_TIMEOUT_S:-540}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests host queue queue-shared gen gen-sampled gen-real variants)

run_stage() {
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep '^{' "$out/$name.log" | tail -1 >"$out/$name.json"
    echo "   rc=$rc, $((SECONDS - t0)) s; $(tail -c 400 "$out/$name.json")"
    return $rc
}

failed=0
for stage in "${stages[@]}"; do
    case $stage in
        tests) run_stage tests "$py" -m pytest -q tests/gpu ;;
        host) run_stage host "$py" -m benchmarks.host_limits ;;
        queue) run_stage queue "$py" -m benchmarks.queue_overhead --device cuda --quick --items 150000 \
                   --naive-items 1000 --instances 12 --cache-redis 1gb ;;
        queue-shared) run_stage queue-shared "$py" -m benchmarks.queue_overhead --device cuda --quick \
                          --items 150000 --naive-items 1000 --instances 12 ;;
        gen) run_stage gen "$py" -m benchmarks.generation --device cuda --quick ;;
        gen-sampled) run_stage gen-sampled "$py" -m benchmarks.generation --device cuda --quick \
                         --temperature 0.8 --top-p 0.95 ;;
        gen-real)
            if [ -z "${GEN_WEIGHTS:-}" ]; then
                echo "== gen-real: skipped (set GEN_WEIGHTS to a SmolLM2-135M-Instruct GGUF file)"
                continue
            fi
            run_stage gen-real "$py" -m benchmarks.generation --device cuda --quick --weights "$GEN_WEIGHTS" \
                --consistency --fp32-reference ;;
        variants) run_stage variants "$py" -m benchmarks.engine_variants --device cuda ;;
        *) echo "unknown stage: $stage" >&2; failed=$((failed + 1)); continue ;;
    esac
    [ $? -eq 0 ] || failed=$((failed + 1))
done
exit $failed
