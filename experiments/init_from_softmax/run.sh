#!/usr/bin/env bash
# Start a variant from a trained softmax model (--config.init_from) against training it from
# scratch for the same steps, on byte-level Shakespeare with the trunk of
# experiments/nats_l_shakespeare (T=128, d_model 128, 2 layers, batch 16; common.sh).
# 1. softmax trained for PRE steps (default 400);
# 2. each variant trained for STEPS steps (default 200) twice, from scratch and with
#    --config.init_from=<the softmax run>, same seed and data order.
# Usage: bash experiments/init_from_softmax/run.sh; SEED=1 bash ... for another seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEED=${SEED:-0}
OUT=${OUT:-runs/experiments/init_from_seed$SEED}
PRE=${PRE:-400}
FINETUNE=${FINETUNE:-200}
VARIANTS=${VARIANTS:-"lucid ssa softplus gated_deltanet"}
source experiments/nats_l_shakespeare/common.sh
mkdir -p "$OUT"
[ -f "$OUT/commit.txt" ] || git describe --always --dirty > "$OUT/commit.txt"  # the code these runs use
STEPS=$PRE NAME=softmax_pretrained train softmax
for v in $VARIANTS; do
  STEPS=$FINETUNE NAME=${v}_scratch train "$v"
  STEPS=$FINETUNE NAME=${v}_from_softmax train "$v" --config.init_from=$OUT/softmax_pretrained
done
python experiments/init_from_softmax/summarize.py runs/experiments/init_from_seed*
