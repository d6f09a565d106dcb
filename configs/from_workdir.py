"""The saved config of a workdir (trained, or converted with `attnlab.convert`),
to train that model on: resume a converted checkpoint, or start another variant
of the same sizes from its parameters.

    python -m attnlab.train --config=configs/from_workdir.py:path=runs/qwen --workdir=runs/qwen
    python -m attnlab.train --config=configs/from_workdir.py:path=runs/qwen \
        --workdir=runs/gdn_from_qwen --config.init_from=runs/qwen \
        --config.model.attention=gated_deltanet

Give the data, steps and optimizer with `--config.*` overrides: a converted
workdir holds the base config's (MQAR on the model's vocabulary).

Arguments: path=<workdir>.
"""

from attnlab import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, path="")
  if not arg.path:
    raise ValueError("give the workdir: --config=configs/from_workdir.py:path=<workdir>")
  return config_lib.finalize(config_lib.load_config(arg.path))
