"""Model FLOPs per token, device peaks and MFU.

Conventions (stated once, used everywhere):

* FLOPs count matmuls only, 2 per multiply-add. Elementwise work (norms,
  activations, exp, gates) is left out, as in the usual 6N rule.
* Dense part: every parameter named `kernel` (projections, MLP, convs) costs
  2 FLOPs per weight per token, plus the LM head's 2·V·d (the tied embedding
  is a matmul there, the embedding lookup is free).
* Mixer part, per layer, per token, forward; T = data.seq_len:
  - softmax family (softmax, ssa, softplus): QKᵀ and AV over the causal half,
    2·H·(T/2)·(d_k + d_v). LUCID adds the key kernel L = exp(k̂k̂ᵀ…) and the
    forward substitution L⁻¹V, again over the causal half: twice softmax.
  - linear attention, chunk C (as computed by the chunked xla form, the intra-
    chunk C×C products dense): 2·C·(d_k + d_v') + 4·d_k·d_v' per head, with
    d_v' = d_v + 1 when the normaliser rides along as a ones column.
  - Gated DeltaNet, chunk C (the chunked WY form): per q/k head KKᵀ and QKᵀ,
    4·C·d_k; per value head U = T·βV, W = T·βK, the C×C inverse (C³/3
    multiply-adds per chunk), the chunk state read and update (three
    d_k×d_v products) and the intra-chunk output: 4·C·d_v + 2·C·d_k +
    6·d_k·d_v + 2·C²/3.
  - NAtS-L: its delta rule on every head and every block (the xla form runs
    both paths and routes with gates) plus causal block-sparse softmax on its
    attention heads counted dense over the causal half.
  - SOFT (m landmarks): Gaussian kernel of q against the landmarks 2·m·d_k,
    the query side P·A⁺ 2·m², linear attention with features m and values
    d_v + 1, and the landmark Gram matrix and Newton inverse (4·iters·m³ per
    step, spread over the step's B·T tokens).
* Training costs 3× the forward (the backward is two matmuls per forward
  matmul); rematerialisation is not counted, so this is MFU, not HFU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from attnlab.models.attention import gated_deltanet, registry
from attnlab.models.transformer import layer_mixers

# Dense bf16 peak FLOP/s of one JAX device (a chip, or a TensorCore on v2/v3),
# matched against `device.device_kind` by the longest matching prefix.
# From the vendors' spec sheets; no sparsity.
PEAK_BF16_FLOPS: dict[str, float] = {
  "TPU v2": 22.5e12,  # per TensorCore (JAX device)
  "TPU v3": 61.5e12,  # per TensorCore (JAX device)
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,  # v6e (Trillium)
  "NVIDIA A100": 312e12,
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H100": 989e12,  # SXM
  "NVIDIA H200": 989e12,
  "NVIDIA GH200": 989e12,
  "NVIDIA B200": 2250e12,
  "NVIDIA L4": 121e12,
}


def _head_dim(model: ConfigDict) -> int:
  return model.head_dim or model.d_model // model.num_heads


def _softmax_family(model: ConfigDict, seq_len: int) -> float:
  d = _head_dim(model)
  return 2.0 * model.num_heads * (seq_len / 2) * (d + d)


def _linear_chunked(heads: int, d_k: int, d_v: int, chunk: int) -> float:
  return heads * (2.0 * chunk * (d_k + d_v) + 4.0 * d_k * d_v)


def _delta_chunked(heads: int, v_heads: int, d_k: int, d_v: int, chunk: int) -> float:
  per_qk_head = 4.0 * chunk * d_k
  per_v_head = 4.0 * chunk * d_v + 2.0 * chunk * d_k + 6.0 * d_k * d_v + 2.0 * chunk**2 / 3
  return heads * per_qk_head + v_heads * per_v_head


def mixer_flops_per_token(name: str, model: ConfigDict, *, seq_len: int, batch: int) -> float:
  """Forward matmul FLOPs of one `name` mixer per token, beyond its projections."""
  options = registry.options(name, model)
  chunk = min(options.get("chunk_size", 64), seq_len)
  if name in ("softmax", "ssa", "softplus"):
    return _softmax_family(model, seq_len)
  if name == "lucid":
    return 2.0 * _softmax_family(model, seq_len)
  if name == "linear":
    d = _head_dim(model)
    return _linear_chunked(model.num_heads, d, d + int(options.normalize), chunk)
  if name == "gated_deltanet":
    heads, d_k, v_heads, d_v = gated_deltanet.head_geometry(model, options)
    return _delta_chunked(heads, v_heads, d_k, d_v, chunk)
  if name == "nats_l":
    delta_options = ConfigDict(dict(options, num_v_heads=0))
    heads, d_k, _, d_v = gated_deltanet.head_geometry(model, delta_options)
    attn_heads = options.num_attn_heads or 2 * heads
    block = min(options.block_size, seq_len)
    a_k, a_v = heads * d_k // attn_heads, heads * d_v // attn_heads
    return _delta_chunked(heads, heads, d_k, d_v, block) + 2.0 * attn_heads * (seq_len / 2) * (
      a_k + a_v
    )
  if name == "soft":
    heads, d, m = model.num_heads, _head_dim(model), options.num_landmarks
    d_v = d + int(options.normalize)
    features = heads * (2.0 * m * d + 2.0 * m * m)
    per_step = heads * (2.0 * m * m * d + 4.0 * options.newton_iters * m**3)
    return features + _linear_chunked(heads, m, d_v, chunk) + per_step / (batch * seq_len)
  raise ValueError(f"no FLOP formula for mixer {name!r}")


def _dense_weights(params: Any) -> int:
  """Weights of every `kernel` leaf (projections, MLP, convs), any stacking."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    if "kernel" in keys:
      total += int(leaf.size)
  return total


def flops_per_token(config: ConfigDict, params: Any) -> dict[str, float]:
  """Model FLOPs per token of `config` with parameters `params` (arrays or
  ShapeDtypeStructs): {'dense', 'lm_head', 'mixer', 'forward', 'train'}."""
  model = config.model
  seq_len, batch = config.data.seq_len, config.data.batch_size
  dense = 2.0 * _dense_weights(params)
  # The tied embedding acts as the LM head; an untied head is already a kernel.
  lm_head = 2.0 * model.vocab_size * model.d_model if model.tie_embeddings else 0.0
  mixer = sum(
    mixer_flops_per_token(name, model, seq_len=seq_len, batch=batch) for name in layer_mixers(model)
  )
  forward = dense + lm_head + mixer
  return {
    "dense": dense,
    "lm_head": lm_head,
    "mixer": mixer,
    "forward": forward,
    "train": 3 * forward,
  }


def table_peak(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of `device_kind`, or None if unknown."""
  matches = [k for k in PEAK_BF16_FLOPS if device_kind.startswith(k)]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def measure_matmul_peak(
  dtype: str = "float32", *, size: int = 512, repeats: int = 5, device: Any = None
) -> float:
  """FLOP/s of the best of `repeats` jitted [size, size] matmuls (a cheap
  stand-in for a CPU's peak: ~0.1 s). Counts 2·size³ per matmul."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)

  @jax.jit
  def chain(x):  # 4 dependent matmuls: amortises dispatch on small sizes
    for _ in range(4):
      x = (x @ a) * (1.0 / size)
    return x

  chain(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 4 * 2.0 * size**3 / best


def device_peak(dtype: str = "bfloat16", device: Any = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where it came from). Accelerators: the
  bf16 table; CPUs and unknown kinds: a measured matmul in `dtype`."""
  device = device or jax.devices()[0]
  peak = table_peak(device.device_kind) if device.platform != "cpu" else None
  if peak is not None:
    return peak, f"table ({device.device_kind}, bf16)"
  return measure_matmul_peak(
    dtype, device=device
  ), f"measured {dtype} matmul ({device.device_kind})"


def mfu(train_flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: achieved training FLOP/s over the peak."""
  return train_flops_per_token * tokens_per_sec / peak_flops


def summary(counts: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v / 1e6:.3f} MFLOP" for k, v in counts.items())


def mesh_peak(devices: Any, dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, its source). A measured CPU peak
  already uses every core of its host, so CPU devices count once per process."""
  devices = list(devices)
  # Measure on a device of this process: another process's devices cannot run our matmul.
  local = [d for d in devices if d.process_index == jax.process_index()] or devices
  peak, source = device_peak(dtype, local[0])
  if devices[0].platform == "cpu":
    count = len({d.process_index for d in devices})
  else:
    count = len(devices)
  return peak * count, f"{count} × {source}"
