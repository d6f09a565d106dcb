"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), with its
`parameters` cell overridden to small step counts, and shows what it promises."""

import csv
import json

import pytest

from .conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs(tmp_path):
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  root = tmp_path / "nb"
  workdir = root / "attention=softmax"
  # As papermill does: a cell after the parameters cell overrides them.
  overrides = (
    f"STEPS = 20\nOTHER_VARIANT = 'linear'\nBATCH_SIZE = 8\nROOT = {str(tmp_path / 'nb')!r}\n"
  )
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(REPO / "notebooks")}},
  )
  client.execute()  # raises CellExecutionError on any failing cell

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # The curves, the analysis figures (at least eigenvalues and attention maps) and the comparison.
  assert len(images) >= 4, len(images)
  text = "".join(o.get("text", "") for o in outputs)
  assert "decoded answers correct:" in text
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 20 and "train/mfu" in rows[-1]
  assert (workdir / "analysis" / "summary.json").exists()
  with open(root / "compare.csv") as f:
    table = list(csv.DictReader(f))
  assert sorted(r["model.attention"] for r in table) == ["linear", "softmax"]
  assert all(r["step"] == "20" for r in table)
