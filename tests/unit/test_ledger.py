"""Privacy ledger: signing, chaining, verification, bounds, file handling."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.privacy.accountant import epsilon_for
from secure_xfl.privacy.ledger import (
    GENESIS_PREV,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    LedgerError,
    LedgerInvalid,
    PrivacyLedger,
    canonical_bytes,
    entry_hash,
    load_verify_key,
    outcome_of,
    read_ledger,
)

DELTA = DEFAULT_DELTA


def _round(ledger: PrivacyLedger, r: int, participants: list[str], **over: Any) -> dict[str, Any]:
    enrolled = over.pop("enrolled", 4)
    sigma = over.pop("noise_multiplier", 1.1)
    q = len(participants) / enrolled
    if "epsilon" in over:
        eps = over.pop("epsilon")
    else:
        eps = ledger.would_spend("run-1", noise_multiplier=sigma, sample_rate=q, delta=DELTA)
    args: dict[str, Any] = {
        "run": "run-1",
        "round": r,
        "participants": participants,
        "enrolled": enrolled,
        "clip_norm": 1.0,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "delta": DELTA,
        "rule": "fedavg",
        "epsilon": eps,
    }
    args.update(over)
    return ledger.append(**args)


@pytest.fixture(params=["ed25519", "p256"])
def key(request: pytest.FixtureRequest) -> Any:
    if request.param == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def test_round_trip_and_reopen(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path, key) as ledger:
        assert ledger.head == GENESIS_PREV and len(ledger) == 0
        first = _round(ledger, 0, ["b", "a", "c"], dp_sgd={"noise_multiplier": 1.0, "steps": 5})
        _round(ledger, 1, ["a", "b", "c", "d"])
        head = ledger.head
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = read_ledger(path, key.public_key(), expected_entries=2, expected_head=head)
    assert entries[0] == first
    assert entries[0]["participants"] == ["a", "b", "c"]
    assert entries[0]["prev"] == GENESIS_PREV and entries[0]["seq"] == 0
    assert entries[0]["dp_sgd"] == {"noise_multiplier": 1.0, "steps": 5}
    lines = path.read_bytes().splitlines()
    assert entries[1]["prev"] == entry_hash(lines[0]) and head == entry_hash(lines[1])
    assert lines[0] == canonical_bytes(entries[0])
    when = dt.datetime.fromisoformat(entries[0]["time"].replace("Z", "+00:00"))
    assert when.utcoffset() == dt.timedelta(0)
    # Reopening recovers seq and prev and keeps appending to the chain.
    with PrivacyLedger(path, key) as ledger:
        assert len(ledger) == 2 and ledger.head == head
        third = _round(ledger, 2, ["a", "c"])
        assert third["seq"] == 2 and third["prev"] == head
    assert len(read_ledger(path, key.public_key())) == 3


def test_spent_and_would_spend(tmp_path: Path, key: Any) -> None:
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        assert ledger.spent("run-1", DELTA) == 0.0
        for r in range(3):
            _round(ledger, r, ["a", "b", "c", "d"])
        assert ledger.spent("run-1", DELTA) == pytest.approx(epsilon_for(1.1, 1.0, 3, DELTA))
        nxt = ledger.would_spend("run-1", noise_multiplier=1.1, sample_rate=1.0, delta=DELTA)
        assert nxt == pytest.approx(epsilon_for(1.1, 1.0, 4, DELTA))
        assert ledger.history()[-1]["epsilon"] == pytest.approx(ledger.spent("run-1", DELTA))
        assert ledger.spent("other", DELTA) == 0.0
        assert ledger.history("other") == []


def test_floats_round_trip_exactly(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    sigma = 1 / 3 + 1e-17
    with PrivacyLedger(path, key) as ledger:
        _round(ledger, 0, ["a"], enrolled=3, noise_multiplier=sigma, clip_norm=0.1 + 0.2)
    (e,) = read_ledger(path, key.public_key())
    assert e["noise_multiplier"] == sigma and e["clip_norm"] == 0.1 + 0.2
    assert e["sample_rate"] == 1 / 3


def test_unbounded_epsilon_is_null(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        e = _round(ledger, 0, ["a"], noise_multiplier=0.0)
    assert e["epsilon"] is None
    assert read_ledger(path, key.public_key())[0]["epsilon"] is None


@pytest.mark.parametrize(
    ("over", "participants"),
    [
        ({"clip_norm": math.nan}, ["a"]),
        ({"noise_multiplier": -1.0}, ["a"]),
        ({"delta": 0.0}, ["a"]),
        ({"epsilon": -1.0}, ["a"]),
        ({"epsilon": math.nan}, ["a"]),
        ({"rule": "fed avg; rm -rf"}, ["a"]),
        ({"run": ""}, ["a"]),
        ({"round": -1}, ["a"]),
        ({"round": True}, ["a"]),
        ({"enrolled": 1}, ["a", "b"]),
        ({}, ["a", "a"]),
        ({}, []),
        ({}, ["bad\nid"]),
        ({"sample_rate": 0.5}, ["a"]),
        ({"dp_sgd": {"nested": {"x": 1}}}, ["a"]),
    ],
)
def test_append_refuses_invalid_entries(
    tmp_path: Path, key: Any, over: dict[str, Any], participants: list[str]
) -> None:
    over.setdefault("epsilon", 1.0)
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        with pytest.raises(LedgerError):
            _round(ledger, 0, participants, **over)
        assert len(ledger) == 0
    assert (tmp_path / "l.jsonl").read_bytes() == b""


def test_round_released_once(tmp_path: Path, key: Any) -> None:
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        _round(ledger, 0, ["a"])
        with pytest.raises(LedgerError, match="already recorded as released"):
            _round(ledger, 0, ["a", "b"])
        _round(ledger, 0, ["a"], run="run-2")
        assert len(ledger) == 2


def test_refused_decryptions_then_one_release(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    refused = {"outcome": "refused", "reason": "aggregate_out_of_bounds"}
    with PrivacyLedger(path, key) as ledger:
        assert not ledger.released("run-1", 0) and ledger.attempts("run-1", 0) == 0
        first = _round(ledger, 0, ["a", "b"], **refused)
        _round(ledger, 0, ["a", "c"], outcome="refused", reason="lane_integrity")
        assert ledger.attempts("run-1", 0) == 2 and not ledger.released("run-1", 0)
        done = _round(ledger, 0, ["a", "b", "c"])
        assert ledger.released("run-1", 0) and ledger.attempts("run-1", 0) == 2
        with pytest.raises(LedgerError, match="refused after its release"):
            _round(ledger, 0, ["a"], **refused)
        with pytest.raises(LedgerError, match="released again"):
            _round(ledger, 0, ["a"])
        _round(ledger, 1, ["a"], **refused)  # other rounds are unaffected
        assert len(ledger) == 4
    assert first["outcome"] == "refused" and first["reason"] == "aggregate_out_of_bounds"
    assert done["outcome"] == "released" and "reason" not in done
    entries = read_ledger(path, key.public_key())
    assert [outcome_of(e) for e in entries] == ["refused", "refused", "released", "refused"]
    with PrivacyLedger(path, key) as ledger:  # the state is rebuilt from the file
        assert ledger.released("run-1", 0) and ledger.attempts("run-1", 0) == 2
        assert ledger.attempts("run-1", 1) == 1 and not ledger.released("run-1", 1)
        with pytest.raises(LedgerError):
            _round(ledger, 0, ["a"], **refused)
        _round(ledger, 1, ["a", "b"])


@pytest.mark.parametrize(
    "over",
    [
        {"outcome": "refused"},  # a refusal needs its reason
        {"outcome": "refused", "reason": ""},
        {"outcome": "refused", "reason": "out of bounds; rm -rf"},
        {"outcome": "released", "reason": "aggregate_out_of_bounds"},
        {"outcome": "withheld", "reason": "x"},
        {"client_epsilon": -1.0},
        {"client_epsilon": math.nan},
        {"client_epsilon": "1.0"},
    ],
)
def test_append_refuses_bad_outcomes_and_claims(
    tmp_path: Path, key: Any, over: dict[str, Any]
) -> None:
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        with pytest.raises(LedgerError):
            _round(ledger, 0, ["a"], **over)
        assert len(ledger) == 0 and ledger.attempts("run-1", 0) == 0


def test_client_epsilon_round_trips(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        budget = ledger.budget("run-1", DELTA)
        _, worst, _ = budget.projected(1.1, 0.5, ["a", "b"])
        _round(ledger, 0, ["a", "b"], client_epsilon=worst)
        _round(ledger, 1, ["a"], noise_multiplier=0.0, client_epsilon=math.inf)
        _round(ledger, 2, ["a"])  # not given: the field is left out
    e0, e1, e2 = read_ledger(path, key.public_key())
    assert e0["client_epsilon"] == worst == pytest.approx(epsilon_for(1.1, 1.0, 1, DELTA))
    assert e1["client_epsilon"] is None and "client_epsilon" not in e2


def test_entries_without_outcome_read_as_released(tmp_path: Path, key: Any) -> None:
    # A line from a key holder that predates the field, signed and chained.
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        entry = _round(ledger, 0, ["a"])
    del entry["outcome"]
    path.write_bytes(_resign(key, entry))
    (old,) = read_ledger(path, key.public_key())
    assert "outcome" not in old and outcome_of(old) == "released"
    with PrivacyLedger(path, key) as ledger:
        assert ledger.released("run-1", 0) and ledger.attempts("run-1", 0) == 0
        with pytest.raises(LedgerError, match="already recorded as released"):
            _round(ledger, 0, ["a"])


def test_refuses_to_append_to_a_broken_ledger(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        for r in range(3):
            _round(ledger, r, ["a", "b"])
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])
    with pytest.raises(LedgerInvalid) as info:
        PrivacyLedger(path, key)
    assert info.value.line_no == 2
    path.write_bytes(lines[0] + lines[1][:-10])  # torn last write
    with pytest.raises(LedgerInvalid, match="incomplete"):
        PrivacyLedger(path, key)


def test_wrong_key_is_refused_on_open(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _round(ledger, 0, ["a"])
    with pytest.raises(LedgerInvalid, match="signature"):
        PrivacyLedger(path, ed25519.Ed25519PrivateKey.generate())


def test_exclusive_lock_and_permissions(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key):
        with pytest.raises(LedgerError, match="in use"):
            PrivacyLedger(path, key)
    os.chmod(path, 0o666)
    with pytest.raises(LedgerError, match="writable"):
        PrivacyLedger(path, key)
    os.chmod(path, 0o640)
    PrivacyLedger(path, key).close()
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(LedgerError):
        PrivacyLedger(link, key)


def test_other_curves_and_key_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path / "a", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path / "b", "not a key")  # type: ignore[arg-type]
    with pytest.raises(LedgerError):
        load_verify_key(ec.generate_private_key(ec.SECP384R1()).public_key())


def _self_signed(key: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyholder")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_verification_key_sources(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _round(ledger, 0, ["a"])
    cert_pem = _self_signed(key)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "pub.pem").write_bytes(pub_pem)
    for src in (
        cert_pem,
        pub_pem,
        pub_pem.decode(),
        tmp_path / "cert.pem",
        str(tmp_path / "pub.pem"),
        x509.load_pem_x509_certificate(cert_pem),
        key.public_key(),
    ):
        assert len(read_ledger(path, src)) == 1
    for bad in (b"garbage", tmp_path / "missing.pem", 42):
        with pytest.raises(LedgerError):
            read_ledger(path, bad)


def test_tail_truncation_needs_an_anchor(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        for r in range(3):
            _round(ledger, r, ["a"])
        head = ledger.head
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]))
    assert len(read_ledger(path, key.public_key())) == 2  # undetectable alone
    with pytest.raises(LedgerInvalid):
        read_ledger(path, key.public_key(), expected_entries=3)
    with pytest.raises(LedgerInvalid):
        read_ledger(path, key.public_key(), expected_head=head)


def _resign(key: Any, obj: dict[str, Any]) -> bytes:
    # What a forger holding the real key would need to do; used to show that
    # structural checks apply even to correctly signed lines.
    body = {k: v for k, v in obj.items() if k != "sig"}
    data = canonical_bytes(body)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        body["sig"] = key.sign(data).hex()
    else:
        body["sig"] = key.sign(data, ec.ECDSA(hashes.SHA256())).hex()
    return canonical_bytes(body) + b"\n"


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e.update(noise_multiplier=-1.0),
        lambda e: e.update(clip_norm=1),
        lambda e: e.update(extra="field"),
        lambda e: e.pop("rule"),
        lambda e: e.update(participants=["b", "a"]),
        lambda e: e.update(time="2024-01-01T00:00:00+02:00"),
        lambda e: e.update(time="yesterday Z"),
        lambda e: e.update(type="other/v1"),
        lambda e: e.update(seq=5),
        lambda e: e.update(prev="00" * 32),
        lambda e: e.update(outcome="refused"),  # no reason
        lambda e: e.update(reason="x"),  # reason on a released entry
        lambda e: e.update(outcome=None),
        lambda e: e.update(client_epsilon=1),
    ],
)
def test_structural_checks_apply_to_signed_lines(tmp_path: Path, key: Any, edit: Any) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        entry = _round(ledger, 0, ["a"])
    edit(entry)
    path.write_bytes(_resign(key, entry))
    with pytest.raises(LedgerInvalid) as info:
        read_ledger(path, key.public_key())
    assert info.value.line_no == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\n",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[" * 2000 + b"\n",
        b'{"a":1,"a":2}\n',
        b'{"epsilon":NaN}\n',
        b"\n",
        b"1" * 5000 + b"\n",
    ],
)
def test_malformed_lines_are_invalid(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "l.jsonl"
    path.write_bytes(raw)
    with pytest.raises(LedgerInvalid):
        read_ledger(path, ed25519.Ed25519PrivateKey.generate().public_key())


def test_size_bounds(tmp_path: Path) -> None:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    long_line = tmp_path / "long.jsonl"
    long_line.write_bytes(b"x" * (MAX_LINE_BYTES + 1) + b"\n")
    with pytest.raises(LedgerInvalid, match="line exceeds"):
        read_ledger(long_line, pub)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(LedgerInvalid, match="exceeds"):
        read_ledger(huge, pub)
    with pytest.raises(LedgerInvalid, match="regular file"):
        read_ledger(tmp_path, pub)
    with pytest.raises(LedgerInvalid, match="cannot open"):
        read_ledger(tmp_path / "absent", pub)


def test_invalid_error_carries_reason_and_line() -> None:
    err = LedgerInvalid("bad thing", 7)
    assert err.reason == "bad thing" and err.line_no == 7 and "line 7" in str(err)
    assert err.code == "privacy.ledger.invalid"
    assert json.loads(canonical_bytes({"b": 1.5, "a": [1]})) == {"a": [1], "b": 1.5}
    assert canonical_bytes({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def test_budget_follows_appends_and_is_a_copy(tmp_path: Path, key: Any) -> None:
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        _round(ledger, 0, ["a", "b"])
        budget = ledger.budget("run-1", DELTA)
        assert budget.rounds == 1 and budget.client_rounds("a") == 1
        budget.step(1.1, 0.5, ["a", "b"])  # the caller's copy only
        assert ledger.budget("run-1", DELTA).rounds == 1
        _round(ledger, 1, ["a", "c"])
        after = ledger.budget("run-1", DELTA)
        assert after.rounds == 2 and after.client_rounds("c") == 1
        assert after.federation_epsilon() == pytest.approx(ledger.spent("run-1", DELTA))
        assert ledger.budget("run-1").delta == DEFAULT_DELTA
    # Reopening rebuilds the same figures from the file.
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        again = ledger.budget("run-1", DELTA)
        assert again.federation_epsilon() == pytest.approx(after.federation_epsilon())
        assert again.client_epsilon("a") == pytest.approx(after.client_epsilon("a"))


def test_a_file_without_newlines_is_refused_at_the_line_bound(tmp_path: Path) -> None:
    # The reader streams: it must not buffer a whole file that never ends a line.
    path = tmp_path / "l.jsonl"
    path.write_bytes(b"{" * (MAX_LINE_BYTES + 2))
    with pytest.raises(LedgerInvalid, match="line exceeds") as info:
        read_ledger(path, ed25519.Ed25519PrivateKey.generate().public_key())
    assert info.value.line_no == 1
