"""Three clients, client-level DP, blind aggregation, a signed ledger and its audit.

Run: .venv/bin/python examples/quickstart.py   (offline, a few seconds)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import secure_xfl as sx

CLIENTS = {"hospital": 1200, "bank": 3000, "lab": 800}  # name: training samples
WEIGHT_CAP = 5000.0  # public cap, so every client's weight samples/cap lies in (0, 1]
# Client-level DP: each client clips its whole update to C and adds N(0, σ²C²/K).
DP = sx.DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=3)


def main(out: Path) -> int:
    # 1. Provision a CA and one kit per party. Kits default to record-level DP-SGD in
    #    each silo ([privacy.record]), which needs training; this program trains nothing,
    #    so it turns that off and relies on client-level DP on the whole update instead.
    cfg = sx.KitConfig(
        federation=sx.FederationSettings(run="quickstart", min_clients=DP.min_clients),
        privacy=sx.PrivacySettings(
            clip_norm=DP.clip_norm,
            noise_multiplier=DP.noise_multiplier,
            delta=DP.delta,
            record=sx.RecordPrivacySettings(enabled=False),
        ),
    )
    kits = sx.provision(out / "federation", federation="demo", clients=CLIENTS, cfg=cfg)
    run = cfg.federation.run
    preset = sx.get_preset(cfg.federation.preset)

    # 2. Each client loads its own kit (public CKKS context, its signing key) and
    #    protects its update: clip, pre-weight, noise, encrypt, sign.
    plain, uploads = {}, {}
    for name, samples in CLIENTS.items():
        kit = sx.Kit.load(kits[f"client-{name}"], role="client")
        update = {"lora_A": torch.randn(8, 64) * 0.01, "lora_B": torch.randn(64, 8) * 0.01}
        layout = sx.layout_of(update)  # the same for every client
        plain[name] = sx.flatten(update, layout)
        protected = sx.protect_update(
            update,
            ctx=kit.public_context(),
            preset=preset,
            run=run,
            round=0,
            client=name,
            signing_key=kit.tls.private_key,
            dp=DP,  # required: dp=None means no DP at all, and is logged as a warning
            weight=samples / WEIGHT_CAP,
            weighting="client",
        )
        uploads[name] = protected.encode()

    # 3. The aggregator sums ciphertexts (it has no secret key) and checks signatures.
    agg_kit = sx.Kit.load(kits["aggregator"], role="aggregator")
    certs = agg_kit.client_certificates()
    acc = sx.Accumulator(
        ctx=agg_kit.public_context(),
        preset=preset,
        run=run,
        round=0,
        layout_digest=layout.digest,
        numel=layout.numel,
        key_for=lambda client: certs[client],
        weighting="client",
    )
    for name, blob in uploads.items():
        acc.add(blob, peer=name)
    aggregate = acc.result().encode()

    # 4. The key holder decrypts under its own kit's policy, and writes a signed ledger
    #    line (after_release) before the plaintext leaves. Its state_dir must outlive
    #    the run: it is what makes each round decrypt once (here it is temporary, so
    #    KeyHolder warns).
    kh = sx.Kit.load(kits["keyholder"], role="keyholder")
    p = kh.config.privacy
    state = kh.path / "state"
    state.mkdir(mode=0o700)
    ledger = sx.PrivacyLedger(state / "ledger.jsonl", kh.tls.private_key)
    enrolled = kh.client_certificates()

    def record(release: sx.Release) -> None:
        rate = len(release.participants) / len(enrolled)
        budget = ledger.budget(release.run, p.delta)
        eps, worst, _ = budget.projected(release.noise_multiplier, rate, release.participants)
        ledger.append(
            run=release.run,
            round=release.round,
            participants=release.participants,
            enrolled=len(enrolled),
            clip_norm=release.clip_norm,
            noise_multiplier=release.noise_multiplier,
            sample_rate=rate,
            delta=p.delta if release.delta is None else release.delta,
            rule=kh.config.round.rule,
            epsilon=eps,
            client_epsilon=worst,
            statements=[
                sx.ledger_statement(s, enrolled[s.statement.client]) for s in release.statements
            ],
            weight_scale=release.weight_scale,
        )

    holder = sx.KeyHolder(
        ctx=kh.secret_context(),
        preset=preset,
        policy=sx.KeyHolderPolicy(
            run=kh.config.federation.run,
            min_clients=kh.config.federation.min_clients,
            dp=kh.config.dp_spec(),  # every client must have signed at least this DP
            allow_no_dp=False,
        ),
        client_keys=enrolled,
        state_dir=state,
        after_release=record,
    )
    result = holder.decrypt(aggregate)
    holder.close()
    ledger.close()

    # The release is the weighted average plus DP noise of std σC·√(n/K) / Σw.
    weights = {n: s / WEIGHT_CAP for n, s in CLIENTS.items()}
    total = sum(weights.values())
    expected = sum(weights[n] * plain[n] for n in CLIENTS) / total
    noise = float((result.vector - expected).std())
    want = DP.noise_multiplier * DP.clip_norm * (len(CLIENTS) / DP.min_clients) ** 0.5 / total
    print(f"decrypted FedAvg of {list(result.release.participants)}: {layout.numel} values, "
          f"noise std {noise:.3f} (expected {want:.3f})")  # fmt: skip

    # 5. Anyone holding the CA certificate can audit the ledger and recompute ε.
    report = sx.audit(state / "ledger.jsonl", kh.tls.cert, ca=out / "federation/ca/ca.pem")
    print(f"audit {report.status}: ε = {report.epsilon['rdp']:.3f} at δ = {report.delta:g} "
          f"after {report.rounds} round(s)")  # fmt: skip
    return 0 if report.ok and 0.8 < noise / want < 1.25 else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(Path(tmp)))
