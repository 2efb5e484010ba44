"""PrivacyBudget: its figures are the accountant's; would_exceed names who breaks the budget."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.privacy.accountant import AccountingError, epsilon
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.ledger import PrivacyLedger

DELTA = DEFAULT_DELTA
# (σ_eff, sample rate, participants) of a hand-built run: "d" sits out rounds 1 and 3,
# σ varies, so the per-client histories differ from the federation's.
ROUNDS: list[tuple[float, float, list[str]]] = [
    (1.2, 1.0, ["a", "b", "c", "d"]),
    (0.9, 0.75, ["a", "b", "c"]),
    (1.5, 1.0, ["a", "b", "c", "d"]),
    (1.1, 0.5, ["a", "b"]),
]


def _budget(delta: float = DELTA) -> PrivacyBudget:
    budget = PrivacyBudget("run-1", delta)
    for sigma, q, people in ROUNDS:
        budget.step(sigma, q, people)
    return budget


def _client_history(client: str) -> list[tuple[float, float, int]]:
    return [(s, 1.0, 1) for s, _, people in ROUNDS if client in people]


def test_federation_epsilon_is_the_accountants() -> None:
    budget = _budget()
    fed = [(s, q, 1) for s, q, _ in ROUNDS]
    assert budget.rounds == 4 and budget.history() == fed
    assert budget.federation_epsilon() == pytest.approx(epsilon(fed, DELTA, "rdp"), rel=1e-12)
    assert budget.federation_epsilon("prv") == pytest.approx(epsilon(fed, DELTA, "prv"))
    other = _budget(1e-8)
    assert other.federation_epsilon() == pytest.approx(epsilon(fed, 1e-8, "rdp"), rel=1e-12)


def test_client_epsilon_counts_only_its_rounds_at_rate_one() -> None:
    budget = _budget()
    assert budget.clients() == ["a", "b", "c", "d"]
    for client in ("a", "c", "d"):
        want = epsilon(_client_history(client), DELTA, "rdp")
        assert budget.client_epsilon(client) == pytest.approx(want, rel=1e-12)
        assert budget.client_history(client) == _client_history(client)
    assert budget.client_rounds("d") == 2 and budget.client_rounds("a") == 4
    assert budget.client_epsilon("d") < budget.client_epsilon("a")
    assert budget.client_epsilon("d", "prv") == pytest.approx(
        epsilon(_client_history("d"), DELTA, "prv")
    )
    assert budget.client_epsilon("nobody") == 0.0
    # Knowing who took part, no amplification: a client in every round pays more.
    assert budget.client_epsilon("a") > budget.federation_epsilon()


def test_empty_and_unbounded() -> None:
    budget = PrivacyBudget("run-1")
    assert budget.delta == DEFAULT_DELTA
    assert budget.federation_epsilon() == 0.0 and budget.client_epsilon("a") == 0.0
    budget.step(0.0, 0.5, ["a"])
    assert budget.federation_epsilon() == math.inf and budget.client_epsilon("a") == math.inf
    assert budget.client_epsilon("b") == 0.0


def test_projection_matches_one_more_step_and_changes_nothing() -> None:
    budget = _budget()
    fed, worst, who = budget.projected(1.0, 0.75, ["b", "c", "d"])
    after = _budget()
    after.step(1.0, 0.75, ["b", "c", "d"])
    assert fed == pytest.approx(after.federation_epsilon(), rel=1e-12)
    # b and c were in all four rounds, d in two; b wins the tie by name order.
    assert who == "b" and worst == pytest.approx(after.client_epsilon("b"), rel=1e-12)
    assert budget.rounds == 4  # projecting does not record


def test_would_exceed_names_the_client() -> None:
    budget = _budget()
    fed, worst, _ = budget.projected(1.0, 0.75, ["b", "c", "d"])
    assert fed < worst
    assert budget.would_exceed(worst * 1.01, 1.0, 0.75, ["b", "c", "d"]) is None
    reason = budget.would_exceed((fed + worst) / 2, 1.0, 0.75, ["b", "c", "d"])
    assert reason is not None and "client b" in reason and "federation" not in reason
    both = budget.would_exceed(fed / 2, 1.0, 0.75, ["b", "c", "d"])
    assert both is not None and "federation" in both and "client b" in both


def test_would_exceed_names_the_federation() -> None:
    # Two clients alternating at q = 0.9: each has half the rounds, the federation all.
    budget = PrivacyBudget("run-1")
    for r in range(10):
        budget.step(2.0, 0.9, ["a" if r % 2 else "b"])
    fed, worst, who = budget.projected(2.0, 0.9, ["a"])
    assert who == "a" and fed > worst
    reason = budget.would_exceed((fed + worst) / 2, 2.0, 0.9, ["a"])
    assert reason is not None and "federation" in reason and "client" not in reason


def test_from_entries_and_the_ledger_agree(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        for r, (sigma, q, people) in enumerate(ROUNDS):
            enrolled = round(len(people) / q)
            for run in ("run-1", "run-2"):
                ledger.append(
                    run=run, round=r, participants=people, enrolled=enrolled, clip_norm=1.0,
                    noise_multiplier=sigma, sample_rate=q, delta=DELTA, rule="fedavg",
                    epsilon=ledger.would_spend(
                        run, noise_multiplier=sigma, sample_rate=q, delta=DELTA
                    ),
                )  # fmt: skip
        from_ledger = ledger.budget("run-1", DELTA)
        entries = ledger.history()
    built = PrivacyBudget.from_entries(entries, "run-1", DELTA)
    hand = _budget()
    for b in (from_ledger, built):
        assert b.rounds == 4
        assert b.federation_epsilon() == pytest.approx(hand.federation_epsilon(), rel=1e-12)
        assert b.client_epsilon("d") == pytest.approx(hand.client_epsilon("d"), rel=1e-12)
    assert entries[-1]["epsilon"] == pytest.approx(hand.federation_epsilon(), rel=1e-9)


@pytest.mark.parametrize(
    ("sigma", "q", "people"),
    [(-1.0, 0.5, ["a"]), (math.nan, 0.5, ["a"]), (1.0, 0.0, ["a"]), (1.0, 1.5, ["a"]),
     (1.0, 0.5, []), (1.0, 0.5, ["a", "a"])],
)  # fmt: skip
def test_bad_rounds_are_refused(sigma: float, q: float, people: list[str]) -> None:
    budget = PrivacyBudget("run-1")
    with pytest.raises(AccountingError):
        budget.step(sigma, q, people)
    with pytest.raises(AccountingError):
        budget.would_exceed(1.0, sigma, q, people)
    assert budget.rounds == 0


def test_bad_delta_and_budget_are_refused() -> None:
    for delta in (0.0, 1.0, math.nan):
        with pytest.raises(AccountingError):
            PrivacyBudget("run-1", delta)
    with pytest.raises(AccountingError):
        PrivacyBudget("run-1").would_exceed(-1.0, 1.0, 0.5, ["a"])


def test_a_refused_decryption_is_charged_like_a_release(tmp_path: Path) -> None:
    # Round 0 refused (the key holder saw the plaintext), then retried and released:
    # two Gaussian mechanisms on a, b, c's data, so ε is the accountant's over two.
    sigma, q, people = 1.3, 0.75, ["a", "b", "c"]
    key = ed25519.Ed25519PrivateKey.generate()
    with PrivacyLedger(tmp_path / "l.jsonl", key) as ledger:
        common: dict[str, Any] = {
            "run": "run-1", "round": 0, "participants": people, "enrolled": 4,
            "clip_norm": 1.0, "noise_multiplier": sigma, "sample_rate": q, "delta": DELTA,
            "rule": "fedavg",
        }  # fmt: skip
        first = ledger.would_spend("run-1", noise_multiplier=sigma, sample_rate=q, delta=DELTA)
        ledger.append(**common, epsilon=first, outcome="refused", reason="aggregate_out_of_bounds")
        second = ledger.would_spend("run-1", noise_multiplier=sigma, sample_rate=q, delta=DELTA)
        _, worst, _ = ledger.budget("run-1", DELTA).projected(sigma, q, people)
        ledger.append(**common, epsilon=second, client_epsilon=worst)
        spent = ledger.spent("run-1", DELTA)
        budget = ledger.budget("run-1", DELTA)
        entries = ledger.history()
    two = [(sigma, q, 1)] * 2
    assert first == pytest.approx(epsilon(two[:1], DELTA), rel=1e-12)
    assert second == pytest.approx(epsilon(two, DELTA), rel=1e-12)
    assert spent == pytest.approx(epsilon(two, DELTA), rel=1e-12)
    assert budget.rounds == 2 and budget.client_rounds("a") == 2
    assert budget.client_epsilon("a") == pytest.approx(epsilon([(sigma, 1.0, 1)] * 2, DELTA))
    assert worst == pytest.approx(budget.client_epsilon("a"), rel=1e-12)
    rebuilt = PrivacyBudget.from_entries(entries, "run-1", DELTA)
    assert rebuilt.federation_epsilon() == pytest.approx(spent, rel=1e-12)
    assert rebuilt.client_rdp("a") == pytest.approx(budget.client_rdp("a"))
    assert not rebuilt.client_rdp("nobody").any()
