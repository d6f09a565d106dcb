"""Soak run: a long training run watched from outside for leaks and drift.

    python -m benchmarks.soak --attention=softmax --steps=50000
    python -m benchmarks.soak --attention=nats_l --steps=50000
    python -m benchmarks.soak --from_json=benchmarks/results/soak_*.jsonl   # tables only

Trains `configs/tiny.py` as a child process (`python -m attnlab.train`, the
command a user runs) with evaluation every `--eval_every` steps and a
checkpoint every `--checkpoint_every`, and every `--sample_every` steps
records the child's resident memory (VmRSS), its open file descriptors, the
checkpoints on disk and the train step time (from `train/tokens_per_sec`,
which excludes evaluation) to one JSON line, flushed at once. Rerunning the
same command after a crash resumes the run (the trainer resumes from its
workdir) and appends to the same file.

Verdict (`summarize`), over the samples after `--warmup` steps:
- RSS and file descriptors flat: least-squares slope per 10K steps, and the
  rise from the first post-warm-up sample to the last;
- retention: checkpoints on disk never above `keep_checkpoints`, exactly that
  many at the end;
- step time: median of the last five samples against the first five.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from benchmarks import _args

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Pass thresholds: growth a leak would show over 45K steps, but scheduling
# noise on a shared 2-core host would not.
MAX_RSS_RISE_FRACTION = 0.05
MAX_FD_RISE = 2
MAX_STEP_TIME_DRIFT = 0.25


def _proc_rss_mb(pid: int) -> float | None:
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def _proc_fds(pid: int) -> int | None:
  try:
    return len(os.listdir(f"/proc/{pid}/fd"))
  except OSError:
    return None


def _proc_cpu_s(pid: int) -> float | None:
  """User + system CPU seconds of the process so far. Unlike wall time per
  step it hardly moves when other work shares the host, so drift shows in it."""
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _checkpoints_on_disk(workdir: pathlib.Path) -> int:
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return 0
  return sum(1 for p in directory.iterdir() if p.name.isdigit())


def _commit() -> str | None:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _write(path: pathlib.Path, row: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write(json.dumps(row) + "\n")


def soak(args) -> pathlib.Path:
  """Runs (or resumes) the child and samples it until it exits."""
  import jax  # only for the version stamp; the child does the training

  today = datetime.date.today().isoformat()
  name = f"soak_{args.attention}_{today}"
  workdir = pathlib.Path(args.workdir or f"/tmp/attnlab_soak/{name}")
  out = pathlib.Path(args.json or RESULTS / f"{name}.jsonl")
  overrides = {
    "eval_every": args.eval_every,
    "checkpoint_every": args.checkpoint_every,
    "log_every": args.log_every,
    "keep_checkpoints": args.keep,
    "progress": False,
  }
  command = [
    sys.executable, "-m", "attnlab.train",
    f"--config=configs/tiny.py:attention={args.attention},steps={args.steps}",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]  # fmt: skip
  _write(
    out,
    {
      "kind": "settings",
      "date": today,
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "jax": jax.__version__,
      "commit": _commit(),
      "cpus": os.cpu_count(),
      "attention": args.attention,
      "steps": args.steps,
      "warmup": args.warmup,
      "sample_every": args.sample_every,
      "config": "configs/tiny.py (batch 32, seq_len 64, lr 3e-3, seed 0)",
      "overrides": overrides,
      "command": " ".join(command),
    },
  )
  workdir.mkdir(parents=True, exist_ok=True)
  log = (workdir / "soak_child.log").open("a")
  child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  metrics_path = workdir / "metrics.jsonl"
  offset, rows, next_sample = 0, [], None
  start = time.time()
  while True:
    exited = child.poll() is not None
    if metrics_path.exists():
      with metrics_path.open() as f:
        f.seek(offset)
        chunk = f.read()
      complete = chunk[: chunk.rfind("\n") + 1]  # a half-written last line waits
      offset += len(complete.encode())
      rows += [json.loads(line) for line in complete.splitlines() if line.strip()]
    if rows and next_sample is None:  # resumed runs start at their first logged step
      # Offset by a quarter interval: multiples of 500 are evaluation and
      # checkpoint steps, whose threads and files would be counted otherwise.
      offset_steps = args.sample_every // 4
      next_sample = rows[0]["step"] - offset_steps
      next_sample = (next_sample // args.sample_every + 1) * args.sample_every + offset_steps
    while rows and next_sample is not None and rows[-1]["step"] >= next_sample:
      window = [r for r in rows if next_sample - args.sample_every < r["step"] <= next_sample]
      rates = [r["train/tokens_per_sec"] for r in window if "train/tokens_per_sec" in r]
      saved = json.loads((workdir / "config.json").read_text())  # the run's own batch shape
      tokens_per_step = saved["data"]["batch_size"] * saved["data"]["seq_len"]
      _write(
        out,
        {
          "kind": "sample",
          "step": next_sample,
          "wall_s": round(time.time() - start, 1),
          "rss_mb": _proc_rss_mb(child.pid),
          "open_fds": _proc_fds(child.pid),
          "cpu_s": _proc_cpu_s(child.pid),
          "checkpoints_on_disk": _checkpoints_on_disk(workdir),
          "step_ms": round(1e3 * tokens_per_step / float(np.median(rates)), 3) if rates else None,
          "eval_loss": next((r["eval/loss"] for r in reversed(window) if "eval/loss" in r), None),
        },
      )
      rows = [r for r in rows if r["step"] > next_sample]
      next_sample += args.sample_every
    if exited:
      break
    time.sleep(0.5)
  _write(
    out,
    {
      "kind": "end",
      "returncode": child.returncode,
      "checkpoints_on_disk": _checkpoints_on_disk(workdir),
      "wall_s": round(time.time() - start, 1),
    },
  )
  log.close()
  return out


def summarize(rows: list[dict], warmup: int, keep: int) -> dict:
  """The verdict of one soak file's rows (settings, samples, end)."""
  samples = [r for r in rows if r["kind"] == "sample" and r["rss_mb"] is not None]
  after = [r for r in samples if r["step"] >= warmup]
  ends = [r for r in rows if r["kind"] == "end"]
  result = {"samples": len(samples), "last_step": samples[-1]["step"] if samples else None}
  if len(after) < 3:
    return {**result, "verdict": "too few samples after warm-up"}
  steps = np.array([r["step"] for r in after], float)

  def slope(key):  # per 10K steps, least squares
    return float(np.polyfit(steps, np.array([r[key] for r in after], float), 1)[0] * 1e4)

  times = [r["step_ms"] for r in after if r["step_ms"] is not None]
  first, last = float(np.median(times[:5])), float(np.median(times[-5:]))
  # CPU time per step between consecutive samples (evaluation and saves included,
  # which recur at the same rate): the drift check when recorded.
  cpu = [
    1e3 * (b["cpu_s"] - a["cpu_s"]) / (b["step"] - a["step"])
    for a, b in zip(after, after[1:])
    if a.get("cpu_s") is not None and b.get("cpu_s") is not None and b["cpu_s"] >= a["cpu_s"]
  ]
  cpu_first, cpu_last = (
    (float(np.median(cpu[:5])), float(np.median(cpu[-5:]))) if len(cpu) >= 5 else (None, None)
  )
  drift = (cpu_last / cpu_first - 1) if cpu_first else (last / first - 1)

  def floors(key):
    """Minimum of the first and of the last five samples. Leaked memory or
    descriptors stay, so they raise the floor; a save or evaluation in flight
    at a sample (its host buffers, its files) only adds a transient."""
    values = [r[key] for r in after]
    return float(min(values[:5])), float(min(values[-5:]))

  rss0, rss1 = floors("rss_mb")
  fd0, fd1 = floors("open_fds")
  checkpoints = [r["checkpoints_on_disk"] for r in samples]
  final_checkpoints = ends[-1]["checkpoints_on_disk"] if ends else checkpoints[-1]
  checks = {
    "rss_flat": rss1 - rss0 <= MAX_RSS_RISE_FRACTION * rss0,
    "fds_flat": fd1 - fd0 <= MAX_FD_RISE,
    "retention": max(checkpoints) <= keep and final_checkpoints == keep,
    "step_time_steady": abs(drift) <= MAX_STEP_TIME_DRIFT,
  }
  return {
    **result,
    "first_sample_step": samples[0]["step"],
    "rss_mb_first": samples[0]["rss_mb"],
    "rss_mb_last": samples[-1]["rss_mb"],
    "rss_mb_floor_first5_after_warmup": rss0,
    "rss_mb_floor_last5": rss1,
    "rss_mb_max_after_warmup": max(r["rss_mb"] for r in after),
    "rss_slope_mb_per_10k": round(slope("rss_mb"), 3),
    "fds_first": samples[0]["open_fds"],
    "fds_last": samples[-1]["open_fds"],
    "fds_floor_first5_after_warmup": fd0,
    "fds_floor_last5": fd1,
    "fd_slope_per_10k": round(slope("open_fds"), 3),
    "checkpoints_max": max(checkpoints),
    "checkpoints_final": final_checkpoints,
    "step_ms_first5": round(first, 3),
    "step_ms_last5": round(last, 3),
    "step_time_drift": round(last / first - 1, 3),
    "cpu_ms_per_step_first5": None if cpu_first is None else round(cpu_first, 3),
    "cpu_ms_per_step_last5": None if cpu_last is None else round(cpu_last, 3),
    "cpu_time_drift": None if cpu_first is None else round(cpu_last / cpu_first - 1, 3),
    "returncode": ends[-1]["returncode"] if ends else None,
    "checks": checks,
    "verdict": (
      "incomplete (no end row: still running or stopped)"
      if not ends
      else "pass"
      if all(checks.values()) and ends[-1]["returncode"] == 0
      else "fail"
    ),
  }


def markdown(paths: list[pathlib.Path]) -> str:
  """The soak table, generated from the JSON lines files."""
  lines = [
    "| variant | steps | RSS MB first → last sample (slope /10K) | RSS floor MB early → late "
    "| open fds first → last (slope /10K) | fd floor early → late "
    "| checkpoints on disk (max, end; keep) | wall ms/step first → last (drift) "
    "| CPU ms/step first → last (drift) | wall | verdict |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for path in paths:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    settings = next(r for r in rows if r["kind"] == "settings")
    keep = settings["overrides"]["keep_checkpoints"]
    s = summarize(rows, settings["warmup"], keep)
    if "checks" not in s:
      lines.append(f"| {settings['attention']} | {s['last_step']} | {s['verdict']} |||||")
      continue
    wall = sum(r["wall_s"] for r in rows if r["kind"] == "end")
    failed = [k for k, ok in s["checks"].items() if not ok]
    lines.append(
      f"| {settings['attention']} | {s['last_step']:,} "
      f"| {s['rss_mb_first']:.0f} → {s['rss_mb_last']:.0f} ({s['rss_slope_mb_per_10k']:+.2f}) "
      f"| {s['rss_mb_floor_first5_after_warmup']:.0f} → {s['rss_mb_floor_last5']:.0f} "
      f"({s['rss_mb_floor_last5'] / s['rss_mb_floor_first5_after_warmup'] - 1:+.1%}) "
      f"| {s['fds_first']} → {s['fds_last']} ({s['fd_slope_per_10k']:+.2f}) "
      f"| {s['fds_floor_first5_after_warmup']:.0f} → {s['fds_floor_last5']:.0f} "
      f"| {s['checkpoints_max']}, {s['checkpoints_final']}; {keep} "
      f"| {s['step_ms_first5']:.2f} → {s['step_ms_last5']:.2f} ({s['step_time_drift']:+.1%}) "
      + (
        f"| {s['cpu_ms_per_step_first5']:.2f} → {s['cpu_ms_per_step_last5']:.2f} "
        f"({s['cpu_time_drift']:+.1%}) "
        if s["cpu_time_drift"] is not None
        else "| not recorded "
      )
      + f"| {wall / 60:.0f} min | {s['verdict']}{' (' + ', '.join(failed) + ')' if failed else ''} |"
    )
    notes.append(
      f"- {settings['attention']}: {settings['date']}, jax {settings['jax']}, commit "
      f"{settings['commit']}, {settings['cpus']} CPUs; `{settings['command']}`"
    )
  header = (
    "Soak runs (`python -m benchmarks.soak`). Samples every `sample_every` steps, a quarter "
    "interval past each multiple (away from evaluation and checkpoint steps); the first sample is "
    "early in the run. Slopes are least squares over the samples after warm-up, per 10K "
    "steps. The checks compare floors, the minimum of the first and of the last five "
    "post-warm-up samples (a leak raises the floor; a save or evaluation in flight at a sample "
    "only adds a transient): RSS floor rise ≤ 5 %, fd floor rise ≤ 2; checkpoints on disk "
    "never above keep_checkpoints and equal to it at the end; CPU ms per step (or, where not "
    "recorded, wall ms per step, which excludes evaluation) within ±25 % between the first "
    "and last five samples.\n\n"
  )
  return header + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = _args.ArgumentParser(prog="benchmarks.soak", description=__doc__.splitlines()[0])
  parser.add_argument("--attention", default="softmax")
  parser.add_argument("--steps", type=int, default=50_000)
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--checkpoint_every", type=int, default=1_000)
  parser.add_argument("--log_every", type=int, default=100)
  parser.add_argument("--keep", type=int, default=3, help="keep_checkpoints")
  parser.add_argument("--sample_every", type=int, default=1_000)
  parser.add_argument("--warmup", type=int, default=5_000, help="steps before the verdict's span")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--json", default="", help="JSON lines out (default benchmarks/results/)")
  parser.add_argument("--from_json", nargs="*", default=None, help="only write the table")
  parser.add_argument("--md", default="", help="Markdown out (default: beside the JSON)")
  args = parser.parse_args(argv)
  if args.from_json is None:
    for name in ("steps", "eval_every", "checkpoint_every", "log_every", "keep", "sample_every"):
      if getattr(args, name) <= 0:
        parser.error(f"--{name} must be positive")
    paths = [soak(args)]
  else:
    paths = [pathlib.Path(p) for p in args.from_json]
  md = pathlib.Path(args.md or paths[0].with_suffix(".md"))
  md.write_text(markdown(paths))
  print(f"wrote {md}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
