"""Offline corpus, byte tokenizer, blocks and partitioners."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_xfl.errors import TrainingError
from secure_xfl.training.data import (
    DEFAULT_MODULES,
    ByteTokenizer,
    DataError,
    Document,
    PartitionError,
    default_corpus,
    default_documents,
    dirichlet_partition,
    dynamic_partition,
    fixed_partition,
    load_text,
    make_blocks,
    rebalance,
    train_eval_split,
)

# ---------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_decodes_broken_utf8_without_raising() -> None:
    assert ByteTokenizer().decode([0xFF, ord("a"), ByteTokenizer.PAD]) == "\ufffda"


# ---------------------------------------------------------------- corpus and blocks


def test_default_corpus_is_deterministic_bounded_and_from_the_stdlib() -> None:
    docs = default_documents(60_000)
    assert docs == default_documents(60_000)
    assert sum(len(d.text.encode()) for d in docs) <= 60_000
    assert all(d.source in DEFAULT_MODULES for d in docs)
    assert [d.source for d in docs] == sorted(d.source for d in docs)
    text = default_corpus(20_000)
    assert 10_000 < len(text.encode()) <= 20_000 + 2 * len(docs)
    assert "def " not in text.split("\n")[0]  # prose (a docstring), not code


def test_blocks_have_fixed_length_and_one_label_each() -> None:
    docs = [Document("a", "x" * 100), Document("b", "y" * 50), Document("a", "z" * 10)]
    b = make_blocks(docs, block_size=16)
    assert b.tokens.shape == (6 + 3, 16)  # (100+1)//16 + (50+1)//16; the short one drops
    assert b.label_names == ("a", "b")
    assert b.labels.tolist() == [0] * 6 + [1] * 3
    assert ByteTokenizer().decode(b.tokens[0].tolist()) == "x" * 16
    with pytest.raises(DataError):
        make_blocks("short", block_size=64)


def test_eval_split_is_deterministic_disjoint_and_complete() -> None:
    b = make_blocks(default_documents(40_000), block_size=32)
    tr, ev = train_eval_split(b, 0.1)
    assert len(tr) + len(ev) == len(b)
    assert abs(len(ev) - len(b) / 10) <= 1
    rows = {r.tobytes() for r in b.tokens}
    assert {r.tobytes() for r in tr.tokens} | {r.tobytes() for r in ev.tokens} == rows
    _, ev2 = train_eval_split(b, 0.1)
    assert np.array_equal(ev.tokens, ev2.tokens)
    with pytest.raises(DataError):
        train_eval_split(b, 1.5)


def test_load_text_reads_local_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}) + "\n"
    )
    assert load_text(tmp_path / "a.txt") == [Document("a.txt", "first line\nsecond line\n")]
    docs = load_text(tmp_path)
    assert [d.text for d in docs] == ["first line\nsecond line\n", "doc one", "doc two"]
    assert load_text(tmp_path / "b.jsonl", max_bytes=9) == [
        Document("b.jsonl:0", "doc one"),
        Document("b.jsonl:1", "do"),
    ]
    with pytest.raises(DataError, match="no field"):
        load_text(tmp_path / "b.jsonl", text_field="body")
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "missing.txt")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # Offline mode answers at once; a real lookup would retry DNS for ~25 s first.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="internet") as info:
        load_text("someone/some-dataset")
    assert isinstance(info.value, TrainingError) and info.value.code == "data"


# ---------------------------------------------------------------- partitioners


def _check_exact_cover(parts: dict[str, list[int]], n: int) -> None:
    flat = [i for p in parts.values() for i in p]
    assert sorted(flat) == list(range(n))


names_st = st.lists(
    st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=6, unique=True
)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 500), k=st.integers(1, 8), seed=st.integers(0, 3) | st.none())
def test_fixed_partition_equal_shares(n: int, k: int, seed: int | None) -> None:
    parts = fixed_partition(n, k, seed=seed)
    assert list(parts) == [f"client{i}" for i in range(k)]
    _check_exact_cover(parts, n)
    sizes = [len(p) for p in parts.values()]
    assert max(sizes) - min(sizes) <= 1
    assert parts == fixed_partition(n, k, seed=seed)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=8, max_size=300),
    k=st.integers(1, 8),
    alpha=st.floats(0.01, 100),
    seed=st.integers(0, 5),
)
def test_dirichlet_partition_covers_every_index_once(
    labels: list[int], k: int, alpha: float, seed: int
) -> None:
    parts = dirichlet_partition(labels, k, alpha, seed)
    _check_exact_cover(parts, len(labels))
    assert parts == dirichlet_partition(labels, k, alpha, seed)
    assert all(len(p) >= 1 for p in parts.values())


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    labels = np.repeat(np.arange(10), 200)

    def skew(alpha: float) -> float:
        parts = dirichlet_partition(labels, 5, alpha, seed=1)
        # mean over clients of the share of its most common label
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts.values()]))

    assert skew(0.05) > 0.5 > 0.2 > skew(1000.0)
    _check_exact_cover(dirichlet_partition(1000, 3, 0.3), 1000)
    with pytest.raises(PartitionError):
        dirichlet_partition([0, 1], 3, 1.0)
    with pytest.raises(PartitionError):
        dirichlet_partition(10, 2, 0.0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(10, 2000),
    names=names_st,
    rates=st.lists(st.floats(0.1, 1000), min_size=6, max_size=6),
)
def test_dynamic_partition_is_proportional_to_throughput(
    n: int, names: list[str], rates: list[float]
) -> None:
    tp = dict(zip(names, rates, strict=False))
    parts = dynamic_partition(n, tp)
    _check_exact_cover(parts, n)
    total = math.fsum(tp.values())
    for c, p in parts.items():
        assert len(p) >= 1
        # ≥1 guaranteed to each, the rest by largest remainder: within 1 of exact
        assert abs(len(p) - 1 - (n - len(tp)) * tp[c] / total) < 1
    # mapping order does not matter
    assert parts == dynamic_partition(n, dict(reversed(list(tp.items()))))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(10, 1000),
    names=names_st,
    before=st.lists(st.floats(0.1, 100), min_size=6, max_size=6),
    after=st.lists(st.floats(0.1, 100), min_size=6, max_size=6),
    drop=st.booleans(),
)
def test_rebalance_moves_only_what_it_must(
    n: int, names: list[str], before: list[float], after: list[float], drop: bool
) -> None:
    old = dynamic_partition(n, dict(zip(names, before, strict=False)))
    new_names = names[:-1] if drop and len(names) > 1 else [*names, "newcomer"]
    tp = dict(zip(new_names, after, strict=False))
    new = rebalance(old, tp)
    _check_exact_cover(new, n)
    assert [len(new[c]) for c in sorted(tp)] == [
        len(p) for p in dynamic_partition(n, tp, seed=None).values()
    ]
    for c in new:
        kept = set(new[c]) & set(old.get(c, []))
        assert len(kept) == min(len(new[c]), len(old.get(c, [])))
    assert rebalance(old, tp) == new


def test_partitioners_reject_bad_input() -> None:
    with pytest.raises(PartitionError):
        dynamic_partition(10, {"a": 0.0})
    with pytest.raises(PartitionError):
        dynamic_partition(10, {"a": float("nan")})
    with pytest.raises(PartitionError):
        dynamic_partition(1, {"a": 1.0, "b": 1.0})
    with pytest.raises(PartitionError):
        fixed_partition(10, ["a", "a"])
    with pytest.raises(PartitionError):
        rebalance({"a": [0, 1], "b": [1]}, {"a": 1.0})
