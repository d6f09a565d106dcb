"""The one registry of attention variants, by name.

A variant registers its mixer class with its default options (which become
`config.model.mixer.<name>`), whether it uses RoPE by default, its analysis
adapter (how `attnlab.analysis` reads the layer in the common form, defined
next to the mixer), and which of its parameters are exempt from weight decay
or use the temperature learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx
from ml_collections import ConfigDict

from attnlab.models.attention.common_form import Adapter


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  mixer_cls: type
  options: dict
  uses_rope: bool
  analysis: Adapter
  no_decay: tuple[str, ...] = ()
  temperature: tuple[str, ...] = ()


_VARIANTS: dict[str, Variant] = {}


def register(
  name: str,
  *,
  options: dict,
  uses_rope: bool,
  analysis: Adapter,
  no_decay: tuple[str, ...] = (),
  temperature: tuple[str, ...] = (),
) -> Callable[[type], type]:
  """Class decorator adding a mixer to the registry, with its analysis adapter."""

  def wrap(cls: type) -> type:
    if name in _VARIANTS:
      raise ValueError(f"attention variant {name!r} registered twice")
    if not isinstance(analysis, Adapter):
      raise TypeError(f"attention variant {name!r}: analysis must be a common_form.Adapter")
    _VARIANTS[name] = Variant(
      name, cls, dict(options), uses_rope, analysis, tuple(no_decay), tuple(temperature)
    )
    return cls

  return wrap


def get(name: str) -> Variant:
  if name not in _VARIANTS:
    raise ValueError(f"unknown attention variant {name!r}; registered: {sorted(_VARIANTS)}")
  return _VARIANTS[name]


def names() -> list[str]:
  return sorted(_VARIANTS)


def default_options() -> ConfigDict:
  """{variant name: its options}: the `config.model.mixer` block."""
  return ConfigDict({name: dict(v.options) for name, v in sorted(_VARIANTS.items())})


def no_decay_names() -> frozenset[str]:
  return frozenset(n for v in _VARIANTS.values() for n in v.no_decay)


def temperature_names() -> frozenset[str]:
  """Parameters trained with `optim.temperature_lr` (e.g. SSA's temperatures)."""
  return frozenset(n for v in _VARIANTS.values() for n in v.temperature)


def build(name: str, model: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """Instantiates variant `name` with the trunk config and its options."""
  variant = get(name)
  use_rope = variant.uses_rope if model.rope is None else bool(model.rope)
  options = model.mixer[name] if name in model.mixer else ConfigDict(variant.options)
  return variant.mixer_cls(model, options, use_rope=use_rope, rngs=rngs)
