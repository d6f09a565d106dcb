"""Test setup: 8 simulated CPU devices, shared helpers and fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
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


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and backend != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}"))
