"""attnlab.sweep and attnlab.compare end to end: a two-run sweep runs,
resumes (skipping finished runs) and is tabulated and plotted."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from attnlab import metrics, sweep

from .conftest import REPO

# Small enough for seconds per run; every run logs, evaluates and checkpoints.
OVERRIDES = [
  "--config.total_steps=4",
  "--config.log_every=2",
  "--config.eval_every=4",
  "--config.eval_batches=1",
  "--config.checkpoint_every=0",
  "--config.data.batch_size=8",
  "--config.data.eval_batch_size=8",
  "--config.data.seq_len=32",
  "--config.data.num_kv_pairs=4",
  "--config.progress=False",
]


def test_product_zip_and_names():
  grid = sweep.product(
    sweep.axis(":task", ["mqar", "needle"]), sweep.axis(":attention", ["a", "b"])
  )
  assert grid == [
    {":task": "mqar", ":attention": "a"},
    {":task": "mqar", ":attention": "b"},
    {":task": "needle", ":attention": "a"},
    {":task": "needle", ":attention": "b"},
  ]
  paired = sweep.zip_(sweep.axis(":attention", ["a", "b"]), sweep.axis("config.optim.lr", [1, 2]))
  assert paired == [
    {":attention": "a", "config.optim.lr": 1},
    {":attention": "b", "config.optim.lr": 2},
  ]
  with pytest.raises(ValueError):
    sweep.zip_(sweep.axis(":a", [1, 2]), sweep.axis(":b", [1]))
  with pytest.raises(ValueError):
    sweep.axis("model.d_model", [1])  # neither ':arg' nor 'config.x'
  assert sweep.run_name(paired[1]) == "attention=b,lr=2"
  args = sweep.train_args("configs/tiny.py:canon=0", paired[1], ["--config.total_steps=3"], "w")
  assert args == [
    "--config=configs/tiny.py:canon=0,attention=b",
    "--config.optim.lr=2",
    "--config.total_steps=3",
    "--workdir=w",
  ]


def test_progress_line():
  stream = io.StringIO()  # not a terminal: one printed line per update
  progress = metrics.Progress(total=4, label="sweep", stream=stream)
  progress.update(run="a")
  progress.message("note")
  progress.update(advance=3, run="b")
  progress.close()
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("sweep 1/4 | run a | ") and " | eta " in lines[0]
  assert lines[1] == "note"
  assert lines[2].startswith("sweep 4/4 | run b | ") and "eta" not in lines[2]
  quiet = io.StringIO()
  metrics.Progress(total=1, label="x", stream=quiet, enabled=False).update()
  assert quiet.getvalue() == ""


def test_shipped_sweeps_load():
  recall = sweep.load_sweep(str(REPO / "sweeps" / "recall.py"))
  assert len(recall) == 16 and {":task", ":attention"} == set(recall[0])
  for name in ("recall_canon0", "softplus_power", "variants_short"):
    assert sweep.load_sweep(str(REPO / "sweeps" / f"{name}.py"))


def _sweep(sweep_file, root, *extra):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "attnlab.sweep",
      "--config=configs/tiny.py",
      f"--sweep={sweep_file}",
      f"--workdir={root}",
      *OVERRIDES,
      *extra,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_sweep_runs_resumes_and_compares(tmp_path):
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(
    "from attnlab.sweep import axis, zip_\n"
    "def get_sweep():\n"
    "  return zip_(axis(':attention', ['softmax', 'linear']), axis('config.seed', [0, 1]))\n"
  )
  root = tmp_path / "runs"
  first = _sweep(sweep_file, root)
  assert first.returncode == 0, first.stderr[-3000:]
  names = ["attention=softmax,seed=0", "attention=linear,seed=1"]
  for name in names:
    assert sweep.is_finished(str(root / name)), name
    saved = json.loads((root / name / "config.json").read_text())
    assert saved["total_steps"] == 4 and saved["model"]["attention"] in name
  rows_before = {n: (root / n / "metrics.jsonl").read_text() for n in names}

  printed = _sweep(sweep_file, root, "--print")
  assert printed.returncode == 0
  assert printed.stdout.count("# finished: python -m attnlab.train") == 2

  again = _sweep(sweep_file, root)  # resumes: everything is finished, nothing trains
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("skipped (finished)") == 2
  assert "attnlab.train" not in again.stderr
  assert {n: (root / n / "metrics.jsonl").read_text() for n in names} == rows_before

  cmp = subprocess.run(
    [sys.executable, "-m", "attnlab.compare", str(root)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert cmp.returncode == 0, cmp.stderr[-3000:]
  with open(root / "compare.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["run"] for r in table] == sorted(names)
  assert {r["model.attention"] for r in table} == {"softmax", "linear"}
  assert {r["seed"] for r in table} == {"0", "1"}
  for r in table:
    last = json.loads((root / r["run"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert r["step"] == "4"
    assert float(r["eval/accuracy"]) == pytest.approx(last["eval/accuracy"])
  md = (root / "compare.md").read_text()
  assert md.count("\n") == 2 + len(names) and "model.attention" in md
  assert os.path.getsize(root / "compare.png") > 10_000
