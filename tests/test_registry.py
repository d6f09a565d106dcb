"""Every registered attention variant has each piece that the README's
'Adding a variant' lists, and the models stay below the analysis."""

import inspect
import re
import subprocess
import sys

import pytest

from attnlab.models import attention
from attnlab.models.attention import base, common_form

from .conftest import LAYER_CASES, MODEL_CASES, REPO


def _variants_in(cases: dict) -> set[str]:
  """The variants a test's cases build, directly or through a layer pattern."""
  names = set()
  for trunk, _ in cases.values():
    names.add(trunk.get("attention", "softmax"))
    names.update(n for n in trunk.get("layer_pattern", "").split(",") if n)
  return names


@pytest.mark.parametrize("name", attention.names())
def test_registered_variant_has_every_step(name):
  variant = attention.get(name)
  mixer = variant.mixer_cls
  assert issubclass(mixer, base.Mixer), f"{name}: subclass base.Mixer"
  for method in ("__call__", "init_cache", "step"):
    assert getattr(mixer, method) is not getattr(base.Mixer, method), f"{name}: implement {method}"

  adapter = variant.analysis
  assert isinstance(adapter, common_form.Adapter), f"{name}: register an analysis adapter"
  assert callable(adapter.forms) and callable(adapter.readout)
  assert adapter.hooks, f"{name}: name the mixer hooks the analysis adapter calls"
  for hook in adapter.hooks:
    assert not hook.startswith("_"), f"{name}: analysis hook {hook!r} must be public"
    method = getattr(mixer, hook, None)
    assert callable(method), f"{name}: the mixer lacks the analysis hook {hook!r}"
    doc = inspect.getdoc(method) or ""
    assert re.search(r"\[(B|batch)\b", doc), f"{name}: document {hook!r} with its shapes"

  assert name in _variants_in(MODEL_CASES), f"add {name!r} to tests/conftest.py::MODEL_CASES"
  assert name in _variants_in(LAYER_CASES), f"add {name!r} to tests/conftest.py::LAYER_CASES"


def test_models_do_not_import_the_analysis():
  """attnlab.analysis sits above attnlab.models; a fresh interpreter shows the
  whole import graph (this one has imported the analysis already)."""
  check = (
    "import sys, attnlab.models; "
    "print(sorted(m for m in sys.modules if m.startswith('attnlab.analysis')))"
  )
  done = subprocess.run(
    [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "[]"


def test_register_requires_an_analysis_adapter():
  with pytest.raises(TypeError, match="Adapter"):
    attention.registry.register("no_such_variant", uses_rope=False, analysis=object())(object)
  assert "no_such_variant" not in attention.names()
