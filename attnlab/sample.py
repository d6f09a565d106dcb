"""Generate from a trained workdir.

python -m attnlab.sample --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200
python -m attnlab.sample --workdir=runs/tiny --prompt_ids=5,40,7,33,5 --max_new_tokens=1
python -m attnlab.sample --workdir=runs/lssa --prompt="ROMEO:" --config.model.mixer.softplus.power=15

`--config.x.y=value` overrides apply to the run's saved config before the
model is built.
"""

import sys

from absl import flags, logging

# jax and the model code are imported in main, after the flags have been checked.
from attnlab import cli, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (text tokenizers).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt as comma-separated token ids.")
flags.register_validator(
  "prompt_ids",
  lambda ids: ids is None or all(i.isdigit() for i in ids),
  "--prompt_ids takes non-negative integer token ids, e.g. --prompt_ids=5,40,7",
)
_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
# `--config.x.y=value` overrides: defined when run as a program, so importing this module
# next to another command line's own --config flag (tests, notebooks) does not collide.
_CONFIG: flags.FlagHolder | None = None


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PROMPT_IDS.value and _PROMPT.value is None:
    raise errors.UsageError("give --prompt=TEXT or --prompt_ids=ID,ID,...")
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np

  from attnlab import generate, loader
  from attnlab.data import tokenizers

  overrides = cli.override_values(_CONFIG) if _CONFIG is not None else {}
  model, config, step = loader.load_model(_WORKDIR.value, overrides=overrides)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  if _PROMPT_IDS.value:
    prompt = np.array([[int(i) for i in _PROMPT_IDS.value]], np.int32)
    vocab = config.model.vocab_size
    if prompt.max() >= vocab:
      raise errors.UsageError(
        f"--prompt_ids holds id {prompt.max()}, outside the model's vocabulary of {vocab}"
      )
  else:
    prompt = tokenizer.encode(_PROMPT.value)[None]
    if prompt.size == 0:
      raise errors.UsageError("--prompt encodes to no tokens; give a non-empty prompt")
  out = generate.generate(
    model,
    prompt,
    max_new_tokens=_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    rng=jax.random.key(_SEED.value),
  )
  ids = np.asarray(out[0])
  if _PROMPT_IDS.value:
    sys.stdout.write(",".join(map(str, ids.tolist())) + "\n")
  else:
    sys.stdout.write(tokenizer.decode(ids) + "\n")


if __name__ == "__main__":
  _CONFIG = cli.define_config_overrides()
  cli.run(main)
