"""Read a training workdir's metrics.jsonl (shared by the experiment summaries)."""

from __future__ import annotations

import json
import os


def read(workdir: str) -> list[dict]:
  """Every logged row of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def evals(workdir: str, key: str) -> list[tuple[int, float]]:
  """(step, value) for each row that carries `key` (e.g. 'eval/accuracy')."""
  return [(row["step"], row[key]) for row in read(workdir) if key in row]
