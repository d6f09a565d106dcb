"""The layering of attnlab, checked statically (no imports run): each module
imports only its own layer or lower ones, `attnlab.ops` imports nothing beyond
jax and numpy, and an op's backend files never import one another."""

import ast
import pathlib
import sys

import pytest

from .conftest import REPO

PACKAGE = REPO / "attnlab"

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = (
  ("ops", ("attnlab.ops",)),
  (
    "foundation",
    (
      "attnlab.errors",
      "attnlab.cli",
      "attnlab.config",
      "attnlab.hardware",
      "attnlab.sharding",
      "attnlab.metrics",
      "attnlab.optim",
    ),
  ),
  ("models", ("attnlab.models",)),
  ("data", ("attnlab.data",)),
  (
    "training parts",
    (
      "attnlab.checkpoint",
      "attnlab.flops",
      "attnlab.validate",
      "attnlab.train_state",
      "attnlab.generate",
      "attnlab.hf",
      "attnlab.warm_start",
    ),
  ),
  ("runs", ("attnlab.trainer", "attnlab.loader", "attnlab.analysis")),
  (
    "programs",
    (
      "attnlab.train",
      "attnlab.evaluate",
      "attnlab.sample",
      "attnlab.analyze",
      "attnlab.sweep",
      "attnlab.compare",
      "attnlab.plan",
      "attnlab.convert",
    ),
  ),
)
BACKENDS = ("xla", "pallas_tpu", "pallas_gpu", "cudnn", "splash")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at any depth (function-local imports too);
  `from a import b` counts as a.b (b may be a submodule)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


def _layer(module: str) -> int | None:
  for index, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return index
  return None


def _modules() -> dict[str, set[str]]:
  return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def backward_edges() -> list[tuple[str, str]]:
  """(importer, imported) pairs where a lower layer imports a higher one."""
  edges = []
  for module, imported in _modules().items():
    own = _layer(module)
    for target in sorted(imported):
      theirs = _layer(target)
      if target.startswith("attnlab.") and theirs is not None and own is not None:
        if theirs > own:
          edges.append((module, target))
  return edges


def test_every_module_has_a_layer():
  missing = [m for m in _modules() if m != "attnlab" and _layer(m) is None]
  assert not missing, f"add these modules to a layer in {__file__}: {missing}"


def test_no_module_imports_a_higher_layer():
  assert backward_edges() == []


def test_ops_import_only_jax_numpy_and_the_standard_library():
  allowed = {"jax", "jaxlib", "numpy", "attnlab", "__future__"} | set(sys.stdlib_module_names)
  offenders = {
    module: sorted(t for t in imported if t.split(".")[0] not in allowed)
    for module, imported in _modules().items()
    if module.startswith("attnlab.ops")
  }
  assert not {m: t for m, t in offenders.items() if t}


def _reachable(module: str, graph: dict[str, set[str]]) -> set[str]:
  """The attnlab modules `module` imports, directly or through others (not
  counting what a package's __init__ loads on the way)."""
  packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
  seen, todo = set(), [module]
  while todo:
    for target in graph.get(todo.pop(), ()):
      if target in graph and target not in packages and target not in seen:
        seen.add(target)
        todo.append(target)
  return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_files_never_import_another_backend(backend):
  """Directly or through a shared module: a TPU kernel file must load on a
  machine whose other backends are broken, and vice versa. (An op's backend
  may build on the same backend of a shared kernel package, e.g. softmax's
  pallas_gpu on flash's.)"""
  graph = _modules()
  for module in graph:
    if module.startswith("attnlab.ops.") and module.rsplit(".", 1)[-1] == backend:
      others = sorted(
        t for t in _reachable(module, graph) if t.rsplit(".", 1)[-1] in set(BACKENDS) - {backend}
      )
      assert not others, f"{module} imports {others}"
