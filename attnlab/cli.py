"""How every attnlab command line starts, fails and exits.

    if __name__ == "__main__":
      _define_flags()
      cli.run(main)

Exit status: 0 when done; 2 for a usage error (bad flags, a missing or wrong
path, a config that cannot work: `errors.UsageError` and its subclasses such
as `validate.ConfigError`, absl's flag errors, `app.UsageError`); 1 for a
runtime failure (anything else: a diverged loss, a full disk, a compile that
does not fit); 130 when interrupted. A failure prints one line on stderr,

    attnlab.train: error: model.num_heads=3 does not divide model.d_model=64; ...

and no traceback unless `--verbose` is given or ATTNLAB_VERBOSE=1 is set.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from attnlab import config as config_lib
from attnlab import errors

VERBOSE_ENV = "ATTNLAB_VERBOSE"
_MAX_MESSAGE = 600  # characters; orbax and XLA messages can run to pages


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (its lines joined, long ones cut; an
  embedded traceback, as ml_collections puts in a config error, reduced to its
  last line)."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    head, _, tail = text.partition("Traceback (most recent call last)")
    last = [line for line in tail.splitlines() if line.strip()]
    text = head + (last[-1] if last else "")
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  text = text or type(error).__name__
  return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def is_usage_error(error: BaseException) -> bool:
  return isinstance(error, (errors.UsageError, app.UsageError, flags.Error))


def exit_code(error: BaseException) -> int:
  return 2 if is_usage_error(error) else 1


def fail(program: str, message: str, code: int) -> NoReturn:
  sys.stderr.write(f"{program}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _verbose(argv: list[str] | None = None) -> bool:
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose)
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv or sys.argv)


def describe(error: BaseException) -> str:
  """The line printed for `error`: usage errors as their message, runtime
  failures with their type, since 'nan at step 12' reads differently from
  'No space left on device'."""
  if is_usage_error(error):
    return one_line(error)
  return f"{type(error).__name__}: {one_line(error)} (--verbose shows the traceback)"


def run(
  main: Callable[[Any], Any],
  *,
  flags_parser: Callable[[list[str]], Any] | None = None,
  program: str | None = None,
) -> None:
  """`absl.app.run(main)` with attnlab's exit convention (module docstring).

  `flags_parser` is absl's: argv -> what `main` receives (default: the parsed
  flags' remaining argv).
  """
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On failure, show the Python traceback.")
  name = program or _program_name()

  def parse(argv: list[str]) -> Any:
    try:
      return flags_parser(argv) if flags_parser else flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - a config file can raise anything while parsing
      if _verbose(argv):
        raise
      fail(name, _parse_error_message(error, argv), 2)

  def guarded(parsed: Any) -> None:
    try:
      main(parsed)
    except SystemExit:
      raise
    except KeyboardInterrupt:
      if _verbose():
        raise
      fail(name, "interrupted", 130)
    except BaseException as error:  # noqa: BLE001 - every failure ends in one line
      if _verbose():
        raise
      fail(name, describe(error), exit_code(error))

  def start(parsed: Any) -> None:
    if not flags.FLAGS["verbosity"].present:
      _quiet_library_info()
    guarded(parsed)

  app.run(start, flags_parser=parse)


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and errors from anywhere, INFO only from attnlab's own
  code: orbax and grain log dozens of INFO lines per checkpoint, which would
  bury a command's own progress and its error line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return any(part in record.pathname for part in ("/attnlab/", "/benchmarks/"))


def _quiet_library_info() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def _parse_error_message(error: Exception, argv: list[str]) -> str:
  if isinstance(error, SyntaxError):
    return f"syntax error in {error.filename}, line {error.lineno}: {error.msg}"
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: an unknown override field
    given = ", ".join(a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config."))
    hint = re.search(r'Did you mean \\?"([\w.]+)\\?"', str(error))
    return f"unknown config field in {given or 'the overrides'}" + (
      f"; did you mean {hint.group(1)!r}?" if hint else "; check its spelling in the config file"
    )
  required = re.search(r"Flag --(\w+) must have a value other than None", str(error))
  if required:
    return f"--{required.group(1)} is required (--helpshort lists the flags)"
  return one_line(error)


def config_file_value(holder: flags.FlagHolder) -> Any:
  """The ConfigDict of a `config_flags.DEFINE_config_file` flag. ml_collections
  defers a missing or unloadable file to first use; this turns that into a
  usage error naming the file."""
  config = holder.value
  try:
    config.get("seed")
  except OSError as error:
    given = next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{holder.name}=")), None)
    path = (given or "").split(":", 1)[0]
    if path and not os.path.exists(path):
      raise errors.PathError(
        f"--{holder.name}={given}: no such config file (relative paths start at the current "
        "directory; the repository's configs are in configs/, e.g. configs/tiny.py)"
      ) from None
    raise errors.UsageError(f"--{holder.name}: {one_line(error)}") from None
  return config


def _program_name() -> str:
  main_module = sys.modules.get("__main__")
  spec = getattr(main_module, "__spec__", None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.basename(sys.argv[0]) if sys.argv else "attnlab"


def define_config_overrides() -> flags.FlagHolder:
  """Defines (once) the `--config.x.y=value` flag of the command lines that
  load a workdir (evaluate, sample). Overrides parse with ml_collections'
  config_flags semantics against the base config (typed, unknown keys are an
  error); `override_values(holder)` then applies to the run's saved config."""
  if "config" in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])
  return config_flags.DEFINE_config_dict(
    "config",
    config_lib.base_config(),
    "Overrides of the run's saved config, e.g. --config.model.mixer.softplus.power=15.",
  )


def override_values(holder: flags.FlagHolder) -> dict[str, Any]:
  """The overrides given on the command line, flattened ('a.b.c' -> value)."""
  return dict(flags.FLAGS[holder.name].override_values)
