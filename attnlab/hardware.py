"""Accelerator memory per device kind, and TPU slice names.

Used by `python -m attnlab.plan` (does a step fit?); peak FLOP/s for MFU live
in `attnlab.flops`. Figures are the vendors' per-chip datasheet numbers (a
TPU v4/v5p chip has two TensorCores that jax shows as one device).
`device_kind` strings are jax's.
"""

from __future__ import annotations

import dataclasses

from attnlab import errors

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int


CHIPS = {
  "TPU v4": Chip("TPU v4", 32 * GIB),
  "TPU v5 lite": Chip("TPU v5e", 16 * GIB),
  "TPU v5": Chip("TPU v5p", 95 * GIB),
  "TPU v6 lite": Chip("TPU v6e", 32 * GIB),
  "NVIDIA A100-SXM4-80GB": Chip("A100 80GB", 80 * GIB),
  "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 80 * GIB),
  "NVIDIA H200": Chip("H200 SXM", 141 * 10**9),
}

# Cloud slice names count chips (v5e, v6e) or TensorCores (v4, v5p: two per chip).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {
  4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
  512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip


def chip(device_kind: str) -> Chip | None:
  """The chip of a jax `device_kind`, or None when it is not in the table."""
  if device_kind in CHIPS:
    return CHIPS[device_kind]
  matches = [kind for kind in CHIPS if device_kind.startswith(kind)]
  return CHIPS[max(matches, key=len)] if matches else None


def topology_name(slice_name: str) -> str:
  """'v5p-64' -> 'v5p:2x4x4' (32 chips); 'v5e:2x2' passes through unchanged."""
  if ":" in slice_name:
    return slice_name
  generation, _, count = slice_name.partition("-")
  if generation not in _CORES_PER_CHIP or not count.isdigit():
    raise errors.UsageError(
      f"unknown TPU slice {slice_name!r}; use e.g. v5p-64, v5e-16, v6e-8, v4-32, or a "
      "topology such as v5p:2x4x4"
    )
  chips = int(count) // _CORES_PER_CHIP[generation]
  shapes = _3D if generation in ("v4", "v5p") else _2D
  if chips not in shapes:
    raise errors.UsageError(
      f"{slice_name}: {chips} chips is not a slice shape this tool knows; "
      f"known chip counts for {generation}: {sorted(shapes)}"
    )
  return f"{generation}:{shapes[chips]}"
