# Shared by the Shakespeare experiments: `train <variant> [overrides...]` trains one
# small byte-level model at T=128 into $OUT/${NAME:-<variant>} unless it is already done.
# SEED (default 0) seeds the weights and the data order.
DATA_DIR=${DATA_DIR:-/tmp/tfds}
train() {
  local v=$1; shift
  local wd=$OUT/${NAME:-$v}
  [ -f "$wd/metrics.jsonl" ] && grep -q "\"step\": $STEPS" "$wd/metrics.jsonl" && return 0
  python -m attnlab.train --config=configs/shakespeare.py:attention=$v,seq_len=128,steps=$STEPS \
    --config.seed=${SEED:-0} --config.data.data_dir=$DATA_DIR \
    --config.model.d_model=128 --config.model.num_layers=2 --config.model.num_heads=4 \
    --config.model.mlp_dim=512 --config.data.batch_size=16 --config.optim.warmup_steps=100 \
    --config.eval_every=200 --config.checkpoint_every=$STEPS --config.log_every=50 \
    "$@" --workdir=$wd 2>&1 | grep -E "eval|rror" || true
}
