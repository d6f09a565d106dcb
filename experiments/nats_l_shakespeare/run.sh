#!/usr/bin/env bash
# NAtS-L against softmax and Gated DeltaNet on byte-level Shakespeare, same trunk as
# experiments/length_extrapolation (T=128, 200 steps, d_model 128, 2 layers, seed 0).
# NAtS-L routes each block of 16 tokens per head to softmax or the delta rule; the
# attention-block fraction it learns is read from its training metrics.
# Usage: bash experiments/nats_l_shakespeare/run.sh; SEED=1 bash ... for another seed
# (seed 0 goes to runs/experiments/shakespeare, shared with length_extrapolation; seed s
# to runs/experiments/shakespeare_seed<s>). The summary covers every seed run so far.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEED=${SEED:-0}
if [ "$SEED" = 0 ]; then OUT=${OUT:-runs/experiments/shakespeare}; else OUT=${OUT:-runs/experiments/shakespeare_seed$SEED}; fi
STEPS=${STEPS:-200}
source experiments/nats_l_shakespeare/common.sh
train softmax
train nats_l --config.model.mixer.nats_l.block_size=16
train gated_deltanet
python experiments/nats_l_shakespeare/summarize.py runs/experiments/shakespeare runs/experiments/shakespeare_seed*
