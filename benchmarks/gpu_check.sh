#!/usr/bin/env bash
# One-call GPU verification of the flash kernels (issue 6), < 10 minutes on an H200:
#   1. benchmarks/gpu_check.py: GPU kernels vs the xla path, forward + all gradients, bf16
#      tolerances (prints PASS/FAIL per case);
#   2. benchmarks/attention.py --mode=gpu --sweep: a block-size sweep of our softmax kernel, then
#      TFLOP/s and ratios vs cuDNN / XLA / tokamax (SWEEP=0 skips the sweep);
#   3. optionally (RUN_PYTEST=1) the gpu-marked tests of tests/test_ops_pallas.py.
# Results land in benchmarks/results/ and, when $OUT is set (device runner), in $OUT too.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

timeout "${CHECK_TIMEOUT:-180}" python -m benchmarks.gpu_check
check=$?
sweep=""
[ "${SWEEP:-1}" = "1" ] && sweep="--sweep"
timeout "${BENCH_TIMEOUT:-360}" python -m benchmarks.attention --mode=gpu ${sweep} \
  --time_budget="${BENCH_BUDGET:-290}" --min_seconds="${BENCH_MIN_SECONDS:-0.3}"
bench=$?
tests=0
if [ "${RUN_PYTEST:-0}" = "1" ]; then
  timeout 120 python -m pytest -q -m gpu tests/test_ops_pallas.py -p no:cacheprovider
  tests=$?
fi
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/gpu_check_* benchmarks/results/attention_gpu_* "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check exit ${check}, benchmark exit ${bench}, pytest exit ${tests}"
[ "$check" = 0 ] && [ "$bench" = 0 ] && [ "$tests" = 0 ]
