"""Collect run.sh's runs into results.json, README.md's table and init_from.png.

python experiments/init_from_softmax/summarize.py runs/experiments/init_from_seed0 [more seeds]

The table is generated from results.json only (`python summarize.py --table` rewrites
it without the runs).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE_START, TABLE_END = "<!-- table -->", "<!-- /table -->"


def _run(workdir: str) -> dict | None:
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return None
  rows = _metrics.read(workdir)
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  if not evals:
    return None
  config = json.load(open(os.path.join(workdir, "config.json")))
  return {
    "settings": {
      "seed": config.get("seed"),
      "steps": config.get("total_steps"),
      "batch": config["data"]["batch_size"],
      "seq_len": config["data"]["seq_len"],
      "lr": config["optim"]["lr"],
      "d_model": config["model"]["d_model"],
      "num_layers": config["model"]["num_layers"],
      "init_from": config.get("init_from", ""),
    },
    "eval_loss": evals,
    "train_loss": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
    "final_eval_loss": evals[-1][1],
  }


def _commit(seed_dir: str) -> str:
  """The code a seed's runs used (run.sh writes commit.txt before training)."""
  path = os.path.join(seed_dir, "commit.txt")
  if os.path.exists(path):
    return open(path).read().strip()
  return "unknown"


def collect(seed_dirs: list[str]) -> dict:
  import jax

  out = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "runs": {}}
  for seed_dir in seed_dirs:
    for name in sorted(os.listdir(seed_dir)):
      run = _run(os.path.join(seed_dir, name))
      if run is not None:
        run["settings"]["commit"] = _commit(seed_dir)
        out["runs"][f"{os.path.basename(seed_dir)}/{name}"] = run
  return out


def table(results: dict) -> str:
  """Final eval loss per variant: from scratch, from softmax, and the difference."""
  runs = results["runs"]
  pre = {k: r for k, r in runs.items() if k.endswith("/softmax_pretrained")}
  commits = sorted({r["settings"]["commit"] for r in runs.values()})
  lines = [
    f"Generated from results.json (date {results['date']}, jax {results['jax']}, "
    f"code {'; '.join(commits)}).",
    "",
  ]
  for key, r in sorted(pre.items()):
    lines.append(
      f"Softmax source `{key}`: {r['settings']['steps']} steps, final eval loss "
      f"{r['final_eval_loss']:.3f}."
    )
  lines += ["", "| seed | variant | steps | from scratch | from softmax | difference |",
            "|---|---|---|---|---|---|"]  # fmt: skip
  for key in sorted(runs):
    seed, name = key.split("/")
    if not name.endswith("_scratch"):
      continue
    variant = name[: -len("_scratch")]
    other = runs.get(f"{seed}/{variant}_from_softmax")
    scratch = runs[key]["final_eval_loss"]
    if other is None:
      lines.append(f"| {seed} | {variant} | {runs[key]['settings']['steps']} | {scratch:.3f} | "
                   "not run | |")  # fmt: skip
      continue
    warm = other["final_eval_loss"]
    lines.append(
      f"| {seed} | {variant} | {runs[key]['settings']['steps']} | {scratch:.3f} | {warm:.3f} | "
      f"{warm - scratch:+.3f} |"
    )
  return "\n".join(lines)


def write_table(results: dict) -> None:
  path = os.path.join(HERE, "README.md")
  text = open(path).read()
  head, rest = text.split(TABLE_START)
  _, tail = rest.split(TABLE_END)
  open(path, "w").write(f"{head}{TABLE_START}\n{table(results)}\n{TABLE_END}{tail}")


def plot(results: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = results["runs"]
  variants = sorted({k.split("/")[1][: -len("_scratch")] for k in runs if k.endswith("_scratch")})
  fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(4 * max(1, len(variants)), 3.2))
  axes = axes if len(variants) > 1 else [axes]
  for ax, variant in zip(axes, variants):
    for key, r in sorted(runs.items()):
      name = key.split("/")[1]
      if name.startswith(variant + "_"):
        style = "-" if name.endswith("from_softmax") else "--"
        steps, losses = zip(*r["train_loss"])
        ax.plot(steps, losses, style, label=f"{key.split('/')[0]} {name[len(variant) + 1 :]}")
    ax.set_title(variant)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "init_from.png"), dpi=110)


def main(argv: list[str]) -> None:
  path = os.path.join(HERE, "results.json")
  if argv[1:] == ["--table"]:
    write_table(json.load(open(path)))
    return
  results = collect(argv[1:])
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  write_table(results)
  plot(results)


if __name__ == "__main__":
  main(sys.argv)
