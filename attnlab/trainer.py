"""The training loop: `train_and_evaluate(config, workdir)`.

One linear function in the big_vision style, importable from notebooks and
tests; `python -m attnlab.train` is its command line.

  1. mesh; the train state placed on it (`train_state.setup`, shared with
     `lower_steps` and `attnlab.loader`)
  2. data iterators (grain)         5. loop: step, NaN guard, log, eval, save
  3. restore from <workdir> or init 6. final checkpoint, close
  4. jitted, donated train / eval steps
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from attnlab import (
  checkpoint,
  data,
  flops,
  metrics,
  optim,
  sharding,
  train_state,
  validate,
  warm_start,
)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


def weighted_sums(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Sums of weighted cross-entropy, correct predictions and weights."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return {"ce": jnp.sum(ce * w), "correct": jnp.sum(correct * w), "weight": jnp.sum(w)}


def layer_statistics(model: nnx.Module) -> dict[str, jax.Array]:
  """Scalars the mixers sowed as nnx.Intermediate during the forward pass,
  named 'layer_<i>/<name>' (e.g. NAtS-L's attention-block fraction)."""
  stats = {}
  scanned = getattr(model, "scan_layers", False)
  for path, value in nnx.to_flat_state(nnx.pop(model, nnx.Intermediate)):
    sown = jnp.asarray(value.get_value() if isinstance(value, nnx.Variable) else value)
    layer = next((p for p in path if isinstance(p, int)), None)
    if scanned and path[0] == "blocks":  # [sows, layers, ...]: split the layer axis
      per_layer = jnp.mean(jnp.moveaxis(sown, 1, 0).reshape(sown.shape[1], -1), axis=1)
      stats.update({f"layer_{i}/{path[-1]}": per_layer[i] for i in range(sown.shape[1])})
    else:
      name = path[-1] if layer is None else f"layer_{layer}/{path[-1]}"
      stats[name] = jnp.mean(sown)
  return stats


def make_steps(config: ConfigDict, graphdef: Any, tx: optax.GradientTransformation):
  """(train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> sums)."""
  accum = config.optim.grad_accum_steps

  def loss_sums(params, batch):
    model = nnx.merge(graphdef, params)
    # Mixers sow statistics only when asked (their state stays fixed otherwise).
    model.set_attributes(collect_statistics=True, raise_if_not_found=False)
    sums = weighted_sums(model(batch["inputs"], batch.get("segment_ids")), batch)
    return sums["ce"], (sums, layer_statistics(model))

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def accumulate(carry, microbatch):
      grads, totals = carry
      (_, aux), g = grad_fn(state["params"], microbatch)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, aux)), None

    microbatches = _microbatches(batch, accum)
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    aux_shape = jax.eval_shape(
      loss_sums, state["params"], jax.tree.map(lambda x: x[0], microbatches)
    )[1]
    totals0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape)
    (grads, (totals, stats)), _ = jax.lax.scan(accumulate, (zeros, totals0), microbatches)
    weight = jnp.maximum(totals["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
    }
    step_metrics = {
      "train/loss": totals["ce"] / weight,
      "train/accuracy": totals["correct"] / weight,
      "train/grad_norm": optax.global_norm(grads),
      "train/lr": optim.learning_rate_schedule(config.optim, config.total_steps)(state["step"]),
      **{f"train/{name}": value / accum for name, value in stats.items()},
    }
    return new_state, step_metrics

  def eval_step(params, batch):
    return loss_sums(params, batch)[1][0]

  return train_step, eval_step


def jit_steps(config: ConfigDict, setup: train_state.Setup) -> tuple[Any, Any]:
  """(train_step, eval_step), jitted for `setup`'s shardings; the train step
  donates its state."""
  train_step, eval_step = make_steps(config, setup.graphdef, setup.tx)
  with setup.context():
    train = jax.jit(train_step, donate_argnums=0, out_shardings=(setup.state_sharding, None))
    return train, jax.jit(eval_step)


def lower_steps(
  config: ConfigDict, devices: Sequence[jax.Device] | None = None
) -> dict[str, jax.stages.Lowered]:
  """Lowers the sharded train and eval steps ahead of time, allocating nothing
  full-size, for `devices` (default: this process's; compile-only TPU devices
  of `jax.experimental.topologies` work too, which `python -m attnlab.plan`
  uses). `.compile().memory_analysis()` then gives the per-device footprint.

  Returns {'train': Lowered, 'eval': Lowered}.
  """
  placed = train_state.setup(config, sharding.make_mesh(dict(config.mesh), devices))
  train, eval_ = jit_steps(config, placed)
  batch_sharding = sharding.batch_sharding(placed.mesh, placed.rules)

  def batch(size):
    keys = [("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32)]
    keys += [("segment_ids", jnp.int32)] if config.data.pack else []
    shape = (size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, t, sharding=batch_sharding) for k, t in keys}

  state = placed.abstract_state
  with placed.context():
    return {
      "train": train.lower(state, batch(config.data.batch_size)),
      "eval": eval_.lower(state["params"], batch(config.data.eval_batch_size)),
    }


def compile_train_step(config: ConfigDict) -> jax.stages.Compiled:
  """The train step of `lower_steps`, compiled for this process's devices."""
  return lower_steps(config)["train"].compile()


def _microbatches(batch: dict, count: int) -> dict:
  """[B, ...] -> [count, B/count, ...] for gradient accumulation."""

  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"batch {x.shape[0]} does not split into {count} microbatches")
    return x.reshape(count, x.shape[0] // count, *x.shape[1:])

  return jax.tree.map(split, batch)


class _StopFlag:
  """Set by SIGTERM (a preempted VM); the loop then checkpoints and exits.

  The handler stays until the final checkpoint is on disk, so a second SIGTERM
  (an impatient user, a scheduler's repeat) cannot kill the process halfway
  through that save; it only says so.
  """

  def __init__(self):
    self.requested = False
    self.signals = 0
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    self.signals += 1
    if self.signals > 1:
      os.write(
        2,
        b"SIGTERM again: finishing the checkpoint first (SIGKILL would leave it unfinished)\n",
      )

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(pending: list[tuple[int, jax.Array]]) -> None:
  """Raises naming the first step whose loss was NaN/Inf; clears `pending`."""
  if not pending:
    return
  values = jax.device_get([loss for _, loss in pending])
  for (step, _), value in zip(pending, values):
    if not np.isfinite(value):
      pending.clear()
      raise NonFiniteLossError(
        f"training loss is {float(value)} at step {step}; stopping. "
        "Lower optim.lr, check the data, or try model.dtype='float32'."
      )
  pending.clear()


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the last logged train and eval metrics.
  """
  workdir = os.path.abspath(workdir)
  validate.check_run(config, workdir)  # bad input fails here, before any compute

  # 1. Mesh, and the train state placed on it (abstract, with its shardings).
  placed = train_state.setup(config, sharding.make_mesh(dict(config.mesh)))
  mesh = placed.mesh
  process_index, process_count = jax.process_index(), jax.process_count()

  # 2. Data: this process's share; the train iterator is checkpointed.
  train_iter = iter(
    data.make_dataset(
      config.data,
      seed=config.seed,
      train=True,
      process_index=process_index,
      process_count=process_count,
    )
  )

  def eval_batches():
    ds = data.make_dataset(
      config.data,
      seed=config.seed,
      train=False,
      process_index=process_index,
      process_count=process_count,
    )
    for i, batch in enumerate(ds):
      if i >= config.eval_batches:
        break
      yield batch

  # 3. Restore from this workdir, or initialise directly sharded.
  writer = metrics.MetricWriter(workdir, total_steps=config.total_steps, progress=config.progress)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, warn=writer.warning)
  latest, state = ckpt.restore_latest(placed.abstract_state, train_iter)
  for line in ckpt.skipped:  # damaged or unfinished checkpoints (also in the absl log)
    writer.message(f"WARNING: {line}")
  if latest is not None:
    writer.message(f"resumed from {ckpt.directory} at step {latest}")
  else:
    state = placed.create(jax.random.key(config.seed))
    if config.init_from:  # a run starting from another's parameters (not on resume)
      state, report = warm_start.load(config, placed, state)
      writer.message(warm_start.describe(report))
      if process_index == 0:
        with open(os.path.join(workdir, warm_start.REPORT_FILE), "w") as f:
          json.dump(report, f, indent=1)
    if process_index == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
  writer.message(f"{placed.num_params:,} parameters; mesh {dict(mesh.shape)}; workdir {workdir}")
  # Model FLOPs per token and the mesh's peak, for train/mfu (see attnlab/flops.py).
  flop_counts = flops.flops_per_token(config, placed.abstract_state["params"])
  peak, peak_source = flops.mesh_peak(mesh.devices.flat, config.model.dtype)
  writer.message(f"{flop_counts['train'] / 1e6:.3f} MFLOP/token (train); peak {peak:.3g} FLOP/s")
  if process_index == 0:
    with open(os.path.join(workdir, "flops.json"), "w") as f:
      json.dump({**flop_counts, "peak_flops": peak, "peak_source": peak_source}, f, indent=1)
  profiler = metrics.StepProfiler(config.profile_steps, os.path.join(workdir, "tensorboard"))

  # 4. Steps.
  train_step, eval_step = jit_steps(config, placed)

  def to_global(local):
    return sharding.global_batch(local, mesh, placed.rules)

  def evaluate(params) -> dict[str, float]:
    totals = {"ce": 0.0, "correct": 0.0, "weight": 0.0}
    for local in eval_batches():
      sums = jax.device_get(eval_step(params, to_global(local)))
      totals = {k: totals[k] + float(sums[k]) for k in totals}
    weight = max(totals["weight"], 1.0)
    return {"eval/loss": totals["ce"] / weight, "eval/accuracy": totals["correct"] / weight}

  # 5. Loop.
  first_step = int(jax.device_get(state["step"]))
  tokens_per_step = config.data.batch_size * config.data.seq_len
  pending: list[tuple[int, jax.Array]] = []
  last = {}
  window_start, window_steps = time.time(), 0
  step = first_step
  saved_step = first_step
  with _StopFlag() as stop:
    try:
      with placed.context():
        for step in range(first_step + 1, config.total_steps + 1):
          profiler.before(step)
          with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, step_metrics = train_step(state, to_global(next(train_iter)))
          if profiler.after(step, state):
            writer.message(f"wrote a profile of steps {config.profile_steps} to {profiler.logdir}")
          pending.append((step, step_metrics["train/loss"]))
          window_steps += 1
          is_last = step == config.total_steps
          if step % config.log_every == 0 or is_last:
            _check_finite(pending)
            last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            elapsed = time.time() - window_start
            last["train/tokens_per_sec"] = tokens_per_step * window_steps / max(elapsed, 1e-9)
            last["train/mfu"] = flops.mfu(flop_counts["train"], last["train/tokens_per_sec"], peak)
            window_start, window_steps = time.time(), 0
            if config.eval_every and (step % config.eval_every == 0 or is_last):
              last.update(evaluate(state["params"]))
              window_start = time.time()  # eval time is not training throughput
            writer.write(step, last)
            writer.show_progress(step, last)
          preempted = stop.requested or (
            process_count > 1 and multihost_utils.reached_preemption_sync_point(step)
          )
          periodic = config.checkpoint_every and step % config.checkpoint_every == 0
          if periodic or is_last or preempted:
            _check_finite(pending)  # never checkpoint a diverged state
            ckpt.save(step, state, train_iter)
            saved_step = step
          if preempted:
            writer.message(
              f"SIGTERM: saved a checkpoint at step {step}; rerun the command to resume"
            )
            break
    finally:
      # 6. Finish: let in-flight async saves land, also when a step raised.
      profiler.close()
      try:
        ckpt.close()
      finally:
        writer.close()
  logging.info("finished at step %d (last checkpoint %d): %s", step, saved_step, json.dumps(last))
  return last
