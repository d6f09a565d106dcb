"""Shared timing and reporting helpers for the benchmarks (jax and numpy only).

Timing follows device practice: compile and warm up first, then take the
median wall time of many runs, each ended by `jax.block_until_ready`, on
random (never all-zero) inputs (`median_s`, wall clock, dispatch and sync
included); and the device time (`device_s`): many dependent calls inside one
jitted loop, so the per-call host overhead is paid once. `seconds` is the
device time where it was measured, and what ratios use.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def time_fn(
  fn: Callable,
  args: Sequence,
  *,
  warmup: int = 3,
  min_runs: int = 10,
  max_runs: int = 200,
  min_seconds: float = 1.0,
  device: bool | None = None,
) -> dict:
  """Seconds per call of `fn(*args)` after compilation and warm-up.

  The wall clock of single calls: at least `min_runs` and until `min_seconds`
  have passed (at most `max_runs`), so fast kernels get many samples and slow
  ones a few (`median_s`, `p10_s`, `p90_s`). With `device` (default: on an
  accelerator; a CPU's dispatch is cheap next to its compute), also the device
  time of `device_time` (`device_s`); `seconds` is the device time, else the
  wall-clock median.
  """
  if device is None:
    device = jax.default_backend() != "cpu"
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples: list[float] = []
  begin = time.perf_counter()
  while len(samples) < max_runs and (
    len(samples) < min_runs or time.perf_counter() - begin < min_seconds
  ):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  result = {
    "median_s": statistics.median(samples),
    "p10_s": float(np.percentile(samples, 10)),
    "p90_s": float(np.percentile(samples, 90)),
    "runs": len(samples),
    "compile_s": compile_s,
  }
  if device:
    result.update(device_time(fn, args, wall_s=result["median_s"]))
  result["seconds"] = result.get("device_s", result["median_s"])
  return result


def device_time(
  fn: Callable, args: Sequence, *, wall_s: float, target_s: float = 0.3, max_calls: int = 200
) -> dict:
  """Seconds per call of `fn(*args)` on the device: `calls` dependent calls in one
  jitted `fori_loop`, timed as one dispatch, so host dispatch and synchronisation
  (about 0.2 ms a call at attention shapes) are paid once, not per call.

  The first floating-point input array carries a perturbation of one element by
  1e-30 × an element of the previous call's output: the calls stay ordered and
  XLA cannot hoist them out of the loop, at the cost of one scalar update a
  call. `wall_s` (the wall-clock time of one call) sizes the loop to about
  `target_s`.
  """
  import jax.numpy as jnp
  from jax import lax

  calls = int(min(max_calls, max(5, np.ceil(target_s / max(wall_s, 1e-6)))))
  leaves, treedef = jax.tree.flatten(tuple(args))
  nudged = next(i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.floating))

  @jax.jit
  def loop(leaves):
    def body(_, carry):
      x, feedback = carry
      x = x.at[(0,) * x.ndim].add((feedback * 1e-30).astype(x.dtype))
      call_args = jax.tree.unflatten(treedef, [*leaves[:nudged], x, *leaves[nudged + 1 :]])
      leaf = jax.tree.leaves(fn(*call_args))[0]
      return x, leaf[(0,) * leaf.ndim].astype(jnp.float32)

    return lax.fori_loop(0, calls, body, (leaves[nudged], jnp.float32(0)))[1]

  jax.block_until_ready(loop(leaves))  # compile
  samples = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(loop(leaves))
    samples.append((time.perf_counter() - start) / calls)
  return {"device_s": min(samples), "device_calls": calls}


def environment() -> dict:
  """Date, device and software versions for the results header."""
  device = jax.devices()[0]
  import jaxlib

  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "platform": device.platform,
    "device": getattr(device, "device_kind", str(device)),
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "python": platform.python_version(),
    "host": platform.machine(),
  }


def fit_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
  """Slope of log(seconds) against log(size): cost ∝ size^slope."""
  slope, _ = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)
  return float(slope)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else ("—" if x is None else str(x))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(stem: str, env: dict, payload: dict, markdown: str) -> tuple[pathlib.Path, ...]:
  """Writes `<stem>_<device>_<date>.{json,md}` under benchmarks/results/."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
  name = f"{stem}_{device}_{env['date'][:10]}"
  json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
  json_path.write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
  header = ", ".join(f"{k} {v}" for k, v in env.items())
  md_path.write_text(f"{markdown.rstrip()}\n\n_{header}_\n")
  return json_path, md_path


class Recorder:
  """Rows of one benchmark, each appended to a JSON-lines file and flushed at
  once, so a run killed by its time limit (SIGTERM) keeps every finished row.

  The file goes to $OUT when it is set (the device runner copies $OUT back)
  and to benchmarks/results/ otherwise. SIGTERM ends the run through
  SystemExit, so `finally` blocks still write the summary.
  """

  def __init__(self, stem: str, env: dict):
    import os
    import signal
    import sys

    folder = pathlib.Path(os.environ.get("OUT") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    self.path = folder / f"{stem}_{device}_{env['date'][:10]}.jsonl"
    self.rows: list[dict] = []
    self._file = self.path.open("a")
    self._write({"environment": env})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

  def _write(self, record: dict) -> None:
    import os

    self._file.write(json.dumps(record, default=str) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def add(self, row: dict) -> dict:
    self.rows.append(row)
    self._write(row)
    return row


class Budget:
  """Seconds left of a phase: `budget.left()`, `budget.over()`."""

  def __init__(self, seconds: float):
    self.seconds, self.start = seconds, time.perf_counter()

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)

  def over(self) -> bool:
    return self.left() <= 0
