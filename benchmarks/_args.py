"""argparse for the benchmark scripts, failing as attnlab's commands do: one
line on stderr, `<program>: error: <message>`, and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
  def error(self, message: str) -> NoReturn:
    sys.stderr.write(f"{self.prog}: error: {message} (--help lists the options)\n")
    sys.exit(2)
