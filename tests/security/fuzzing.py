"""A seeded generator of hostile application messages for the fuzzing tests.

It mixes five families, each aimed at a different layer of a server:

* ``random``   — raw random bytes of many sizes (framing / msgpack parser);
* ``mutated``  — valid messages with bit flips, byte stores, insertions, deletions,
  truncations, duplicated ranges and splices (every parser and validator);
* ``typed``    — well-formed msgpack maps whose fields (or whole message) have the
  wrong type, range or message type (field validation);
* ``deep``     — valid messages whose *inner* envelope (update / aggregate) has one
  leaf replaced by a hostile value (envelope validation, CKKS chunk parsing);
* ``lengths``  — hand-made msgpack headers declaring huge lengths (2³²−1 bytes,
  elements or entries) followed by almost nothing (allocation bounds).

``SECURE_XFL_FUZZ_N`` sets the count per server role (CI default 500; the full
run documented in docs/security.md uses 10000) and ``SECURE_XFL_FUZZ_SEED`` the
seed, so any failure is reproducible.
"""

from __future__ import annotations

import math
import os
import random
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

DEFAULT_N = 500
FULL_N = 10_000


def fuzz_count() -> int:
    """Messages per server role (``SECURE_XFL_FUZZ_N``, default 500)."""
    return int(os.environ.get("SECURE_XFL_FUZZ_N", DEFAULT_N))


def fuzz_seed() -> int:
    """Generator seed (``SECURE_XFL_FUZZ_SEED``, default 0)."""
    return int(os.environ.get("SECURE_XFL_FUZZ_SEED", 0))


_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xC6, 0xDB, 0xDD, 0xDF, 0xFF)


def hostile_values(rng: random.Random) -> Any:
    """One value of a type or size a validator should refuse somewhere."""
    choices: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        2**31,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        math.nan,
        math.inf,
        -math.inf,
        1e308,
        "",
        "x" * rng.choice((1, 129, 5000)),
        "\u202e\x00../../etc/passwd",
        b"",
        b"\x00" * rng.choice((1, 31, 32, 33, 600)),
        os.urandom(rng.randint(1, 64)),
        [],
        [None] * rng.randint(1, 20),
        {},
        {"t": "upload"},
        {rng.randint(0, 9): 1} if rng.random() < 0.5 else {"k": [1, 2]},
        _nested(rng.randint(2, 2000)),
    ]
    return rng.choice(choices)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _pack(obj: Any) -> bytes:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True, strict_types=False))
    except (ValueError, OverflowError, TypeError):
        return b"\xc1"  # a byte msgpack never uses


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes]) -> bytes:
    """1–4 random byte-level mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[pos] = rng.choice(_INTERESTING_BYTES)
        elif op == 2:
            buf[pos:pos] = os.urandom(rng.randint(1, 16))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randint(1, 64)]
        elif op == 4:
            del buf[rng.randint(0, len(buf)) :]
        elif op == 5 and buf:
            end = min(len(buf), pos + rng.randint(1, 256))
            buf[end:end] = buf[pos:end]
        elif op == 6 and others:
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 7 and len(buf) > 4:
            # Overwrite a 4-byte run with a big-endian huge count (length fields).
            buf[pos : pos + 4] = struct.pack(">I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 1 << 24)))
    return bytes(buf)


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    yield path


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, list):
        out = list(obj)
        out[head] = _replace(obj[head], rest, value)
        return out
    out_d = dict(obj)
    out_d[head] = _replace(obj[head], rest, value)
    return out_d


def deep_mutation(message: bytes, field: str, rng: random.Random) -> bytes:
    """Replace one leaf of the envelope inside ``message[field]`` with a hostile value."""
    outer = msgpack.unpackb(message, raw=False)
    inner = msgpack.unpackb(outer[field], raw=False)
    leaves = [p for p in _leaves(inner) if p]
    path = rng.choice(leaves)
    value = hostile_values(rng)
    if rng.random() < 0.3 and isinstance(value, bytes | str):
        value = value * 2
    outer[field] = _pack(_replace(inner, path, value))
    return _pack(outer)


def huge_length(rng: random.Random, msg_type: str, field: str) -> bytes:
    """A message whose (outer or inner) msgpack header declares a huge length."""
    n = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x10000000))
    headers = (
        b"\xc6" + struct.pack(">I", n),  # bin32
        b"\xdb" + struct.pack(">I", n),  # str32
        b"\xdd" + struct.pack(">I", n),  # array32
        b"\xdf" + struct.pack(">I", n),  # map32
        b"\xc9" + struct.pack(">I", n) + b"\x01",  # ext32
    )
    head = rng.choice(headers) + os.urandom(rng.randint(0, 32))
    pick = rng.random()
    if pick < 0.3:
        return head  # the whole message claims to be huge
    if pick < 0.65:
        # The field's value declares the huge length.
        items = ("t", msg_type, "v", 1, "round", 0, field)
        return bytes([0x80 | 4]) + b"".join(_pack(x) for x in items) + head
    # The inner envelope declares it, e.g. ["update", 1, <huge>, …].
    kind = "update" if field == "update" else "aggregate"
    inner = bytes([0x94]) + _pack(kind) + _pack(1) + head
    return _pack({"t": msg_type, "v": 1, field: inner, "round": 0})


def generate(
    n: int,
    seed: int,
    valid: dict[str, bytes],
    envelope_fields: dict[str, str],
    types: Sequence[str],
) -> Iterator[tuple[str, bytes]]:
    """``n`` (family, payload) pairs built from the role's ``valid`` messages.

    ``envelope_fields`` maps a valid message name to its field holding an inner
    envelope (``update`` / ``aggregate``); ``types`` are message types to mix in.
    """
    rng = random.Random(seed)
    bases = list(valid.values())
    all_types = ["hello", "task", "upload", "decrypt", "status", "plain", "ack", "x" * 70]
    for _ in range(n):
        family = rng.choices(
            ("random", "mutated", "typed", "deep", "lengths"), weights=(15, 35, 20, 20, 10)
        )[0]
        if family == "random":
            size = rng.choice((0, 1, 2, rng.randint(3, 64), rng.randint(65, 4096)))
            yield family, os.urandom(size)
        elif family == "mutated":
            yield family, mutate(rng.choice(bases), rng, bases)
        elif family == "typed":
            kind = rng.random()
            if kind < 0.15:
                yield family, _pack(hostile_values(rng))
            else:
                name = rng.choice(list(valid))
                msg = msgpack.unpackb(valid[name], raw=False)
                key = rng.choice([*msg.keys(), "extra", "t", "v"])
                msg[key] = hostile_values(rng)
                if kind < 0.3:
                    msg["t"] = rng.choice([*types, *all_types])
                yield family, _pack(msg)
        elif family == "deep":
            name = rng.choice(list(envelope_fields))
            yield family, deep_mutation(valid[name], envelope_fields[name], rng)
        else:
            name = rng.choice(list(envelope_fields))
            msg_type = msgpack.unpackb(valid[name], raw=False)["t"]
            yield family, huge_length(rng, msg_type, envelope_fields[name])


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found")
