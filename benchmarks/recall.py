"""Tiny MQAR and needle-retrieval accuracy of several variants at equal steps.

    python -m benchmarks.recall --steps=600
    python -m benchmarks.recall --variants=softmax --canon=0   # no Canon conv

Each (task, variant) trains configs/tiny.py from scratch in a fresh workdir
under --root; the eval accuracy after every evaluation (each 100 steps) is
tabulated. Writes benchmarks/results/recall_<date>[_canon<k>].{md,json} with
the jax version and device.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pathlib
import shutil
import time

import jax
from absl import app, flags, logging

from attnlab import trainer

_VARIANTS = flags.DEFINE_list(
  "variants",
  ["softmax", "linear", "gated_deltanet", "nats_l", "lucid", "ssa", "softplus", "soft"],
  "Registered variant names.",
)
_TASKS = flags.DEFINE_list("tasks", ["mqar", "needle"], "Synthetic tasks.")
_STEPS = flags.DEFINE_integer("steps", 600, "Train steps per run (equal for all).")
_CANON = flags.DEFINE_integer("canon", 4, "Canon conv width (configs/tiny.py:canon); 0 = none.")
_ROOT = flags.DEFINE_string("root", "/tmp/attnlab_recall", "Parent of the run workdirs.")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Where the tables go.")

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(arg: str):
  spec = importlib.util.spec_from_file_location("tiny", _REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _eval_curve(workdir: str) -> dict[int, float]:
  """{step: eval accuracy} from the run's metrics.jsonl."""
  curve = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval/accuracy" in row:
        curve[row["step"]] = round(row["eval/accuracy"], 4)
  return curve


def main(argv):
  del argv
  rows = []
  for task in _TASKS.value:
    for variant in _VARIANTS.value:
      arg = f"attention={variant},task={task},steps={_STEPS.value},canon={_CANON.value}"
      config = _tiny_config(arg)
      with config.unlocked():
        config.progress = False
      workdir = os.path.join(_ROOT.value, f"{task}_{variant}_canon{_CANON.value}")
      shutil.rmtree(workdir, ignore_errors=True)  # from scratch, never a resume
      start = time.time()
      last = trainer.train_and_evaluate(config, workdir)
      row = dict(
        task=task,
        variant=variant,
        steps=_STEPS.value,
        eval_accuracy=round(float(last["eval/accuracy"]), 4),
        eval_loss=round(float(last["eval/loss"]), 4),
        curve=_eval_curve(workdir),
        seconds=round(time.time() - start, 1),
      )
      logging.info("%s", row)
      rows.append(row)

  date = datetime.date.today().isoformat()
  meta = dict(
    date=date, jax=jax.__version__, device=str(jax.devices()[0].device_kind), canon=_CANON.value
  )
  os.makedirs(_OUT.value, exist_ok=True)
  suffix = "" if _CANON.value == 4 else f"_canon{_CANON.value}"
  stem = os.path.join(_OUT.value, f"recall_{date}{suffix}")
  steps = sorted({step for r in rows for step in r["curve"]})
  with open(stem + ".json", "w") as f:
    json.dump({**meta, "rows": rows}, f, indent=1)
  lines = [
    f"# Tiny recall accuracy ({date}, jax {meta['jax']}, {meta['device']})",
    "",
    f"configs/tiny.py with canon={_CANON.value}; eval accuracy after each step count.",
    "",
    "| task | variant | " + " | ".join(f"step {s}" for s in steps) + " | eval loss | seconds |",
    "|---|---|" + "---|" * len(steps) + "---|---|",
    *(
      f"| {r['task']} | {r['variant']} | "
      + " | ".join(f"{r['curve'].get(s, float('nan')):.3f}" for s in steps)
      + f" | {r['eval_loss']:.3f} | {r['seconds']} |"
      for r in rows
    ),
  ]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  logging.info("wrote %s.md", stem)


if __name__ == "__main__":
  app.run(main)
