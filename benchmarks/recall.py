"""Tiny MQAR and needle-retrieval accuracy of several variants at equal steps.

    python -m benchmarks.recall --variants=softmax,lucid,ssa,softplus,soft --steps=600

Each (task, variant) trains configs/tiny.py from scratch in its own workdir
under --root and the final eval accuracy is tabulated. Writes
benchmarks/results/recall_<date>.{md,json} with the jax version and device.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pathlib
import time

import jax
from absl import app, flags, logging

from attnlab import trainer

_VARIANTS = flags.DEFINE_list("variants", ["softmax", "lucid", "ssa", "softplus", "soft"], "")
_TASKS = flags.DEFINE_list("tasks", ["mqar", "needle"], "Synthetic tasks.")
_STEPS = flags.DEFINE_integer("steps", 600, "Train steps per run (equal for all).")
_ROOT = flags.DEFINE_string("root", "/tmp/attnlab_recall", "Parent of the run workdirs.")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Where the tables go.")

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(arg: str):
  spec = importlib.util.spec_from_file_location("tiny", _REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main(argv):
  del argv
  rows = []
  for task in _TASKS.value:
    for variant in _VARIANTS.value:
      config = _tiny_config(f"attention={variant},task={task},steps={_STEPS.value}")
      with config.unlocked():
        config.progress = False
      start = time.time()
      last = trainer.train_and_evaluate(config, os.path.join(_ROOT.value, f"{task}_{variant}"))
      row = dict(
        task=task,
        variant=variant,
        steps=_STEPS.value,
        eval_accuracy=round(float(last["eval/accuracy"]), 4),
        eval_loss=round(float(last["eval/loss"]), 4),
        seconds=round(time.time() - start, 1),
      )
      logging.info("%s", row)
      rows.append(row)

  date = datetime.date.today().isoformat()
  meta = dict(date=date, jax=jax.__version__, device=str(jax.devices()[0].device_kind))
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"recall_{date}")
  with open(stem + ".json", "w") as f:
    json.dump({**meta, "rows": rows}, f, indent=1)
  lines = [
    f"# Tiny recall accuracy ({date}, jax {meta['jax']}, {meta['device']})",
    "",
    "| task | variant | steps | eval accuracy | eval loss | seconds |",
    "|---|---|---|---|---|---|",
    *(
      f"| {r['task']} | {r['variant']} | {r['steps']} | {r['eval_accuracy']:.3f} | "
      f"{r['eval_loss']:.3f} | {r['seconds']} |"
      for r in rows
    ),
  ]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  logging.info("wrote %s.md", stem)


if __name__ == "__main__":
  app.run(main)
