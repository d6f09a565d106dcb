#!/usr/bin/env bash
# Length extrapolation on byte-level Shakespeare: softmax vs LSSA (softplus, power 0)
# vs the same LSSA model evaluated with LSSAR's re-weighting p=15 (no retraining).
# Trained at T=128 (200 steps of 16 sequences, d_model 128, 2 layers, 4 heads, SwiGLU
# 512, lr 1e-3, seed 0), evaluated at T = 128, 512, 1024, 2048 (1x, 4x, 8x, 16x).
# The TFDS copy of the corpus is built under /tmp/tfds (outside the repository).
# A fourth model, LSSAR trained with p=15 (the v4/v5 protocol), is evaluated at p=15.
# The softmax run is shared with experiments/nats_l_shakespeare.
# Usage: bash experiments/length_extrapolation/run.sh
#        STEPS=1000 OUT=runs/experiments/shakespeare_1000 bash ... (longer training)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/experiments/shakespeare}
STEPS=${STEPS:-200}
TOKENS=${TOKENS:-16384}
source experiments/nats_l_shakespeare/common.sh
train softmax
train softplus --config.model.mixer.softplus.power=0.0
NAME=softplus_p15 train softplus --config.model.mixer.softplus.power=15.0
L=128,512,1024,2048
python -m attnlab.evaluate --workdir=$OUT/softmax --seq_lens=$L --tokens=$TOKENS 2>&1 | grep -E "T=|rror"
python -m attnlab.evaluate --workdir=$OUT/softplus --seq_lens=$L --tokens=$TOKENS 2>&1 | grep -E "T=|rror"
python -m attnlab.evaluate --workdir=$OUT/softplus --seq_lens=$L --tokens=$TOKENS \
  --config.model.mixer.softplus.power=15 2>&1 | grep -E "T=|rror"
python -m attnlab.evaluate --workdir=$OUT/softplus_p15 --seq_lens=$L --tokens=$TOKENS 2>&1 | grep -E "T=|rror"
python experiments/length_extrapolation/summarize.py runs/experiments/shakespeare runs/experiments/shakespeare_1000
