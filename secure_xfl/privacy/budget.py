"""One privacy budget per run: the ε the key holder enforces and the audit recomputes.

A :class:`PrivacyBudget` holds the decryptions of one run at one δ and
answers the two questions both sides ask, with the same arithmetic (the RDP
accountant of :mod:`secure_xfl.privacy.accountant`):

* **federation ε** — every round, each a Gaussian mechanism with its σ_eff,
  subsampled at its client sampling rate. The amplification assumes the
  cohort was a secret random sample of the enrolled clients.
* **client ε** — only the rounds the client took part in, each at sample rate
  1. Once the ledger (and the aggregator) know who took part, selection hides
  nothing, so no amplification can be claimed; rounds a client sat out never
  touched its data and cost it nothing.

Every decryption counts, released or refused: a refused aggregate was still
decrypted (the key holder saw it), so it is one more application of the
Gaussian mechanism to the participants' data, and retries of a round over
overlapping cohorts could be differenced. A round refused once and then
released costs two mechanisms.

A budget binds both figures: :meth:`PrivacyBudget.would_exceed` checks the
projected federation ε and the most exposed participant's ε before a release.

RDP composes additively, so the budget keeps running RDP curves (one for the
federation, one per client) and each figure costs one conversion, not a pass
over the history: the key holder asks once per round, the audit once per
entry and client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.privacy.accountant import (
    AccountingError,
    Method,
    epsilon,
    rdp_curve,
    rdp_to_epsilon,
)

__all__ = ["PrivacyBudget"]

Curve = npt.NDArray[np.float64]


def _check_round(noise_multiplier: float, sample_rate: float, participants: Sequence[str]) -> None:
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not math.isfinite(sigma) or sigma < 0:
        raise AccountingError(f"noise multiplier must be finite and ≥ 0, got {noise_multiplier!r}")
    if not 0 < q <= 1:
        raise AccountingError(f"sample rate must lie in (0, 1], got {sample_rate!r}")
    if len(set(participants)) != len(participants) or not participants:
        raise AccountingError("participants must be a non-empty list of distinct names")


class PrivacyBudget:
    """Decryptions (released and refused) of one run at one δ; see the module docstring."""

    def __init__(self, run: str, delta: float = DEFAULT_DELTA) -> None:
        d = float(delta)
        if not 0 < d < 1:
            raise AccountingError(f"delta must lie in (0, 1), got {delta!r}")
        self.run = run
        self.delta = d
        self._history: list[tuple[float, float, int]] = []
        self._fed: Curve = rdp_curve([])
        self._clients: dict[str, list[float]] = {}
        self._client_curves: dict[str, Curve] = {}

    @classmethod
    def from_entries(
        cls,
        entries: Iterable[Mapping[str, Any]],
        run: str,
        delta: float = DEFAULT_DELTA,
    ) -> PrivacyBudget:
        """Budget of ``run`` from ledger entries (other runs' entries are skipped).

        Every entry counts, whatever its ``outcome``. Uses each entry's
        *recorded* σ_eff and sample rate: what the key holder itself wrote. The
        audit, which does not take σ on the key holder's word, calls
        :meth:`step` with the σ it recomputed from the signatures.
        """
        budget = cls(run, delta)
        for e in entries:
            if e["run"] == run:
                budget.step(e["noise_multiplier"], e["sample_rate"], e["participants"])
        return budget

    def copy(self) -> PrivacyBudget:
        """An independent copy (stepping it leaves this one unchanged)."""
        out = PrivacyBudget(self.run, self.delta)
        out._history = list(self._history)
        out._fed = self._fed.copy()
        out._clients = {c: list(s) for c, s in self._clients.items()}
        out._client_curves = {c: v.copy() for c, v in self._client_curves.items()}
        return out

    # -- recording

    def step(
        self, noise_multiplier: float, sample_rate: float, participants: Sequence[str]
    ) -> None:
        """Add one decryption (released or refused): σ_eff, client sampling rate, who
        took part."""
        people = list(participants)
        _check_round(noise_multiplier, sample_rate, people)
        sigma, q = float(noise_multiplier), float(sample_rate)
        self._history.append((sigma, q, 1))
        self._fed = self._fed + rdp_curve([(sigma, q, 1)])
        one = rdp_curve([(sigma, 1.0, 1)])
        for cid in people:
            self._clients.setdefault(cid, []).append(sigma)
            self._client_curves[cid] = self._client_curves.get(cid, rdp_curve([])) + one

    # -- queries

    @property
    def rounds(self) -> int:
        """Number of decryptions recorded (released and refused)."""
        return len(self._history)

    def history(self) -> list[tuple[float, float, int]]:
        """The federation history as accountant triples ``(σ_eff, q, 1)``."""
        return list(self._history)

    def clients(self) -> list[str]:
        """Every client that took part in at least one round, sorted."""
        return sorted(self._clients)

    def client_rounds(self, client: str) -> int:
        """How many decryptions (released or refused) ``client`` took part in."""
        return len(self._clients.get(client, ()))

    def client_history(self, client: str) -> list[tuple[float, float, int]]:
        """The client's history: its rounds only, each at sample rate 1."""
        return [(s, 1.0, 1) for s in self._clients.get(client, ())]

    def federation_rdp(self) -> Curve:
        """RDP curve of the federation history (for ε at another δ, e.g. an entry's)."""
        return self._fed.copy()

    def client_rdp(self, client: str) -> Curve:
        """RDP curve of one client's history (zero for a client that never took part)."""
        curve = self._client_curves.get(client)
        return rdp_curve([]) if curve is None else curve.copy()

    def federation_epsilon(self, method: Method = "rdp") -> float:
        """Federation ε at :attr:`delta` (``inf`` once any round had no noise)."""
        if method == "rdp":
            return rdp_to_epsilon(self._fed, self.delta)
        return epsilon(self._history, self.delta, method)

    def client_epsilon(self, client: str, method: Method = "rdp") -> float:
        """ε of one client at :attr:`delta` (0 for a client that never took part)."""
        if method == "rdp":
            curve = self._client_curves.get(client)
            return 0.0 if curve is None else rdp_to_epsilon(curve, self.delta)
        return epsilon(self.client_history(client), self.delta, method)

    def projected(
        self, noise_multiplier: float, sample_rate: float, participants: Sequence[str]
    ) -> tuple[float, float, str | None]:
        """(federation ε, worst participant's ε, that participant) after one more
        decryption of this round, released or refused; the budget is not changed.
        The second figure is what a ledger entry records as ``client_epsilon``."""
        people = list(participants)
        _check_round(noise_multiplier, sample_rate, people)
        sigma, q = float(noise_multiplier), float(sample_rate)
        fed = rdp_to_epsilon(self._fed + rdp_curve([(sigma, q, 1)]), self.delta)
        one = rdp_curve([(sigma, 1.0, 1)])
        worst, who = -1.0, None
        zero = rdp_curve([])
        for cid in sorted(people):
            eps = rdp_to_epsilon(self._client_curves.get(cid, zero) + one, self.delta)
            if eps > worst:
                worst, who = eps, cid
        return fed, worst, who

    def would_exceed(
        self,
        budget: float,
        noise_multiplier: float,
        sample_rate: float,
        participants: Sequence[str],
    ) -> str | None:
        """Why decrypting this round would exceed ``budget`` (ε), or ``None`` if it fits.

        Both the federation figure and the most exposed participant's are held
        to the budget; the reason names which one (and the client) breaks it.
        """
        b = float(budget)
        if math.isnan(b) or b < 0:
            raise AccountingError(f"budget must be ≥ 0, got {budget!r}")
        fed, worst, who = self.projected(noise_multiplier, sample_rate, participants)
        reasons = []
        if fed > b:
            reasons.append(f"federation ε would reach {fed:.4g} > budget {b:g}")
        if worst > b:
            reasons.append(f"client {who} ε would reach {worst:.4g} > budget {b:g}")
        if not reasons:
            return None
        return f"one more round of run {self.run!r} (δ={self.delta:g}): " + "; ".join(reasons)
