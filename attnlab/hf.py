"""Hugging Face Llama-family checkpoints and attnlab's softmax trunk: the
mapping between their configs and between their tensors.

Both compute the same function: token embedding, pre-norm blocks of RMSNorm
(weight · x / rms(x)), causal softmax attention with GQA (query head h reads kv
head h // (heads / kv_heads), HF's `repeat_kv`), half-split RoPE with
inv_freq = 1 / θ^(2i/d) and scale 1/√head_dim, SwiGLU down(silu(gate) · up), a
final RMSNorm and the (tied or untied) LM head. Qwen2 adds q/k/v biases
(`model.qkv_bias`), Qwen3 per-head q/k RMSNorm before RoPE (`model.qk_norm`).

Layout: a torch Linear weight is [out, in], an nnx.Linear kernel [in, out], so
projections are transposed both ways; embeddings and norm weights are kept as
they are. attnlab keeps parameters in float32; a checkpoint's own dtypes
(bfloat16, float16) convert to float32 exactly and are recorded, so writing back
gives the same bytes.

Only numpy and the `safetensors` package are needed (`pip install -e ".[hf]"`);
safetensors reads and writes bfloat16 through ml_dtypes, which jax ships.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from attnlab import errors

Path = tuple[str | int, ...]

# model_type -> the architecture name written back into config.json.
ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
# The defaults of transformers' config classes for fields a config.json may leave out.
_DEFAULTS = {
  "llama": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=2048),
  "mistral": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=131_072),
  "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=32_768),
  "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=32_768),
}
_REQUIRED = (
  "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
)  # fmt: skip
_DTYPES = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
  "float64": np.dtype(np.float64),
}
# Derived buffers some older checkpoints saved; transformers recomputes them.
_DERIVED_SUFFIX = ".rotary_emb.inv_freq"
INDEX_FILE = "model.safetensors.index.json"
# Files of a checkpoint directory besides config and weights, kept for the way back.
SIDE_FILES = (
  "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
  "special_tokens_map.json", "vocab.json", "merges.txt",
)  # fmt: skip


class UnsupportedError(errors.UsageError):
  """The checkpoint is of an architecture, or uses a feature, the trunk lacks."""


def _model_type(hf: Mapping[str, Any]) -> str:
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type not in ARCHITECTURES or any(a != ARCHITECTURES[model_type] for a in architectures):
    given = f"{architectures[0]!r} " if architectures else ""
    raise UnsupportedError(
      f"unsupported architecture {given}(model_type {model_type!r}); attnlab converts "
      f"{', '.join(ARCHITECTURES.values())}"
    )
  return model_type


# The RoPE scalings the trunk computes (`layers.rope_frequencies`).
ROPE_SCALINGS = ("linear", "llama3")


def _rope(hf: Mapping[str, Any], model_type: str) -> tuple[float, dict[str, Any]]:
  """(rope_theta, config.model.rope_scaling fields), after rejecting the RoPE
  variants the trunk does not compute.

  transformers ≥ 4.56 may write `rope_parameters` {rope_type, rope_theta, ...}
  instead of `rope_theta` and `rope_scaling`.
  """
  parameters = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or parameters
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type not in (None, "default", *ROPE_SCALINGS):
    raise UnsupportedError(
      f"rope_scaling of type {rope_type!r} is not supported: the trunk's RoPE computes "
      f"{', '.join(ROPE_SCALINGS)} scaling; convert a model with one of them or none"
    )
  fraction = hf.get("partial_rotary_factor", parameters.get("partial_rotary_factor", 1.0))
  if fraction != 1.0:
    raise UnsupportedError(f"partial_rotary_factor={fraction} is not supported (only 1.0)")
  theta = float(
    hf.get("rope_theta", parameters.get("rope_theta", _DEFAULTS[model_type]["rope_theta"]))
  )
  fields = dict(type="", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_len=8192)  # fmt: skip
  if rope_type in ROPE_SCALINGS:
    fields.update(type=rope_type, factor=float(scaling["factor"]))
  if rope_type == "llama3":
    fields.update(
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_len=int(scaling["original_max_position_embeddings"]),
    )
  return theta, fields


def _hf_rope_scaling(scaling: Mapping[str, Any]) -> dict[str, Any] | None:
  """config.model.rope_scaling -> a config.json rope_scaling (None: unscaled)."""
  if scaling["type"] in ("", "default"):
    return None
  out = {"rope_type": scaling["type"], "factor": scaling["factor"]}
  if scaling["type"] == "llama3":
    out.update(
      low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"],
      original_max_position_embeddings=scaling["original_max_len"],
    )  # fmt: skip
  return out


def model_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """config.model fields (attnlab.config) of the trunk that computes what the
  Hugging Face config `hf` (a parsed config.json) describes.

  Raises UnsupportedError, naming the field, for what the trunk cannot compute:
  another architecture, sliding windows, rope scaling, biases on o_proj or the
  MLP, an activation other than SiLU.
  """
  model_type = _model_type(hf)
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise UnsupportedError(f"config.json lacks {missing}")
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("mlp_bias"):
    raise UnsupportedError("mlp_bias=true is not supported: the trunk's MLP has no biases")
  if model_type != "qwen2" and hf.get("attention_bias"):
    raise UnsupportedError(
      "attention_bias=true is not supported: it biases o_proj too, and the trunk's output "
      "projection has no bias (only q/k/v biases, as Qwen2 has)"
    )
  if model_type == "mistral" and hf.get("sliding_window", 4096) is not None:
    raise UnsupportedError(
      f"sliding_window={hf.get('sliding_window', 4096)} is not supported: the trunk's "
      "softmax attends to every earlier token"
    )
  layer_types = hf.get("layer_types") or []
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
    raise UnsupportedError(
      "sliding-window layers (use_sliding_window / layer_types) are not supported: the "
      "trunk's softmax attends to every earlier token"
    )
  defaults = _DEFAULTS[model_type]
  heads = int(hf["num_attention_heads"])
  theta, scaling = _rope(hf, model_type)
  return dict(
    attention="softmax",
    layer_pattern="",
    vocab_size=int(hf["vocab_size"]),
    d_model=int(hf["hidden_size"]),
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=heads,
    num_kv_heads=int(hf.get("num_key_value_heads") or heads),
    head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
    mlp_dim=int(hf["intermediate_size"]),
    rope=True,
    rope_theta=theta,
    rope_scaling=scaling,
    rope_fraction=1.0,
    qk_norm=model_type == "qwen3",
    canon_conv=0,
    qkv_bias=model_type == "qwen2",
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
    max_len=int(hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
    scan_layers=False,
  )


def check_exportable(model: Mapping[str, Any]) -> None:
  """Raises UnsupportedError unless `model` (config.model) is a trunk a Llama-family
  config describes: softmax in every layer, RoPE over all of head_dim, no Canon
  conv, q/k/v biases and qk-norm not both (Qwen3's attention_bias biases o_proj too)."""
  names = [p.strip() for p in str(model["layer_pattern"]).split(",") if p.strip()]
  names = names or [model["attention"]]
  if set(names) != {"softmax"}:
    raise UnsupportedError(
      f"only softmax trunks map onto a Hugging Face Llama; this run's layers are {names}"
    )
  if model["canon_conv"]:
    raise UnsupportedError(
      f"model.canon_conv={model['canon_conv']}: Llama-family models have no Canon conv"
    )
  if model["rope"] is False or model["rope_fraction"] != 1.0:
    raise UnsupportedError("Llama-family models rotate all of head_dim (model.rope, rope_fraction)")
  if model["qkv_bias"] and model["qk_norm"]:
    raise UnsupportedError("model.qkv_bias with model.qk_norm has no Hugging Face counterpart")


def tensor_map(model: Mapping[str, Any]) -> dict[str, tuple[Path, bool]]:
  """{HF tensor name: (attnlab parameter path, transposed)} for config.model
  `model` (unscanned layout: ('blocks', layer, ...))."""
  table: dict[str, tuple[Path, bool]] = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
  }
  if not model["tie_embeddings"]:
    table["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(model["num_layers"]):
    hf, ours = f"model.layers.{i}.", ("blocks", i)
    table[hf + "input_layernorm.weight"] = (ours + ("attn_norm", "scale"), False)
    table[hf + "post_attention_layernorm.weight"] = (ours + ("mlp_norm", "scale"), False)
    for p in "qkv":
      table[hf + f"self_attn.{p}_proj.weight"] = (ours + ("mixer", "qkv", p, "kernel"), True)
      if model["qkv_bias"]:
        table[hf + f"self_attn.{p}_proj.bias"] = (ours + ("mixer", "qkv", p, "bias"), False)
    if model["qk_norm"]:
      for p in "qk":
        table[hf + f"self_attn.{p}_norm.weight"] = (
          ours + ("mixer", "qkv", f"{p}_norm", "scale"),
          False,
        )
    table[hf + "self_attn.o_proj.weight"] = (ours + ("mixer", "out", "kernel"), True)
    for p in ("gate", "up", "down"):
      table[hf + f"mlp.{p}_proj.weight"] = (ours + ("mlp", p, "kernel"), True)
  return table


def read_config(directory: str) -> dict[str, Any]:
  """The parsed config.json of a Hugging Face checkpoint directory."""
  if not os.path.isdir(directory):
    raise errors.PathError(f"--from_hf={directory}: no such directory")
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise errors.PathError(
      f"--from_hf={directory} holds no config.json: give a Hugging Face checkpoint directory "
      "(save_pretrained's output)"
    )
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise errors.UsageError(f"{path} is not JSON: {error}") from None


def _safetensors_numpy():
  try:
    import safetensors.numpy
  except ImportError:
    raise errors.UsageError(
      "reading and writing Hugging Face checkpoints needs the safetensors package: "
      'pip install -e ".[hf]"'
    ) from None
  return safetensors.numpy


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory: the files its
  model.safetensors.index.json names (a sharded checkpoint), else every
  *.safetensors there. Arrays keep their stored dtype."""
  st = _safetensors_numpy()
  index_path = os.path.join(directory, INDEX_FILE)
  weight_map = None
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise errors.PathError(
      f"no *.safetensors in {directory} (a pytorch_model.bin checkpoint: load it in "
      "transformers and save_pretrained it again, which writes safetensors)"
    )
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise errors.PathError(f"{index_path} names {name}, which is not in {directory}")
    for key, array in st.load_file(path).items():
      if key in tensors:
        raise errors.UsageError(f"tensor {key} is in two files of {directory}")
      tensors[key] = array
  if weight_map is not None:
    lost = sorted(set(weight_map) - set(tensors))
    if lost:
      raise errors.UsageError(f"{index_path} lists {lost[:3]}, which its files do not hold")
  return tensors


def params_from_hf(
  tensors: Mapping[str, np.ndarray],
  model: Mapping[str, Any],
  shapes: Mapping[Path, tuple[int, ...]],
) -> tuple[dict[Path, np.ndarray], dict[str, str]]:
  """(float32 parameters by path, {HF tensor name: stored dtype}) of a checkpoint.

  `shapes` are the trunk's parameter shapes (train_state.param_shapes); every
  tensor must fit one exactly and every parameter must be given. With tied
  embeddings a stored lm_head.weight must equal the embedding (it is written
  back, so the tensors round-trip)."""
  table = tensor_map(model)
  tied_head = model["tie_embeddings"] and "lm_head.weight" in tensors
  params: dict[Path, np.ndarray] = {}
  dtypes: dict[str, str] = {}
  unknown = []
  for name, array in tensors.items():
    if name.endswith(_DERIVED_SUFFIX) or (tied_head and name == "lm_head.weight"):
      continue
    if name not in table:
      unknown.append(name)
      continue
    path, transposed = table[name]
    if array.dtype not in _DTYPES.values():
      raise errors.UsageError(f"tensor {name} has dtype {array.dtype}; expected a float type")
    value = array.astype(np.float32)
    value = value.T if transposed else value
    if tuple(value.shape) != tuple(shapes[path]):
      want = shapes[path][::-1] if transposed else shapes[path]
      raise errors.UsageError(
        f"tensor {name} has shape {list(array.shape)}; config.json implies {list(want)}"
      )
    params[path] = value
    dtypes[name] = array.dtype.name
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise UnsupportedError(
      f"tensor {sorted(unknown)[0]}{more} has no place in the trunk: not a Llama-family "
      "checkpoint, or one with a feature attnlab lacks"
    )
  missing = sorted(set(table) - set(dtypes))
  if missing:
    raise errors.UsageError(
      f"the checkpoint lacks {missing[0]}"
      + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    )
  if tied_head:
    head = tensors["lm_head.weight"]
    if not np.array_equal(head, tensors["model.embed_tokens.weight"]):
      raise errors.UsageError(
        "tie_word_embeddings=true, but lm_head.weight differs from model.embed_tokens.weight"
      )
    dtypes["lm_head.weight"] = head.dtype.name
  return params, dtypes


def unstack_layers(params: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
  """Parameters of a scan_layers trunk (('blocks', name..., ) with a leading
  layer axis) in the per-layer layout (('blocks', i, name...)); others as given."""
  out: dict[Path, np.ndarray] = {}
  for path, value in params.items():
    if path[0] == "blocks" and not isinstance(path[1], int):
      for i in range(value.shape[0]):
        out[("blocks", i, *path[1:])] = value[i]
    else:
      out[path] = value
  return out


def hf_tensors(
  params: Mapping[Path, np.ndarray],
  model: Mapping[str, Any],
  dtypes: Mapping[str, str] | str,
) -> dict[str, np.ndarray]:
  """The HF tensors ([out, in] projections) of a trunk's parameters.

  `dtypes`: one dtype name for every tensor, or {name: dtype} (a converted
  checkpoint's own; then exactly those tensors are written, a tied
  lm_head.weight included where the source had one)."""
  params = unstack_layers(params)
  table = dict(tensor_map(model))
  names = list(table)
  if not isinstance(dtypes, str):
    if model["tie_embeddings"] and "lm_head.weight" in dtypes:
      table["lm_head.weight"] = (("embed", "embedding"), False)
    names = [n for n in dtypes if n in table] + [n for n in table if n not in dtypes]
  out = {}
  for name in names:
    path, transposed = table[name]
    dtype = _DTYPES[dtypes if isinstance(dtypes, str) else dtypes.get(name, "float32")]
    value = np.asarray(params[path], np.float32)
    out[name] = np.ascontiguousarray((value.T if transposed else value).astype(dtype))
  return out


# (HF config key, config.model key): the fields an exported config.json carries.
_FIELDS = (
  ("vocab_size", "vocab_size"), ("hidden_size", "d_model"), ("num_hidden_layers", "num_layers"),
  ("num_attention_heads", "num_heads"), ("num_key_value_heads", "num_kv_heads"),
  ("head_dim", "head_dim"), ("intermediate_size", "mlp_dim"), ("rope_theta", "rope_theta"),
  ("rms_norm_eps", "norm_eps"), ("tie_word_embeddings", "tie_embeddings"),
  ("max_position_embeddings", "max_len"),
)  # fmt: skip


def hf_config(
  model: Mapping[str, Any], base: Mapping[str, Any] | None = None, dtype: str | None = None
) -> dict[str, Any]:
  """A config.json for config.model `model`.

  With `base` (the converted checkpoint's own config.json) the result is
  `base` with only the fields that now differ replaced, so a checkpoint
  converted in and out gets its config back unchanged. Without, a Llama
  config (Qwen2 for q/k/v biases, Qwen3 for qk-norm)."""
  check_exportable(model)
  resolved = {k: v for k, v in model.items()}
  resolved["num_kv_heads"] = model["num_kv_heads"] or model["num_heads"]
  resolved["head_dim"] = model["head_dim"] or model["d_model"] // model["num_heads"]
  if base is not None:
    out = dict(base)
    now = model_fields(base)
    for hf_key, key in _FIELDS:
      if now[key] != resolved[key]:
        out[hf_key] = resolved[key]
  else:
    model_type = "qwen2" if model["qkv_bias"] else "qwen3" if model["qk_norm"] else "llama"
    out = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "hidden_act": "silu",
      "attention_dropout": 0.0,
      "rope_scaling": _hf_rope_scaling(model.get("rope_scaling") or {"type": ""}),
      "use_cache": True,
      **({"attention_bias": False, "mlp_bias": False} if model_type == "llama" else {}),
      **({"use_sliding_window": False} if model_type != "llama" else {}),
      **{hf_key: resolved[key] for hf_key, key in _FIELDS},
      "torch_dtype": "float32",
    }
  if dtype is not None:
    out["torch_dtype"] = dtype
  return out


def write(directory: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
  """config.json and model.safetensors (metadata format 'pt', which
  transformers' loader asks for) into `directory`."""
  st = _safetensors_numpy()
  os.makedirs(directory, exist_ok=True)
  st.save_file(
    dict(tensors), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(config), f, indent=2)
    f.write("\n")
