"""The exceptions that mean "the input is wrong", as opposed to a failure.

A command line (`attnlab.cli.run`) exits with status 2 and one line for these,
and with status 1 for anything else raised.
"""

from __future__ import annotations


class UsageError(ValueError):
  """A value, path or combination the user gave cannot work; the message names
  it and the fix."""


class PathError(UsageError, FileNotFoundError):
  """A path the user gave does not exist or is not what the command needs."""
