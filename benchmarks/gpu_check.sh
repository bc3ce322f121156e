#!/usr/bin/env bash
# The one-GPU check (issue 14): experiment=debug_gpu1 end to end on GPU 0 with vLLM and
# QLoRA 4-bit + paged_adamw_8bit; decode tok/s per stage, peak and free GPU memory between
# stages (>= 90 % free), whole run < 8 min. Figures go to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#   bash benchmarks/gpu_check.sh teacher=qwen3_0_6b judge=qwen3_0_6b student=qwen3_0_6b
#
# Needs an installed environment (make setup on the GPU machine: extras dev,gpu) and the
# built-in model's wheel; no network. Exit code 0 = every target met.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
RUN_DIR="${RUN_DIR:-/tmp/cpt-gpu-check-$$}"
LOG="${LOG:-/tmp/cpt-gpu-check-$$.log}"

echo "== gpu_check: $(date -u '+%F %T UTC'), python $PYTHON, run_dir $RUN_DIR, log $LOG"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: this is not a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"   # one GPU, whatever the machine has

rm -rf "$RUN_DIR"
start=$(date +%s)
status=0
timeout --kill-after=30 "${GPU_CHECK_TIMEOUT_S:-900}" \
  "$PYTHON" -m benchmarks.gpu_check --run-dir "$RUN_DIR" "$@" 2>&1 | tee "$LOG" || status=$?
echo "== gpu_check: exit $status after $(( $(date +%s) - start )) s; full log: $LOG"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
if [[ $status -ne 0 ]]; then
  echo "== last lines with an error:" >&2
  grep -nE "Error|error|Traceback" "$LOG" | tail -20 >&2 || true
fi
exit "$status"
