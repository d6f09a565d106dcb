"""The headline pod config compiles ahead of time on 8 simulated devices."""

import jax
import pytest

from attnlab import trainer

from .test_models import _load_config

pytestmark = pytest.mark.slow


def test_lucid_1b_train_step_compiles_sharded_on_8_devices(record_property):
  config = _load_config("lucid_1b")
  assert config.model.scan_layers and config.model.remat and config.mesh.fsdp == -1
  compiled = trainer.compile_train_step(config)  # lowers and compiles; allocates nothing
  memory = compiled.memory_analysis()
  gib = 2**30
  per_device = {
    "arguments_gib": memory.argument_size_in_bytes / gib,
    "temporaries_gib": memory.temp_size_in_bytes / gib,
  }
  for key, value in per_device.items():
    record_property(key, round(value, 2))
  print(f"lucid_1b train step per device on {jax.device_count()} devices: {per_device}")

  # The state (f32 params + two Adam moments, ~1.1B each) is split 8 ways by FSDP,
  # not replicated: 12 bytes x 1.1e9 / 8 ≈ 1.6 GiB per device.
  assert jax.device_count() == 8
  assert 1.3 < per_device["arguments_gib"] < 1.9
  # The step donates its state: outputs alias the inputs.
  assert memory.alias_size_in_bytes > 0.95 * memory.output_size_in_bytes
