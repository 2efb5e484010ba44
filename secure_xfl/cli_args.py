"""What every ``secure-xfl`` command shares: exit codes, the one-line error handler, the
help formatter and strict argument types."""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from secure_xfl.errors import ConfigError, SecureXFLError

log = logging.getLogger("secure_xfl.cli")

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_FAILED = 1
"""The run failed: no round completed, a child process died, an audit finding, a bug."""
EXIT_USAGE = 2
"""Usage, configuration or input error: a bad flag, kit, file or permission."""
EXIT_REFUSED = 3
"""A client refused the run because it violates its own privacy policy
(:data:`secure_xfl.services.client.EXIT_REFUSED`)."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C)."""

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK:<4} success
  {EXIT_FAILED:<4} the run failed (no round completed, a child process failed, an audit
       finding such as an exceeded budget, or an unexpected error)
  {EXIT_USAGE:<4} usage, configuration or input error: a bad flag, startup kit, file or
       permission (one line on stderr: secure-xfl COMMAND: error: MESSAGE)
  {EXIT_REFUSED:<4} client only: it refused the run, which violates its own privacy policy
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends ``(default: …)`` to options that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default is None
            or action.default is False  # a store_true flag: off unless given
            or action.default == argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``PROG: error: MESSAGE (see …)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types: reject bad values while parsing, with the flag's name ----------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def _positive(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def _address(text: str) -> str:
    from secure_xfl.services.runtime import parse_address

    try:
        parse_address(text)
    except SecureXFLError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 127.0.0.1:8443)") from None
    return text


def _model_spec(text: str) -> str:
    kind, _, arg = text.partition(":")
    if text == "lm" or (kind == "vector" and arg.isdigit() and int(arg) > 0):
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: expected lm or vector:N (N > 0)")


def _slow_spec(clients: Sequence[str]) -> Callable[[str], tuple[str, float]]:
    def parse(text: str) -> tuple[str, float]:
        name, sep, factor = text.partition("=")
        if not sep or not name or not factor:
            raise argparse.ArgumentTypeError(
                f"expected CLIENT=FACTOR, e.g. {clients[-1]}=3, got {text!r}"
            )
        if name not in clients:
            raise argparse.ArgumentTypeError(
                f"unknown client {name!r}; the demo's clients are {', '.join(clients)}"
            )
        try:
            value = _non_negative(factor)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: FACTOR {exc}") from None
        return name, value

    parse.__name__ = "CLIENT=FACTOR"
    return parse


# -- checks run before any work starts ---------------------------------------------------------


def _writable_dir(path: Path, what: str) -> None:
    """Create ``path`` (and parents) if needed and make sure files can be written in it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {what} {path}: permission denied")


def _writable_file(path: str | None, what: str) -> None:
    """The folder a file will be written into exists and is writable."""
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} {path}: permission denied on {parent}")
    if Path(path).is_dir():
        raise ConfigError(f"cannot write {what} {path}: it is a folder")


def _os_message(exc: OSError) -> str:
    """``PATH: reason`` for an OSError (permission, missing file, full disk …)."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def _child_message(exc: subprocess.CalledProcessError) -> str:
    """What a failed child process said last, on one line."""
    cmd = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd))
    said = exc.stderr or exc.output or b""
    text = said.decode(errors="replace") if isinstance(said, bytes) else str(said)
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
    return f"child process exited {exc.returncode}: {cmd}" + (f": {last}" if last else "")


def _run(prog: str, func: Callable[[], int]) -> int:
    """Run one command; every error becomes one line on stderr and an exit code."""

    def fail(code: int, message: str) -> int:
        log.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(func())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SecureXFLError as exc:
        return fail(EXIT_USAGE, str(exc) or type(exc).__name__)
    except OSError as exc:
        return fail(EXIT_USAGE, _os_message(exc))
    except subprocess.CalledProcessError as exc:
        return fail(EXIT_FAILED, _child_message(exc))
    except Exception as exc:
        return fail(
            EXIT_FAILED,
            f"unexpected {type(exc).__name__}: {exc} (rerun as "
            f"'secure-xfl --log-level DEBUG {prog.removeprefix('secure-xfl ')} …' "
            "for the traceback)",
        )
