"""Idempotent release and storage faults at the key holder (issue 15).

Real TenSEAL ciphertexts throughout: the same aggregate sent again for a released
round gets the identical answer with no new ledger line and no new ε; another
aggregate for that round is refused; a crash between the record's mark and the
ledger line is completed by the retry, once; a write that fails half-way (a full
disk, a file-size limit) refuses with ``storage_unavailable``, leaves every file
as it was and burns nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, Release
from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.crypto.record import DecryptionRecord
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger import read_ledger
from secure_xfl.protocol import messages
from secure_xfl.services.keyholder import LEDGER_FILE, KeyHolderService
from tests.security import live
from tests.unit.helpers import RUN
from tests.unit.test_keyholder import (
    AGG,
    DP_SPEC,
    aggregate,
    client_weighted,
    holder,
    refused,
)

REPO = Path(__file__).resolve().parents[2]
NUMEL = 64
MODEL = live.zero_model(NUMEL)
PEER = PeerIdentity("test", "aggregator", "main")


def digest_of(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# -- the KeyHolder itself ------------------------------------------------------------


def counting_holder(tmp: Path, **policy: object) -> tuple[KeyHolder, dict[str, list[Release]]]:
    calls: dict[str, list[Release]] = {"budget": [], "ledger": [], "repeat": []}
    kh = holder(tmp, **policy)
    kh.before_release = calls["budget"].append
    kh.after_release = calls["ledger"].append
    kh.on_repeat = calls["repeat"].append
    return kh, calls


def test_same_aggregate_twice_gives_the_identical_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kh, calls = counting_holder(tmp_path)
    blob = AGG.encode()
    first = kh.decrypt(blob)
    with caplog.at_level(logging.INFO, logger="secure_xfl.crypto.keyholder"):
        again = kh.decrypt(blob)
    assert not first.repeat and again.repeat
    assert np.array_equal(first.vector, again.vector)  # bit for bit: same ciphertext
    assert again.total_weight == first.total_weight and again.release == first.release
    # Charged and put on the ledger once; the repeat only asks the ledger hook to check.
    assert len(calls["budget"]) == len(calls["ledger"]) == len(calls["repeat"]) == 1
    assert any("re-sent: same aggregate, nothing new released" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert kh.last_released(RUN) == (0, digest_of(blob))
    assert len((tmp_path / "decrypted.jsonl").read_text().splitlines()) == 1
    kh.close()
    # …and after a restart, from the durable record.
    restarted, calls = counting_holder(tmp_path)
    assert np.array_equal(restarted.decrypt(blob).vector, first.vector)
    assert calls["budget"] == calls["ledger"] == [] and len(calls["repeat"]) == 1
    assert len((tmp_path / "decrypted.jsonl").read_text().splitlines()) == 1


def test_another_aggregate_for_a_released_round_is_refused(tmp_path: Path) -> None:
    kh, calls = counting_holder(tmp_path)
    kh.decrypt(AGG)
    fresh = aggregate()  # the same values encrypted again: other ciphertexts, other digest
    assert digest_of(fresh.encode()) != digest_of(AGG.encode())
    assert refused(kh, fresh) == "already_decrypted"
    assert refused(kh, aggregate(4)) == "already_decrypted"
    assert len(calls["budget"]) == 1 and calls["repeat"] == []
    kh.close()
    assert refused(holder(tmp_path), fresh) == "already_decrypted"


def test_a_repeat_still_passes_the_policy_but_not_the_once_only_rules(tmp_path: Path) -> None:
    # Round 0 of a client-weighted DP run: one refused attempt, then the release.
    kh = holder(tmp_path, dp=DP_SPEC, max_attempts=2)
    small = {f"c{i}": np.full(10, 0.01) for i in range(3)}
    assert refused(kh, client_weighted({**small, "c2": np.full(10, 200.0)})) == (
        "aggregate_out_of_bounds"
    )
    honest = client_weighted(small)
    first = kh.decrypt(honest.encode())
    kh.close()
    # A stricter max_attempts would refuse a new decryption of the round; not the repeat.
    strict = holder(tmp_path, dp=DP_SPEC, max_attempts=1)
    assert np.array_equal(strict.decrypt(honest.encode()).vector, first.vector)
    strict.close()
    # The rest of the policy still applies to the repeat (here: a larger cohort floor).
    assert refused(holder(tmp_path, dp=DP_SPEC, min_clients=4), honest) == "too_few_clients"


def test_the_old_record_format_still_loads(tmp_path: Path) -> None:
    (tmp_path / "decrypted.jsonl").write_text(
        json.dumps({"run": RUN, "round": 0}) + "\n"
        + json.dumps({"run": RUN, "round": 1, "outcome": "refused", "reason": "x"}) + "\n"
    )  # fmt: skip
    kh = holder(tmp_path)
    assert kh.already_decrypted(RUN, 0) and kh.record.refused(RUN, 1) == 1
    assert kh.last_released(RUN) == (0, "")
    assert refused(kh, AGG) == "already_decrypted"  # no digest: no repeat is possible
    r1 = aggregate(round=1).encode()
    kh.decrypt(r1)
    assert kh.last_released(RUN) == (1, digest_of(r1))
    assert kh.last_released("another-run") == (-1, "")
    kh.close()
    again = holder(tmp_path)
    assert again.record.released_digest(RUN, 0) is None
    assert again.record.released_digest(RUN, 1) == digest_of(r1)


def test_a_malformed_digest_in_the_record_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "decrypted.jsonl").write_text('{"run": "r", "round": 0, "digest": "zz"}\n')
    with pytest.raises(DecryptionRefused, match="state_corrupt"):
        DecryptionRecord(tmp_path)


# -- full disk, simulated in-process -------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path | None], None]]:
    """``full_disk(path)``: every os.write to ``path`` writes half its bytes, then fails
    with ENOSPC (``None``: the disk has space again)."""
    target: list[Path | None] = [None]
    real = os.write

    def write(fd: int, data: Any) -> int:
        where = target[0]
        if where is not None and os.readlink(f"/proc/self/fd/{fd}") == str(where):
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    def fill(path: Path | None) -> None:
        target[0] = None if path is None else path.resolve()

    monkeypatch.setattr(os, "write", write)
    yield fill


def test_a_full_disk_under_the_record_burns_nothing(
    tmp_path: Path, full_disk: Callable[[Path | None], None]
) -> None:
    kh, calls = counting_holder(tmp_path)
    kh.decrypt(aggregate(round=1))  # the record file exists, one line long
    record = tmp_path / "decrypted.jsonl"
    size = record.stat().st_size
    full_disk(record)
    assert refused(kh, AGG) == "storage_unavailable"
    assert record.stat().st_size == size and not kh.already_decrypted(RUN, 0)
    assert len(calls["ledger"]) == 1  # the ledger hook never ran for round 0
    full_disk(None)
    out = kh.decrypt(AGG)  # once space returns, the same aggregate is released
    assert not out.repeat and kh.already_decrypted(RUN, 0) and len(calls["ledger"]) == 2
    kh.close()
    assert DecryptionRecord(tmp_path).released_digest(RUN, 0) == digest_of(AGG.encode())


# -- the service: ledger, ε, status --------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned federation whose clients sign client-level DP (ε is finite)."""
    return live.provision_run(
        tmp_path_factory.mktemp("fed"),
        live.HONEST,
        rounds=3,
        privacy={"noise_multiplier": 1.0, "clip_norm": 1.0, "allow_no_dp": False},
    )


def honest(root: Path, rnd: int) -> bytes:
    """An honest aggregate of round ``rnd``, encoded as the aggregator sends it."""
    ups = [live.honest_update(root, c, rnd, MODEL) for c in live.HONEST]
    return live.accumulate(root, ups, rnd, NUMEL).encode()


def service(root: Path, state: Path) -> KeyHolderService:
    return KeyHolderService(Kit.load(root / "keyholder"), state_dir=state)


def close(svc: KeyHolderService) -> None:
    svc.holder.close()
    svc.ledger.close()


def ask(svc: KeyHolderService, t: str, **fields: Any) -> dict[str, Any]:
    reply = asyncio.run(svc.handle(PEER, messages.encode(t, **fields)))
    return messages.decode(reply, expect={"plain", "info"})


def decrypt(svc: KeyHolderService, blob: bytes) -> dict[str, Any]:
    return ask(svc, "decrypt", aggregate=blob)


def reason(svc: KeyHolderService, blob: bytes) -> str:
    with pytest.raises(DecryptionRefused) as info:
        decrypt(svc, blob)
    return info.value.reason


def ledger_rounds(root: Path, state: Path) -> list[tuple[str, int, str]]:
    key = Kit.load(root / "keyholder").tls.private_key.public_key()
    return [(e["run"], e["round"], e["outcome"]) for e in read_ledger(state / LEDGER_FILE, key)]


def test_service_repeat_adds_no_ledger_line_and_no_epsilon(root: Path, tmp_path: Path) -> None:
    svc = service(root, tmp_path)
    run = svc.kit.config.federation.run
    before = ask(svc, "status")
    assert (before["last_released"], before["released_digest"]) == (-1, "")
    blob = honest(root, 0)
    first = decrypt(svc, blob)
    again = decrypt(svc, blob)
    assert again["vector"] == first["vector"] and again["participants"] == first["participants"]
    assert again["epsilon"] == first["epsilon"] > 0
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released")]
    info = ask(svc, "status")
    assert (info["last_released"], info["released_digest"]) == (0, digest_of(blob))
    assert info["epsilon"] == first["epsilon"]
    assert ask(svc, "status", run="another")["last_released"] == -1
    assert reason(svc, honest(root, 0)) == "already_decrypted"  # fresh noise: another one
    close(svc)
    restarted = service(root, tmp_path)
    assert decrypt(restarted, blob)["vector"] == first["vector"]
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released")]
    close(restarted)


def test_a_crash_between_the_mark_and_the_ledger_is_completed_once(
    root: Path, tmp_path: Path
) -> None:
    blob = honest(root, 0)
    svc = service(root, tmp_path)
    run = svc.kit.config.federation.run
    close(svc)
    # What the killed process left: the round marked released, no ledger line.
    DecryptionRecord(tmp_path).mark_released(run, 0, digest_of(blob))
    assert ledger_rounds(root, tmp_path) == []
    restarted = service(root, tmp_path)
    reply = decrypt(restarted, blob)
    assert reply["epsilon"] > 0 and ledger_rounds(root, tmp_path) == [(run, 0, "released")]
    assert decrypt(restarted, blob)["vector"] == reply["vector"]
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released")]
    close(restarted)


def test_a_full_disk_under_the_ledger_refuses_then_the_retry_completes(
    root: Path, tmp_path: Path, full_disk: Callable[[Path | None], None]
) -> None:
    svc = service(root, tmp_path)
    run = svc.kit.config.federation.run
    first = decrypt(svc, honest(root, 0))
    ledger = tmp_path / LEDGER_FILE
    size = ledger.stat().st_size
    blob = honest(root, 1)
    full_disk(ledger)
    assert reason(svc, blob) == "storage_unavailable"
    full_disk(None)
    assert ledger.stat().st_size == size  # the half line was truncated away
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released")]  # verifies: not broken
    # The record holds the mark; the retry of the same bytes writes the ledger line once.
    assert ask(svc, "status")["last_released"] == 1
    reply = decrypt(svc, blob)
    assert reply["epsilon"] > first["epsilon"]
    decrypt(svc, blob)
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released"), (run, 1, "released")]
    # Not broken in memory either: the next round appends normally.
    decrypt(svc, honest(root, 2))
    assert len(ledger_rounds(root, tmp_path)) == 3
    close(svc)


def test_a_full_disk_under_the_record_refuses_and_writes_no_ledger_line(
    root: Path, tmp_path: Path, full_disk: Callable[[Path | None], None]
) -> None:
    svc = service(root, tmp_path)
    run = svc.kit.config.federation.run
    blob = honest(root, 0)
    full_disk(tmp_path / "decrypted.jsonl")
    assert reason(svc, blob) == "storage_unavailable"
    full_disk(None)
    assert (tmp_path / "decrypted.jsonl").stat().st_size == 0
    assert ledger_rounds(root, tmp_path) == [] and ask(svc, "status")["last_released"] == -1
    decrypt(svc, blob)
    assert ledger_rounds(root, tmp_path) == [(run, 0, "released")]
    close(svc)


# -- a real file-size limit (EFBIG), in a child process ------------------------------

_FSIZE_CHILD = r"""
import os, resource, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ed25519
from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.crypto.record import DecryptionRecord
from secure_xfl.privacy.ledger import PrivacyLedger, read_ledger
from secure_xfl.privacy.ledger.writer import LedgerStorageError
from tests.unit.test_ledger import _round

tmp = Path(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

def limit(n):
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

key = ed25519.Ed25519PrivateKey.generate()
ledger = PrivacyLedger(tmp / "ledger.jsonl", key)
_round(ledger, 0, ["a", "b"])
size = os.path.getsize(ledger.path)
limit(size + 40)  # the next line is far longer: a short write, then EFBIG
try:
    _round(ledger, 1, ["a", "b"])
    raise SystemExit("ledger append did not fail")
except LedgerStorageError as exc:
    print("ledger:", exc)
assert os.path.getsize(ledger.path) == size, os.path.getsize(ledger.path)
limit(soft)
_round(ledger, 1, ["a", "b"])
ledger.close()
assert len(read_ledger(tmp / "ledger.jsonl", key.public_key())) == 2

record = DecryptionRecord(tmp / "state")
record.mark_released("r", 0, "ab" * 32)
size = os.path.getsize(record.path)
limit(size + 20)
try:
    record.mark_released("r", 1, "cd" * 32)
    raise SystemExit("record append did not fail")
except DecryptionRefused as exc:
    assert exc.reason == "storage_unavailable", exc
    print("record:", exc)
assert os.path.getsize(record.path) == size and not record.released("r", 1)
limit(soft)
record.mark_released("r", 1, "cd" * 32)
record.close()
assert DecryptionRecord(tmp / "state").last_released("r") == (1, "cd" * 32)
print("ok")
"""


def test_a_file_size_limit_leaves_ledger_and_record_whole(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stdout + proc.stderr
    assert "File too large" in proc.stdout, proc.stdout
