"""Every CLI error is one line on stderr and a documented exit code, never a traceback.

Each bad input runs the real ``secure-xfl`` as a subprocess; all of them fail before
any heavy work or network wait, so the table runs in parallel in one module fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from secure_xfl import cli
from secure_xfl.errors import ConfigError

CLI = [sys.executable, "-m", "secure_xfl.cli"]
USAGE = cli.EXIT_USAGE


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    """``{fed}``: a provisioned federation (clients a, b); ``{tmp}``: an empty folder of
    this case's own."""
    phrase: str
    """What the one-line message must say (case-sensitive)."""
    code: int = USAGE


def _case(id: str, argv: str, phrase: str, code: int = USAGE) -> Case:
    return Case(id, tuple(argv.split()), phrase, code)


CASES = [
    # top level
    _case("no-args", "", "missing COMMAND: choose one of provision"),
    _case("bogus-flag", "--bogus", "unrecognized arguments: --bogus"),
    # provision
    _case("add-existing", "provision --out {fed} --add-client a", "'a' is already enrolled"),
    _case(
        "add-and-revoke",
        "provision --out {fed} --add-client c --revoke a",
        "argument --revoke: not allowed with argument --add-client",
    ),
    _case(
        "add-with-clients",
        "provision --out {fed} --add-client c --clients x",
        "cannot be combined with --clients",
    ),
    _case("revoke-unknown", "provision --out {fed} --revoke zz", "no client 'zz'"),
    _case("add-no-federation", "provision --out {tmp} --add-client c", "not a federation folder"),
    _case("no-clients", "provision --federation t --out {tmp}/n", "--clients is required"),
    # export
    _case("export-no-run", "export --out {tmp}/m", "required: --run"),
    _case("export-missing-run", "export --run {tmp}/none --out {tmp}/m", "does not exist"),
    # keyholder
    _case(
        "keyholder-wrong-kit",
        "keyholder --kit {fed}/aggregator",
        "aggregator's startup kit, not a keyholder's",
    ),
    _case(
        "keyholder-bad-listen",
        "keyholder --kit {fed}/keyholder --listen nonsense",
        "'nonsense' is not HOST:PORT",
    ),
    _case(
        "keyholder-bad-port-file",
        "keyholder --kit {fed}/keyholder --listen 127.0.0.1:0 --port-file {tmp}/no/port",
        "does not exist",
    ),
    # aggregator
    _case("aggregator-no-model", "aggregator --kit {fed}/aggregator", "required: --model"),
    _case(
        "aggregator-bad-model",
        "aggregator --kit {fed}/aggregator --model vector:0",
        "expected lm or vector:N",
    ),
    # client
    _case("client-no-trainer", "client --kit {fed}/client-a", "required: --trainer"),
    _case(
        "client-wrong-kit",
        "client --kit {fed}/keyholder --trainer random",
        "keyholder's startup kit, not a client's",
    ),
    _case(
        "client-unknown-flag",
        "client --kit {fed}/client-a --trainer random --bogus",
        "secure-xfl client: error: unrecognized arguments: --bogus",
    ),
    # demo (all fail before the federation is provisioned)
    _case("demo-rounds-0", "demo --rounds 0", "argument --rounds: must be at least 1, got 0"),
    _case("demo-noise-negative", "demo --noise -1", "argument --noise: must be 0 or more"),
    _case("demo-epsilon-0", "demo --epsilon 0", "argument --epsilon: must be greater than 0"),
    _case("demo-slow-no-factor", "demo --slow cloud-c", "expected CLIENT=FACTOR"),
    _case("demo-slow-unknown", "demo --slow cloud-z=2", "unknown client 'cloud-z'"),
    _case("demo-slow-not-number", "demo --slow cloud-c=fast", "expected a number"),
    _case("demo-out-proc", "demo --out /proc/nope", "cannot create report folder"),
    # experiment
    _case("experiment-rounds-0", "experiment --rounds 0", "argument --rounds: must be at least"),
    # audit
    _case("audit-missing-ledger", "audit {tmp}/none.jsonl --kit {fed}/keyholder", "no ledger at"),
    # bench
    _case("bench-unknown-section", "bench --sections nope", "--sections: unknown nope"),
    _case("loadtest-one-client", "loadtest --clients 1", "argument --clients: must be at least 2"),
]


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("cli-errors")
    fed = root / "fed"
    subprocess.run(
        [*CLI, "provision", "--federation", "t", "--clients", "a,b", "--out", str(fed)],
        check=True,
        capture_output=True,
        timeout=120,
    )

    def run(case: Case) -> subprocess.CompletedProcess[str]:
        tmp = root / case.id
        tmp.mkdir()
        argv = [a.format(fed=fed, tmp=tmp) for a in case.argv]
        return subprocess.run(
            [*CLI, *argv],
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
            cwd=tmp,
        )

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        done = dict(zip([c.id for c in CASES], pool.map(run, CASES), strict=True))
    return done


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(
    case: Case, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    done = results[case.id]
    both = done.stdout + done.stderr
    assert done.returncode != 0, both
    assert done.returncode == case.code, both
    assert "Traceback" not in both, both
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, both
    assert ": error: " in lines[0] and lines[0].startswith("secure-xfl"), both
    assert case.phrase in lines[0], both


def test_every_command_has_bad_inputs() -> None:
    covered = {c.argv[0] for c in CASES if c.argv and not c.argv[0].startswith("-")}
    assert set(cli.COMMANDS) <= covered


@pytest.mark.parametrize("command", ["", *cli.COMMANDS])
def test_help_shows_defaults_and_an_example(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process: --help does no work; keep main() off the test session's logging.
    monkeypatch.setattr("secure_xfl.services.runtime.setup_logging", lambda *a, **k: None)
    argv = [command, "--help"] if command else ["--help"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    out = capsys.readouterr().out
    assert code == 0, out
    assert "default" in out and "example" in out, out
    if command in ("", "client", "demo"):
        for exit_code in (0, 1, 2, 3, 130):
            assert f"\n  {exit_code} " in out, out


def test_refusal_exit_code_is_the_clients() -> None:
    from secure_xfl.services.client import EXIT_REFUSED

    assert cli.EXIT_REFUSED == EXIT_REFUSED == 3


def _raise(exc: BaseException) -> int:
    raise exc


@pytest.mark.parametrize(
    ("exc", "code", "phrase"),
    [
        (ConfigError("bad kit"), cli.EXIT_USAGE, "bad kit"),
        (PermissionError(13, "Permission denied", "/x/y"), cli.EXIT_USAGE, "/x/y: Permission"),
        (FileNotFoundError(2, "No such file or directory", "f.pem"), cli.EXIT_USAGE, "f.pem"),
        (
            subprocess.CalledProcessError(2, ["secure-xfl", "provision"], stderr=b"x\nreal why\n"),
            cli.EXIT_FAILED,
            "exited 2: secure-xfl provision: real why",
        ),
        (RuntimeError("boom"), cli.EXIT_FAILED, "unexpected RuntimeError: boom"),
        (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "interrupted"),
    ],
    ids=["secure-xfl-error", "permission", "missing-file", "child", "bug", "interrupt"],
)
def test_run_turns_every_error_into_one_line(
    exc: BaseException, code: int, phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli._run("secure-xfl demo", lambda: _raise(exc)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("secure-xfl demo: "), err
    assert phrase in err and "Traceback" not in err, err
