"""Hugging Face Llama-family checkpoints in and out of attnlab (`attnlab.convert`).

The trunk's logits on a converted checkpoint are checked against an independent
float64 numpy forward pass of the Hugging Face Llama written here from its
math (and, where torch and transformers are installed, against
`transformers.LlamaForCausalLM` itself); a checkpoint converted in and out
must come back byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the hf extra: pip install -e '.[hf]'")

import safetensors.numpy  # noqa: E402

from attnlab import convert, errors, hf, loader  # noqa: E402

from .conftest import REPO, checkpoint_entries, forward  # noqa: E402

TINY = dict(
  architectures=["LlamaForCausalLM"],
  model_type="llama",
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  hidden_act="silu",
  max_position_embeddings=512,
  rms_norm_eps=1e-5,
  rope_theta=500.0,  # small, so the test's short sequences see every frequency turn
  rope_scaling=None,
  attention_bias=False,
  mlp_bias=False,
  tie_word_embeddings=False,
  torch_dtype="float32",
)
QWEN2 = dict(
  TINY,
  architectures=["Qwen2ForCausalLM"],
  model_type="qwen2",
  use_sliding_window=False,
  sliding_window=4096,
  attention_bias=None,
)
QWEN3 = dict(TINY, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24)
for _config in (QWEN2, QWEN3):
  del _config["mlp_bias"]
del QWEN2["attention_bias"]

# --- a tiny random checkpoint, written as save_pretrained writes one ---------------------


def random_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 tensors of a Llama-family `config` in HF names and [out, in]
  layout, scaled so activations stay O(1) (every matmul and norm matters)."""
  rng = np.random.default_rng(seed)
  d, hd = (
    config["hidden_size"],
    config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
  )
  h, hkv = config["num_attention_heads"], config["num_key_value_heads"]
  f, v = config["intermediate_size"], config["vocab_size"]

  def linear(out_features, in_features):
    return rng.normal(0, in_features**-0.5, (out_features, in_features)).astype(np.float32)

  def norm(n):
    return (1 + 0.2 * rng.normal(size=n)).astype(np.float32)

  t = {"model.embed_tokens.weight": rng.normal(0, 1, (v, d)).astype(np.float32)}
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = norm(d)
    t[p + "post_attention_layernorm.weight"] = norm(d)
    t[p + "self_attn.q_proj.weight"] = linear(h * hd, d)
    t[p + "self_attn.k_proj.weight"] = linear(hkv * hd, d)
    t[p + "self_attn.v_proj.weight"] = linear(hkv * hd, d)
    t[p + "self_attn.o_proj.weight"] = linear(d, h * hd)
    if config["model_type"] == "qwen2":
      for name, n in (("q", h * hd), ("k", hkv * hd), ("v", hkv * hd)):
        t[p + f"self_attn.{name}_proj.bias"] = (0.3 * rng.normal(size=n)).astype(np.float32)
    if config["model_type"] == "qwen3":
      t[p + "self_attn.q_norm.weight"] = norm(hd)
      t[p + "self_attn.k_norm.weight"] = norm(hd)
    t[p + "mlp.gate_proj.weight"] = linear(f, d)
    t[p + "mlp.up_proj.weight"] = linear(f, d)
    t[p + "mlp.down_proj.weight"] = linear(d, f)
  t["model.norm.weight"] = norm(d)
  if not config["tie_word_embeddings"]:
    t["lm_head.weight"] = linear(v, d)
  return t


def write_checkpoint(directory, config: dict, tensors: dict, *, shards: int = 1) -> str:
  """config.json and safetensors files; `shards` > 1 writes the
  model-0000i-of-0000n.safetensors files and the index of a sharded save."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  if shards == 1:
    safetensors.numpy.save_file(
      tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
    )
    return str(directory)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}
    safetensors.numpy.save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, file))
  with open(os.path.join(directory, hf.INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(directory)


# --- the Hugging Face Llama forward pass, float64 numpy ----------------------------------


def reference_logits(config: dict, tensors: dict, tokens: np.ndarray) -> np.ndarray:
  """HF LlamaForCausalLM / Qwen2 / Qwen3 logits [B, T, vocab] in float64, from
  the modeling code's math (eager attention, no cache)."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  eps, theta = config["rms_norm_eps"], config["rope_theta"]
  h, hkv = config["num_attention_heads"], config["num_key_value_heads"]
  hd = config.get("head_dim") or config["hidden_size"] // h
  b, n = tokens.shape

  def rms_norm(x, weight):
    return weight * (x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps))

  # Rotary: inv_freq = 1 / θ^(2i/d); cos/sin of cat(freqs, freqs); rotate_half.
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  scaling = config.get("rope_scaling") or {}
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":  # the transformers rule, step by step
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  freqs = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb), np.sin(emb)  # [T, hd]

  def rotate_half(x):
    return np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)

  def rope(x):  # [B, heads, T, hd]
    return x * cos + rotate_half(x) * sin

  def repeat_kv(x, n_rep):  # [B, Hkv, T, hd] -> [B, Hkv * n_rep, T, hd]
    bb, kv, tt, dd = x.shape
    return np.broadcast_to(x[:, :, None], (bb, kv, n_rep, tt, dd)).reshape(bb, kv * n_rep, tt, dd)

  def linear(x, name):
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y

  causal = np.tril(np.ones((n, n), dtype=bool))
  x = t["model.embed_tokens.weight"][tokens]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = rms_norm(x, t[p + "input_layernorm.weight"])
    q = linear(a, p + "self_attn.q_proj").reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    k = linear(a, p + "self_attn.k_proj").reshape(b, n, hkv, hd).transpose(0, 2, 1, 3)
    v = linear(a, p + "self_attn.v_proj").reshape(b, n, hkv, hd).transpose(0, 2, 1, 3)
    if p + "self_attn.q_norm.weight" in t:  # Qwen3: per-head RMSNorm before RoPE
      q, k = (
        rms_norm(q, t[p + "self_attn.q_norm.weight"]),
        rms_norm(k, t[p + "self_attn.k_norm.weight"]),
      )
    q, k = rope(q), rope(k)
    k, v = repeat_kv(k, h // hkv), repeat_kv(v, h // hkv)
    scores = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
    x = x + linear(o, p + "self_attn.o_proj")
    m = rms_norm(x, t[p + "post_attention_layernorm.weight"])
    gate = linear(m, p + "mlp.gate_proj")
    x = x + linear(gate / (1 + np.exp(-gate)) * linear(m, p + "mlp.up_proj"), p + "mlp.down_proj")
  x = rms_norm(x, t["model.norm.weight"])
  head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
  return x @ head.T


def tokens_for(config: dict, batch: int = 2, length: int = 24) -> np.ndarray:
  return np.random.default_rng(1).integers(0, config["vocab_size"], (batch, length), np.int32)


def trunk_logits(workdir: str, tokens: np.ndarray) -> np.ndarray:
  model, _, _ = loader.load_model(workdir)
  return np.asarray(forward(model, jax.numpy.asarray(tokens)), np.float64)


# --- logits against the reference --------------------------------------------------------

CHECKPOINTS = {
  "llama_untied": (TINY, "float32", 1),
  "llama_tied_sharded": (dict(TINY, tie_word_embeddings=True), "float32", 3),
  "llama_bf16_mha": (dict(TINY, num_key_value_heads=4), "bfloat16", 1),
  "qwen2_qkv_bias": (QWEN2, "float32", 2),
  "qwen3_qk_norm": (QWEN3, "float32", 1),
  # θ = 500 and a short original length put the 4 frequencies of head_dim 16 in all
  # three of llama3's bands (kept, interpolated, divided).
  "llama3_rope_scaling": (
    dict(TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "float32", 1,
  ),
  "linear_rope_scaling": (dict(TINY, rope_scaling={"type": "linear", "factor": 4.0}), "float32", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_trunk_logits_equal_the_reference_llama(name, tmp_path):
  config, dtype, shards = CHECKPOINTS[name]
  tensors = random_tensors(config)
  if dtype == "bfloat16":
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  source = write_checkpoint(tmp_path / "hf", config, tensors, shards=shards)
  workdir = convert.from_hf(source, str(tmp_path / "run"))
  tokens = tokens_for(config)
  expected = reference_logits(config, tensors, tokens)
  got = trunk_logits(workdir, tokens)
  assert np.abs(expected).max() > 1.0  # activations are O(1): the check sees every term
  error = np.abs(got - expected).max()
  assert error < 1e-5 * max(1.0, np.abs(expected).max()), f"{name}: max |Δlogit| = {error:.3g}"


@pytest.mark.parametrize(
  "scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["layers", "scanned_layers"]
)
def test_exported_trained_model_computes_the_same_logits(scan, tmp_path):
  """A run of attnlab's own (random init, saved as training saves) written out
  with --to_hf: the reference Llama on the written tensors gives the trunk's logits."""
  import jax.numpy as jnp

  from attnlab import checkpoint, sharding, train_state

  from .conftest import tiny_config

  config = tiny_config(
    **{"model.canon_conv": 0, "model.num_kv_heads": 2, "model.scan_layers": scan}
  )
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  placed = train_state.setup(config, sharding.make_mesh({}, jax.local_devices()[:1]))
  state = placed.create(jax.random.key(3))
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  ckpt.save_without_data(5, state)
  ckpt.close()
  out = str(tmp_path / "hf")
  assert convert.to_hf(workdir, out) == 5
  with open(os.path.join(out, "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["architectures"] == ["LlamaForCausalLM"]
  tensors = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}
  tokens = tokens_for(hf_config)
  model, _, _ = loader.load_model(workdir)
  got = np.asarray(forward(model, jnp.asarray(tokens)), np.float64)
  expected = reference_logits(hf_config, tensors, tokens)
  np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


# --- round trip --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "config,dtype",
  [(TINY, "float32"), (dict(TINY, tie_word_embeddings=True), "bfloat16"), (QWEN2, "bfloat16")],
  ids=["llama_float32", "llama_tied_bfloat16", "qwen2_bfloat16"],
)
def test_round_trip_is_bit_exact(config, dtype, tmp_path):
  tensors = random_tensors(config, seed=5)
  if dtype == "bfloat16":
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  if config["tie_word_embeddings"]:  # some saves carry the tied head too: it comes back
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  source = write_checkpoint(tmp_path / "hf", config, tensors, shards=2)
  with open(os.path.join(source, "tokenizer.json"), "w") as f:
    f.write('{"tiny": true}')
  workdir = convert.from_hf(source, str(tmp_path / "run"), dtype="bfloat16")
  out = str(tmp_path / "out")
  convert.to_hf(workdir, out)
  back = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  assert sorted(back) == sorted(tensors)
  for name, array in tensors.items():
    assert back[name].dtype == array.dtype, name
    assert back[name].shape == array.shape, name
    assert back[name].tobytes() == array.tobytes(), name
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == config
  with open(os.path.join(out, "tokenizer.json")) as f:
    assert f.read() == '{"tiny": true}'
  # --dtype casts on the way out.
  convert.to_hf(workdir, str(tmp_path / "out32"), dtype="float32")
  back32 = safetensors.numpy.load_file(str(tmp_path / "out32" / "model.safetensors"))
  assert {v.dtype for v in back32.values()} == {np.dtype(np.float32)}
  np.testing.assert_array_equal(
    back32["model.norm.weight"], tensors["model.norm.weight"].astype(np.float32)
  )


def test_converted_workdir_is_a_training_workdir(tmp_path):
  """config.json as training writes it, with the HF fields mapped; one
  checkpoint at step 0 with a fresh optimizer state."""
  source = write_checkpoint(tmp_path / "hf", QWEN3, random_tensors(QWEN3))
  workdir = convert.from_hf(source, str(tmp_path / "run"))
  config = loader.load_config(workdir)
  m = config.model
  assert (m.attention, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (
    "softmax", 64, 2, 4, 2, 24,
  )  # fmt: skip
  assert (m.mlp_dim, m.vocab_size, config.data.vocab_size, m.max_len) == (96, 128, 128, 512)
  assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.qk_norm, m.qkv_bias) == (
    500.0, 1e-5, False, True, False,
  )  # fmt: skip
  assert (m.canon_conv, m.dtype, m.rope) == (0, "float32", True)
  assert checkpoint_entries(workdir) == ["0"]
  with pytest.raises(errors.UsageError, match="already holds checkpoints"):
    convert.from_hf(source, workdir)


def test_from_workdir_config_is_the_workdir_s_own(tmp_path):
  from .conftest import load_config

  source = write_checkpoint(tmp_path / "hf", QWEN2, random_tensors(QWEN2))
  workdir = convert.from_hf(source, str(tmp_path / "run"))
  config = load_config("from_workdir", f"path={workdir}")
  assert config.model.to_dict() == loader.load_config(workdir).model.to_dict()
  assert config.is_locked
  config.data.vocab_size = 256  # an override of the data reaches the model, as in every config
  assert config.model.vocab_size == 256


# --- what the trunk cannot compute fails with one line -----------------------------------

UNSUPPORTED = {
  "mixtral": (dict(TINY, architectures=["MixtralForCausalLM"], model_type="mixtral"), "unsupported architecture 'MixtralForCausalLM'"),
  "gemma": (dict(TINY, architectures=["GemmaForCausalLM"], model_type="gemma"), "unsupported architecture"),
  "yarn_rope": (dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope_scaling of type 'yarn'"),
  "dynamic_rope": (dict(TINY, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling of type 'dynamic'"),
  "o_proj_bias": (dict(TINY, attention_bias=True), "attention_bias=true is not supported"),
  "mlp_bias": (dict(TINY, mlp_bias=True), "mlp_bias=true"),
  "gelu": (dict(TINY, hidden_act="gelu"), "hidden_act='gelu'"),
  "qwen2_sliding": (dict(QWEN2, use_sliding_window=True), "sliding-window layers"),
  "mistral_window": (dict(TINY, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096), "sliding_window=4096"),
  "partial_rotary": (dict(TINY, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
}  # fmt: skip


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_configs_fail_with_the_field(name):
  config, message = UNSUPPORTED[name]
  with pytest.raises(errors.UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
    hf.model_fields(config)


def test_tensors_that_do_not_fit_fail_with_the_name(tmp_path):
  tensors = random_tensors(TINY)
  cases = {
    "missing": ({k: v for k, v in tensors.items() if "layers.1.mlp.up" not in k}, "lacks model.layers.1.mlp.up_proj.weight"),
    "extra": ({**tensors, "model.layers.0.block_sparse_moe.gate.weight": tensors["model.norm.weight"]}, "tensor model.layers.0.block_sparse_moe.gate.weight has no place"),
    "shape": ({**tensors, "model.norm.weight": tensors["model.norm.weight"][:10]}, "tensor model.norm.weight has shape [10]; config.json implies [64]"),
    "int": ({**tensors, "model.norm.weight": tensors["model.norm.weight"].astype(np.int32)}, "has dtype int32"),
  }  # fmt: skip
  for name, (bad, message) in cases.items():
    source = write_checkpoint(tmp_path / name, TINY, bad)
    with pytest.raises(errors.UsageError, match=message.replace("[", r"\[")):
      convert.from_hf(source, str(tmp_path / f"run_{name}"))
  # Older checkpoints stored RoPE's inv_freq buffers: derived, skipped.
  source = write_checkpoint(
    tmp_path / "inv_freq",
    TINY,
    {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)},
  )
  convert.from_hf(source, str(tmp_path / "run_inv_freq"))


def test_only_llama_shaped_runs_export(tmp_path):
  from .conftest import tiny_config

  for overrides, message in (
    ({"model.attention": "lucid"}, "only softmax trunks"),
    ({"model.canon_conv": 4}, "canon_conv=4"),
    ({"model.canon_conv": 0, "model.rope": False}, "rotate all of head_dim"),
  ):
    with pytest.raises(errors.UsageError, match=message):
      hf.check_exportable(tiny_config(**overrides).model)


# --- the commands that load a workdir load a converted one -------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("converted")
  config = dict(TINY, tie_word_embeddings=True)
  source = write_checkpoint(root / "hf", config, random_tensors(config))
  return convert.from_hf(source, str(root / "run"))


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


@pytest.mark.slow
def test_sample_generates_from_a_converted_workdir(converted):
  """Greedy tokens of `python -m attnlab.sample` are the reference's argmax."""
  result = _run(
    "attnlab.sample", f"--workdir={converted}", "--prompt_ids=5,9,77", "--max_new_tokens=3"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  ids = [int(i) for i in result.stdout.strip().split(",")]
  assert ids[:3] == [5, 9, 77] and len(ids) == 6
  config = json.load(open(os.path.join(converted, "converted.json")))["hf_config"]
  tensors = safetensors.numpy.load_file(
    json.load(open(os.path.join(converted, "converted.json")))["from_hf"] + "/model.safetensors"
  )
  expected = reference_logits(config, tensors, np.array([ids[:-1]]))[0, 2:].argmax(-1)
  assert ids[3:] == expected.tolist()


@pytest.mark.slow
def test_evaluate_runs_on_a_converted_workdir(converted):
  result = _run("attnlab.evaluate", f"--workdir={converted}", "--seq_lens=64", "--tokens=256")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(converted, "eval_lengths.json")) as f:
    results = json.load(f)["results"]
  assert results[0]["seq_len"] == 64 and np.isfinite(results[0]["loss"])


@pytest.mark.slow
def test_convert_command_round_trips(tmp_path):
  source = write_checkpoint(tmp_path / "hf", TINY, random_tensors(TINY))
  result = _run("attnlab.convert", f"--from_hf={source}", f"--workdir={tmp_path}/run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "converted" in result.stderr
  result = _run("attnlab.convert", f"--to_hf={tmp_path}/out", f"--workdir={tmp_path}/run")
  assert result.returncode == 0, result.stderr[-2000:]
  back = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  original = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
  assert all(back[k].tobytes() == original[k].tobytes() for k in original)


@pytest.mark.slow
def test_training_resumes_a_converted_workdir(tmp_path):
  """`attnlab.train` on a converted workdir resumes its step 0 (no data position:
  the data starts at the beginning) from the converted parameters."""
  from attnlab import config as config_lib
  from attnlab import trainer

  from .conftest import metric_rows

  source = write_checkpoint(tmp_path / "hf", TINY, random_tensors(TINY))
  workdir = convert.from_hf(source, str(tmp_path / "run"))
  c = config_lib.load_config(workdir)
  c.progress, c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = False, 2, 1, 0, 2
  c.data.batch_size, c.data.seq_len, c.data.num_kv_pairs, c.mesh.data = 8, 32, 4, 1
  c.optim.lr, c.optim.warmup_steps = 1e-9, 0  # the parameters stay the converted ones
  trainer.train_and_evaluate(config_lib.finalize(c), workdir)
  assert [r["step"] for r in metric_rows(workdir)] == [1, 2]
  model, _, step = loader.load_model(workdir)
  assert step == 2
  expected = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
  np.testing.assert_allclose(
    np.asarray(model.blocks[1].mixer.qkv.k.kernel[...]),
    expected["model.layers.1.self_attn.k_proj.weight"].T,
    atol=1e-6,
  )


# --- against transformers itself (where torch is installed) ------------------------------


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
def test_logits_equal_transformers(kind, tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed (CPU torch is enough)")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  torch.manual_seed(0)
  common = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=kind == "llama_tied",
  )  # fmt: skip
  if kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  with torch.no_grad():  # random init is N(0, 0.02): widen it so the logits are O(1)
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim == 2:
        p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  model = model.float().eval()
  model.save_pretrained(tmp_path / "hf")  # safetensors, the default since transformers 4.35
  workdir = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  tokens = tokens_for(common)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens.astype(np.int64))).logits.double().numpy()
  got = trunk_logits(workdir, tokens)
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
