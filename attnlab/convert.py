"""Hugging Face Llama-family checkpoints to attnlab workdirs, and back.

    python -m attnlab.convert --from_hf=path/to/Llama-3.2-1B --workdir=runs/llama
    python -m attnlab.convert --to_hf=out/llama --workdir=runs/llama [--step=N]

`--from_hf` reads a local checkpoint directory (config.json and *.safetensors,
sharded or not) of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
Qwen3ForCausalLM into a workdir laid out as a training run leaves one:
config.json (the trunk's config: softmax, GQA, RoPE θ, RMSNorm ε, tied or untied
embeddings, Qwen2's q/k/v biases, Qwen3's qk-norm) and an Orbax checkpoint at
step 0 (parameters in float32, a fresh optimizer state). `attnlab.evaluate`,
`attnlab.sample`, `attnlab.analyze` load it; `attnlab.train` resumes it (with a
config of the same model; its data starts at the beginning); and
`--config.init_from=WORKDIR` starts any variant's training from its parameters.
`converted.json` records the source, its config.json and its tensors' dtypes.
`--dtype` sets model.dtype, the compute dtype (default float32).

`--to_hf` writes a workdir's softmax trunk (latest checkpoint, or `--step`) as
config.json and model.safetensors ([out, in] projections): a converted
checkpoint with its own config, tensor names and dtypes, so a checkpoint
converted in and out has the same tensors byte for byte; a trained run as a
Llama (Qwen2 with q/k/v biases, Qwen3 with qk-norm) in float32. `--dtype` sets
the tensors' dtype instead.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import flags, logging

# jax, orbax and the model are imported in main, after the flags have been checked.
from attnlab import cli, errors


def _define_flags() -> None:
  """Defined only when run as a program, so importing `from_hf` / `to_hf` beside
  another command line's flags (tests, notebooks: --workdir, --step) does not collide."""
  flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint directory to read.")
  flags.DEFINE_string("to_hf", None, "Directory to write a Hugging Face checkpoint into.")
  flags.DEFINE_string("workdir", None, "attnlab workdir.", required=True)
  flags.DEFINE_integer(
    "step", None, "With --to_hf: the checkpoint step (default: latest).", lower_bound=0
  )
  flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "With --from_hf: model.dtype, the compute dtype (default float32; parameters stay "
    "float32). With --to_hf: the tensors' dtype (default: the converted checkpoint's own, "
    "else float32).",
  )


def _checked_flags(values) -> None:
  if bool(values.from_hf) == bool(values.to_hf):
    raise errors.UsageError(
      "give one of --from_hf=DIR (Hugging Face checkpoint to workdir) or --to_hf=DIR "
      "(workdir to Hugging Face checkpoint)"
    )
  if values.from_hf and values.step is not None:
    raise errors.UsageError("--step goes with --to_hf (a converted workdir has step 0 only)")


def from_hf(source: str, workdir: str, dtype: str = "float32") -> str:
  """Converts the checkpoint directory `source` into the new workdir `workdir`;
  returns the workdir's absolute path."""
  import jax
  import jax.numpy as jnp

  from attnlab import checkpoint, hf, sharding, train_state
  from attnlab import config as config_lib

  hf_config = hf.read_config(source)
  fields = hf.model_fields(hf_config)  # unsupported architectures fail before any reading
  workdir = os.path.abspath(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(n[0] != "." for n in os.listdir(checkpoints)):
    raise errors.UsageError(
      f"--workdir={workdir} already holds checkpoints; convert into a new workdir"
    )
  config = config_lib.base_config()
  for key, value in fields.items():
    if isinstance(value, dict):  # a nested group (rope_scaling)
      config.model[key].update(value)
    elif key != "vocab_size":
      config.model[key] = value
  config.model.dtype = dtype
  config.data.vocab_size = fields["vocab_size"]  # the model's follows it (finalize)
  config = config_lib.finalize(config)

  shapes = {path: shape for path, (shape, _) in train_state.param_shapes(config).items()}
  params, dtypes = hf.params_from_hf(hf.read_tensors(source), config.model, shapes)
  placed = train_state.setup(config, sharding.make_mesh({}, jax.local_devices()[:1]))

  def put(key_path, leaf):
    path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
    return jax.device_put(params[path], leaf.sharding)

  with placed.context():
    state_params = jax.tree_util.tree_map_with_path(put, placed.abstract_state["params"])
    shardings = placed.state_sharding
    state = {
      "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
      "params": state_params,
      # AdamW's moments start at zero whatever the parameters: a fresh optimizer.
      "opt_state": jax.jit(placed.tx.init, out_shardings=shardings["opt_state"])(state_params),
    }
  os.makedirs(workdir, exist_ok=True)
  kept = [name for name in hf.SIDE_FILES if os.path.isfile(os.path.join(source, name))]
  if "tokenizer.json" in kept:
    # sample/evaluate/train then read text with the model's own tokenizer (it is
    # copied below); it needs the optional `tokenizers` package to load.
    config.data.tokenizer = os.path.join(workdir, "hf", "tokenizer.json")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  if kept:  # tokenizer and generation settings, written back by --to_hf
    os.makedirs(os.path.join(workdir, "hf"), exist_ok=True)
    for name in kept:
      shutil.copy(os.path.join(source, name), os.path.join(workdir, "hf", name))
  record = {
    "from_hf": os.path.abspath(source),
    "step": 0,
    "architecture": hf.ARCHITECTURES[hf_config["model_type"]],
    "hf_config": hf_config,
    "tensors": dtypes,
    "files": kept,
  }
  with open(os.path.join(workdir, checkpoint.CONVERTED_FILE), "w") as f:
    json.dump(record, f, indent=1)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    ckpt.save_without_data(0, state)
  finally:
    ckpt.close()
  return workdir


def to_hf(workdir: str, out: str, step: int | None = None, dtype: str | None = None) -> int:
  """Writes the softmax trunk of `workdir` (at `step`, default latest) as a
  Hugging Face checkpoint into `out`; returns the step written."""
  import numpy as np
  from flax import nnx

  from attnlab import checkpoint, hf, loader

  if os.path.isdir(out) and any(
    name.endswith(".safetensors") or name == hf.INDEX_FILE for name in os.listdir(out)
  ):
    raise errors.UsageError(
      f"--to_hf={out} already holds a checkpoint (*.safetensors); give a new directory"
    )
  config = loader.load_config(workdir)
  hf.check_exportable(config.model)  # before the parameters are read
  model, config, step = loader.load_model(workdir, step)
  params = {
    tuple(path): np.asarray(variable.get_value())
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  record = {}
  marker = os.path.join(workdir, checkpoint.CONVERTED_FILE)
  if os.path.isfile(marker):
    with open(marker) as f:
      record = json.load(f)
  model_config = config.model.to_dict()
  tensors = hf.hf_tensors(params, model_config, dtype or record.get("tensors") or "float32")
  hf.write(out, tensors, hf.hf_config(model_config, record.get("hf_config"), dtype))
  for name in record.get("files", []):
    source = os.path.join(workdir, "hf", name)
    if os.path.isfile(source):
      shutil.copy(source, os.path.join(out, name))
  return step


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  _checked_flags(values)
  if not values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would drown the result
  from attnlab import metrics

  if values.from_hf:
    workdir = from_hf(values.from_hf, values.workdir, values.dtype or "float32")
    metrics.ProgressLine().message(f"converted {values.from_hf} into {workdir} (step 0)")
  else:
    step = to_hf(values.workdir, values.to_hf, values.step, values.dtype)
    metrics.ProgressLine().message(f"wrote step {step} of {values.workdir} to {values.to_hf}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
