"""Gather runs into one table and one figure.

    python -m attnlab.compare runs/recall            # every run under a sweep workdir
    python -m attnlab.compare runs/a runs/b --out=cmp

A run is a directory holding `metrics.jsonl` (and `config.json`). Writes to
--out (default: the single directory given, else the current one):

  compare.md / compare.csv  one row per run: the config fields that differ
                            between runs, then the final step, final train
                            and eval loss and accuracy, best eval accuracy,
                            median tokens/s and MFU
  compare.png               loss (train solid, eval dashed) and eval accuracy
                            (train if there is no eval) against step, one
                            colour per run, side by side
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from attnlab import config as config_lib
from attnlab import errors

# Fields that differ between runs of one config but say nothing about the run.
_IGNORED = ("progress",)


def find_runs(paths: Sequence[str]) -> list[str]:
  """Run directories: the paths themselves if they hold metrics.jsonl, else
  their subdirectories that do (sorted)."""
  runs = []
  for path in paths:
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
      runs.append(path)
      continue
    if not os.path.isdir(path):
      raise errors.PathError(f"{path!r} is neither a run nor a directory of runs")
    for name in sorted(os.listdir(path)):
      if os.path.exists(os.path.join(path, name, "metrics.jsonl")):
        runs.append(os.path.join(path, name))
  if not runs:
    raise errors.PathError(
      f"no metrics.jsonl under {', '.join(paths)}: give training workdirs or their parent"
    )
  return runs


def read_metrics(run: str) -> list[dict[str, Any]]:
  """metrics.jsonl rows; a resumed run may repeat steps, the last one wins."""
  by_step: dict[int, dict[str, Any]] = {}
  with open(os.path.join(run, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


# One flattening of nested configs, shared with validate's resume check.
flatten = config_lib.flatten


def _config(run: str) -> dict[str, Any]:
  path = os.path.join(run, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return flatten(json.load(f))


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
  values = [r[key] for r in rows if key in r]
  return values[-1] if values else None


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
  # The first logged window holds compilation; leave it out when there are more.
  values = [r[key] for r in rows if key in r]
  values = values[1:] if len(values) > 1 else values
  return statistics.median(values) if values else None


def table(runs: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
  """(columns, rows): differing config fields, then summary metrics."""
  configs = [_config(r) for r in runs]
  keys = sorted({k for c in configs for k in c})
  varied = [
    k
    for k in keys
    if k.split(".")[-1] not in _IGNORED and len({json.dumps(c.get(k)) for c in configs}) > 1
  ]
  rows = []
  for run, config in zip(runs, configs):
    metrics = read_metrics(run)
    evals = [r["eval/accuracy"] for r in metrics if "eval/accuracy" in r]
    rows.append(
      {
        "run": os.path.basename(os.path.normpath(run)),
        **{k: config.get(k) for k in varied},
        "step": metrics[-1]["step"] if metrics else None,
        "train/loss": _last(metrics, "train/loss"),
        "train/accuracy": _last(metrics, "train/accuracy"),
        "eval/loss": _last(metrics, "eval/loss"),
        "eval/accuracy": _last(metrics, "eval/accuracy"),
        "best eval/accuracy": max(evals) if evals else None,
        "tokens/s": _median(metrics, "train/tokens_per_sec"),
        "mfu": _median(metrics, "train/mfu"),
      }
    )
  columns = list(rows[0]) if rows else []
  return columns, rows


def _format(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value)


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_format(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot(runs: Sequence[str], path: str) -> None:
  """Loss and accuracy curves of every run, side by side, to `path` (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
  colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  for i, run in enumerate(runs):
    rows = read_metrics(run)
    name = os.path.basename(os.path.normpath(run))
    colour = colours(i % colours.N)
    for key, style in (("train/loss", "-"), ("eval/loss", "--")):
      points = [(r["step"], r[key]) for r in rows if key in r]
      if points:
        loss_ax.plot(*zip(*points), style, color=colour, label=name if style == "-" else None)
    acc_key = "eval/accuracy" if any("eval/accuracy" in r for r in rows) else "train/accuracy"
    points = [(r["step"], r[acc_key]) for r in rows if acc_key in r]
    if points:
      acc_ax.plot(*zip(*points), marker=".", color=colour, label=name)
  loss_ax.set(xlabel="step", ylabel="loss (train solid, eval dashed)", yscale="log")
  acc_ax.set(xlabel="step", ylabel="eval accuracy", ylim=(0, 1.02))
  acc_ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def compare(paths: Sequence[str], out: str | None = None) -> dict[str, str]:
  """Writes compare.{md,csv,png}; returns their paths."""
  runs = find_runs(paths)
  out = out or (paths[0] if len(paths) == 1 and os.path.isdir(paths[0]) else ".")
  os.makedirs(out, exist_ok=True)
  columns, rows = table(runs)
  written = {k: os.path.join(out, f"compare.{k}") for k in ("md", "csv", "png")}
  with open(written["md"], "w") as f:
    f.write(to_markdown(columns, rows))
  with open(written["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  plot(runs, written["png"])
  return written


def main(argv):
  from absl import flags

  paths = argv[1:]
  if not paths:
    raise errors.UsageError(
      "give runs to compare: python -m attnlab.compare RUN_OR_SWEEP_DIR [...] [--out=DIR]"
    )
  written = compare(paths, flags.FLAGS.out)
  with open(written["md"]) as f:
    print(f.read(), end="")
  print(f"wrote {', '.join(written.values())}")


if __name__ == "__main__":
  from absl import flags

  from attnlab import cli

  flags.DEFINE_string("out", None, "Output directory (default: the one directory given).")
  cli.run(main)
