#!/usr/bin/env bash
# Zoology MQAR (Arora et al., 2023, Figure 2), scaled down for a shared 2-core CPU:
# configs/tiny.py (2 layers, 2 heads, Canon conv) at d_model D=64, one seed (0) each.
# Zoology sweeps (T, pairs) = (64,4) (128,8) (256,16) at vocab 8192. Here SETTINGS
# (default T=64 with 4 and 16 pairs) and VOCAB=64, 300 steps: the CPU gave ~3k tokens/s
# under load, and at VOCAB=512 softmax was still at 0.155 accuracy after 200 steps.
# TOKENS_PER_STEP (if set) fixes batch x T, so every setting sees the same number of
# tokens (and, with pairs proportional to T, of key-value pairs) per step.
# TAG names a variant's run apart, EXTRA adds overrides: e.g. TAG=_3000steps for a longer
# run, or TAG=_nope EXTRA=--config.model.rope=False for softmax without RoPE.
# Usage: bash experiments/zoology_mqar/run.sh [variants] [steps]
#   e.g. bash experiments/zoology_mqar/run.sh "softmax linear gated_deltanet lucid nats_l" 300
#   Zoology's grid at vocab 8192 (README, grid B):
#   SETTINGS="64:4 128:8 256:16" VOCAB=8192 TOKENS_PER_STEP=2048 \
#     bash experiments/zoology_mqar/run.sh "softmax lucid gated_deltanet nats_l linear" 1200
set -euo pipefail
cd "$(dirname "$0")/../.."
VARIANTS=${1:-"softmax linear gated_deltanet"}
STEPS=${2:-300}
SETTINGS=${SETTINGS:-"64:4 64:16"}
VOCAB=${VOCAB:-64}
D=${D:-64}
OUT=${OUT:-runs/experiments/zoology_mqar}
for setting in $SETTINGS; do
  T=${setting%:*}; P=${setting#*:}
  for v in $VARIANTS; do
    wd=$OUT/${v}${TAG:-}_T${T}_P${P}_d${D}_v${VOCAB}
    batch=()
    [ -n "${TOKENS_PER_STEP:-}" ] && batch=(--config.data.batch_size=$((TOKENS_PER_STEP / T)))
    [ -f "$wd/metrics.jsonl" ] && grep -q "\"step\": $STEPS" "$wd/metrics.jsonl" && continue
    python -m attnlab.train --config=configs/tiny.py:attention=$v,task=mqar,steps=$STEPS \
      --config.data.vocab_size=$VOCAB \
      --config.data.seq_len=$T --config.data.num_kv_pairs=$P \
      --config.model.d_model=$D --config.model.mlp_dim=$((2 * D)) \
      "${batch[@]}" ${EXTRA:-} --config.checkpoint_every=100000 --workdir=$wd 2>&1 | grep -E "eval|Error|error" || true
  done
done
python experiments/zoology_mqar/summarize.py "$OUT" "$D" "$VOCAB"
