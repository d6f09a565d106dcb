"""The RNN / dynamical-systems view: identities between the recurrent form, the
parallel form and the production layers, closed-form eigenvalues, the Taylor
view, histograms and the analysis command line."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import config as config_lib
from attnlab import ops
from attnlab.analysis import collect, report
from attnlab.analysis import forms as F
from attnlab.analysis import quantities as Q
from attnlab.analysis import taylor as TY
from attnlab.models import attention, build_model

from .conftest import LAYER_CASES, tiny_config

T = 21  # not a multiple of any chunk or block size used below (4, 8, 16, 64)


def _model_config(**overrides):
  c = config_lib.base_config().model
  c.update(dict(d_model=32, num_heads=4, mlp_dim=64, vocab_size=50, num_layers=1))
  c.update(overrides)
  return c


def _layer(case):
  trunk, options = LAYER_CASES[case]
  variant = trunk["attention"]
  if variant not in attention.names():
    pytest.skip(f"variant {variant!r} is not registered")
  cfg = _model_config(**trunk)
  for name, values in options.items():
    cfg.mixer[name].update(values)
  mixer = build_model(cfg, nnx.Rngs(0)).blocks[0].mixer
  rng = np.random.default_rng(3)
  for name in ("ssa_u_q", "ssa_u_v"):  # SSA starts as plain attention
    if hasattr(mixer, name):
      param = getattr(mixer, name)
      param[...] = jnp.asarray(rng.normal(size=param.shape), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, T, 32)), jnp.float32)
  return mixer, variant, x


@nnx.jit(static_argnames=("variant",))
def _all_forms(mixer, x, variant):
  forms = collect.layer_forms(mixer, variant, x)
  recurrent = {p: F.run_recurrent(f)[0] for p, f in forms.items()}
  matrices = {p: F.implicit_attention(f) for p, f in forms.items()}
  parallel = {p: matrices[p] @ f.u for p, f in forms.items()}  # = run_parallel
  return (
    forms,
    mixer(x),
    collect.layer_readout(mixer, variant, x, recurrent),
    collect.layer_readout(mixer, variant, x, parallel),
    matrices,
  )


@pytest.mark.slow
def test_unknown_variant_names_the_registered_ones():
  mixer, _, x = _layer("softmax_gqa")
  with pytest.raises(ValueError, match="registered: .*'softmax'"):
    collect.layer_forms(mixer, "no_such_variant", x)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_recurrent_equals_parallel_equals_production_layer(case):
  mixer, variant, x = _layer(case)
  forms, production, recurrent, parallel, matrices = _all_forms(mixer, x, variant)
  np.testing.assert_allclose(recurrent, production, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(parallel, production, atol=1e-5, rtol=1e-5)
  for part, m in matrices.items():
    assert m.shape[-2:] == (T, T)
    np.testing.assert_array_equal(np.triu(np.asarray(m), 1), 0.0)  # causal
    form = forms[part]
    if isinstance(form, F.KernelForm) and form.kernel == "softmax":
      np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_lucid_effective_attention_acts_on_raw_values():
  mixer, variant, x = _layer("lucid_gqa")
  form = _all_forms(mixer, x, variant)[0]["main"]
  _, k, v, _ = mixer.project(x, jnp.arange(T))
  v = jnp.swapaxes(jnp.repeat(v, 2, axis=2), 1, 2)
  assert form.value_map is not None
  np.testing.assert_allclose(F.effective_attention(form) @ v, F.run_parallel(form), atol=1e-5)


def test_nats_l_case_mixes_block_types():
  """Guards the identity test: both block types and the block reset occur."""
  mixer, variant, x = _layer("nats_l")
  forms = _all_forms(mixer, x, variant)[0]
  write = np.asarray(forms["delta"].write)[:, :, :16]  # the two complete blocks
  assert 0 < write.mean() < 1
  np.testing.assert_array_equal(np.flatnonzero(forms["delta"].reset), [0, 8, 16])  # blocks of 8
  visible = np.asarray(forms["attention"].visible)
  assert visible[:, :, 16:, :16].any() and not visible[:, :, 16:, :16].all()


def _random_delta_form(rng, b=2, h=2, t=T, dk=4, dv=3, reset=False, dtype=np.float32):
  k = rng.normal(size=(b, h, t, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  arrays = dict(
    log_alpha=-rng.uniform(0.01, 0.5, (b, h, t)),
    beta=rng.uniform(0, 1, (b, h, t)),
    k=k,
    c=rng.normal(size=(b, h, t, dk)) * dk**-0.5,
    u=rng.normal(size=(b, h, t, dv)),
  )
  arrays = {name: jnp.asarray(a, dtype) for name, a in arrays.items()}
  if reset:
    arrays["write"] = jnp.asarray(rng.integers(0, 2, (b, h, t)), dtype)
    arrays["reset"] = jnp.arange(t) % 5 == 0
  return F.DeltaForm(**arrays)


@pytest.mark.slow
def test_forms_agree_in_float64(x64):
  rng = np.random.default_rng(0)
  b, h, n, dv = 2, 2, 3, 4
  scalar = F.ScalarForm(
    log_lam=jnp.asarray(rng.normal(0, 0.3, (b, h, T))),
    b=jnp.asarray(rng.normal(size=(b, h, T, n))),
    c=jnp.asarray(rng.normal(size=(b, h, T, n))),
    u=jnp.asarray(rng.normal(size=(b, h, T, dv))),
    sign=jnp.asarray(rng.choice([-1.0, 1.0], (b, h, T))),
  )
  diagonal = scalar.replace(log_lam=jnp.asarray(rng.normal(0, 0.3, (b, h, T, n))), sign=None)
  forms = [scalar, diagonal, _random_delta_form(rng, dtype=np.float64)]
  forms.append(_random_delta_form(rng, reset=True, dtype=np.float64))
  both = jax.jit(lambda form: (F.run_recurrent(form)[0], F.run_parallel(form)))
  for form in forms:
    np.testing.assert_allclose(*both(form), atol=1e-10)
  # The delta form is the gated delta rule op's own recurrence.
  gdn = forms[2]
  scale = 0.5
  o, _ = ops.gated_delta_rule(
    *(jnp.swapaxes(a, 1, 2) for a in (gdn.c / scale, gdn.k, gdn.u, gdn.log_alpha, gdn.beta)),
    scale=scale,
    implementation="reference",
  )
  np.testing.assert_allclose(F.run_parallel(gdn), jnp.swapaxes(o, 1, 2), atol=1e-10)


@pytest.mark.parametrize("reset", [False, True])
def test_delta_eigenvalues_match_numeric_eigendecomposition(reset):
  rng = np.random.default_rng(1)
  form = _random_delta_form(rng, t=7, reset=reset)
  form = form.replace(beta=form.beta * 2.0)  # β ∈ [0, 2): negative eigenvalues too
  closed = np.sort(np.asarray(Q.transition_eigs(form)), -1)
  numeric = np.linalg.eigvals(np.asarray(F.transition_matrices(form), np.float64))[:, :, 1:]
  assert np.abs(numeric.imag).max() < 1e-6
  np.testing.assert_allclose(closed, np.sort(numeric.real, -1), atol=1e-5)
  # β = 0 leaves the pure decay α·I.
  plain = form.replace(beta=jnp.zeros_like(form.beta), write=None, reset=None)
  alpha = np.exp(np.asarray(form.log_alpha))[:, :, 1:, None]
  np.testing.assert_allclose(
    Q.transition_eigs(plain), np.broadcast_to(alpha, closed.shape[:3] + (4,)), rtol=1e-6
  )


def _random_kernel_form(rng, b=2, h=2, t=T, d=3, dv=2, spread=1.0, dtype=np.float32):
  return F.KernelForm(
    q=jnp.asarray(rng.normal(0, spread, (b, h, t, d)), dtype),
    k=jnp.asarray(rng.normal(0, spread, (b, h, t, d)), dtype),
    scale=jnp.full((b, h, t), d**-0.5, dtype),
    u=jnp.asarray(rng.normal(size=(b, h, t, dv)), dtype),
  )


def test_softmax_eigenvalues_from_lse_equal_normaliser_ratio(x64):
  rng = np.random.default_rng(2)
  form = _random_kernel_form(rng, spread=3.0, dtype=np.float64)
  logits = np.einsum("bhtd,bhsd->bhts", form.q, form.k) * np.asarray(form.scale)[..., None]
  causal = np.tril(np.ones((T, T), bool))
  nu = np.where(causal, np.exp(logits), 0.0).sum(-1)  # the explicit normaliser
  ratio = nu[..., :-1] / nu[..., 1:]
  eigs = np.asarray(Q.transition_eigs(form))[..., 0]
  np.testing.assert_allclose(eigs, ratio, rtol=1e-12)
  lse = jax.nn.logsumexp(jnp.where(causal, logits, -jnp.inf), -1)
  np.testing.assert_allclose(Q.softmax_eigs_from_lse(lse), ratio, rtol=1e-12)
  np.testing.assert_allclose(
    Q.softmax_eigs_from_lse(lse / math.log(2), base=2.0), ratio, rtol=1e-12
  )
  # The max-shifted formula of the reference eigenvalue code.
  shift = np.where(causal, logits, -np.inf).max(-1)
  shifted = np.where(causal, np.exp(logits - shift[..., None]), 0.0).sum(-1)
  reference = shifted[..., :-1] / shifted[..., 1:] * np.exp(shift[..., :-1] - shift[..., 1:])
  np.testing.assert_allclose(eigs, reference, rtol=1e-12)


@pytest.mark.slow
def test_taylor_converges_at_even_orders(x64):
  rng = np.random.default_rng(4)
  form = _random_kernel_form(rng, spread=0.7, dtype=np.float64)
  result = TY.taylor_analysis(form, orders=tuple(range(0, 26, 2)))
  assert 1.0 < float(result["max_abs_logit"].max()) < 3.5
  err = np.asarray(result["weight_err"]).max(-1)
  assert np.all(np.diff(err[1:]) < 0)  # monotone once past the lowest order
  assert err[-1] < 1e-10  # order 24
  assert np.all(np.asarray(result["out_err"])[-1] < 1e-10)
  assert np.all(np.asarray(result["min_poly"]) > 0)  # even polynomials stay positive
  assert float(TY.taylor_exp(jnp.asarray(-30.0), 3)) < 0  # an odd one does not
  assert np.all(np.asarray(result["remainder_bound"])[-1] >= 0)
  np.testing.assert_array_equal(result["dominant_order"], np.argmax(result["term_mag"], 0))


@pytest.mark.parametrize("order", [1, 2, 4])
def test_taylor_recurrent_equals_parallel(order, x64):
  form = _random_kernel_form(np.random.default_rng(5), t=9, d=2, spread=0.5, dtype=np.float64)
  parallel = TY.taylor_weights(form, order) @ form.u
  np.testing.assert_allclose(TY.taylor_recurrent(form, order), parallel, atol=1e-12)


def test_histograms_sum_to_100_with_half_open_bins():
  values = jnp.asarray([0.0, 0.1, 0.1000001, 0.5, 1.0, 1.5, 100.0, 101.0, -0.95, 0.95])
  hist = Q.spectrum_histogram(values.reshape(1, 1, -1, 1))
  # [0,.1] (.1,.5] (.5,.9] (.9,1] (1,10] (10,100] >100
  np.testing.assert_allclose(hist["radius"][0], [20, 20, 0, 30, 10, 10, 10], atol=1e-4)
  # [0,1] (1,10] (10,45] (45,90] (90,180]: one negative eigenvalue.
  np.testing.assert_allclose(hist["phase"][0], [90, 0, 0, 0, 10], atol=1e-4)
  eigs = Q.transition_eigs(_random_delta_form(np.random.default_rng(6), reset=True))
  for percent in Q.spectrum_histogram(eigs).values():
    np.testing.assert_allclose(percent.sum(-1), 100.0, rtol=1e-5)
  assert Q.histogram_labels(Q.RADIUS_EDGES)[:2] == ["[0,0.1]", "(0.1,0.5]"]


@pytest.mark.slow
def test_closed_forms_of_decay_and_attention_statistics():
  lam = 0.8
  form = F.ScalarForm(
    log_lam=jnp.full((1, 1, T), math.log(lam)),
    b=jnp.ones((1, 1, T, 1)),
    c=jnp.ones((1, 1, T, 1)),
    u=jnp.ones((1, 1, T, 1)),
  )
  m = np.asarray(F.implicit_attention(form))[0, 0]
  t, s = np.tril_indices(T)
  np.testing.assert_allclose(m[t, s], lam ** (t - s), rtol=1e-5)
  memory = Q.memory_profile(form, eps=(0.5, 0.1))
  expected = math.ceil(math.log(0.5) / math.log(lam))  # the half-life in steps
  assert np.asarray(memory["horizon"][0.5])[0, 0, -1] == expected
  assert np.isinf(np.asarray(memory["horizon"][0.1])[0, 0, 0])  # censored at t = 0
  np.testing.assert_allclose(memory["time_constant"], -1 / math.log(lam), rtol=1e-5)

  uniform = jnp.tril(jnp.ones((T, T))) / jnp.arange(1, T + 1)[:, None]
  stats = Q.attention_stats(uniform[None, None])
  np.testing.assert_allclose(stats["entropy"][0, 0], np.log(np.arange(1, T + 1)), atol=1e-5)
  np.testing.assert_allclose(stats["norm_entropy"][0, 0, 1:], 1.0, atol=1e-5)
  np.testing.assert_allclose(stats["sink_mass"][0, 0], 1 / np.arange(1, T + 1), rtol=1e-5)
  np.testing.assert_allclose(stats["mean_dist"][0, 0], np.arange(T) / 2, rtol=1e-5)
  one_hot = jnp.eye(T)[None, None]  # attend to yourself
  stats = Q.attention_stats(one_hot)
  np.testing.assert_allclose(stats["entropy"], 0.0, atol=1e-6)
  np.testing.assert_allclose(stats["topk_mass"][1], 1.0)
  np.testing.assert_allclose(stats["attention_horizon"][0.1], 0.0)
  assert not Q.sink_heads(stats["sink_mass"]).any()

  np.testing.assert_allclose(
    Q.effective_rank(jnp.outer(jnp.arange(1.0, 4), jnp.ones(5))), 1.0, rtol=1e-5
  )
  np.testing.assert_allclose(Q.effective_rank(jnp.eye(4)), 4.0, rtol=1e-5)


@pytest.mark.slow
def test_report_on_a_model():
  """The report path on a delta layer; the command-line test covers softmax."""
  cfg = _model_config(attention="gated_deltanet")
  cfg.mixer.gated_deltanet.chunk_size = 8
  model = build_model(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, T)))
  results = report.analyze_model(model, tokens)
  assert [r.variant for r in results] == ["gated_deltanet"]
  assert max(results[0].errors.values()) < 1e-5  # the forms reproduce the real layer
  summary = report.summarize(results)
  json.dumps(summary)  # JSON-ready
  part = summary["layers"][0]["parts"]["main"]
  assert part["kind"] == "delta" and part["state_dim"] == 8 * 16 and "taylor" not in part
  assert len(part["state"]["final_eff_rank_per_head"]) == 4
  assert summary["findings"]["heads"] == 4
  with pytest.raises(ValueError, match="out of range"):
    report.analyze_model(model, tokens, layers=[1])


@pytest.mark.slow
def test_analyze_command_line_on_a_trained_workdir(tmp_path):
  pytest.importorskip("matplotlib")
  from attnlab import analyze, trainer

  workdir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError):
    analyze.run(workdir)
  trainer.train_and_evaluate(tiny_config(total_steps=2, eval_every=0, checkpoint_every=0), workdir)
  summary = analyze.run(workdir, batch=3, layers=[1])
  outdir = os.path.join(workdir, "analysis")
  with open(os.path.join(outdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["step"] == 2 and summary["batch"] == 3
  assert [layer["layer"] for layer in summary["layers"]] == [1]
  part = summary["layers"][0]["parts"]["main"]
  assert part["kind"] == "kernel" and part["state_dim"] is None and "taylor" in part
  assert max(summary["layers"][0]["form_max_abs_err"].values()) < 1e-5
  for name in ("attention_maps_layer1", "eigenvalues", "decay_horizon", "attention_stats"):
    assert os.path.getsize(os.path.join(outdir, f"{name}.png")) > 0
  assert os.path.exists(os.path.join(outdir, "taylor_error.png"))  # the tiny config is softmax
