"""Command line of the trainer.

    python -m attnlab.train --config=configs/tiny.py --workdir=runs/tiny
    python -m attnlab.train --config=configs/tiny.py:attention=linear \
        --workdir=runs/linear --config.total_steps=500

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from absl import flags, logging
from ml_collections import config_flags

# The trainer (jax, flax, orbax, grain) is imported in main: a mistyped flag or
# config file fails in half a second instead of after those imports.
from attnlab import cli, errors

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, optionally with :key=value,... arguments.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints and metrics.", required=True
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for multi-process runs off TPU (on TPU pods leave "
  "unset and pass --distributed).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM)."
)


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/grain INFO logs drown progress
  if _DISTRIBUTED.value or _COORDINATOR.value:
    import jax

    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  config = cli.config_file_value(_CONFIG)
  from attnlab import trainer

  # Bad input raises errors.UsageError (validate.ConfigError included): cli.run
  # prints its one line and exits 2; any other failure exits 1.
  trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
