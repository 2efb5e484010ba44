"""The demo's report: report.json, report.md, the plots, and the ledger with what audits it.

Privacy is shown the way a data-protection officer reads it: each silo's
record-level ε (recomputed by the audit from the ledger alone, PLD with RDP
beside it) against its budget, the federation's client-level ε beside it, and
the cost of privacy as the private run's held-out loss next to the
non-private baseline's.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _finite(x: Any) -> Any:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def _eps(x: Any) -> str:
    if x is None or x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "∞"
    return f"{x:.3f}"


def _rounds(records: list[dict[str, Any]], base: dict[str, Any] | None) -> list[dict[str, Any]]:
    # Rounds are numbered from 0 everywhere (logs, ledger, audit, this report); the
    # baseline simulation counts completed rounds from 1.
    ref = {r["round"] - 1: r["loss"] for r in (base or {}).get("rounds", [])}
    out = []
    for r in records:
        n = r["round"]
        out.append({
            "round": n, "loss": r.get("loss"), "perplexity": r.get("perplexity"),
            "accuracy": r.get("accuracy"), "bytes_up": r["bytes_up"],
            "bytes_down": r["bytes_down"], "seconds": r["seconds"],
            "epsilon": _finite(r.get("epsilon")), "participants": r["participants"],
            "baseline_loss": ref.get(n),
        })  # fmt: skip
    return out


def write_report(
    cfg: Any,
    records: list[dict[str, Any]],
    outcome: dict[str, Any],
    seconds: float,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json, report.md, loss.png, privacy.png, bytes.png, and the ledger with what
    audits it (ledger.jsonl, keyholder-cert.pem, ca.pem, crl.pem) under ``cfg.out``."""
    from secure_xfl.privacy.audit import audit

    out: Path = cfg.out
    rounds = _rounds(records, baseline)
    for src, name in (("ledger", "ledger.jsonl"), ("keyholder_cert", "keyholder-cert.pem"),
                      ("ca", "ca.pem"), ("crl", "crl.pem")):  # fmt: skip
        shutil.copy(outcome[src], out / name)
    budget = cfg.epsilon if cfg.record_dp else None
    # The ε budget is the silos' record-level one; with three clients a client-level ε
    # is never small, so it is shown but not held to it.
    report_audit = audit(
        out / "ledger.jsonl", out / "keyholder-cert.pem", ca=out / "ca.pem", crl=out / "crl.pem",
        record_budget=budget, allow_no_dp=not cfg.record_dp and cfg.noise_multiplier == 0,
    )  # fmt: skip
    # What a user runs to check it again: the key holder's cert and the CRL are found
    # beside the ledger and the CA; the CA itself must always be named.
    argv = ["secure-xfl", "audit", str(out / "ledger.jsonl"), "--ca", str(out / "ca.pem")]
    if budget is not None and cfg.noise_multiplier == 0:  # --budget binds both levels
        argv += ["--budget", f"{budget:g}"]
    if not cfg.record_dp and cfg.noise_multiplier == 0:
        argv.append("--allow-no-dp")
    command = shlex.join(argv)
    audit_json = report_audit.to_json()
    initial = outcome.get("initial") or {}
    final, ref = rounds[-1]["loss"], rounds[-1]["baseline_loss"]
    gap = None if ref is None or final is None else (final - ref) / ref
    report = {
        "initial": outcome.get("initial"),
        "rounds": rounds,
        "outcome": outcome["outcome"],
        "ok": outcome["ok"] and report_audit.ok,
        "wall_seconds": round(seconds, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "privacy": {
            "unit": "one training block (a sequence of the model's block_size tokens)",
            "delta": cfg.delta,
            "budget": budget,
            "per_silo": audit_json["per_silo"],
            "per_round": audit_json["record_rounds"],
            "federation_client_level": audit_json["epsilon"],
            "client_level_on": audit_json["client_level"],
        },
        "baseline": None
        if baseline is None
        else {
            "initial": baseline["initial"],
            "rounds": baseline["rounds"],
            "seconds": baseline["seconds"],
            "key": baseline["key"],
        },
        "loss_gap": gap,
        "audit": audit_json,
        "audit_command": command,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plots(out, rounds, initial.get("loss"), baseline, audit_json, budget)
    (out / "report.md").write_text(_markdown(cfg, report, report_audit.table(), seconds))
    return report


def _markdown(cfg: Any, report: dict[str, Any], table: str, seconds: float) -> str:
    rounds, priv = report["rounds"], report["privacy"]
    first = (report["initial"] or {}).get("loss", float("nan"))
    lines = [
        "# secure-xfl demo report", "",
        f"Outcome: **{report['outcome']}** in {seconds:.0f} s, {len(rounds)} rounds, rule "
        f"`{cfg.rule}`, partition `{cfg.partition}`, clients {', '.join(cfg.clients)}.", "",
        "## Privacy", "",
    ]  # fmt: skip
    if cfg.record_dp:
        lines += [
            f"Record-level DP-SGD in every silo (Opacus: Poisson sampling, per-block clip "
            f"C_r = {cfg.record_clip:g}, σ_r derived by each silo from its own budget). "
            f"Privacy unit: {priv['unit']}. Each silo's ε is recomputed by the audit from "
            f"the clients' signed DP-SGD specs in the ledger, at δ = {cfg.delta:g}:", "",
            "| silo | rounds | ε (PLD) | ε (RDP) | budget |", "| --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for silo, info in sorted(priv["per_silo"].items()):
            e = info["epsilon"]
            lines.append(f"| {silo} | {info['rounds']} | {_eps(e['pld'])} | {_eps(e['rdp'])} "
                         f"| {_eps(priv['budget'])} |")  # fmt: skip
        lines.append("")
    fed = priv["federation_client_level"]
    if cfg.noise_multiplier > 0:
        lines.append(
            f"Client-level DP over the sum: σ = {cfg.noise_multiplier:g}, "
            f"C = {cfg.clip_norm:g}; federation ε = {_eps(fed['rdp'])} (RDP)."
        )
    else:
        lines.append("Client-level DP over the sum: off (its ε is unbounded); with three "
                     "clients no useful update survives the noise a small client-level ε "
                     "needs. Every whole update is still clipped to C = "
                     f"{cfg.clip_norm:g}.")  # fmt: skip
    lines += ["", "![privacy](privacy.png)", "", "## Model", ""]
    gap = report["loss_gap"]
    if gap is not None:
        lines += [f"Held-out loss {first:.4f} → {rounds[-1]['loss']:.4f} (private) vs "
                  f"{rounds[-1]['baseline_loss']:.4f} (non-private, same seed, rounds and "
                  f"local steps): the cost of privacy is {100 * gap:+.1f} %.", ""]  # fmt: skip
    lines += [
        "| round | held-out loss | non-private | perplexity | accuracy | MB up | MB down | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rounds:
        b = r["baseline_loss"]
        lines.append(
            f"| {r['round']} | {r['loss']:.4f} | {'-' if b is None else f'{b:.4f}'} | "
            f"{r['perplexity']:.2f} | {r['accuracy']:.3f} | {r['bytes_up'] / 1e6:.2f} | "
            f"{r['bytes_down'] / 1e6:.2f} | {r['seconds']:.1f} |"
        )
    lines += [
        "", "![loss](loss.png) ![bytes](bytes.png)", "", "## Ledger audit", "",
        "Every decryption is on the signed ledger, refused ones included (they are charged",
        "in ε too). Check it against the federation CA yourself:", "",
        "```", report["audit_command"], "```", "", "```", table, "```",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plots(
    out: Path,
    rounds: list[dict[str, Any]],
    initial_loss: float | None,
    baseline: dict[str, Any] | None,
    audit_json: dict[str, Any],
    budget: float | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [r["round"] + 1 for r in rounds]  # position 0 is the initial model
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    lead = [0] if initial_loss is not None else []
    first = [initial_loss] if initial_loss is not None else []
    ax.plot(lead + xs, first + [r["loss"] for r in rounds], marker="o", label="private (DP)")
    if baseline is not None:
        bx = [0] + [r["round"] for r in baseline["rounds"]]
        by = [baseline["initial"]["loss"]] + [r["loss"] for r in baseline["rounds"]]
        ax.plot(bx, by, marker="s", linestyle="--", label="non-private baseline")
    ax.set_xticks(lead + xs, (["start"] if lead else []) + [str(x - 1) for x in xs])
    ax.set(xlabel="after round", ylabel="held-out loss (nats / token)",
           title="Global model loss")  # fmt: skip
    ax.grid(alpha=0.3)
    _finish(fig, ax, out / "loss.png", ncol=2)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    per_round = audit_json.get("record_rounds") or []
    silos = sorted(audit_json.get("per_silo") or {})
    # Silos with equal budgets and shares overlap exactly: distinct markers and dashes
    # keep every one visible.
    styles = [("o", "-", 9), ("s", "--", 7), ("^", ":", 5), ("D", "-.", 4)]
    for k, silo in enumerate(silos):
        pts = [(row["round"], row[silo]) for row in per_round if silo in row]
        marker, dash, size = styles[k % len(styles)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=dash,
                markersize=size, label=silo)  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle=":", label=f"budget ε = {budget:g}")
    if not silos:
        ax.text(0.5, 0.5, "no record-level DP in this run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="round (a retried round adds a point)", ylabel="record-level ε (PLD)",
           title="Privacy spent per silo")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _finish(fig, ax, out / "privacy.png", ncol=4)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    up = [r["bytes_up"] / 1e6 for r in rounds]
    per_cloud = sum(u / max(1, len(r["participants"])) for u, r in zip(up, rounds, strict=True))
    ax.bar([x - 0.2 for x in xs], up, 0.4, label="up (all clouds)")
    ax.bar([x + 0.2 for x in xs], [r["bytes_down"] / 1e6 for r in rounds], 0.4,
           label="down (all clouds)")  # fmt: skip
    ax.set_xticks(xs, [str(x - 1) for x in xs])
    ax.set(
        xlabel="round",
        ylabel="MB per round",
        title=f"Bytes on the wire (≈ {per_cloud / len(rounds):.2f} MB up per cloud per round)",
    )
    _finish(fig, ax, out / "bytes.png", ncol=2)


def _finish(fig: Any, ax: Any, path: Path, ncol: int) -> None:
    """Legend below the axes (never on the data), then write and close the figure."""
    import matplotlib.pyplot as plt

    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
