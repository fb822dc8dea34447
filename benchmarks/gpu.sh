#!/usr/bin/env bash
# The GPU check, in one command, under 13 minutes on one GPU (the time limits of the steps and
# nvidia-smi add up to 740 s): the machine; which xformers kernels serve the group attention; the
# CUDA tests (xformers' BlockDiagonalMask against our mask, every backend against the float32
# reference in bf16 and fp16, head_dim != dim / heads, the host reads of a CUDA training step);
# the attention benchmark at k* = 512 in bf16 (xformers, fold, mask, dense-masked); one
# EPIC-size training step per attention backend with its peak memory (and the released way);
# the host reads of a training step on the GPU; the rehearsal of every --preset paper at the
# benchmarks' real shapes with enough stage-2 steps for its val goal (benchmarks/rehearse.py).
#
# Every step has a time limit; a step that fails or times out is reported and the next one
# runs. Everything goes to one log, <out>/gpu_<UTC time>.log (and the terminal); the benchmarks'
# JSON and PNG files go to <out> too. Exit status: 0 when every step passed.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --dry-run       # on a CPU: every python piece at small sizes on the
#                                          # CPU, CUDA-only work skipped (CI runs this)
#   bash benchmarks/gpu.sh --out DIR       # somewhere else than results/
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
out=results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }; out=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out" || exit 2
stamp=$(date -u +%Y%m%d_%H%M%S)
log="$out/gpu_${stamp}$([ "$dry" = 1 ] && echo _dry).log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
  device=cpu
  xformers_args=(--device cpu --batch 1)
  attention_args=(--device cpu --quick --tokens 66 --groups 2 --head-dim 16)
  train_args=(--device cpu --quick --repeats 1 --warmup 0 --no-flops --no-breakdown --backends fold mask)
  rehearse_args=(--device cpu --quick)
else
  device=cuda
  xformers_args=(--device cuda --batch 4)
  attention_args=(--device cuda --dtype bfloat16 --tokens 514 --groups 2 --batch 16 --head-dim 64
                  --repeats 10 --warmup 3)
  train_args=(--device cuda --dtype bfloat16 --batch 32 --repeats 10 --warmup 2 --no-breakdown
              --backends xformers fold mask)
  rehearse_args=(--device cuda --size gpu)
fi

start=$(date +%s)
failed=()

step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

run_step() {  # run_step <time limit in seconds> <label> <command...>
  local limit=$1 label=$2
  shift 2
  step "$label (limit ${limit} s): $*"
  local began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - began ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "!!! $label: TIMED OUT after ${limit} s"; failed+=("$label (timed out)")
  elif [ $rc -ne 0 ]; then
    echo "!!! $label: FAILED, exit status $rc, after ${took} s"; failed+=("$label (exit $rc)")
  else
    echo "--- $label: passed in ${took} s"
  fi
  return 0
}

main() {
  step "gpu.sh $([ "$dry" = 1 ] && echo '--dry-run (CPU, small sizes, CUDA-only steps skipped)'); log $log"
  date -u +"%Y-%m-%d %H:%M UTC"
  git log -1 --format='commit %H (%cd)' 2>/dev/null || true
  uptime
  if [ "$dry" = 1 ]; then
    echo "nvidia-smi: skipped (dry run)"
  else
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv \
      || echo "nvidia-smi unavailable"
  fi
  run_step 30 "machine" python benchmarks/gpu_check.py machine --device "$device" --out "$out"

  run_step 60 "xformers: which kernels serve the group attention" \
    python benchmarks/gpu_check.py xformers "${xformers_args[@]}" --out "$out"

  if [ "$dry" = 1 ]; then
    run_step 60 "CUDA tests (dry run: collected, skipped without a GPU)" \
      python -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_attention.py tests/train/test_loop.py
  else
    run_step 110 "CUDA tests: pytest -m cuda" \
      python -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_attention.py tests/train/test_loop.py
  fi

  run_step 70 "attention benchmark, k* = 512 (N = 514, 2 groups)" \
    python benchmarks/attention.py "${attention_args[@]}" --out "$out" --name "gpu_attention_${stamp}"

  run_step 120 "EPIC-size training step per attention backend, with peak memory" \
    python benchmarks/train_step.py "${train_args[@]}" --out "$out" --name "gpu_train_step_${stamp}"

  run_step 30 "host reads of a training step on $device" \
    python benchmarks/gpu_check.py host-reads --device "$device" --out "$out"

  run_step 300 "rehearsal of each --preset paper at the real shapes (stage-1 loss, pseudo-labels, val)" \
    python benchmarks/rehearse.py "${rehearse_args[@]}" --out "$out" --name "gpu_rehearse_${stamp}"

  step "done in $(( $(date +%s) - start )) s"
  if [ ${#failed[@]} -eq 0 ]; then
    echo "every step passed"
    return 0
  fi
  echo "failed steps (${#failed[@]}):"
  printf '  - %s\n' "${failed[@]}"
  return 1
}

main 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "log: $log"
exit "$status"
