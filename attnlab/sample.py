"""Generate from a trained workdir.

python -m attnlab.sample --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200
python -m attnlab.sample --workdir=runs/tiny --prompt_ids=5,40,7,33,5 --max_new_tokens=1
python -m attnlab.sample --workdir=runs/lssa --prompt="ROMEO:" --config.model.mixer.softplus.power=15

`--config.x.y=value` overrides apply to the run's saved config before the
model is built.
"""

import sys

import jax
import numpy as np
from absl import app, flags, logging

from attnlab import generate, loader
from attnlab.data import tokenizers

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (text tokenizers).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt as comma-separated token ids.")
_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
# `--config.x.y=value` overrides: defined when run as a program, so importing this module
# next to another command line's own --config flag (tests, notebooks) does not collide.
_CONFIG: flags.FlagHolder | None = None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  overrides = loader.override_values(_CONFIG) if _CONFIG is not None else {}
  model, config, step = loader.load_model(_WORKDIR.value, overrides=overrides)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  if _PROMPT_IDS.value:
    prompt = np.array([[int(i) for i in _PROMPT_IDS.value]], np.int32)
  elif _PROMPT.value is not None:
    prompt = tokenizer.encode(_PROMPT.value)[None]
  else:
    raise app.UsageError("give --prompt or --prompt_ids")
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
  _CONFIG = loader.define_config_overrides()
  app.run(main)
