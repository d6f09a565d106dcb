"""The config system: ml_collections ConfigDicts built by `configs/*.py`.

Every config file defines `get_config(arg)` and starts from `base_config()`.
`parse_arg` reads big_vision-style `:key=value,...` arguments.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from attnlab import errors

DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("norm", None),
  ("layers", None),  # the stacked-layer axis of scan_layers
)


def mixer_options() -> ConfigDict:
  """`config.model.mixer`: each attention variant's options, by registry name.

  The variant's mixer (attnlab/models/attention/<name>.py) reads them, and
  `registry.build` rejects names not listed here. `implementation` picks an
  op backend (None: by platform, see attnlab/ops/_dispatch.py). Fields whose
  default is None are typed placeholders, so `--config.model.mixer.softmax.
  implementation=xla` works on a command line.
  """
  return ConfigDict(
    {
      "softmax": dict(implementation=placeholder(str)),
      "linear": dict(
        feature_map="elu1", normalize=True, chunk_size=64, implementation=placeholder(str)
      ),
      "gated_deltanet": dict(
        num_heads=0,  # 0: the trunk's num_heads
        head_dim=0,  # 0: the trunk's head_dim
        num_v_heads=0,  # 0: num_heads; more gives grouped value heads
        expand_v=2.0,
        conv_size=4,
        allow_neg_eigval=False,
        use_gate=True,
        chunk_size=64,
        implementation=placeholder(str),
      ),
      "nats_l": dict(
        num_heads=0,  # 0: the trunk's num_heads (delta heads = NAtS heads)
        head_dim=0,  # 0: the trunk's head_dim (delta key dim)
        num_attn_heads=0,  # 0: twice num_heads, as in the paper's configs
        expand_v=2.0,
        conv_size=4,
        allow_neg_eigval=False,
        block_size=64,
        prefill_chunk_blocks=0,  # blocks per parallel prefill chunk; 0: 1024 tokens' worth
        decode_attn_blocks=placeholder(
          int
        ),  # attention-typed blocks a decoding cache holds; None: all
        implementation=placeholder(str),
      ),
      "lucid": dict(eps=1e-5, block_size=64, implementation=placeholder(str)),
      "ssa": dict(alpha_init=-7.0, token_temperature=True, implementation=placeholder(str)),
      "soft": dict(
        num_landmarks=32,
        newton_iters=20,
        ridge=0.01,
        normalize=True,
        conv_size=3,
        chunk_size=64,
        implementation=placeholder(str),
      ),
      "softplus": dict(power=0.0, implementation=placeholder(str)),  # power 0: LSSA; > 0: LSSAR
    }
  )


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """'attention=linear,steps=100' -> ConfigDict, typed by `defaults`.

  Unknown keys are an error, so `:atention=...` fails loudly.
  """
  result = ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must look like key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; this config accepts {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} expects a bool, got {value!r}")
      result[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      result[key] = type(default)(ast.literal_eval(value))
    else:
      result[key] = value
  return result


def base_config() -> ConfigDict:
  """Every knob of a run, with defaults for a small CPU model."""
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 200
  c.eval_batches = 4
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.progress = True  # live progress line on stderr
  # "START,END": a jax profiler trace of train steps START..END (inclusive),
  # written to <workdir>/tensorboard (TensorBoard's Profile tab). "" = none.
  c.profile_steps = ""
  # A workdir (trained, or written by `python -m attnlab.convert`): a run starting from
  # scratch takes every parameter of its latest checkpoint whose path and shape match
  # (attnlab/warm_start.py); the rest start fresh. Ignored when resuming. "" = none.
  c.init_from = ""

  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = DEFAULT_RULES

  m = c.model = ConfigDict()
  m.vocab_size = 256
  m.d_model = 128
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = placeholder(int)  # None: same as num_heads
  m.head_dim = placeholder(int)  # None: d_model // num_heads
  m.mlp_dim = 512
  m.attention = "softmax"
  m.layer_pattern = ""  # comma-separated names tiled over layers; '' = attention
  m.rope = placeholder(bool)  # None: the variant's default
  m.rope_theta = 10_000.0
  m.rope_fraction = 1.0  # share of head_dim rotated; the rest is position-free
  # RoPE frequency scaling of long-context checkpoints (`layers.rope_frequencies`):
  # type '' (none), 'linear' (every frequency / factor) or 'llama3' (Llama 3.1's
  # wavelength-dependent interpolation between low_freq_factor and high_freq_factor
  # over original_max_len tokens).
  m.rope_scaling = ConfigDict(
    dict(type="", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)
  )
  m.qk_norm = False
  m.canon_conv = 0  # k > 0: mixer input h + causal depthwise conv_k(h) (Canon layer)
  m.qkv_bias = False  # biases on q/k/v give position-only heads a content-free direction
  m.tie_embeddings = True
  m.norm_eps = 1e-6
  m.dtype = "float32"  # compute dtype; parameters are always float32
  m.remat = False
  m.scan_layers = False  # one scanned layer body (uniform variants only): fast compiles
  m.max_len = 256  # default decoding cache length
  m.mixer = mixer_options()

  d = c.data = ConfigDict()
  d.task = "mqar"  # mqar | needle | tfds
  d.seq_len = 64
  d.batch_size = 32  # global batch
  d.eval_batch_size = 64
  d.vocab_size = 256
  # Synthetic tasks.
  d.num_kv_pairs = 8
  d.num_queries = placeholder(int)  # None: every key is queried
  # TFDS text.
  d.tfds_name = ""
  d.data_dir = placeholder(str)
  d.train_split = "train"
  d.eval_split = "validation"
  d.text_key = "text"
  d.tokenizer = "byte"  # byte | path to a SentencePiece .model | a Hugging Face tokenizer.json
  d.prepare_from = placeholder(str)  # directory of .txt files to build from
  # Packed documents: batches carry segment_ids, every mixer keeps documents apart
  # (attention within the document, positions and states restart) and the loss skips
  # targets that start a new document. False: documents run into each other.
  d.pack = False
  # With pack: every document starts at a multiple of this many tokens (padding with
  # weight 0 in between). NAtS-L needs a multiple of its block_size, so that no routing
  # block spans two documents; 1 packs tightly.
  d.pack_align = 1

  o = c.optim = ConfigDict()
  o.lr = 3e-3
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1
  o.weight_decay = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.clip_norm = 1.0
  o.grad_accum_steps = 1
  # Peak lr of temperature parameters (SSA's position slope α); 0: same as lr. The official
  # SSA recipe gives its temperature its own, larger rate (beta_lr 1e-2 against a
  # base lr of 1e-5, umich-sota/selective_attention full_bindata_finetune.py): at
  # the base lr the position slope σ(α) barely leaves its α₀ = −7 start.
  o.temperature_lr = 1e-2
  return c


def pretraining(config: ConfigDict, *, tokenizer: str, dataset: str) -> ConfigDict:
  """Shared settings of the ~1B pretraining configs: a TFDS text dataset,
  bf16 compute, remat, FSDP within a slice, 2M-token steps, AdamW 4e-4."""
  c = config
  c.total_steps = 50_000  # ~100B tokens at 2M tokens per step
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.scan_layers = True
  c.model.max_len = 2048

  d = c.data
  d.task = "tfds"
  d.tfds_name = dataset
  d.train_split = "train"
  d.eval_split = "validation"
  d.tokenizer = tokenizer
  d.vocab_size = 32000
  d.seq_len = 2048
  d.batch_size = 1024
  d.eval_batch_size = 256

  o = c.optim
  o.lr = 4e-4
  o.warmup_steps = 2000
  o.weight_decay = 0.1
  o.min_lr_ratio = 0.1
  return c


def finalize(config: ConfigDict) -> ConfigDict:
  """Ties values that must agree (model vocab = data vocab) and locks.

  The model's vocabulary is a reference to the data's, so command-line
  overrides applied later (`--config.data.vocab_size=300`) reach the model too.
  """
  config.model.vocab_size = config.data.get_ref("vocab_size")
  config.lock()
  return config


def load_config(workdir: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
  """The saved config of a training workdir, with `overrides` applied.

  Args:
    workdir: a training workdir (holds config.json).
    overrides: flattened 'a.b.c' -> value, e.g. {'model.mixer.softplus.power': 15.0}
      (`cli.override_values` of the `cli.define_config_overrides` flag).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise errors.PathError(f"workdir {workdir!r} does not exist; give a training workdir")
  if not os.path.exists(path):
    raise errors.PathError(
      f"{path} not found: {workdir!r} is not a training workdir (python -m attnlab.train "
      "writes config.json there first)"
    )
  with open(path) as f:
    saved = json.load(f)
  # Fields added to attnlab after the run was saved take their defaults.
  config = ConfigDict(_fill_missing(saved, base_config().to_dict()))
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def _fill_missing(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _fill_missing(out[key], default)
  return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.dumps(value) if isinstance(value, list) else value
  return out
