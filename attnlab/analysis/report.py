"""Everything measured on a model's layers, as numpy, and its JSON summary.

`analyze_model(model, tokens)` collects every layer's forms and computes the
quantities the plots and the summary need; `summarize` reduces them to a
JSON-ready dict with per-head numbers and headline findings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.analysis import collect as C
from attnlab.analysis import forms as F
from attnlab.analysis import quantities as Q
from attnlab.analysis import taylor as TY

DECAY_EPS = (0.5, 0.1)
ATTENTION_EPS = (0.5, 0.1)
TOPK = (1, 4)
DISTANCES = (4, 16)


@dataclasses.dataclass
class PartResult:
  """The measured quantities of one part of one layer (numpy arrays, per head).

  Attributes:
    kind: 'scalar', 'delta' or 'kernel'.
    state_dim: N·dv per head (inf for kernel forms).
    attention_map: implicit attention of example 0, [heads, T, T] (for LUCID
      the map from raw values).
    eig_range: min and max transition eigenvalue per step of example 0,
      [heads, T−1, 2].
    histogram: {'radius', 'phase'} percentages, [heads, bins].
    decay_curve: median over examples and queries of log‖Φ(t, t−Δ)‖ per lag,
      [heads, T].
    decay_horizon: {ε: [batch, heads, T]} (inf where not reached).
    time_constant: [batch, heads, T−1].
    stats: attention statistics, [batch, heads, T] each (see
      `quantities.attention_stats`).
    mass_by_distance: mean mass within distance D, [heads, T].
    state: {'norm', 'eff_rank'} [batch, heads, T] and 'state_dim', or None.
    taylor: `taylor.taylor_analysis` output or None (softmax kernels only).
  """

  kind: str
  state_dim: float
  attention_map: np.ndarray
  eig_range: np.ndarray
  histogram: dict[str, np.ndarray]
  decay_curve: np.ndarray
  decay_horizon: dict[float, np.ndarray]
  time_constant: np.ndarray
  stats: dict[str, Any]
  mass_by_distance: np.ndarray
  state: dict[str, Any] | None
  taylor: dict[str, np.ndarray] | None


@dataclasses.dataclass
class LayerResult:
  index: int
  variant: str
  errors: dict[str, float]
  parts: dict[str, PartResult]


def _kind(form: F.Form) -> str:
  return {F.ScalarForm: "scalar", F.DeltaForm: "delta", F.KernelForm: "kernel"}[type(form)]


@jax.jit
def _part_arrays(form: F.Form) -> dict:
  m = F.effective_attention(form)
  eigs = Q.transition_eigs(form)
  memory = Q.memory_profile(form, DECAY_EPS)
  decay = memory["log_decay"]
  t = decay.shape[-1]
  stats = Q.attention_stats(m, TOPK, DISTANCES, ATTENTION_EPS)
  a = jnp.abs(m) / jnp.maximum(jnp.abs(m).sum(-1, keepdims=True), 1e-30)
  within = jnp.cumsum(Q.by_lag(a, 0.0), -1)
  # Median over (batch, query) per lag, counting only queries with t ≥ Δ.
  curve = jnp.nanmedian(jnp.moveaxis(decay, 1, 0).reshape(decay.shape[1], -1, t), axis=1)
  return {
    "attention_map": m[0],
    "eig_range": jnp.stack([eigs[0].min(-1), eigs[0].max(-1)], -1),
    "histogram": Q.spectrum_histogram(eigs),
    "decay_curve": curve,
    "decay_horizon": memory["horizon"],
    "time_constant": memory["time_constant"],
    "stats": stats,
    "mass_by_distance": within.mean(axis=(0, 2)),
  }


def analyze_form(form: F.Form, taylor_orders: tuple[int, ...] = TY.EVEN_ORDERS) -> PartResult:
  """All quantities of one form."""
  arrays = jax.tree.map(np.asarray, _part_arrays(form))
  state = Q.state_stats(form)
  taylor = None
  if isinstance(form, F.KernelForm) and form.kernel == "softmax":
    taylor = jax.tree.map(
      np.asarray, jax.jit(TY.taylor_analysis, static_argnums=1)(form, taylor_orders)
    )
  return PartResult(
    kind=_kind(form),
    state_dim=F.state_dim(form),
    state=None if state is None else jax.tree.map(np.asarray, state),
    taylor=taylor,
    **arrays,
  )


def analyze_model(
  model: nnx.Module,
  tokens: jax.Array,
  layers: list[int] | None = None,
  progress=None,
) -> list[LayerResult]:
  """Collects the forms of `layers` (default all) on tokens [B, T] and measures them.

  Args:
    progress: optional callable(message) called as each layer is done.

  Returns:
    One LayerResult per chosen layer.
  """
  captures = C.capture_layers(model, tokens, layers)
  results = []
  for capture in captures:
    parts = {name: analyze_form(form) for name, form in capture.forms.items()}
    errors = {k: float(v) for k, v in capture.errors.items()}
    results.append(LayerResult(capture.index, capture.variant, errors, parts))
    if progress is not None:
      progress(f"layer {capture.index} ({capture.variant}): {', '.join(parts)} analysed")
  return results


# Summary ------------------------------------------------------------------------


def _finite_median(x: np.ndarray) -> float | None:
  """Median, or None when more than half the values are inf (censored)."""
  value = float(np.median(x))
  return value if math.isfinite(value) else None


def _per_head(x: np.ndarray, skip_first: bool = True) -> list[float]:
  """Mean over examples and queries (t ≥ 1 by default) of [B, H, T] -> [H]."""
  x = x[:, :, 1:] if skip_first else x
  return [round(float(v), 6) for v in x.mean(axis=(0, 2))]


def _horizon_summary(horizon: np.ndarray) -> dict:
  """[B, H, T] with inf where censored -> per-head medians and censoring."""
  return {
    "median_per_head": [_finite_median(horizon[:, h]) for h in range(horizon.shape[1])],
    "median": _finite_median(horizon),
    "censored_fraction": float(np.mean(~np.isfinite(horizon))),
  }


def summarize_part(part: PartResult) -> dict:
  """JSON-ready numbers of one part: per-head lists, medians, histograms."""
  stats = part.stats
  radius_labels = Q.histogram_labels(Q.RADIUS_EDGES)
  phase_labels = Q.histogram_labels(Q.PHASE_EDGES_DEG, open_end=False)
  out = {
    "kind": part.kind,
    "state_dim": None if math.isinf(part.state_dim) else part.state_dim,
    "heads": int(part.attention_map.shape[0]),
    "eigenvalue_histogram_percent": {
      "radius_bins": radius_labels,
      "radius": np.round(part.histogram["radius"], 4).tolist(),
      "phase_bins_deg": phase_labels,
      "phase": np.round(part.histogram["phase"], 4).tolist(),
    },
    "decay_horizon": {f"eps={e}": _horizon_summary(h) for e, h in part.decay_horizon.items()},
    "time_constant_median": _finite_median(part.time_constant),
    "attention": {
      "entropy": _per_head(stats["entropy"]),
      "norm_entropy": _per_head(stats["norm_entropy"]),
      "eff_support": _per_head(stats["eff_support"]),
      "participation": _per_head(stats["participation"]),
      **{f"top{k}_mass": _per_head(v) for k, v in stats["topk_mass"].items()},
      "mean_dist": _per_head(stats["mean_dist"]),
      **{f"mass_beyond_{d}": _per_head(v) for d, v in stats["mass_beyond"].items()},
      "sink_mass": _per_head(stats["sink_mass"]),
      "row_sum": _per_head(stats["row_sum"]),
      "neg_mass": _per_head(stats["neg_mass"]),
      **{
        f"horizon_{int(round(100 * (1 - e)))}pct": _horizon_summary(v)
        for e, v in stats["attention_horizon"].items()
      },
    },
    "sink_heads": [bool(s) for s in np.asarray(Q.sink_heads(stats["sink_mass"]))],
  }
  if part.state is not None:
    out["state"] = {
      "final_norm_per_head": _per_head(part.state["norm"][:, :, -1:], skip_first=False),
      "final_eff_rank_per_head": _per_head(part.state["eff_rank"][:, :, -1:], skip_first=False),
    }
  if part.taylor is not None:
    ty = part.taylor
    out["taylor"] = {
      "orders": ty["orders"].tolist(),
      "weight_err_max": [float(v) for v in ty["weight_err"].max(-1)],
      "out_err_max": [float(v) for v in ty["out_err"].max(-1)],
      "remainder_bound_max": [float(v) for v in ty["remainder_bound"].max(-1)],
      "dominant_order_per_head": ty["dominant_order"].tolist(),
      "max_abs_logit_per_head": [float(v) for v in ty["max_abs_logit"]],
    }
  return out


def summarize(results: list[LayerResult]) -> dict:
  """JSON-ready summary with per-layer, per-part numbers and headline findings.

  Findings: the median decay horizon (ε = 0.1, also per head, and the
  half-life) and the median 90%-mass attention horizon per layer and part,
  and the fraction of heads that act as sinks (mean mass on token 0 above
  0.5). A median is null when over half the queries never reach ε within the
  sequence (censored: memory longer than the context).
  """
  layers, decay, half_life, attention_horizon, per_head = [], {}, {}, {}, {}
  sinks = total_heads = 0
  for layer in results:
    parts = {name: summarize_part(part) for name, part in layer.parts.items()}
    layers.append({
      "layer": layer.index,
      "variant": layer.variant,
      "form_max_abs_err": layer.errors,
      "parts": parts,
    })  # fmt: skip
    for name, part in parts.items():
      key = f"layer_{layer.index}/{name}"
      decay[key] = part["decay_horizon"]["eps=0.1"]["median"]
      per_head[key] = part["decay_horizon"]["eps=0.1"]["median_per_head"]
      half_life[key] = part["decay_horizon"]["eps=0.5"]["median"]
      attention_horizon[key] = part["attention"]["horizon_90pct"]["median"]
      sinks += sum(part["sink_heads"])
      total_heads += len(part["sink_heads"])
  return {
    "layers": layers,
    "findings": {
      "median_decay_horizon_eps0.1": decay,
      "median_decay_horizon_eps0.1_per_head": per_head,
      "median_half_life": half_life,
      "median_attention_horizon_90pct": attention_horizon,
      "sink_heads": sinks,
      "heads": total_heads,
      "fraction_sink_heads": sinks / max(total_heads, 1),
    },
  }
