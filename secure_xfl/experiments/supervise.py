"""Supervising the demo's child processes: start them with logs, notice one dying, stop
them all, and hold SIGTERM / Ctrl-C until a start or a clean-up step has finished."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from secure_xfl.errors import SecureXFLError

__all__ = ["CLI", "CLIENT_EXPECTED_EXITS", "DemoChildError", "last_error_line"]

CLI = [sys.executable, "-m", "secure_xfl.cli"]

#: Exit statuses of a client that are part of a normal run: 0 (the run ended well) and
#: 3 (its own policy refused the aggregator's plans; ``services.client.EXIT_REFUSED``).
CLIENT_EXPECTED_EXITS = (0, 3)


class DemoChildError(SecureXFLError):
    """A process of the demo's federation died, or ended the run without an outcome."""

    def __init__(self, child: str, what: str, log_path: Path, last_line: str | None) -> None:
        self.child = child
        self.log_path = log_path
        self.last_line = last_line
        seen = "no error in its log" if last_line is None else f"its last error: {last_line}"
        super().__init__(
            f"{child} {what}; {seen}; log: {log_path} (the demo stopped the other processes)"
        )


def last_error_line(text: str) -> str | None:
    """The last error-looking line of a log: a line naming ERROR / Error (a log record or
    an exception), or the final line of a traceback (the exception it ends with);
    ``None`` when there is none. Indented lines (a traceback's frames and source) never
    count, so ``raise FooError(...)`` in a frame is not mistaken for the error."""
    found: str | None = None
    in_traceback = False
    for line in text.splitlines():
        if not line.strip() or line[0].isspace():
            continue
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback:
            found, in_traceback = line, False
        elif "ERROR" in line or "Error" in line:
            found = line
    if found is not None and len(found) > 400:
        found = found[:400] + " …"
    return found


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class _Signals:
    """SIGTERM and SIGINT raise in the main thread (SystemExit(143), KeyboardInterrupt),
    so every ``finally`` runs: children are stopped and the temporary federation, which
    holds the CA key and the CKKS secret context, is removed. Inside ``deferred()`` a
    signal is held until the block ends (it is raised then, unless an exception is
    already on its way out), so starting a child or cleaning up is never cut in half."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = self.pending or signum
            return
        self._raise(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def deferred(self) -> _Deferred:
        return _Deferred(self)


class _Deferred:
    def __init__(self, signals: _Signals) -> None:
        self.signals = signals

    def __enter__(self) -> None:
        self.signals.depth += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        s = self.signals
        s.depth -= 1
        if s.depth == 0 and s.pending is not None:
            signum, s.pending = s.pending, None
            if exc_type is None:
                s._raise(signum)


_SIGNALS = _Signals()


class _Procs:
    """The federation's child processes, with logs; supervised while the run goes and
    stopped (terminate, then kill) on every way out."""

    def __init__(self, logs: Path, log_dest: Path | None = None, stop_grace_s: float = 5.0):
        self.logs = logs
        self.log_dest = logs if log_dest is None else log_dest
        """Where the logs will be when the demo is over (named in error messages)."""
        self.stop_grace_s = stop_grace_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``secure-xfl ARGS`` as child ``name`` (output to ``logs/NAME.log``)."""
        return self.spawn(name, [*CLI, *args])

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        # Five processes share the machine: one intra-op thread each avoids the
        # oversubscription that otherwise slows every training step several-fold.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with _SIGNALS.deferred():  # a signal here must not lose track of the child
            out = (self.logs / f"{name}.log").open("wb")
            self._files.append(out)
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            self.procs[name] = proc
        return proc

    def failure(self, name: str, what: str) -> DemoChildError:
        """The error naming child ``name``, its last error-looking log line and its log."""
        path = self.logs / f"{name}.log"
        try:
            with path.open("rb") as fh:
                fh.seek(max(0, path.stat().st_size - (256 << 10)))
                text = fh.read().decode(errors="replace")
        except OSError:
            text = ""
        return DemoChildError(name, what, self.log_dest / f"{name}.log", last_error_line(text))

    def _first_exited(self) -> str | None:
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def wait_port(self, name: str, path: Path, timeout: float = 120) -> int:
        """Wait for ``name``'s port file; any child exiting meanwhile is a failure."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            dead = self._first_exited()
            if dead is not None:
                code = self.procs[dead].returncode
                when = "before it was ready" if dead == name else f"while {name} was starting"
                raise self.failure(dead, f"{_exit_text(code)} {when}")
            if time.monotonic() > deadline:
                raise self.failure(name, f"was not ready after {timeout:g} s")
            time.sleep(0.1)
        return int(path.read_text())

    def problem(self, clients: Sequence[str], min_clients: int) -> tuple[str, str, bool] | None:
        """What is wrong while the aggregator runs, as (child, what, certain), or ``None``.

        Every other child must still run, except that a client may end with status 0
        (the run ended well: clients hear the end before the aggregator exits) or 3 (its
        own policy refused the aggregator's plans). The key holder ending at all, a
        client ending otherwise (a crash, a signal), or so many refusals that fewer than
        ``min_clients`` clients remain, is a problem. It is *certain* when no run's end
        explains it (the key holder ending, a client killed by a signal); a client's own
        failure status or refusals can also mean the run just ended badly, which the
        aggregator's outcome then reports."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is None or name == "aggregator":
                continue
            if name not in clients or code not in CLIENT_EXPECTED_EXITS:
                certain = name not in clients or code < 0
                return name, f"{_exit_text(code)} while the run was going", certain
        gone = [c for c in clients if self.procs[c].poll() not in (None, 0)]
        remain = len(clients) - len(gone)
        if remain < min_clients:
            what = (
                f"{_exit_text(self.procs[gone[0]].returncode)} (its own policy refused the "
                f"plan) and only {remain} client(s) remain, fewer than min_clients="
                f"{min_clients}; gone: {', '.join(gone)}"
            )
            return gone[0], what, False
        return None

    def supervise(
        self,
        *,
        clients: Sequence[str],
        min_clients: int,
        outcome_file: Path,
        tick: Callable[[], None] = lambda: None,
        grace_s: float = 5.0,
        poll_s: float = 0.5,
    ) -> None:
        """Return when the aggregator exits having written ``outcome_file``; raise
        :class:`DemoChildError` naming the child when it exits without one, or when
        :meth:`problem` reports a certain problem, or an uncertain one that lasts
        ``grace_s`` (long enough for an aggregator whose run just ended to write its
        outcome and exit, so the outcome, not a client's exit, is what a failed run
        reports)."""
        agg = self.procs["aggregator"]
        since: float | None = None
        while agg.poll() is None:
            tick()
            found = self.problem(clients, min_clients)
            now = time.monotonic()
            if found is None:
                since = None
            elif found[2] or (since is not None and now - since >= grace_s):
                raise self.failure(found[0], found[1])
            elif since is None:
                since = now
            time.sleep(poll_s)
        tick()
        if not outcome_file.exists():
            found = self.problem(clients, min_clients)
            if found is not None:  # the root cause, more likely than the aggregator
                raise self.failure(found[0], found[1] + ", and the aggregator ended with it")
            raise self.failure("aggregator", f"{_exit_text(agg.returncode)} without an outcome")

    def stop(self) -> None:
        """Terminate every child still running, kill those left after the grace time."""
        with _SIGNALS.deferred():
            live = [p for p in self.procs.values() if p.poll() is None]
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            deadline = time.monotonic() + self.stop_grace_s
            for proc in live:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
            for out in self._files:
                out.close()
