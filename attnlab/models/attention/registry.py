"""The one registry of attention variants, by name.

A variant registers its mixer class, whether it uses RoPE by default, its
analysis adapter (how `attnlab.analysis` reads the layer in the common form,
defined next to the mixer), and which of its parameters are exempt from weight
decay or use the temperature learning rate. Its options live in the config
(`config.model.mixer.<name>`, defaults in `attnlab.config.mixer_options`);
`build` checks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx
from ml_collections import ConfigDict

from attnlab import config as config_lib
from attnlab.models.attention.common_form import Adapter


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  mixer_cls: type
  uses_rope: bool
  analysis: Adapter
  no_decay: tuple[str, ...] = ()
  temperature: tuple[str, ...] = ()


_VARIANTS: dict[str, Variant] = {}


def register(
  name: str,
  *,
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
    _VARIANTS[name] = Variant(name, cls, uses_rope, analysis, tuple(no_decay), tuple(temperature))
    return cls

  return wrap


def get(name: str) -> Variant:
  if name not in _VARIANTS:
    raise ValueError(f"unknown attention variant {name!r}; registered: {sorted(_VARIANTS)}")
  return _VARIANTS[name]


def packing_names() -> list[str]:
  """The variants whose mixers keep packed documents apart (`segment_ids`)."""
  return sorted(n for n, v in _VARIANTS.items() if getattr(v.mixer_cls, "supports_segments", False))


def names() -> list[str]:
  return sorted(_VARIANTS)


def no_decay_names() -> frozenset[str]:
  return frozenset(n for v in _VARIANTS.values() for n in v.no_decay)


def temperature_names() -> frozenset[str]:
  """Parameters trained with `optim.temperature_lr` (e.g. SSA's temperatures)."""
  return frozenset(n for v in _VARIANTS.values() for n in v.temperature)


def options(name: str, model: ConfigDict) -> ConfigDict:
  """Variant `name`'s options: `model.mixer.<name>` over the defaults of
  `config.mixer_options` (a config saved before an option existed still
  builds). Unknown option names are an error, not silently ignored."""
  defaults = config_lib.mixer_options()
  if name not in defaults:
    raise ValueError(
      f"attention variant {name!r} has no options in attnlab.config.mixer_options; add them there"
    )
  merged = ConfigDict(defaults[name])
  given = model.mixer[name] if name in model.mixer else {}
  unknown = sorted(set(given) - set(merged))
  if unknown:
    raise ValueError(
      f"model.mixer.{name}: unknown option(s) {unknown}; {name} takes {sorted(merged)}"
    )
  merged.update(dict(given))
  return merged


def build(name: str, model: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """Instantiates variant `name` with the trunk config and its options."""
  variant = get(name)
  use_rope = variant.uses_rope if model.rope is None else bool(model.rope)
  return variant.mixer_cls(model, options(name, model), use_rope=use_rope, rngs=rngs)
