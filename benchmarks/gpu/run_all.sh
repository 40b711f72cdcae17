#!/usr/bin/env bash
# One prepared run for a lent GPU (H100/H200): build the CUDA extension, run the GPU parity
# tests and every GPU benchmark, write one results JSON (device, versions, commit, numbers,
# the commands) plus its Markdown table and PNG chart.
#
#   bash benchmarks/gpu/run_all.sh            # results in $OUT (if set) and benchmarks/results/
#
# Robust by design: each step has its own time limit, a failing step is recorded and the
# run goes on, and whatever exists is collected on exit (also on Ctrl-C or a kill).
# Environment knobs: PYTHON (interpreter), BUDGET_S (total seconds, default 500),
# MAX_JOBS (build parallelism, default 16), SKIP_BUILD=1, TRAIN_SMOKE=0 to skip the script run.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS_DIR="$ROOT/benchmarks/results"
WORK="${OUT:-$RESULTS_DIR/gpu-run-$STAMP}"
mkdir -p "$WORK" "$RESULTS_DIR"
LOG="$WORK/run_all.log"
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
BUDGET_S="${BUDGET_S:-500}"
START_S="$(date +%s)"
COMMAND="bash benchmarks/gpu/run_all.sh (BUDGET_S=$BUDGET_S)"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

remaining() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

# step NAME LIMIT_S CMD...: run with min(LIMIT_S, time left), record rc and seconds, never abort.
step() {
    local name="$1" limit="$2"; shift 2
    local left; left="$(remaining)"
    if (( left < 20 )); then
        log "skip $name: only ${left}s of the ${BUDGET_S}s budget left"
        echo "{\"name\": \"$name\", \"rc\": \"skipped (budget)\", \"seconds\": 0}" >> "$STEPS"
        return 0
    fi
    (( limit > left )) && limit="$left"
    log "=== $name (limit ${limit}s): $*"
    local t0; t0="$(date +%s)"
    timeout --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local secs=$(( $(date +%s) - t0 ))
    echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs}" >> "$STEPS"
    log "--- $name: exit $rc after ${secs}s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    return 0
}

finish() {
    trap - EXIT INT TERM
    log "collecting results"
    local inputs=()
    for f in "$WORK"/bench-*.json; do [[ -s "$f" ]] && inputs+=("$f"); done
    local out="$WORK/gpu-$STAMP.json"
    timeout 60 "$PY" benchmarks/report.py collect "${inputs[@]:-/nonexistent}" --out "$out" \
        --command "$COMMAND" --steps "$STEPS" \
        --note "prepared GPU run; per-step exit codes in 'steps' (124 = timed out); log in run_all.log" \
        >> "$LOG" 2>&1 || log "collect failed"
    timeout 60 "$PY" benchmarks/report.py render "$out" >> "$LOG" 2>&1 || log "render failed"
    if [[ "$WORK" != "$RESULTS_DIR"* ]]; then
        cp -f "$WORK"/gpu-"$STAMP".* "$RESULTS_DIR"/ 2>/dev/null || true
    fi
    log "done in $(( $(date +%s) - START_S ))s; results: $out"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM

log "gptfast GPU run in $ROOT, output in $WORK"
{ nvidia-smi || true; } > "$WORK/nvidia-smi.txt" 2>&1
"$PY" - > "$WORK/environment.txt" 2>&1 <<'EOF' || true
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "pytest", "pytest_benchmark", "llms_from_scratch", "ninja", "matplotlib", "tiktoken"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "present"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", exc)
EOF
cat "$WORK/environment.txt" >> "$LOG"

# 1. Build the CUDA extension for Hopper (sm_90) with ninja.
if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" GPTFAST_BUILD_CUDA=1
    step build 200 "$PY" -m pip install --no-build-isolation --no-deps -e .
    if ! "$PY" -c "import gptfast._C_cuda" >> "$LOG" 2>&1; then
        step build-inplace 150 "$PY" setup.py build_ext --inplace
    fi
fi
"$PY" -c "from gptfast import ops; print(ops.backend_status())" >> "$LOG" 2>&1 || true

# 2. GPU parity tests (the `gpu` marker), then the CUDA/Triton test files' remaining tests.
step gpu-tests 90 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$WORK/tests-gpu.xml"
# 3. Benchmarks, most important first: the training comparison (issue 9's goal), ops at the
#    issues' H100 shapes, generation.
BENCH=(-q -p no:cacheprovider --benchmark-columns=median,mean,stddev,rounds)
step bench-train 150 "$PY" -m pytest benchmarks/test_bench_train.py "${BENCH[@]}" \
    --benchmark-json="$WORK/bench-train.json"
step bench-ops 100 "$PY" -m pytest benchmarks/test_bench_ops.py "${BENCH[@]}" --benchmark-json="$WORK/bench-ops.json"
if [[ -f benchmarks/test_bench_generation.py ]]; then
    step bench-generation 90 "$PY" -m pytest benchmarks/test_bench_generation.py "${BENCH[@]}" \
        --benchmark-json="$WORK/bench-generation.json"
fi
KERNEL_TESTS=(tests/test_*cuda*.py tests/test_*triton*.py)
existing=()
for f in "${KERNEL_TESTS[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
if (( ${#existing[@]} )); then
    step kernel-tests 120 "$PY" -m pytest -q -m "not gpu" "${existing[@]}" -p no:cacheprovider \
        --junitxml="$WORK/tests-kernels.xml"
fi
# 4. The training script end to end (compile, bf16, checkpoint, metrics, MFU in its log).
if [[ "${TRAIN_SMOKE:-1}" == "1" ]]; then
    step train-script 120 "$PY" -m gptfast.train --model gpt2 --context-length 1024 --batch-size 16 \
        --max-steps 30 --warmup-steps 5 --eval-every 30 --no-progress --out-dir "$WORK/train-smoke"
fi
exit 0
