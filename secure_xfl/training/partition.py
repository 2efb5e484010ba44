"""Client partitions of a data set's indices (DESIGN §3, paper §3.1).

Every partitioner returns ``{client: sorted indices}`` with every index
assigned exactly once, and is deterministic given its seed, so every party of a
demo computes the same split and keeps its own share. Fixed: equal shares;
Dirichlet: non-IID label skew for experiments; dynamic: shares proportional to
each cloud's measured throughput, re-balanced between rounds with as little
data movement as possible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from secure_xfl.errors import TrainingError

__all__ = [
    "PartitionError",
    "dirichlet_partition",
    "dynamic_partition",
    "fixed_partition",
    "rebalance",
]


class PartitionError(TrainingError):
    """A partition request that cannot be met (too few items, bad throughputs)."""

    code = "partition"


def _names(clients: int | Sequence[str]) -> list[str]:
    names = [f"client{i}" for i in range(clients)] if isinstance(clients, int) else list(clients)
    if not names:
        raise PartitionError("need at least one client")
    if len(set(names)) != len(names):
        raise PartitionError("client names must be distinct")
    return names


def _largest_remainder(n: int, weights: Sequence[float], minimum: int) -> list[int]:
    """Integer shares of n proportional to weights, each ≥ minimum, summing to n."""
    k = len(weights)
    if n < minimum * k:
        raise PartitionError(f"{n} items cannot give {k} clients at least {minimum} each")
    total = math.fsum(weights)
    rest = n - minimum * k
    exact = [rest * w / total for w in weights]
    shares = [math.floor(e) for e in exact]
    # Hand out what flooring left over, biggest fractional part first (ties by order).
    order = sorted(range(k), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: rest - sum(shares)]:
        shares[i] += 1
    return [s + minimum for s in shares]


def _check_throughputs(throughputs: Mapping[str, float]) -> list[str]:
    names = sorted(throughputs)  # sorted: the result must not depend on dict order
    if not names:
        raise PartitionError("need at least one client")
    for name in names:
        t = throughputs[name]
        if not (math.isfinite(t) and t > 0):
            raise PartitionError(f"throughput of {name!r} must be finite and > 0, got {t!r}")
    return names


def fixed_partition(
    n: int, clients: int | Sequence[str], *, seed: int | None = 0
) -> dict[str, list[int]]:
    """Equal shares (sizes differ by at most one) of ``range(n)``.

    Indices are shuffled with ``seed`` first (IID shares); ``seed=None`` gives
    contiguous ranges instead.
    """
    names = _names(clients)
    sizes = _largest_remainder(n, [1.0] * len(names), 0)
    perm = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([0, *sizes])
    return {c: sorted(perm[cuts[i] : cuts[i + 1]].tolist()) for i, c in enumerate(names)}


def dirichlet_partition(
    labels_or_n: Sequence[Hashable] | np.ndarray | int,
    clients: int | Sequence[str],
    alpha: float,
    seed: int = 0,
    *,
    min_per_client: int = 1,
) -> dict[str, list[int]]:
    """Non-IID shares: each label's items split across clients by Dir(α) proportions.

    Small α gives each client few labels; large α approaches IID. An int ``n``
    stands for ``n`` items in 10 contiguous label groups. Clients left with
    fewer than ``min_per_client`` items take them from the largest client.
    """
    names = _names(clients)
    if not (math.isfinite(alpha) and alpha > 0):
        raise PartitionError("alpha must be finite and > 0")
    if isinstance(labels_or_n, int):
        n = labels_or_n
        codes = (np.arange(n) * 10 // max(n, 1)).astype(np.int64)
    else:
        lab = list(labels_or_n)
        n = len(lab)
        lookup: dict[Hashable, int] = {}
        codes = np.asarray([lookup.setdefault(x, len(lookup)) for x in lab], dtype=np.int64)
    if n < min_per_client * len(names):
        raise PartitionError(f"{n} items cannot give {len(names)} clients {min_per_client} each")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in names]
    for label in np.unique(codes):
        idx = np.flatnonzero(codes == label)
        rng.shuffle(idx)
        props = rng.dirichlet(np.full(len(names), alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].extend(chunk.tolist())
    for i in range(len(names)):
        while len(parts[i]) < min_per_client:
            donor = max(range(len(names)), key=lambda j: (len(parts[j]), -j))
            parts[donor].sort()
            parts[i].append(parts[donor].pop())
    return {c: sorted(p) for c, p in zip(names, parts, strict=True)}


def dynamic_partition(
    n: int, throughputs: Mapping[str, float], *, seed: int | None = 0, min_per_client: int = 1
) -> dict[str, list[int]]:
    """Shares of ``range(n)`` proportional to each client's measured samples/s.

    Clients are ordered by name so the result does not depend on mapping order;
    ``seed`` shuffles the indices first (``None``: contiguous ranges).
    """
    names = _check_throughputs(throughputs)
    sizes = _largest_remainder(n, [throughputs[c] for c in names], min_per_client)
    perm = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([0, *sizes])
    return {c: sorted(perm[cuts[i] : cuts[i + 1]].tolist()) for i, c in enumerate(names)}


def rebalance(
    current: Mapping[str, Sequence[int]],
    throughputs: Mapping[str, float],
    *,
    min_per_client: int = 1,
) -> dict[str, list[int]]:
    """New shares ∝ ``throughputs`` over the same indices, moving as few as possible.

    Clients above their new target give up their highest indices; clients below
    take from that pool, lowest first. Clients in ``current`` but not in
    ``throughputs`` (dropped out) give all of theirs up; new clients start empty.
    """
    names = _check_throughputs(throughputs)
    everything = [i for c in sorted(current) for i in current[c]]
    if len(set(everything)) != len(everything):
        raise PartitionError("the current partition assigns some index twice")
    sizes = _largest_remainder(len(everything), [throughputs[c] for c in names], min_per_client)
    pool: list[int] = [i for c in sorted(current) if c not in throughputs for i in current[c]]
    kept: dict[str, list[int]] = {}
    for c, size in zip(names, sizes, strict=True):
        mine = sorted(current.get(c, ()))
        kept[c] = mine[:size]
        pool.extend(mine[size:])
    pool.sort(reverse=True)  # pop() hands out the lowest index first
    for c, size in zip(names, sizes, strict=True):
        while len(kept[c]) < size:
            kept[c].append(pool.pop())
        kept[c].sort()
    return kept
