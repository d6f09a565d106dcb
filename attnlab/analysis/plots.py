"""PNG figures of `report.analyze_model` results (matplotlib, Agg backend).

matplotlib is imported only when a figure is drawn, so nothing else in
attnlab depends on it. Every figure has one row per (layer, part) and one
line or panel per head.
"""

from __future__ import annotations

import os

import numpy as np

from attnlab.analysis import quantities as Q
from attnlab.analysis.report import LayerResult, PartResult


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _rows(results: list[LayerResult], keep=lambda part: True) -> list[tuple[str, PartResult]]:
  return [
    (f"L{layer.index} {layer.variant}" + ("" if name == "main" else f" / {name}"), part)
    for layer in results
    for name, part in layer.parts.items()
    if keep(part)
  ]


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)
  return path


def attention_maps(results: list[LayerResult], outdir: str) -> list[str]:
  """One figure per layer: implicit attention M[t, s] of example 0, per part and head."""
  plt = _pyplot()
  paths = []
  for layer in results:
    parts = list(layer.parts.items())
    heads = max(p.attention_map.shape[0] for _, p in parts)
    fig, axes = plt.subplots(
      len(parts), heads, figsize=(2.6 * heads, 2.6 * len(parts)), squeeze=False
    )
    for row, (name, part) in enumerate(parts):
      for h in range(heads):
        ax = axes[row, h]
        if h >= part.attention_map.shape[0]:
          ax.axis("off")
          continue
        m = part.attention_map[h]
        signed = m.min() < -1e-6 * max(abs(m.max()), 1e-30)
        if signed:
          limit = np.abs(m).max()
          image = ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
          image = ax.imshow(m, cmap="magma", vmin=0.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"{name} h{h}", fontsize=8)
        ax.set_xlabel("key s", fontsize=7)
        ax.set_ylabel("query t", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"Layer {layer.index} ({layer.variant}): implicit attention M[t, s]", fontsize=9)
    paths.append(_save(fig, os.path.join(outdir, f"attention_maps_layer{layer.index}.png")))
  return paths


def eigenvalues(results: list[LayerResult], outdir: str) -> str:
  """Histogram of |λ| per head, and the range of λ_t over time (example 0)."""
  plt = _pyplot()
  rows = _rows(results)
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.8 * len(rows)), squeeze=False)
  labels = Q.histogram_labels(Q.RADIUS_EDGES)
  for row, (name, part) in enumerate(rows):
    ax = axes[row, 0]
    percent = part.histogram["radius"]
    heads = percent.shape[0]
    width = 0.8 / heads
    x = np.arange(len(labels))
    for h in range(heads):
      ax.bar(x + (h - (heads - 1) / 2) * width, percent[h], width, label=f"h{h}")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("% of eigenvalues")
    ax.set_title(f"{name}: |λ| histogram ({part.kind})", fontsize=9)
    ax.legend(fontsize=6, ncol=min(heads, 4))
    ax = axes[row, 1]
    steps = np.arange(1, part.eig_range.shape[1] + 1)
    for h in range(part.eig_range.shape[0]):
      low, high = part.eig_range[h, :, 0], part.eig_range[h, :, 1]
      (line,) = ax.plot(steps, high, lw=1, label=f"h{h}")
      if not np.allclose(low, high):
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    if part.kind == "kernel":
      ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.5, ls=":")
    ax.set_xlabel("step t")
    ax.set_ylabel("λ_t (min–max)")
    ax.set_title(f"{name}: transition eigenvalues, example 0", fontsize=9)
  return _save(fig, os.path.join(outdir, "eigenvalues.png"))


def decay(results: list[LayerResult], outdir: str) -> str:
  """Decay ‖Φ(t, t−Δ)‖ and attention mass within distance Δ, per head."""
  plt = _pyplot()
  rows = _rows(results)
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.8 * len(rows)), squeeze=False)
  for row, (name, part) in enumerate(rows):
    ax = axes[row, 0]
    for h, curve in enumerate(part.decay_curve):
      ax.plot(np.arange(len(curve)), curve / np.log(10), lw=1, label=f"h{h}")
    for eps in (0.5, 0.1):
      ax.axhline(np.log10(eps), color="k", lw=0.5, ls=":")
    ax.set_xlabel("lag Δ")
    ax.set_ylabel("log10 ‖Φ(t, t−Δ)‖ (median)")
    ax.set_title(f"{name}: transition decay", fontsize=9)
    ax.legend(fontsize=6, ncol=min(len(part.decay_curve), 4))
    ax = axes[row, 1]
    for h, curve in enumerate(part.mass_by_distance):
      ax.plot(np.arange(len(curve)), curve, lw=1, label=f"h{h}")
    ax.axhline(0.9, color="k", lw=0.5, ls=":")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, len(part.mass_by_distance[0]))
    ax.set_xlabel("distance D")
    ax.set_ylabel("attention mass within D")
    ax.set_title(f"{name}: memory horizon (mean over queries)", fontsize=9)
  return _save(fig, os.path.join(outdir, "decay_horizon.png"))


_STAT_PANELS = (
  ("norm_entropy", "entropy / log(t+1)"),
  ("sink_mass", "sink mass (token 0)"),
  ("mean_dist", "mean distance t − s"),
  ("top1", "top-1 mass"),
)


def attention_statistics(results: list[LayerResult], outdir: str) -> str:
  """Per-query attention statistics over t (mean over examples), per head."""
  plt = _pyplot()
  rows = _rows(results)
  fig, axes = plt.subplots(
    len(rows), len(_STAT_PANELS), figsize=(13, 2.6 * len(rows)), squeeze=False
  )
  for row, (name, part) in enumerate(rows):
    for col, (key, label) in enumerate(_STAT_PANELS):
      ax = axes[row, col]
      values = part.stats["topk_mass"][1] if key == "top1" else part.stats[key]
      for h, curve in enumerate(values.mean(axis=0)):
        ax.plot(curve, lw=1, label=f"h{h}")
      ax.set_xlabel("query t", fontsize=7)
      ax.set_title(f"{name}: {label}", fontsize=8)
      ax.tick_params(labelsize=6)
    axes[row, 0].legend(fontsize=6)
  return _save(fig, os.path.join(outdir, "attention_stats.png"))


def taylor(results: list[LayerResult], outdir: str) -> str | None:
  """Truncation error of the even-order Taylor expansion and term magnitudes."""
  rows = _rows(results, keep=lambda part: part.taylor is not None)
  if not rows:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.8 * len(rows)), squeeze=False)
  for row, (name, part) in enumerate(rows):
    ty = part.taylor
    ax = axes[row, 0]
    for h in range(ty["out_err"].shape[1]):
      ax.plot(ty["orders"], ty["out_err"][:, h], marker="o", ms=3, lw=1, label=f"output h{h}")
    ax.plot(ty["orders"], ty["weight_err"].max(-1), "k--", lw=1, label="max weight err")
    ax.plot(ty["orders"], ty["remainder_bound"].max(-1), "k:", lw=1, label="remainder bound")
    ax.set_yscale("log")
    ax.set_ylim(1e-8, 1e2)  # the bound is astronomically loose at low orders
    ax.set_xlabel("even order P")
    ax.set_ylabel("error")
    ax.set_title(f"{name}: Taylor truncation error", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[row, 1]
    for h in range(ty["term_mag"].shape[1]):
      ax.plot(ty["term_mag"][:, h], lw=1, label=f"h{h} (peak n={int(ty['dominant_order'][h])})")
    ax.set_yscale("log")
    ax.set_xlabel("term n")
    ax.set_ylabel("mean |sⁿ/n!|")
    ax.set_title(f"{name}: Taylor term magnitudes", fontsize=9)
    ax.legend(fontsize=6)
  return _save(fig, os.path.join(outdir, "taylor_error.png"))


def states(results: list[LayerResult], outdir: str) -> str | None:
  """‖h_t‖_F and the effective rank of the state over t, for finite-state parts."""
  rows = _rows(results, keep=lambda part: part.state is not None)
  if not rows:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.6 * len(rows)), squeeze=False)
  for row, (name, part) in enumerate(rows):
    for col, (key, label) in enumerate((("norm", "‖h_t‖_F"), ("eff_rank", "effective rank"))):
      ax = axes[row, col]
      for h, curve in enumerate(part.state[key].mean(axis=0)):
        ax.plot(curve, lw=1, label=f"h{h}")
      ax.set_xlabel("step t")
      ax.set_title(f"{name}: {label} (N·dv = {part.state_dim:g})", fontsize=9)
    axes[row, 0].legend(fontsize=6)
  return _save(fig, os.path.join(outdir, "state_stats.png"))


def write_all(results: list[LayerResult], outdir: str) -> list[str]:
  """Draws every figure into outdir; returns the written paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = attention_maps(results, outdir)
  for draw in (eigenvalues, decay, attention_statistics, taylor, states):
    path = draw(results, outdir)
    if path is not None:
      paths.append(path)
  return paths
