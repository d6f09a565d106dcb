"""Regenerates the README's bad-input table from the cases that check it.

    python -m tests.cli_table

Runs `tests/test_cli_errors.py` (each case: the real command, its exit status
and its one line on stderr) with the rows written out instead of compared, then
replaces the README section between the markers with them, in case order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.test_cli_errors import CASES, REPO, TABLE_DIR_ENV

BEGIN, END = "<!-- bad-input-table -->", "<!-- /bad-input-table -->"
HEADER = "| bad input | command | exit | the one line on stderr |\n|---|---|---|---|\n"


def main() -> int:
  with tempfile.TemporaryDirectory() as rows_dir:
    code = subprocess.call(
      [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
       "tests/test_cli_errors.py::test_bad_input_ends_in_one_line"],
      cwd=REPO, env=dict(os.environ, **{TABLE_DIR_ENV: rows_dir}),
    )  # fmt: skip
    if code != 0:
      print("some cases failed; README left unchanged", file=sys.stderr)
      return code
    rows = []
    for case in CASES:
      with open(os.path.join(rows_dir, case.id)) as f:
        rows.append(f.read())
  readme = REPO / "README.md"
  text = readme.read_text()
  if BEGIN not in text or END not in text:
    print(f"README.md lacks the markers {BEGIN} ... {END}", file=sys.stderr)
    return 1
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  readme.write_text(head + BEGIN + "\n" + HEADER + "\n".join(rows) + "\n" + END + tail)
  print(f"wrote {len(rows)} rows to {readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
