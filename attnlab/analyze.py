"""RNN / dynamical-systems analysis of a trained workdir.

    python -m attnlab.analyze --workdir=runs/tiny
    python -m attnlab.analyze --workdir=runs/tiny --layers=0,1 --batch=16

Loads the latest checkpoint (or --step), runs a batch of the run's own eval
data through the model, reads every layer's common form out of its mixer and
writes PNG figures and `summary.json` to DIR/analysis/ (or --outdir):

  attention_maps_layer<i>.png  implicit attention M[t, s] per part and head
  eigenvalues.png              |λ| histograms and λ_t over time
  decay_horizon.png            transition decay and attention mass vs distance
  attention_stats.png          entropy, sink mass, distance, top-1 mass per query
  taylor_error.png             even-order Taylor truncation error (softmax kernels)
  state_stats.png              state norm and effective rank (finite states)
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
from absl import flags, logging

from attnlab import cli, data, errors, loader, metrics


def _define_flags() -> None:
  """Flags exist only when run as a program, so importing `run` defines none."""
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_list("layers", None, "Comma-separated layer indices (default: all).")
  flags.register_validator(
    "layers",
    lambda values: values is None or all(v.isdigit() for v in values),
    "--layers takes layer indices, e.g. --layers=0,1",
  )
  flags.DEFINE_integer("batch", 8, "Number of eval sequences to analyse.", lower_bound=1)
  flags.DEFINE_integer("seq_len", None, "Truncate sequences to this length.", lower_bound=1)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
  flags.DEFINE_string("outdir", None, "Output directory (default: DIR/analysis).")


@contextlib.contextmanager
def _quiet():
  """Keeps orbax/grain INFO logs out of the progress messages."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def eval_tokens(config, batch: int, seq_len: int | None = None) -> np.ndarray:
  """The first `batch` sequences of the run's own eval data: [batch, T] int32."""
  if batch < 1:
    raise ValueError(f"--batch must be positive, got {batch}")
  rows, total = [], 0
  for example in data.make_dataset(config.data, seed=config.seed, train=False):
    rows.append(np.asarray(example["inputs"]))
    total += len(rows[-1])
    if total >= batch:
      break
  tokens = np.concatenate(rows)[:batch]
  return tokens if seq_len is None else tokens[:, :seq_len]


def run(
  workdir: str,
  *,
  layers: list[int] | None = None,
  batch: int = 8,
  seq_len: int | None = None,
  step: int | None = None,
  outdir: str | None = None,
) -> dict:
  """Analyses `workdir`; returns the summary also written to outdir/summary.json."""
  from attnlab.analysis import plots, report  # plots pulls in matplotlib

  outdir = outdir or os.path.join(workdir, "analysis")
  start = time.time()
  num_layers = loader.load_config(workdir).model.num_layers  # bad input fails before loading
  if any(not 0 <= i < num_layers for i in layers or ()):
    raise errors.UsageError(
      f"--layers={','.join(map(str, layers))}: the model has layers 0..{num_layers - 1}"
    )
  with _quiet():
    model, config, step = loader.load_model(workdir, step)
    tokens = eval_tokens(config, batch, seq_len)
  logging.info(
    "loaded %s at step %d, %d layers; analysing %d eval sequences of length %d",
    workdir,
    step,
    model.num_layers,
    *tokens.shape,
  )
  line = metrics.Progress(total=len(layers) if layers else model.num_layers, label="analyze layer")
  results = report.analyze_model(
    model, tokens, layers, progress=lambda message: line.update(done=message)
  )
  line.close()
  if not results:
    raise ValueError(f"nothing to analyse in {workdir}: no layers chosen")
  summary = {
    "workdir": os.path.abspath(workdir),
    "step": step,
    "batch": int(tokens.shape[0]),
    "seq_len": int(tokens.shape[1]),
    **report.summarize(results),
  }
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("drawing figures")
  paths = plots.write_all(results, outdir)
  logging.info(
    "wrote summary.json and %d figures to %s in %.1fs", len(paths), outdir, time.time() - start
  )
  return summary


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  layers = None if f.layers is None else [int(i) for i in f.layers]
  summary = run(
    f.workdir, layers=layers, batch=f.batch, seq_len=f.seq_len, step=f.step, outdir=f.outdir
  )
  findings = summary["findings"]
  logging.info(
    "median decay horizon (eps=0.1) per head, None = beyond the sequence: %s",
    findings["median_decay_horizon_eps0.1_per_head"],
  )
  logging.info("median 90%% attention horizon: %s", findings["median_attention_horizon_90pct"])
  logging.info(
    "sink heads: %d of %d (%.0f%%)",
    findings["sink_heads"],
    findings["heads"],
    100 * findings["fraction_sink_heads"],
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
