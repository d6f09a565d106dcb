"""The common (dynamical-systems) form of an attention layer, and the analysis
adapter every variant registers with it.

Every mixer is read as an input-dependent linear recurrence (the Dynamical
Systems Framework, Sieber et al., 2024) per head,

    h_t = Λ_t h_{t−1} + b_t u_tᵀ,      y_t = h_tᵀ c_t,      h_{−1} = 0,

or, for the softmax family, as its implicit attention matrix. Three form
types cover the registered variants: `ScalarForm`, `DeltaForm` and
`KernelForm`. Arrays are head-major: [batch, heads, time, ...].

The containers live here, below the analysis, because each variant builds
its own forms next to its mixer (`Adapter`, passed to `registry.register`);
`attnlab.analysis` runs and measures them and re-exports these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

Array = jax.Array


@struct.dataclass
class ScalarForm:
  """h_t = λ_t h_{t−1} + b_t u_tᵀ, y_t = h_tᵀ c_t with a scalar or diagonal λ_t.

  Attributes:
    log_lam: log|λ_t|, [batch, heads, time] (scalar) or [batch, heads, time, N]
      (diagonal). Entry 0 acts on h_{−1} = 0 and never matters.
    b: input vectors [batch, heads, time, N].
    c: readout vectors [batch, heads, time, N].
    u: values [batch, heads, time, dv].
    sign: sign of λ_t (same shape as log_lam) or None when λ_t > 0.
  """

  log_lam: Array
  b: Array
  c: Array
  u: Array
  sign: Array | None = None


@struct.dataclass
class DeltaForm:
  """Gated delta rule: Λ_t = α_t (I − β_t k_t k_tᵀ) on the key dim, b_t = β_t k_t.

  Without `reset` (Gated DeltaNet): S_t = Λ_t S_{t−1} + β_t k_t u_tᵀ,
  y_t = S_tᵀ c_t. With `reset` (NAtS-L) the state is the direct sum (P, R):

      P_t = α_t (I − m_t β_t k_t k_tᵀ) P_{t−1} + m_t β_t k_t u_tᵀ
      R_t = Λ_t (P_{t−1} if reset_t else R_{t−1}) + β_t k_t u_tᵀ,   y_t = R_tᵀ c_t

  Attributes:
    log_alpha: log decay g_t = log α_t, [batch, heads, time].
    beta: [batch, heads, time].
    k: keys [batch, heads, time, dk] (L2-normalised by the layer).
    c: readout, the scaled query, [batch, heads, time, dk].
    u: values [batch, heads, time, dv].
    write: m_t ∈ {0, 1}, the persistent state's write gate [batch, heads, time],
      or None (always 1).
    reset: [time] bool, True at the first token of every block, or None.
  """

  log_alpha: Array
  beta: Array
  k: Array
  c: Array
  u: Array
  write: Array | None = None
  reset: Array | None = None


@struct.dataclass
class KernelForm:
  """y_t = Σ_{s≤t} w_t(s) u_s with normalised kernel weights (no finite state).

  Attributes:
    q: queries [batch, heads, time, D] as the kernel sees them (after norms and RoPE).
    k: keys [batch, heads, time, D] (kv heads repeated for GQA).
    scale: per-query logit multiplier [batch, heads, time] (1/√D times any
      temperature); unused by the softplus kernel, which has none.
    u: what the weights act on, [batch, heads, time, dv] (LUCID: V′ = L⁻¹V).
    visible: extra key mask [batch, heads, time, time] (NAtS-L's block
      sparsity) or None (plain causal).
    value_map: [batch, heads, time, time] with u = value_map @ v for the
      layer's raw values v (LUCID's L⁻¹), or None.
    kernel: 'softmax' or 'softplus' (LSSA/LSSAR).
    power: LSSAR's sharpening power (None: LSSA).
  """

  q: Array
  k: Array
  scale: Array
  u: Array
  visible: Array | None = None
  value_map: Array | None = None
  kernel: str = struct.field(pytree_node=False, default="softmax")
  power: float | None = struct.field(pytree_node=False, default=None)


Form = ScalarForm | DeltaForm | KernelForm
Forms = dict[str, Form]  # {part: form}; 'main', or NAtS-L's 'delta' and 'attention'


@dataclasses.dataclass(frozen=True)
class Adapter:
  """How the analysis reads a variant's layer; registered with `registry.register`.

  Attributes:
    forms: (mixer, x [batch, time, d_model]) -> {part: form}, built from the
      mixer's own hooks (after its norms, convs and RoPE, with its real
      scales). Every variant but NAtS-L has the one part 'main'.
    readout: (mixer, x, {part: y [batch, heads, time, dv]}) -> [batch, time,
      d_model]: the parts' outputs through the rest of the layer (output
      norms, gates, skips, projections), so that readout(run(forms(x)))
      reproduces mixer(x).
    hooks: names of the public, documented mixer methods that forms and
      readout call; the registry test checks that the mixer has them.
  """

  forms: Callable[[nnx.Module, Array], Forms]
  readout: Callable[[nnx.Module, Array, dict[str, Array]], Array]
  hooks: tuple[str, ...] = ()


def analysis_dtype(x: Array) -> jnp.dtype:
  """The dtype forms are built in: at least float32."""
  return jnp.result_type(jnp.float32, x.dtype)


def heads_first(a: Array, dtype: jnp.dtype) -> Array:
  """[batch, time, heads, ...] -> [batch, heads, time, ...] in `dtype`."""
  return jnp.swapaxes(a, 1, 2).astype(dtype)


def time_first(y: Array) -> Array:
  """A part's output [batch, heads, time, dv] -> [batch, time, heads, dv]."""
  return jnp.swapaxes(y, 1, 2)


def normalized_linear_form(
  q: Array,
  k: Array,
  v: Array,
  *,
  floor: Array | float | None = None,
  positive: bool = False,
) -> ScalarForm:
  """DSF form of normalised linear attention over features q, k [B,H,T,N], v [B,H,T,dv].

  The normaliser η_t = q_t·Σ_{s≤t} k_s (clamped below at `floor`, a scalar
  or [B,H,T], if given) goes into the state: λ_t = η_{t−1}/η_t,
  b_t = k_t/η_t, c_t = q_t, so the state is h_t = Σ_{s≤t} k_s u_sᵀ / η_t.
  `positive` promises η_t > 0.
  """
  eta = jnp.einsum("bhtd,bhtd->bht", q, jnp.cumsum(k, axis=2))
  if floor is not None:
    eta = jnp.maximum(eta, floor)
  log_eta = jnp.log(jnp.abs(eta))
  previous = jnp.pad(log_eta, ((0, 0), (0, 0), (1, 0)))[..., :-1]
  log_lam = (previous - log_eta).at[..., 0].set(0.0)
  sign = None
  if not positive:
    previous_sign = jnp.pad(jnp.sign(eta), ((0, 0), (0, 0), (1, 0)), constant_values=1.0)
    sign = jnp.sign(eta) * previous_sign[..., :-1]
  return ScalarForm(log_lam, k / eta[..., None], q, v, sign)
