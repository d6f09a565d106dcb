"""Held-out loss of a trained workdir at other sequence lengths (length
extrapolation), through the parallel form.

    python -m attnlab.evaluate --workdir=runs/shakespeare --seq_lens=256,1024,4096
    python -m attnlab.evaluate --workdir=runs/lssa --config.model.mixer.softplus.power=15

`--config.x.y=value` overrides apply to the run's saved config before the
model is built (e.g. LSSAR's re-weighting on an LSSA-trained model, which the
paper applies without retraining). With overrides the outputs are named
eval_lengths_<override>... so they do not replace the plain evaluation.

Every length sees about `--tokens` held-out tokens. Writes
<workdir>/eval_lengths.json (loss, accuracy and loss by position bucket per
length) and eval_lengths.png (loss against position), and logs a table.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from flax import nnx

from attnlab import cli, data, errors, loader, metrics

_CONFIG: flags.FlagHolder | None = None  # the --config.x.y=value overrides


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module beside another
  command line's flags (tests, notebooks: --workdir, --config) does not collide."""
  global _CONFIG
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_list("seq_lens", ["256", "1024", "4096"], "Lengths to evaluate.")
  flags.register_validator(
    "seq_lens",
    lambda values: all(v.isdigit() and int(v) > 0 for v in values),
    "--seq_lens takes positive integers, e.g. --seq_lens=256,1024",
  )
  flags.DEFINE_integer("tokens", 65_536, "Held-out tokens per length.", lower_bound=1)
  flags.DEFINE_integer("bucket", 128, "Position bucket of the loss curve.", lower_bound=1)
  _CONFIG = cli.define_config_overrides()


def evaluate_length(
  model: nnx.Module, config, *, seq_len: int, tokens: int, bucket: int, on_batch=None
) -> dict:
  """Weighted loss and accuracy over ~`tokens` eval tokens in windows of
  `seq_len`, plus the loss per position bucket [ceil(seq_len / bucket)].
  `on_batch(done, total)`, if given, is called after every batch."""
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.seq_len = seq_len
    data_config.eval_batch_size = max(1, min(config.data.eval_batch_size, tokens // seq_len))
  batches = max(1, tokens // (seq_len * data_config.eval_batch_size))
  graphdef, params = nnx.split(model)

  @jax.jit
  def sums(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch.get("segment_ids"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = jnp.argmax(logits, -1) == batch["targets"]
    w = batch["weights"]
    return jnp.sum(ce * w, 0), jnp.sum(correct * w, 0), jnp.sum(w, 0)  # each [T]

  ce, correct, weight = (np.zeros(seq_len) for _ in range(3))
  dataset = data.make_dataset(data_config, seed=config.seed, train=False)
  for i, batch in enumerate(dataset):
    if i >= batches:
      break
    c, a, w = jax.device_get(sums(params, batch))
    ce, correct, weight = ce + c, correct + a, weight + w
    if on_batch is not None:
      on_batch(i + 1, batches)
  if weight.sum() == 0:
    raise ValueError(f"the eval split has no tokens at seq_len={seq_len}")
  edges = np.arange(0, seq_len, bucket)
  by_bucket = np.add.reduceat(ce, edges) / np.maximum(np.add.reduceat(weight, edges), 1)
  return {
    "seq_len": seq_len,
    "loss": float(ce.sum() / weight.sum()),
    "accuracy": float(correct.sum() / weight.sum()),
    "tokens": int(weight.sum()),
    "bucket": bucket,
    "loss_by_position": by_bucket.tolist(),
  }


def plot(results: list[dict], path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    x = np.arange(len(r["loss_by_position"])) * r["bucket"] + r["bucket"] / 2
    ax.plot(x, r["loss_by_position"], marker=".", label=f"T={r['seq_len']}")
  ax.set(xlabel="position", ylabel="held-out loss (nats/token)", xscale="log", title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = cli.override_values(_CONFIG) if _CONFIG is not None else {}
  model, config, step = loader.load_model(flags.FLAGS.workdir, overrides=overrides)
  results = []
  for seq_len in (int(s) for s in flags.FLAGS.seq_lens):
    progress = metrics.Progress(total=None, label=f"evaluate T={seq_len} batch")

    def on_batch(done, total, progress=progress):
      progress.total = total
      progress.update()

    r = evaluate_length(
      model,
      config,
      seq_len=seq_len,
      tokens=flags.FLAGS.tokens,
      bucket=flags.FLAGS.bucket,
      on_batch=on_batch,
    )
    progress.close()
    logging.info(
      "step %d  T=%5d  loss %.4f  accuracy %.4f  (%d tokens)",
      step,
      seq_len,
      r["loss"],
      r["accuracy"],
      r["tokens"],
    )
    results.append(r)
  suffix = "".join(f"_{key.split('.')[-1]}={value}" for key, value in sorted(overrides.items()))
  out = os.path.join(flags.FLAGS.workdir, "eval_lengths" + suffix)
  summary = {"step": step, "attention": config.model.attention, "overrides": overrides}
  with open(out + ".json", "w") as f:
    json.dump({**summary, "results": results}, f, indent=1)
  title = f"{config.model.attention}{suffix}, trained at T={config.data.seq_len}"
  plot(results, out + ".png", title)
  logging.info("wrote %s.json and %s.png", out, out)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
