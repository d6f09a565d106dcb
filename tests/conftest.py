"""Test setup: 8 simulated CPU devices, shared helpers and fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (compile-only TPU targets) takes a lock per process unless told that
# several processes (pytest-xdist workers) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the whole run: set here, in the process that
# starts the xdist workers, so every worker and every subprocess a test starts
# (`python -m attnlab.train ...`) inherits it. Many tests train the same tiny model, and
# a run resumed after a crash compiles what the first run did; each program is compiled
# once per test run instead (a repeated tiny run: 25 s -> 5-9 s on 2 cores). A cache of
# the user's own (JAX_COMPILATION_CACHE_DIR already set) is used and kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="attnlab-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE

import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "shakespeare"


@pytest.fixture
def x64():
  """float64 for the duration of one test (gradient checks)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


# --- configs, runs and processes ----------------------------------------------------------


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as `--config=configs/<name>.py:arg` loads it."""
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**overrides):
  """configs/tiny.py shrunk to a 30-step run (checkpoints every 10, eval every
  10); `overrides` are dotted keys, e.g. tiny_config(**{"model.attention": "linear"})."""
  c = load_config("tiny")
  c.progress = False
  c.total_steps = 30
  c.log_every = 1
  c.eval_every = 10
  c.eval_batches = 1
  c.checkpoint_every = 10
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.seq_len = 32
  c.data.num_kv_pairs = 4
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


# `python -m attnlab.train` flags of a 4-step tiny run on a 2-device data mesh.
TINY_RUN_FLAGS = (
  "--config=configs/tiny.py:steps=4",
  "--config.mesh.data=2",
  "--config.data.batch_size=8",
  "--config.data.eval_batch_size=8",
  "--config.data.seq_len=32",
  "--config.data.num_kv_pairs=4",
  "--config.log_every=1",
  "--config.eval_every=4",
  "--config.eval_batches=1",
  "--config.checkpoint_every=2",
  "--config.progress=False",
)


@functools.cache
def _jitted_call():
  from flax import nnx

  return nnx.jit(lambda model, *args: model(*args))


def forward(model, *args):
  """model(*args) compiled as one program: eager op-by-op dispatch of the
  chunked delta rule takes seconds per new shape on a CPU."""
  return _jitted_call()(model, *args)


def assert_same_values_and_grads(got, want, arrays, cot, *, tol: float = 1e-10):
  """got(*arrays) == want(*arrays) in values and in the gradients of ⟨f(*arrays), cot⟩
  with respect to every array (each function compiled once)."""
  argnums = tuple(range(len(arrays)))
  run = lambda f: jax.jit(  # noqa: E731
    jax.value_and_grad(lambda *a: (jax.numpy.sum(f(*a) * cot), f(*a)), argnums, has_aux=True)
  )
  (_, out_got), grads_got = run(got)(*arrays)
  (_, out_want), grads_want = run(want)(*arrays)
  np.testing.assert_allclose(out_got, out_want, atol=tol, rtol=tol)
  for i, (a, b) in enumerate(zip(grads_got, grads_want)):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=f"gradient {i}")


def checkpoint_entries(workdir) -> list[str]:
  """The sorted entries of <workdir>/checkpoints, less the run's hidden marker file."""
  return sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n[0] != ".")


def metric_rows(workdir) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def loss_by_step(workdir) -> dict[int, float]:
  """{step: train/loss}; a step logged twice (a resumed run) keeps its last row."""
  return {r["step"]: r["train/loss"] for r in metric_rows(workdir)}


def assert_same_losses(reference, workdir, steps: range, *, rtol: float) -> None:
  """`workdir` logged every step 1..steps.stop-1 (a rerun's rows win), and its
  losses over `steps` equal those of the uninterrupted `reference` run."""
  expected, got = loss_by_step(reference), loss_by_step(workdir)
  assert sorted(got) == list(range(1, steps.stop))
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=rtol)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (for jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- model cases: (trunk overrides, {variant: option overrides}) -------------------------------

# Whole models: decoding against the parallel logits (tests/test_models.py).
# One trunk configuration per mixer for the packed-document (segment_ids) tests.
PACKED_MIXERS = [
  ("gated_deltanet", dict(chunk_size=4, num_v_heads=4)),
  ("linear", dict(chunk_size=4)),
  ("softmax", {}),
  ("ssa", dict(alpha_init=1.0)),  # a position slope large enough to matter
  ("softplus", {}),
  ("softplus", dict(power=15)),
  ("lucid", dict(block_size=4)),
  ("soft", dict(chunk_size=4)),
  ("nats_l", dict(block_size=4)),
]


def packed_model(attention, **mixer):
  """A one-layer trunk with a canon conv (which must keep documents apart too)."""
  from flax import nnx

  from attnlab import config as config_lib
  from attnlab.models import build_model

  c = config_lib.base_config().model
  c.update(dict(d_model=32, num_heads=2, mlp_dim=64, vocab_size=50, num_layers=1))
  c.update(dict(attention=attention, canon_conv=3))
  c.mixer[attention].update(mixer)
  return build_model(c, nnx.Rngs(0))


MODEL_CASES = {
  "softmax": (dict(attention="softmax"), {}),
  "softmax_gqa_qknorm": (dict(attention="softmax", num_kv_heads=2, qk_norm=True), {}),
  "softmax_nope": (dict(attention="softmax", rope=False), {}),
  "softmax_canon_conv": (dict(attention="softmax", canon_conv=4), {}),
  "gated_deltanet_canon_conv_scanned": (
    dict(attention="gated_deltanet", canon_conv=3, scan_layers=True),
    {"gated_deltanet": dict(chunk_size=4)},
  ),
  "linear_elu_normalized": (dict(attention="linear"), {}),
  "linear_relu_gqa": (
    dict(attention="linear", num_kv_heads=1),
    {"linear": dict(feature_map="relu", normalize=False)},
  ),
  "linear_identity_rope": (
    dict(attention="linear", rope=True),
    {"linear": dict(feature_map="identity", normalize=False, chunk_size=4)},
  ),
  "mixed_pattern": (dict(layer_pattern="softmax,linear", num_layers=4), {}),
  "gated_deltanet": (dict(attention="gated_deltanet"), {"gated_deltanet": dict(chunk_size=4)}),
  "gated_deltanet_gva_neg_eigval": (
    dict(attention="gated_deltanet"),
    {"gated_deltanet": dict(num_heads=2, num_v_heads=4, allow_neg_eigval=True, chunk_size=8)},
  ),
  "lucid_gqa": (dict(attention="lucid", num_kv_heads=2), {"lucid": dict(block_size=4)}),
  "lucid_rope": (dict(attention="lucid", rope=True), {}),
  "softplus_lssar_p15": (
    dict(attention="softplus", num_kv_heads=2),
    {"softplus": dict(power=15.0)},
  ),
  "softplus_lssar_p3": (dict(attention="softplus"), {"softplus": dict(power=3.0)}),
  "softplus_lssa": (dict(attention="softplus", rope=False), {}),  # the default power, 0
  "soft": (dict(attention="soft"), {"soft": dict(num_landmarks=5, chunk_size=4)}),
  "soft_unnormalized_no_conv": (
    dict(attention="soft"),
    {"soft": dict(normalize=False, conv_size=0)},
  ),
  "ssa_gqa": (dict(attention="ssa", num_kv_heads=2), {"ssa": dict(alpha_init=0.5)}),
  # Blocks of 4 tokens: a 9-token prompt spans several blocks of mixed types.
  "nats_l": (dict(attention="nats_l"), {"nats_l": dict(block_size=4, num_heads=2)}),
  "gated_deltanet_nats_l_pattern": (
    dict(layer_pattern="gated_deltanet,nats_l", num_layers=4),
    {"nats_l": dict(block_size=4)},
  ),
}


# Single layers: recurrent and parallel forms against the layer (tests/test_analysis.py).
LAYER_CASES = {
  "softmax_gqa": (dict(attention="softmax", num_kv_heads=2, qk_norm=True), {}),
  "linear_elu": (dict(attention="linear"), {"linear": dict(chunk_size=8)}),
  "linear_identity_unnormalized": (
    dict(attention="linear", rope=True),
    {"linear": dict(feature_map="identity", normalize=False, chunk_size=4)},
  ),
  "gated_deltanet_gva_neg_eigval": (
    dict(attention="gated_deltanet"),
    {"gated_deltanet": dict(num_heads=2, num_v_heads=4, allow_neg_eigval=True, chunk_size=8)},
  ),
  "nats_l": (dict(attention="nats_l"), {"nats_l": dict(block_size=8, num_heads=2)}),
  "lucid_gqa": (dict(attention="lucid", num_kv_heads=2), {"lucid": dict(block_size=8)}),
  "ssa": (dict(attention="ssa"), {"ssa": dict(alpha_init=0.5)}),
  "softplus_lssar": (dict(attention="softplus"), {}),
  "softplus_lssa": (dict(attention="softplus"), {"softplus": dict(power=0.0)}),
  "soft": (dict(attention="soft"), {"soft": dict(chunk_size=8)}),
  "soft_unnormalized": (dict(attention="soft"), {"soft": dict(normalize=False, chunk_size=8)}),
}


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:  # only the process that made the cache removes it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and backend != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}"))
    # Minutes of compiling each: only when the marker expression names them.
    if item.get_closest_marker("heavy") and "heavy" not in config.option.markexpr:
      item.add_marker(pytest.mark.skip(reason="heavy compile-only check; run with -m heavy"))


# --- real accelerator compilers on this CPU host -------------------------------------------

TPU_TARGETS = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def tpu_mesh(topology: str) -> jax.sharding.Mesh:
  """A one-device mesh on a compile-only TPU of `topology` (needs libtpu; skips without)."""
  from benchmarks import _compile_only

  try:
    return _compile_only.tpu_mesh(topology)
  except _compile_only.CompilerUnavailable as error:
    pytest.skip(str(error))


def compile_for_tpu(fn, args, topology: str):
  """Compiles `fn(*args)` (ShapeDtypeStructs) for one chip of `topology` with
  the real TPU compiler; returns (compiled, lowered HLO text)."""
  from benchmarks import _compile_only

  lowered = jax.jit(fn).lower(*_compile_only.placed(args, tpu_mesh(topology)))
  return lowered.compile(), lowered.as_text()


def lower_for_cuda(fn, args) -> str:
  """Lowers `fn(*args)` for CUDA on this host (Pallas GPU kernels go to Triton
  IR; only the PTX compilation is left out); returns the lowered text."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def value_and_grads(fn, argnums):
  """Forward and backward of `fn` in one program: sum of its float32 output, and gradients."""
  return jax.value_and_grad(lambda *a: fn(*a).astype(np.float32).sum(), argnums=argnums)
