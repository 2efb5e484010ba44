"""Signed client statements in the ledger, audited against a real federation CA.

Everything here is real cryptography: a CA from :func:`pki.create_ca`, client
and key-holder certificates from :func:`pki.issue_certificate`, statements
signed with the clients' keys, the ledger signed with the key holder's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DEFAULT_DELTA, DPSpec, effective_noise
from secure_xfl.crypto.envelope import SignedStatement, UpdateStatement
from secure_xfl.privacy.accountant import epsilon
from secure_xfl.privacy.audit import audit
from secure_xfl.privacy.ledger import (
    MAX_LINE_BYTES,
    LedgerError,
    PrivacyLedger,
    read_ledger,
)

FED = "fed"
RUN = "run-1"
CLIENTS = ("alpha", "beta", "gamma")
ENROLLED = 4
DP = DPSpec(clip_norm=1.0, noise_multiplier=1.5, min_clients=3, delta=DEFAULT_DELTA)
WEIGHTS = {"alpha": 10.0, "beta": 30.0, "gamma": 60.0, "delta": 25.0}
SCALE = 100.0


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclasses.dataclass
class Party:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclasses.dataclass
class Federation:
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    keyholder: Party
    clients: dict[str, Party]
    dir: Path

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def kh_path(self) -> Path:
        return self.dir / "keyholder-cert.pem"


def _issue(ca: x509.Certificate, ca_key: Any, role: str, name: str) -> Party:
    cert, key = pki.issue_certificate(ca, ca_key, pki.PeerIdentity(FED, role, name))
    return Party(cert, key)


@pytest.fixture(scope="module")
def pki_material() -> tuple[x509.Certificate, Any, Party, dict[str, Party]]:
    ca, ca_key = pki.create_ca(FED)
    kh = _issue(ca, ca_key, "keyholder", "keyholder")
    clients = {n: _issue(ca, ca_key, "client", n) for n in (*CLIENTS, "delta")}
    return ca, ca_key, kh, clients


@pytest.fixture
def fed(tmp_path: Path, pki_material: Any) -> Federation:
    ca, ca_key, kh, clients = pki_material
    f = Federation(ca, ca_key, kh, dict(clients), tmp_path)
    f.ca_path.write_text(_pem(ca))
    f.crl_path.write_bytes(pki.build_crl(ca, ca_key, []).public_bytes(serialization.Encoding.PEM))
    f.kh_path.write_text(_pem(kh.cert))
    return f


def statement(
    client: str, r: int, *, dp: DPSpec | None = DP, run: str = RUN, weight: float | None = None
) -> UpdateStatement:
    def digest(tag: str) -> bytes:
        return hashlib.sha256(f"{tag}/{client}/{r}".encode()).digest()

    return UpdateStatement(
        run=run, round=r, client=client, layout_digest=hashlib.sha256(b"layout").digest(),
        preset="xfl-default", numel=1000, weight=WEIGHTS[client] if weight is None else weight,
        weighting="aggregator", ciphertext_digest=digest("ct"), loss=None, quant=None,
        plan_digest=hashlib.sha256(f"plan/{r}".encode()).digest(), base_round=r,
        base_model_digest=hashlib.sha256(f"model/{r}".encode()).digest(), dp=dp,
    )  # fmt: skip


def item(
    st: UpdateStatement, signer: Party, cert: x509.Certificate | None = None
) -> dict[str, str]:
    signed = SignedStatement(st, pki.sign(signer.key, st.signing_bytes()))
    packed = msgpack.packb(signed.to_wire(), use_bin_type=True)
    return {"client": st.client, "signed": packed.hex(), "cert": _pem(cert or signer.cert)}


def signed_sigma(statements: Sequence[UpdateStatement]) -> tuple[float, float]:
    # Statements without DP are left out: what a key holder ignoring them would record.
    with_dp = [s for s in statements if s.dp is not None]
    return effective_noise([s.dp for s in with_dp if s.dp], [s.weight / SCALE for s in with_dp])


def append(
    ledger: PrivacyLedger,
    r: int,
    items: list[dict[str, str]],
    *,
    sigma: float,
    sensitivity: float,
    **over: Any,
) -> dict[str, Any]:
    people = sorted(i["client"] for i in items)
    q = len(people) / ENROLLED
    delta = over.pop("delta", DEFAULT_DELTA)
    args: dict[str, Any] = {
        "run": RUN, "round": r, "participants": people, "enrolled": ENROLLED,
        "clip_norm": sensitivity, "noise_multiplier": sigma, "sample_rate": q, "delta": delta,
        "rule": "fedavg", "statements": items, "weight_scale": SCALE,
        "epsilon": ledger.would_spend(RUN, noise_multiplier=sigma, sample_rate=q, delta=delta),
    }  # fmt: skip
    args.update(over)
    return ledger.append(**args)


def honest_round(ledger: PrivacyLedger, fed: Federation, r: int, names: Sequence[str]) -> float:
    sts = [statement(n, r) for n in names]
    sigma, sens = signed_sigma(sts)
    append(ledger, r, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma, sensitivity=sens)
    return sigma


def write(fed: Federation, rounds: int = 2, key: Any = None) -> tuple[Path, list[float]]:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, key or fed.keyholder.key) as ledger:
        sigmas = [honest_round(ledger, fed, r, CLIENTS) for r in range(rounds)]
    return path, sigmas


# ------------------------------------------------------------------- honest


def test_honest_ledger_audits_clean_against_the_ca(fed: Federation) -> None:
    path, sigmas = write(fed)
    report = audit(path, fed.kh_path, ca=fed.ca_path)
    assert report.exit_code == 0, report.table()
    assert report.signer == "spiffe://fed/keyholder/keyholder"
    assert report.problems == [] and not any("CA" in n for n in report.notes)
    # Unequal weights: σ_eff is below the equal-weight figure σ·√(n/K) = 1.5.
    assert sigmas[0] < DP.noise_multiplier
    for row, sigma in zip(report.per_round, sigmas, strict=True):
        assert row["signed_sigma"] == pytest.approx(sigma, rel=1e-12)
        assert row["sigma_used"] == row["signed_sigma"]
        assert row["signed_sensitivity"] == pytest.approx(0.6)  # 60/100 · C
    history = [(s, 3 / ENROLLED, 1) for s in sigmas]
    assert report.epsilon["rdp"] == pytest.approx(epsilon(history, DEFAULT_DELTA, "rdp"))
    assert report.per_client["alpha"]["epsilon"]["rdp"] == pytest.approx(
        epsilon([(s, 1.0, 1) for s in sigmas], DEFAULT_DELTA)
    )
    data = report.to_json()
    assert data["per_round"][0]["signed_sigma"] == pytest.approx(sigmas[0])
    json.dumps(data, allow_nan=False)
    assert "sigma signed" in report.table()


def test_statements_are_kept_in_the_file_not_in_the_writers_memory(fed: Federation) -> None:
    path, _ = write(fed, rounds=1)
    (entry,) = read_ledger(path, fed.kh_path)
    assert [s["client"] for s in entry["statements"]] == list(CLIENTS)
    assert entry["weight_scale"] == SCALE
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        assert "statements" not in ledger.history()[0]
        assert ledger.history()[0]["weight_scale"] == SCALE


def test_without_ca_the_signatures_are_still_checked(fed: Federation) -> None:
    path, _ = write(fed)
    # Without a CA nothing shows who signed: not authentic, with the way to pass one.
    refused = audit(path, fed.kh_path)
    assert refused.exit_code == 2 and "--ca CA_PEM" in refused.problems[0]
    assert "--kit KIT_DIR" in refused.problems[0]
    report = audit(path, fed.kh_path, trust_key_only=True)
    assert report.exit_code == 0 and report.signer is None
    assert any("no federation CA" in n for n in report.notes)
    assert report.per_round[0]["signed_sigma"] is not None


# ------------------------------------------------------------------- forged → 2


def test_edited_dp_breaks_the_clients_signature(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        items = [item(s, fed.clients[s.client]) for s in sts]
        # The key holder raises alpha's σ after the fact, keeping alpha's signature.
        raised = dataclasses.replace(sts[0], dp=dataclasses.replace(DP, noise_multiplier=9.0))
        old = SignedStatement.from_wire(msgpack.unpackb(bytes.fromhex(items[0]["signed"])))
        forged = SignedStatement(raised, old.signature)
        items[0]["signed"] = msgpack.packb(forged.to_wire(), use_bin_type=True).hex()
        sigma, sens = signed_sigma([raised, *sts[1:]])
        append(ledger, 0, items, sigma=sigma, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path)
    assert report.exit_code == 2
    assert any("alpha" in p and "signature does not verify" in p for p in report.problems)
    # Unverifiable evidence supports no noise: ε is unbounded, not the forged σ's.
    assert report.epsilon["rdp"] == float("inf")
    # The signature check needs no CA.
    assert audit(path, fed.kh_path, trust_key_only=True).exit_code == 2


def test_ledger_signed_by_a_client_with_its_genuine_certificate(fed: Federation) -> None:
    mallory = fed.clients["delta"]
    path, _ = write(fed, key=mallory.key)
    (fed.dir / "delta.pem").write_text(_pem(mallory.cert))
    # The chain verifies under delta's key, so only the CA can tell this apart.
    assert audit(path, fed.dir / "delta.pem", trust_key_only=True).exit_code == 0
    report = audit(path, fed.dir / "delta.pem", ca=fed.ca_path)
    assert report.exit_code == 2
    assert "key holder" in report.problems[0] and "wrong_role" in report.problems[0]


def test_keyholder_key_without_certificate_cannot_be_checked(fed: Federation) -> None:
    path, _ = write(fed)
    bare = fed.keyholder.key.public_key()
    assert audit(path, bare, trust_key_only=True).exit_code == 0
    assert audit(path, bare, ca=fed.ca, crl=fed.crl_path).exit_code == 2


def test_keyholder_certificate_from_another_ca(fed: Federation) -> None:
    other, other_key = pki.create_ca(FED)
    impostor = _issue(other, other_key, "keyholder", "keyholder")
    path, _ = write(fed, key=impostor.key)
    (fed.dir / "impostor.pem").write_text(_pem(impostor.cert))
    report = audit(path, fed.dir / "impostor.pem", ca=fed.ca_path)
    assert report.exit_code == 2 and "untrusted" in report.problems[0]


def test_client_certificate_from_another_ca(fed: Federation) -> None:
    other, other_key = pki.create_ca(FED)
    fake_beta = _issue(other, other_key, "client", "beta")
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        signers = {"alpha": fed.clients["alpha"], "beta": fake_beta, "gamma": fed.clients["gamma"]}
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, [item(s, signers[s.client]) for s in sts], sigma=sigma, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path)
    assert report.exit_code == 2
    assert any("beta" in p and "not a client" in p for p in report.problems)
    # Self-consistent without the CA: the signature matches its (fake) certificate.
    assert audit(path, fed.kh_path, trust_key_only=True).exit_code == 0


def test_statement_with_another_clients_certificate(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        items = [item(s, fed.clients[s.client]) for s in sts]
        # gamma's entry signed by delta (an enrolled client) and shipped with delta's cert.
        items[2] = item(sts[2], fed.clients["delta"])
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, items, sigma=sigma, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path)
    assert report.exit_code == 2
    assert any("gamma" in p and "delta" in p for p in report.problems)


def test_unreadable_statement(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        items = [item(s, fed.clients[s.client]) for s in sts]
        items[1]["signed"] = "c0ffee"
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, items, sigma=sigma, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path)
    assert report.exit_code == 2 and any("unreadable" in p for p in report.problems)


# ------------------------------------------------------------- unsupported → 1


def test_recorded_sigma_above_the_signed_one(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        items = [item(s, fed.clients[s.client]) for s in sts]
        append(ledger, 0, items, sigma=sigma * 1.5, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1
    assert any("recorded σ_eff" in p and "exceeds" in p for p in report.problems)
    # ε comes from the signed σ, so the claim made from the inflated one understates it.
    assert report.epsilon["rdp"] == pytest.approx(epsilon([(sigma, 0.75, 1)], DEFAULT_DELTA))
    assert any("understates" in p for p in report.problems)


def test_epsilon_is_recomputed_from_the_signed_sigma(fed: Federation) -> None:
    # A cautious key holder records less noise than was signed: allowed, but the
    # audit's ε is the signed σ's (lower than the claim), never the recorded one's.
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma / 2,
               sensitivity=sens)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 0, report.problems
    assert report.epsilon["rdp"] == pytest.approx(epsilon([(sigma, 0.75, 1)], DEFAULT_DELTA))
    assert report.claimed_epsilon is not None
    assert report.epsilon["rdp"] < report.claimed_epsilon
    assert report.per_round[0]["recorded_sigma"] == pytest.approx(sigma / 2)


def test_recorded_sensitivity_above_the_signed_one(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
               sensitivity=sens * 2)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1 and any("sensitivity" in p for p in report.problems)


def test_statement_for_another_round(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        honest_round(ledger, fed, 0, CLIENTS)
        sts = [statement(n, 1) for n in CLIENTS]
        sts[1] = statement("beta", 0)  # beta's genuine statement of round 0, replayed
        sigma, sens = signed_sigma(sts)
        append(ledger, 1, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
               sensitivity=sens)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1
    assert any("round 1" in p and "beta signed" in p and "round 0" in p for p in report.problems)


def test_statement_for_another_run(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0, run="run-other" if n == "gamma" else RUN) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
               sensitivity=sens)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1 and any("run-other" in p for p in report.problems)


def test_recorded_delta_differs_from_the_signed_one(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
               sensitivity=sens, delta=DEFAULT_DELTA * 10)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1 and any("δ" in p for p in report.problems)


def test_a_client_that_signed_no_dp_means_no_noise(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0, dp=None if n == "beta" else DP) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)  # the key holder ignores the missing DP
        append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
               sensitivity=sens)  # fmt: skip
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1 and report.epsilon["rdp"] == float("inf")
    assert report.per_round[0]["signed_sigma"] == 0.0


def test_missing_statements_are_a_problem_under_the_ca(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        honest_round(ledger, fed, 0, CLIENTS)
        ledger.append(
            run=RUN, round=1, participants=list(CLIENTS), enrolled=ENROLLED, clip_norm=1.0,
            noise_multiplier=1.2, sample_rate=0.75, delta=DEFAULT_DELTA, rule="fedavg",
            epsilon=ledger.would_spend(RUN, noise_multiplier=1.2, sample_rate=0.75,
                                       delta=DEFAULT_DELTA),
        )  # fmt: skip
    msg = "round 1: no signed client statements; σ taken on the key holder's word"
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 1 and msg in report.problems
    assert report.per_round[1]["signed_sigma"] is None
    assert report.per_round[1]["sigma_used"] == 1.2
    plain = audit(path, fed.kh_path, prv=False, trust_key_only=True)
    assert plain.exit_code == 0 and msg in plain.notes


# ------------------------------------------------------------------- schema


def test_client_weighting_and_a_line_of_200_participants(fed: Federation) -> None:
    names = [f"c{i:03d}" for i in range(200)]
    ca, ca_key = fed.ca, fed.ca_key
    parties = {n: _issue(ca, ca_key, "client", n) for n in names}
    sts = [
        dataclasses.replace(statement("alpha", 0, weight=1.0), client=n, weighting="client")
        for n in names
    ]
    sigma, sens = effective_noise([DP] * len(names), [1.0] * len(names))
    path = fed.dir / "big.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        ledger.append(
            run=RUN, round=0, participants=names, enrolled=200, clip_norm=sens,
            noise_multiplier=sigma, sample_rate=1.0, delta=DEFAULT_DELTA, rule="fedavg",
            epsilon=None, statements=[item(s, parties[s.client]) for s in sts], weight_scale=1.0,
        )  # fmt: skip
    size = path.stat().st_size
    # The schema's estimate: ~2 KB per participant, far inside one line's bound.
    assert 200 * 1000 < size < 200 * 2500 < MAX_LINE_BYTES
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 0, report.problems
    # Equal specs and weights: σ_eff = σ·√(n/K), the accountant's long-standing figure.
    want = DP.noise_multiplier * (200 / DP.min_clients) ** 0.5
    assert report.per_round[0]["signed_sigma"] == pytest.approx(want)


def _bad_statements(fed: Federation) -> list[tuple[str, Any]]:
    good = [item(statement(n, 0), fed.clients[n]) for n in CLIENTS]
    big_pem = good[0]["cert"].replace("-----END", "A" * 9000 + "\n-----END")
    return [
        ("missing one", good[:2]),
        ("extra key", [{**good[0], "x": "1"}, *good[1:]]),
        ("uppercase hex", [{**good[0], "signed": good[0]["signed"].upper()}, *good[1:]]),
        ("odd hex", [{**good[0], "signed": "abc"}, *good[1:]]),
        ("huge statement", [{**good[0], "signed": "00" * (64 * 1024 + 1)}, *good[1:]]),
        ("huge pem", [{**good[0], "cert": big_pem}, *good[1:]]),
        ("not pem", [{**good[0], "cert": "hello"}, *good[1:]]),
        ("control chars", [{**good[0], "cert": good[0]["cert"] + "\x07"}, *good[1:]]),
        ("not a list", "abc"),
        ("no client", [{"signed": "00", "cert": good[0]["cert"]}, *good[1:]]),
    ]


def test_the_schema_refuses_malformed_statements(fed: Federation) -> None:
    for name, items in _bad_statements(fed):
        with PrivacyLedger(fed.dir / f"{name}.jsonl", fed.keyholder.key) as ledger:
            with pytest.raises(LedgerError):
                ledger.append(
                    run=RUN, round=0, participants=list(CLIENTS), enrolled=ENROLLED,
                    clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.75,
                    delta=DEFAULT_DELTA, rule="fedavg", epsilon=1.0, statements=items,
                    weight_scale=SCALE,
                )  # fmt: skip
            assert len(ledger) == 0, name


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), True])
def test_the_schema_refuses_bad_weight_scales(fed: Federation, scale: Any) -> None:
    sts = [statement(n, 0) for n in CLIENTS]
    sigma, sens = signed_sigma(sts)
    with PrivacyLedger(fed.dir / "l.jsonl", fed.keyholder.key) as ledger:
        with pytest.raises(LedgerError):
            append(ledger, 0, [item(s, fed.clients[s.client]) for s in sts], sigma=sigma,
                   sensitivity=sens, weight_scale=scale)  # fmt: skip


def test_certificates_are_judged_at_the_release(fed: Federation) -> None:
    # A client certificate that had expired before the round was released.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    stale_cert, stale_key = pki.issue_certificate(
        fed.ca, fed.ca_key, pki.PeerIdentity(FED, "client", "beta"),
        not_before=past, not_after=past + dt.timedelta(days=1),
    )  # fmt: skip
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        stale = Party(stale_cert, stale_key)
        items = [item(s, stale if s.client == "beta" else fed.clients[s.client]) for s in sts]
        sigma, sens = signed_sigma(sts)
        append(ledger, 0, items, sigma=sigma, sensitivity=sens)
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 2 and any("expired" in p for p in report.problems)
    # A key holder certificate not yet valid when the rounds were released.
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    early, early_key = pki.issue_certificate(
        fed.ca, fed.ca_key, pki.PeerIdentity(FED, "keyholder", "keyholder"),
        not_before=future, not_after=future + dt.timedelta(days=1),
    )  # fmt: skip
    path.unlink()
    path, _ = write(fed, key=early_key)
    (fed.dir / "early.pem").write_text(_pem(early))
    bad = audit(path, fed.dir / "early.pem", ca=fed.ca_path, prv=False)
    assert bad.exit_code == 2 and "not_yet_valid" in bad.problems[0]


# -------------------------------------------------- trust: CRL, federation, kits


def _crl(fed: Federation, *revoked: x509.Certificate, name: str = "revoked.pem") -> Path:
    path = fed.dir / name
    crl = pki.build_crl(fed.ca, fed.ca_key, [c.serial_number for c in revoked])
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def test_revoked_keyholder_certificate(fed: Federation) -> None:
    path, _ = write(fed)
    revoked = _crl(fed, fed.keyholder.cert)
    report = audit(path, fed.kh_path, ca=fed.ca_path, crl=revoked, prv=False)
    assert report.exit_code == 2 and "revoked" in report.problems[0]
    # A CRL that revokes someone else changes nothing; the default is crl.pem beside the CA.
    other = _crl(fed, fed.clients["delta"].cert, name="other-crl.pem")
    assert audit(path, fed.kh_path, ca=fed.ca_path, crl=other, prv=False).exit_code == 0
    fed.crl_path.write_bytes(revoked.read_bytes())
    assert audit(path, fed.kh_path, ca=fed.ca_path, prv=False).exit_code == 2


def test_a_crl_is_required_and_must_be_the_cas(fed: Federation) -> None:
    path, _ = write(fed)
    fed.crl_path.unlink()
    missing = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert missing.exit_code == 2 and "--crl CRL_PEM" in missing.problems[0]
    assert audit(path, fed.kh_path, ca=fed.ca, prv=False).exit_code == 2  # no path, no default
    other, other_key = pki.create_ca(FED)
    foreign = pki.build_crl(other, other_key, [])
    bad = audit(path, fed.kh_path, ca=fed.ca, crl=foreign, prv=False)
    assert bad.exit_code == 2 and "bad_crl" in bad.problems[0]
    good = pki.build_crl(fed.ca, fed.ca_key, [])
    assert audit(path, fed.kh_path, ca=fed.ca, crl=good, prv=False).exit_code == 0


def test_keyholder_of_another_federation(fed: Federation) -> None:
    # Our CA, the keyholder role, but another federation's SPIFFE id.
    cert, key = pki.issue_certificate(
        fed.ca, fed.ca_key, pki.PeerIdentity("other", "keyholder", "keyholder")
    )
    path, _ = write(fed, key=key)
    (fed.dir / "other-kh.pem").write_text(_pem(cert))
    report = audit(path, fed.dir / "other-kh.pem", ca=fed.ca_path, prv=False)
    assert report.exit_code == 2 and "wrong_federation" in report.problems[0]
    # The auditor's kit names another federation than the CA serves.
    path.unlink()
    path, _ = write(fed)
    assert audit(path, fed.kh_path, ca=fed.ca_path, prv=False, federation=FED).exit_code == 0
    kit_mismatch = audit(path, fed.kh_path, ca=fed.ca_path, prv=False, federation="other")
    assert kit_mismatch.exit_code == 2 and "wrong_federation" in kit_mismatch.problems[0]


def test_refused_and_retried_round_with_statements(fed: Federation) -> None:
    path = fed.dir / "ledger.jsonl"
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        sts = [statement(n, 0) for n in CLIENTS]
        sigma, sens = signed_sigma(sts)
        items = [item(s, fed.clients[s.client]) for s in sts]
        append(ledger, 0, items, sigma=sigma, sensitivity=sens, outcome="refused",
               reason="aggregate_out_of_bounds")  # fmt: skip
        honest_round(ledger, fed, 0, CLIENTS)  # the retry, fresh noise, same cohort
    report = audit(path, fed.kh_path, ca=fed.ca_path, prv=False)
    assert report.exit_code == 0, report.problems
    assert report.rounds == 1 and report.refused == 1
    assert report.epsilon["rdp"] == pytest.approx(
        epsilon([(sigma, 3 / ENROLLED, 1)] * 2, DEFAULT_DELTA)
    )


def _kit(root: Path, fed: Federation, role: str, federation: str = FED) -> Path:
    root.mkdir(parents=True)
    (root / "config.toml").write_text(
        f'[federation]\nname = "{federation}"\n\n[party]\nrole = "{role}"\nname = "{role}"\n'
    )
    (root / "ca.pem").write_text(_pem(fed.ca))
    (root / "crl.pem").write_bytes(fed.crl_path.read_bytes())
    if role == "keyholder":
        (root / "cert.pem").write_text(_pem(fed.keyholder.cert))
    return root


def test_cli_trust_from_kits_ca_and_crl(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    from secure_xfl.cli import main as cli_main

    def main(*argv: str | Path) -> int:
        return cli_main(["audit", *map(str, argv), "--no-prv"])

    path, _ = write(fed)
    elsewhere = fed.dir / "copy" / "ledger.jsonl"  # no keyholder-cert.pem beside it
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(path.read_bytes())
    kh_kit = _kit(fed.dir / "kh-kit", fed, "keyholder")
    client_kit = _kit(fed.dir / "client-kit", fed, "client")
    assert main(elsewhere, "--kit", kh_kit, "--json") == 0  # CA, CRL and cert from the kit
    assert json.loads(capsys.readouterr().out)["signer"] == "spiffe://fed/keyholder/keyholder"
    assert main(path, "--kit", client_kit) == 0  # a client's kit: cert beside the ledger
    assert main(elsewhere, "--kit", client_kit) == 2  # ... and none beside this copy
    assert "--cert" in capsys.readouterr().err
    assert main(elsewhere, "--kit", client_kit, "--cert", fed.kh_path) == 0
    assert main(path, "--ca", fed.ca_path) == 0  # crl.pem beside the CA
    assert main(path, "--ca", fed.ca_path, "--budget", "0.5") == 1
    capsys.readouterr()
    # Revoked, foreign federation, no CRL, no CA: all exit 2.
    assert main(path, "--ca", fed.ca_path, "--crl", _crl(fed, fed.keyholder.cert)) == 2
    assert "revoked" in capsys.readouterr().out
    assert main(path, "--kit", _kit(fed.dir / "k3", fed, "client", federation="other")) == 2
    assert "wrong_federation" in capsys.readouterr().out
    (fed.dir / "lonely").mkdir()
    (fed.dir / "lonely" / "ca.pem").write_text(_pem(fed.ca))
    assert main(path, "--ca", fed.dir / "lonely" / "ca.pem") == 2
    assert "--crl CRL_PEM" in capsys.readouterr().err
    assert main(path) == 2
    err = capsys.readouterr().err
    assert "--ca CA_PEM" in err and "--kit KIT_DIR" in err
