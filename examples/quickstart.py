"""Three clients protect random updates, the aggregator sums them blind, the key holder decrypts.

Run: .venv/bin/python examples/quickstart.py
Exits non-zero when the decrypted weighted average is off by more than the
preset's stated error bound.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec

import secure_xfl as sx


def main() -> int:
    preset = sx.get_preset(sx.DEFAULT_PRESET)
    # Key holder: the only party with the secret key.
    secret_ctx = sx.generate_context(preset)
    # Everyone else gets the public context (bytes), which cannot decrypt.
    public_ctx = sx.load_context(sx.public_context_bytes(secret_ctx), require_secret=False)

    # Each client has a signing key (in a deployment: its mTLS certificate key).
    clients = {
        name: ec.generate_private_key(ec.SECP256R1()) for name in ("hospital", "bank", "lab")
    }
    samples = {"hospital": 1200, "bank": 3000, "lab": 800}
    updates = {
        name: {"lora_A": torch.randn(8, 512) * 0.01, "lora_B": torch.randn(512, 8) * 0.01}
        for name in clients
    }
    layout = sx.layout_of(updates["hospital"])
    print(f"update: {layout.numel} parameters in {len(layout.specs)} tensors, preset {preset.name}")

    # Aggregator: sums ciphertexts, weighted by sample count (FedAvg).
    acc = sx.Accumulator(
        ctx=public_ctx,
        preset=preset,
        run="quickstart",
        round=0,
        layout_digest=layout.digest,
        numel=layout.numel,
        key_for=lambda name: clients[name].public_key(),
        weight_scale=float(max(samples.values())),
    )
    wire_bytes = 0
    for name, key in clients.items():
        protected = sx.protect_update(
            updates[name],
            layout=layout,
            ctx=public_ctx,
            preset=preset,
            run="quickstart",
            round=0,
            client=name,
            signing_key=key,
            weight=samples[name],
        )
        blob = protected.encode()
        wire_bytes += len(blob)
        acc.add(blob, peer=name)
    print(f"aggregator summed {acc.count} updates, {wire_bytes / 3 / layout.numel:.1f} bytes/param")

    with tempfile.TemporaryDirectory() as state:
        holder = sx.KeyHolder(
            ctx=secret_ctx,
            preset=preset,
            policy=sx.KeyHolderPolicy(run="quickstart", min_clients=3),
            client_keys={n: k.public_key() for n, k in clients.items()},
            state_dir=Path(state),
        )
        result = holder.decrypt(acc.result().encode())
        holder.close()

    flat = {n: sx.flatten(u, layout) for n, u in updates.items()}
    expected = sum(samples[n] * flat[n] for n in clients) / sum(samples.values())
    err = float(np.abs(result.vector - expected).max())
    max_abs = max(float(np.abs(v).max()) for v in flat.values())
    total_mult = sum(result.release.weights)
    bound = preset.error_bound(max_abs, len(clients), total_mult)
    averaged = sx.unflatten(result.vector, layout)
    print(f"decrypted FedAvg of {result.release.participants}: tensors {sorted(averaged)}")
    print(f"max |error| vs plaintext weighted average: {err:.3e} (bound {bound:.3e})")
    return 0 if err <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
