"""Device mesh, logical-axis rules and sharding helpers.

Parameters and activations carry logical axis names ('batch', 'embed',
'heads', 'mlp', ...). The config's `sharding_rules` map each name to mesh
axes of the ('data', 'fsdp', 'tensor') mesh, so the same code runs on one CPU
device, on 8 simulated devices and on a pod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (fill the rest).

  When the sizes multiply to fewer than the available devices, the first
  devices are used (handy for single-device tests on a multi-device host).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[unknown[0]] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, only {len(devices)} available"
    )
  return jax.make_mesh(
    tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:total]
  )


def config_rules(config_rules_value: Any) -> Rules:
  """`config.sharding_rules` (lists after a JSON round trip) -> hashable rules."""
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config_rules_value)


def logical_to_spec(logical: Sequence[str | None], rules: Rules) -> P:
  """('batch', 'embed') -> P(('data', 'fsdp'), None) under `rules`.

  A mesh axis is used at most once per array; later names that map to an
  already-used axis are left unsharded.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical:
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of nnx Variables / arrays from their metadata."""
  specs = nnx.get_partition_spec(abstract_tree)
  # Inside `nnx.logical_axis_rules` the specs arrive already translated to
  # mesh axes; mesh axis names therefore map to themselves.
  rules = tuple(rules) + tuple((axis, axis) for axis in mesh.axis_names)

  def to_sharding(abstract, spec):
    # Masked optimizer entries (optax.MaskedNode) hold no arrays; keep them so
    # the result has exactly the structure of `abstract_tree`. (Inside an nnx
    # Variable their spec arrives as None, so the abstract tree leads.)
    if isinstance(abstract, optax.MaskedNode):
      return abstract
    return NamedSharding(mesh, logical_to_spec(() if spec is None else tuple(spec), rules))

  return jax.tree.map(
    to_sharding, abstract_tree, specs, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, time, ...] input array."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global, sharded arrays."""
  return {
    key: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim), value)
    for key, value in local.items()
  }
