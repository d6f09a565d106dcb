#!/usr/bin/env bash
# One-call GPU check of every Pallas GPU kernel, safe for one 10-minute device run on a bare
# H200 (jax 0.11.x, Python 3.12; no ml-collections, grain or tfds needed):
#   1. benchmarks/gpu_check.py: each GPU kernel vs the xla path (reference at float32 matmul
#      precision), forward + every gradient, bf16 tolerances: PASS / FAIL / SKIP per case;
#   2. benchmarks/attention.py --mode=gpu: the D=128, T=8K targets first, then an optional
#      block-size sweep (at most half its budget), then T and D against cuDNN / XLA / tokamax;
#   3. benchmarks/gated_delta_gpu.py: Gated DeltaNet fwd+bwd vs fla's Triton kernels, and the
#      crossover against our softmax kernel and cuDNN;
#   4. benchmarks/lucid_nats_l.py --mode=gpu: LUCID and NAtS-L against our softmax kernel;
#   5. benchmarks/kernel_report.py on the device's own compile: registers, spills and stack of
#      every Pallas GPU kernel (D=128, T=8K), to cross-check the deviceless H100 report;
#   6. optionally (RUN_PYTEST=1) the gpu-marked tests, with JAX_PLATFORMS=cuda.
# Timings are device time (many calls in one jitted loop; fla: CUDA events over back-to-back
# calls) with the wall clock of one call beside it, and every kernel is checked against the
# float32 reference at the benchmark shape before it is timed. Baselines: cuDNN, jax's XLA
# attention on bf16, tokamax (its own choice, Triton and Mosaic GPU) and fla's chunk GDN
# where their wheels were carried (benchmarks/fetch_wheels.sh fills .wheels/).
# Every phase has its own time limit (defaults sum to 535 s, under the 600 s of one call);
# each benchmark row is flushed to $OUT (or benchmarks/results/) as a JSON line when it is
# done, and SIGTERM still writes the summaries, so an overrun loses nothing. Wheels in
# .wheels/ (fla, tokamax; carried to a machine without a package index) are installed first.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#   PHASES="check attention" bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
phases="${PHASES:-check attention gdn lucid_nats_l registers}"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
if compgen -G ".wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -2 || true
fi

status=0
phase() {  # phase NAME SECONDS COMMAND...: run one phase under a hard time limit
  local name=$1 limit=$2
  shift 2
  case " $phases " in *" $name "*) ;; *) echo "== $name: not selected"; return ;; esac
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" = 0 ] || status=1
}

phase check "${CHECK_TIMEOUT:-110}" env CHECK_BUDGET="${CHECK_BUDGET:-85}" \
  python3 -m benchmarks.gpu_check
sweep=""
[ "${SWEEP:-1}" = "1" ] && sweep="--sweep"
phase attention "${BENCH_TIMEOUT:-160}" python3 -m benchmarks.attention --mode=gpu ${sweep} \
  --time_budget="${BENCH_BUDGET:-130}" --min_seconds="${BENCH_MIN_SECONDS:-0.2}" \
  --lengths="${BENCH_LENGTHS:-1024,2048,4096,8192,16384,32768}" --dims="${BENCH_DIMS:-128,64}"
[ -f benchmarks/gated_delta_gpu.py ] && phase gdn "${GDN_TIMEOUT:-110}" \
  python3 -m benchmarks.gated_delta_gpu --budget_s="${GDN_BUDGET:-90}"
[ -f benchmarks/lucid_nats_l.py ] && phase lucid_nats_l "${LN_TIMEOUT:-65}" \
  python3 -m benchmarks.lucid_nats_l --mode=gpu --time_budget="${LN_BUDGET:-50}"
phase registers "${REG_TIMEOUT:-90}" python3 -m benchmarks.kernel_report --targets=h100 \
  --seq_lens=8192 --head_dims=128 --no_sass --json="${OUT:-benchmarks/results}/kernel_registers_device.jsonl"
if [ "${RUN_PYTEST:-0}" = "1" ]; then
  phases="$phases pytest"
  phase pytest 120 python3 -m pytest -q -m gpu tests/test_ops_pallas.py -p no:cacheprovider
fi
if [ -n "${OUT:-}" ]; then  # the runner returns at most 8 files: JSON lines + one summary
  cat benchmarks/results/*nvidia*_"$(date -u +%F)".md > "$OUT/gpu_summary.md" 2>/dev/null || true
fi
echo "gpu_check.sh: overall status $status"
exit $status
