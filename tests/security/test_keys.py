"""Nothing but the key holder can decrypt: files, live process memory, reachable objects.

DESIGN §2 promise: "Nothing but the key holder can decrypt. The secret key never
leaves the key holder's process and files; public contexts carry no secret key."

The checks are constructive: every candidate (a file, an object, a process's
memory) is *used* to try to decrypt a real CKKS ciphertext, or searched for the
secret key's actual coefficients; each check is paired with a positive control on
the key holder's side, so a check that could never succeed is caught.
"""

from __future__ import annotations

import gc
import os
import struct
import types
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from secure_xfl.crypto.context import load_context
from secure_xfl.errors import ConfigError, SecureXFLError
from secure_xfl.kit import PUBLIC_CTX, SECRET_CTX, Kit
from secure_xfl.protocol import messages
from secure_xfl.services.aggregator import AggregatorService
from tests.federation import federation
from tests.security import live

pytestmark = pytest.mark.timeout(240)

NUMEL = 1000
CLIENTS = (*live.HONEST, "mallory")
PROBE = [0.25, -1.5, 3.0, 42.0]


def _close(values: list[float]) -> bool:
    return len(values) >= len(PROBE) and np.allclose(values[: len(PROBE)], PROBE, atol=1e-3)


def _decrypts_with(data: bytes, probe: ts.CKKSVector, scratch: Path) -> bool:
    """Whether ``data`` — read as a TenSEAL context or as a raw SEAL secret key —
    decrypts ``probe`` (a real ciphertext of PROBE under the run's public key)."""
    try:
        ctx = ts.context_from(data)
    except Exception:
        ctx = None
    if ctx is not None and ctx.has_secret_key():
        try:
            if _close(ts.ckks_vector_from(ctx, probe.serialize()).decrypt()):
                return True
        except Exception:
            pass
    seal_ctx = probe.context().seal_context().data
    path = scratch / "candidate.key"
    path.write_bytes(data)
    try:
        sk = sealapi.SecretKey()
        sk.load(seal_ctx, str(path))
        plain = sealapi.Plaintext()
        sealapi.Decryptor(seal_ctx, sk).decrypt(probe.ciphertext()[0], plain)
        return _close(list(sealapi.CKKSEncoder(seal_ctx).decode_double(plain)))
    except Exception:
        return False
    finally:
        path.unlink()


def _secret_key_needles(keyholder_kit: Path) -> list[bytes]:
    """Three 64-byte runs of the secret key's NTT coefficients, one per RNS prime."""
    ctx = load_context((keyholder_kit / SECRET_CTX).read_bytes(), require_secret=True)
    poly = ctx.secret_key().data.data()
    n = poly.coeff_count() // 3
    return [struct.pack("<8Q", *(poly[i * n + j] for j in range(8))) for i in range(3)]


def test_no_file_and_no_live_process_but_the_key_holder_holds_the_secret_key(
    tmp_path: Path,
) -> None:
    """§2 "the secret key never leaves the key holder's process and files": during a
    real run, the secret key's coefficients are found in the key-holder process's memory
    (positive control) and in neither the aggregator's (holding accepted ciphertexts)
    nor a client's; afterwards no file the run produced outside the key holder's kit —
    kits, CA folder, aggregator outputs, logs — decrypts a real ciphertext, whether read
    as a TenSEAL context or as a raw SEAL secret key, while the key holder's file does."""
    root = live.provision_run(tmp_path, CLIENTS, min_clients=3, timeout_s=120.0)
    needles = _secret_key_needles(root / "keyholder")
    model = live.zero_model(NUMEL)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in live.HONEST:
            fed.start_client(c)
        # mallory is enrolled but silent, so round 0 stays open holding 3 ciphertexts.
        live.wait_for(lambda: "(3/4)" in fed.procs["aggregator"].text(), 90, fed.logs)
        scans = {
            name: live.process_memory_contains(fed.procs[name].popen.pid, needles)
            for name in ("keyholder", "aggregator", "client-alpha")
        }
        assert all(scans["keyholder"]), "positive control: key not found in the key holder"
        assert not any(scans["aggregator"]), scans
        assert not any(scans["client-alpha"]), scans
        # Let the round finish, then scan the aggregator again after it held the aggregate.
        blob = live.honest_update(root, "mallory", 0, model)
        port = fed.ports["aggregator"]
        mallory = Kit.load(root / "client-mallory")
        assert live.run(
            live.call_once(
                mallory, "aggregator", port, messages.encode("upload", round=0, update=blob)
            )
        ).ok
        live.wait_for((root / "agg-out" / "global-1.npy").exists, 60, fed.logs)
        if fed.procs["aggregator"].popen.poll() is None:
            after = live.process_memory_contains(fed.procs["aggregator"].popen.pid, needles)
            assert not any(after)

    probe = ts.ckks_vector(Kit.load(root / "aggregator").public_context(), PROBE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if (root / "keyholder") in path.parents:
            continue
        assert not _decrypts_with(path.read_bytes(), probe, scratch), path
        checked += 1
    assert checked > 20
    # Positive controls: the key holder's file, and its key exported raw, do decrypt.
    secret_file = (root / "keyholder" / SECRET_CTX).read_bytes()
    assert _decrypts_with(secret_file, probe, scratch)
    raw = scratch / "raw.key"
    ts.context_from(secret_file).secret_key().data.save(str(raw))
    assert _decrypts_with(raw.read_bytes(), probe, scratch)
    print(f"\nmemory scans (key found per RNS prime): {scans}; files checked: {checked}")


def test_public_contexts_carry_no_secret_key(tmp_path: Path) -> None:
    """§2 "public contexts carry no secret key": the public context every non-key-holder
    kit receives has no secret key, cannot decrypt its own ciphertexts, refuses to hand
    out a key, and a kit or loader given a secret context instead refuses it."""
    root = live.provision_run(tmp_path, CLIENTS, min_clients=3)
    publics = [root / "aggregator" / PUBLIC_CTX] + [
        root / f"client-{c}" / PUBLIC_CTX for c in CLIENTS
    ]
    assert len({p.read_bytes() for p in publics}) == 1  # one public context for the run
    for path in publics:
        ctx = ts.context_from(path.read_bytes())
        assert ctx.is_public() and not ctx.has_secret_key()
        with pytest.raises(ValueError):
            ctx.secret_key()
        vec = ts.ckks_vector(ctx, PROBE)
        with pytest.raises(ValueError, match="secret"):
            vec.decrypt()
    secret = (root / "keyholder" / SECRET_CTX).read_bytes()
    with pytest.raises(SecureXFLError, match="secret key"):
        load_context(secret, require_secret=False)
    # A secret context planted in the aggregator's kit is refused at load time…
    (root / "aggregator" / SECRET_CTX).write_bytes(secret)
    with pytest.raises(ConfigError, match="secret key"):
        Kit.load(root / "aggregator")
    os.unlink(root / "aggregator" / SECRET_CTX)
    # …and one swapped in for its public context is refused when used.
    (root / "aggregator" / PUBLIC_CTX).write_bytes(secret)
    with pytest.raises(SecureXFLError, match="secret key"):
        Kit.load(root / "aggregator").public_context()


def _walk(root: object, limit: int = 500_000) -> list[object]:
    """Objects reachable from ``root`` through attributes, containers and closures —
    not through modules, classes or function globals (those reach the whole process)."""
    seen: set[int] = set()
    out: list[object] = []
    queue: deque[object] = deque([root])
    while queue and len(out) < limit:
        obj = queue.popleft()
        if id(obj) in seen or isinstance(obj, types.ModuleType | type):
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, types.FunctionType):
            queue.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            queue.extend(obj.__defaults__ or ())
            continue
        queue.extend(gc.get_referents(obj))
    return out


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - probing an empty cell raises
    except ValueError:
        return False
    return True


def test_objects_reachable_from_a_running_aggregator_cannot_decrypt(tmp_path: Path) -> None:
    """§2 "Nothing but the key holder can decrypt": every object reachable from a live
    AggregatorService (its Coordinator and Accumulator holding three accepted real
    ciphertexts) is inspected; no context in it has a secret key, no ciphertext in it
    can be decrypted, and no bytes in it parse as a secret-bearing context."""
    root = live.provision_run(tmp_path, CLIENTS, min_clients=3)
    kit = Kit.load(root / "aggregator")
    model = live.zero_model(NUMEL)
    service = AggregatorService(kit, keyholder="127.0.0.1:9", model=model)
    for c in live.HONEST:
        service.core.upload(c, 0, live.honest_update(root, c, 0, model))
    assert service.core.acc.count == 3
    aggregate = service.core.acc.result()
    contexts = vectors = blobs = 0
    for obj in _walk(service):
        if isinstance(obj, ts.Context):
            contexts += 1
            assert obj.is_public() and not obj.has_secret_key()
        elif type(obj).__name__ == "TenSEALContext":
            contexts += 1
            assert not obj.has_secret_key()  # type: ignore[attr-defined]
        elif isinstance(obj, ts.CKKSVector):
            vectors += 1
            assert not obj.context().has_secret_key()
            with pytest.raises(ValueError, match="secret"):
                obj.decrypt()
        elif isinstance(obj, bytes) and len(obj) > 1024:
            blobs += 1
            try:
                ctx = ts.context_from(obj)
            except Exception:
                continue
            assert not ctx.has_secret_key()
    assert contexts >= 1 and vectors >= 1, (contexts, vectors)
    # The aggregate the service would send holds ciphertexts only.
    for chunk in aggregate.chunks:
        vec = ts.ckks_vector_from(kit.public_context(), chunk)
        with pytest.raises(ValueError, match="secret"):
            vec.decrypt()
    print(f"\nreachable: {contexts} contexts, {vectors} ciphertext vectors, {blobs} byte blobs")
