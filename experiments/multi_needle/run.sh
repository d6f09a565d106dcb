#!/usr/bin/env bash
# Multi-key needle retrieval (RULER MK/MQ-NIAH style, scaled down), LUCID vs softmax at
# equal size: configs/tiny.py (2 layers, d_model 64, 2 heads, Canon conv), T=64,
# vocab 64 (30 possible keys, 32 values), 6 needles of which 2 are queried at the end
# (the other 4 are distractors), batch 16, seeds 0 1 2. T, NEEDLES and QUERIES override
# the setting (README, setting B: T=256 NEEDLES=16 QUERIES=4).
# Usage: bash experiments/multi_needle/run.sh [variants] [steps] [seeds]
#        T=256 NEEDLES=16 QUERIES=4 bash experiments/multi_needle/run.sh "softmax lucid" 1000
# TAG and EXTRA name and configure an ablation, e.g. the positional encoding swapped:
#        TAG=_rope EXTRA=--config.model.rope=True T=256 ... run.sh lucid 1000
#        TAG=_nope EXTRA=--config.model.rope=False T=256 ... run.sh softmax 1000
set -euo pipefail
cd "$(dirname "$0")/../.."
VARIANTS=${1:-"softmax lucid"}
STEPS=${2:-300}
SEEDS=${3:-"0 1 2"}
T=${T:-64}
NEEDLES=${NEEDLES:-6}
QUERIES=${QUERIES:-2}
if [ "$T:$NEEDLES:$QUERIES" = "64:6:2" ]; then
  OUT=${OUT:-runs/experiments/multi_needle}
else
  OUT=${OUT:-runs/experiments/multi_needle_T${T}_n${NEEDLES}_q${QUERIES}}
fi
for seed in $SEEDS; do
  for v in $VARIANTS; do
    wd=$OUT/${v}${TAG:-}_seed${seed}
    [ -f "$wd/metrics.jsonl" ] && grep -q "\"step\": $STEPS" "$wd/metrics.jsonl" && continue
    python -m attnlab.train --config=configs/tiny.py:attention=$v,task=multi_needle,steps=$STEPS \
      --config.seed=$seed --config.data.seq_len=$T --config.data.num_kv_pairs=$NEEDLES \
      --config.data.num_queries=$QUERIES ${EXTRA:-} --config.data.batch_size=16 --config.checkpoint_every=100000 \
      --workdir=$wd 2>&1 | grep -E "eval|Error|error" || true
  done
done
python experiments/multi_needle/summarize.py runs/experiments/multi_needle runs/experiments/multi_needle_T*
