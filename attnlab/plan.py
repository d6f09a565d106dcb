"""Does a config compile and fit on a TPU slice? Answered on a CPU host.

    python -m attnlab.plan --config=configs/lucid_1b.py --topology=v5p-64
    python -m attnlab.plan --config=configs/softmax_1b.py --topology=v5e-16 \
        --config.optim.grad_accum_steps=4 --json

Compiles the full sharded train step and the eval step with the real TPU
compiler (libtpu, `pip install "jax[tpu]"`; compile-only devices from
`jax.experimental.topologies`, so no TPU is needed) and reports per device:
parameters + optimizer state, temporaries and their total against the chip's
HBM; model FLOPs and tokens per step; compile seconds; the mesh; and how many
Pallas (Mosaic) kernels the step calls, so a silent fall-back to the XLA
attention path shows. Exits 1 with suggestions when the step does not compile
or does not fit.

Model FLOPs come from `attnlab.flops` (the layer shapes), not from XLA's
cost analysis, which counts a scanned layer once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# libtpu locks itself to one process unless told otherwise; a compile-only
# plan may run beside tests or another plan.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from attnlab import cli, errors  # noqa: E402

GIB = 1024**3


def _define_flags() -> None:
  """The command line's flags; defined only when run as a program, so importing
  `attnlab.plan` beside another command line's own --config flag does not collide."""
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with :key=value,... arguments.", lock_config=True
  )
  flags.DEFINE_string(
    "topology", "v5p-64", "TPU slice (v5p-64, v5e-16, v6e-8, v4-32) or topology (v5p:2x4x4)."
  )
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
  flags.DEFINE_bool("eval", True, "Also compile the eval step.")


def _footprint(compiled) -> dict[str, float]:
  """Per-device bytes of a compiled step, in GiB. Donated outputs alias
  their inputs, so only the rest of the outputs adds to the total."""
  m = compiled.memory_analysis()
  extra_out = max(0, m.output_size_in_bytes - m.alias_size_in_bytes)
  total = m.argument_size_in_bytes + m.temp_size_in_bytes + extra_out
  return {
    "arguments_gib": m.argument_size_in_bytes / GIB,
    "temporaries_gib": m.temp_size_in_bytes / GIB,
    "total_gib": total / GIB,
    # Share of the outputs written in place of donated inputs (the train state).
    "donated_fraction": m.alias_size_in_bytes / max(m.output_size_in_bytes, 1),
  }


def _suggestions(config: ConfigDict, report: dict[str, Any]) -> list[str]:
  tips = []
  accum = config.optim.grad_accum_steps
  train = report.get("train", {"temporaries_gib": 1, "arguments_gib": 0})  # failed: say all
  if train["temporaries_gib"] > train["arguments_gib"]:
    tips.append(
      f"activations dominate: --config.optim.grad_accum_steps={2 * accum} (halves the "
      "microbatch), or a larger slice"
    )
    if not config.model.remat:
      tips.append("--config.model.remat=True recomputes each block's activations")
  else:
    tips.append(
      "state dominates: shard it over more devices (--config.mesh.fsdp=-1, a larger slice)"
    )
  tips.append("a smaller --config.data.batch_size or --config.data.seq_len")
  return tips


def plan(config: ConfigDict, topology: str, *, with_eval: bool = True) -> dict[str, Any]:
  """Compiles `config`'s steps for one TPU slice; returns the report (GiB per device)."""
  import jax
  from flax import nnx
  from jax.experimental import topologies

  from attnlab import flops, hardware, sharding, trainer
  from attnlab.models.transformer import build_model

  name = hardware.topology_name(topology)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  chip = hardware.chip(devices[0].device_kind)
  report: dict[str, Any] = {
    "topology": name,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "hbm_gib": None if chip is None else chip.hbm_bytes / GIB,
  }
  start = time.perf_counter()
  lowered = trainer.lower_steps(config, devices)
  report["mesh"] = dict(sharding.make_mesh(dict(config.mesh), devices).shape)
  for step in ("train", "eval") if with_eval else ("train",):
    begin = time.perf_counter()
    text = lowered[step].as_text()
    compiled = lowered[step].compile()
    report[step] = {
      **_footprint(compiled),
      "compile_s": time.perf_counter() - begin,
      "pallas_kernels": text.count("tpu_custom_call"),
    }
  report["seconds"] = time.perf_counter() - start
  params = nnx.state(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))
  per_token = flops.flops_per_token(config, params)
  tokens = config.data.batch_size * config.data.seq_len
  report["tokens_per_step"] = tokens
  report["train_flops_per_step"] = per_token["train"] * tokens
  report["train_flops_per_step_per_device"] = per_token["train"] * tokens / len(devices)
  peak = flops.table_peak(devices[0].device_kind)
  if peak is not None:  # seconds per step at 100% MFU: a floor
    report["ideal_step_s"] = report["train_flops_per_step_per_device"] / peak
  report["fits"] = chip is not None and report["train"]["total_gib"] <= report["hbm_gib"]
  report["jax"] = jax.__version__
  return report


def format_report(report: dict[str, Any]) -> str:
  hbm = report["hbm_gib"]
  lines = [
    f"{report['topology']}: {report['devices']} × {report['device_kind']} "
    f"({'?' if hbm is None else f'{hbm:.0f}'} GiB HBM each); mesh {report['mesh']}",
  ]
  for step in ("train", "eval"):
    if step in report:
      r = report[step]
      lines.append(
        f"  {step:5s} per device: state+inputs {r['arguments_gib']:7.2f} GiB, temporaries "
        f"{r['temporaries_gib']:7.2f} GiB, total {r['total_gib']:7.2f} GiB; compiled in "
        f"{r['compile_s']:.0f} s; {r['pallas_kernels']} Pallas kernel calls"
      )
  lines.append(
    f"  {report['tokens_per_step']:,} tokens and {report['train_flops_per_step']:.3g} model "
    f"FLOPs per train step ({report['train_flops_per_step_per_device']:.3g} per device"
    + (
      f"; ≥ {report['ideal_step_s']:.2f} s per step at 100% MFU)"
      if "ideal_step_s" in report
      else ")"
    )
  )
  lines.append("  FITS" if report["fits"] else "  DOES NOT FIT")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  from attnlab import hardware, validate

  f = flags.FLAGS
  config = cli.config_file_value(flags.FlagHolder(f, f["config"]))
  topology, as_json = f.topology, f.json
  hardware.topology_name(topology)  # an unknown slice is a usage error, before any compile
  validate.check_sizes(config)
  validate.check_model(config.model)
  try:
    report = plan(config, topology, with_eval=f.eval)
  except errors.UsageError:
    raise
  except Exception as error:  # noqa: BLE001 - a failed compile is the answer, not a crash
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    report = {"topology": topology, "fits": False, "error": message}
    # The TPU compiler itself refuses a program that cannot fit (RESOURCE_EXHAUSTED).
    verdict = "does not fit on" if "RESOURCE_EXHAUSTED" in message else "does not compile for"
    print(json.dumps(report) if as_json else f"{verdict} {topology}: {message}")
    for tip in _suggestions(config, report):
      print(f"  try: {tip}", file=sys.stderr)
    sys.exit(1)
  if as_json:
    print(json.dumps(report, indent=2))
  else:
    print(format_report(report))
  if not report["fits"]:
    for tip in _suggestions(config, report):
      print(f"  try: {tip}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("config")
  cli.run(main)
