"""Run configuration: frozen dataclasses loaded from a startup kit's ``config.toml``.

Every field has a documented default; unknown keys and wrong types are refused
with :class:`ConfigError` naming the key, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from secure_xfl.crypto.context import PRESETS
from secure_xfl.crypto.dpspec import DEFAULT_DELTA, DPSpec
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.recordspec import RecordDPFloor
from secure_xfl.errors import ConfigError
from secure_xfl.transport.config import TransportConfig

MAX_CONFIG_BYTES = 1024 * 1024
Rule = Literal["fedavg", "dynamic", "gradient", "async", "fedadam", "fedyogi", "fedadagrad"]


@dataclass(frozen=True)
class FederationSettings:
    """Who takes part and how updates are protected."""

    name: str = "federation"
    """Federation name; appears in every certificate's SPIFFE URI."""
    run: str = "run-0"
    """Run id; signed into every update so updates cannot cross runs."""
    preset: str = "xfl-default"
    """HE preset (see ``secure_xfl.crypto.context.PRESETS``): ``xfl-default``, ``xfl-sum``
    and ``nvflare-default`` are CKKS on floats; ``xfl-packed`` (CKKS) and ``bfv-lanes``
    (BFV, fewest bytes) pack quantised integers and need client-level σ > 0."""
    min_clients: int = 2
    """Fewest clients an aggregate must cover before the key holder decrypts it."""
    rounds: int = 3
    """Rounds in the run."""
    max_clients: int = 8
    """Packed presets: most updates one aggregate may sum (sizes each lane's headroom).
    ``bfv-lanes`` fixes it in the key holder's context at provisioning; ``xfl-packed``
    uses the larger of this and the number of enrolled clients."""


@dataclass(frozen=True)
class RecordPrivacySettings:
    """Record-level DP inside each silo (``[privacy.record]``): DP-SGD through Opacus with
    Poisson sampling, per-record clipping and Gaussian noise. The privacy unit is one
    training block (a sequence of the model's ``block_size`` tokens) of the silo's corpus;
    user-level units are not built. A client applies the stricter of its own kit and the
    plan on every axis, and the key holder refuses entries weaker than its own kit."""

    enabled: bool = True
    """Train with DP-SGD in every silo (the cross-silo default)."""
    max_grad_norm: float = 1.0
    """Largest per-record clip C_r (a plan may propose a smaller one)."""
    noise_multiplier: float = 0.0
    """Smallest σ_r; 0 (default) = derive σ_r from ``target_epsilon``."""
    target_epsilon: float = 2.0
    """ε (PLD, at ``privacy.delta``) a silo's records reach by the end of the run: each
    round the client picks the smallest σ_r that keeps its spent ε plus the remaining
    rounds (``federation.rounds``) of this round's steps and sampling rate within it."""
    epsilon_budget: float = -1.0
    """A silo's hard record-level ε limit (PLD, at ``privacy.delta``, all runs of this
    kit's state together): a client declines a round that would pass it and the key
    holder refuses to release one. Negative (default) = ``target_epsilon``; 0 = none."""

    @property
    def budget(self) -> float:
        """The effective record-level ε budget (0: none)."""
        return self.target_epsilon if self.epsilon_budget < 0 else self.epsilon_budget


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy: record-level in each silo, client-level over the sum, budgets."""

    clip_norm: float = 1.0
    """L2 bound C on each client's whole update. With client-level noise on it is the
    sensitivity the noise is scaled to; with it off it only bounds one client's influence
    (and the key holder's release check), so set it to about twice an honest update's
    norm: a bound far below that shrinks every update (the demo uses 20)."""
    noise_multiplier: float = 0.0
    """Client-level σ: each client adds N(0, σ²C²/min_clients); 0 = no client-level noise
    (record-level DP, ``[privacy.record]``, is then what protects each silo)."""
    delta: float = DEFAULT_DELTA
    """δ of every (ε, δ) guarantee, record- and client-level."""
    epsilon_budget: float = 0.0
    """Client-level: the key holder refuses rounds that would spend more federation or
    per-client ε than this; 0 = no client-level budget."""
    record: RecordPrivacySettings = field(default_factory=RecordPrivacySettings)
    """Record-level DP-SGD in each silo."""
    allow_no_dp: bool = False
    """Run with neither client-level noise nor record-level DP. Refused unless set; every
    service then logs a warning each round and the audit reports ``NO_PRIVACY``."""
    max_refused_decryptions: int = 2
    """Aggregates of one round the key holder may decrypt and refuse (out of bounds or
    malformed) before the round stops being retried. Each is charged to the budget, so
    this bounds the extra ε one malicious client can make the federation spend."""
    min_effective_noise: float = -1.0
    """Smallest σ_eff the key holder releases; negative (default) = ``noise_multiplier``,
    so no release carries less noise than this kit asks for."""
    masking: bool = True
    """Pairwise masks on packed presets (``xfl-packed``): each upload carries masks that
    cancel only in the sum of the whole cohort, so not even the aggregator and the key
    holder together can decrypt one client's update. Clients refuse, and the key holder
    refuses to decrypt, packed rounds without them. Unpacked presets cannot mask (their
    slots are not integers) and ignore this."""


@dataclass(frozen=True)
class RoundSettings:
    """How a round is run and closed."""

    @property
    def effective_weight_cap(self) -> float:
        """``weight_cap``, or local_steps × batch_size when it is 0."""
        return self.weight_cap if self.weight_cap > 0 else float(self.local_steps * self.batch_size)

    rule: Rule = "fedavg"
    """Server aggregation rule."""
    weighting: Literal["aggregator", "client"] = "client"
    """Who applies the aggregation weight. ``client`` (default): each client scales its
    clipped update by weight/weight_cap before noise, so every contribution keeps the
    full DP noise and the aggregator only adds. ``aggregator``: the aggregator multiplies
    ciphertexts by weight/weight_cap, which also scales the noise down (the key holder
    records the lower effective σ, so ε grows faster)."""
    weight_cap: float = 0.0
    """Public bound on a client's weight (sample count); weights are divided by it and
    clamped to 1. Keep it near the typical per-round sample count: under client
    weighting a weight far below 1 shrinks the signal but not the DP noise.
    0 (default) = ``local_steps × batch_size``, the samples one round of local training sees."""
    timeout_s: float = 600.0
    """A round closes this long after it opens if at least min_clients have uploaded
    (masked rounds: the cohort is fixed then if at least min_clients published keys)."""
    mask_timeout_s: float = 120.0
    """Masked rounds: seconds the fixed cohort has to upload; members missing then are
    dropped and the rest re-mask the same update for a new cohort (fresh keys)."""
    server_lr: float = 1.0
    """Server learning rate applied to the decrypted aggregate."""
    local_steps: int = 10
    """Local optimisation steps per round on each client."""
    local_lr: float = 1e-3
    """Client learning rate."""
    batch_size: int = 8
    """Client batch size."""
    fedprox_mu: float = 0.0
    """FedProx proximal term μ proposed to clients (0: plain local training)."""
    max_staleness: int = 4
    """Buffered async (``rule = "async"``): rounds an update may trail the round it is
    counted in; the key holder refuses older ones by its own kit's value."""
    seed: int = 0
    """Seed of the initial global model (identical on every party)."""


@dataclass(frozen=True)
class Endpoints:
    """Where the services listen (HOST:PORT)."""

    aggregator: str = "127.0.0.1:7443"
    """Aggregator address, used by clients."""
    keyholder: str = "127.0.0.1:7444"
    """Key holder address, used by the aggregator."""


@dataclass(frozen=True)
class PartySettings:
    """This kit's own identity."""

    role: Literal["client", "aggregator", "keyholder"] = "client"
    """Role named in this party's certificate."""
    name: str = "main"
    """Name in this party's certificate."""


@dataclass(frozen=True)
class KitConfig:
    """Everything in ``config.toml``."""

    party: PartySettings = field(default_factory=PartySettings)
    """This party."""
    federation: FederationSettings = field(default_factory=FederationSettings)
    """Federation-wide settings (identical in every kit)."""
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    """Differential privacy."""
    round: RoundSettings = field(default_factory=RoundSettings)
    """Round control."""
    endpoints: Endpoints = field(default_factory=Endpoints)
    """Service addresses."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """QUIC settings."""

    def record_floor(self) -> RecordDPFloor | None:
        """The record-level DP-SGD this kit demands or proposes (``None``: off)."""
        r = self.privacy.record
        if not r.enabled:
            return None
        return RecordDPFloor(
            max_grad_norm=r.max_grad_norm, noise_multiplier=r.noise_multiplier,
            delta=self.privacy.delta,
        )  # fmt: skip

    @property
    def has_dp(self) -> bool:
        """Whether this kit asks for any differential privacy at all."""
        return self.privacy.noise_multiplier > 0 or self.privacy.record.enabled

    def lane_quant(self) -> QuantSpec | None:
        """The quantisation a ``bfv-lanes`` run's plain modulus is fixed by (its plans
        must sign exactly this); ``None`` for every other preset."""
        preset = PRESETS.get(self.federation.preset)
        if preset is None or preset.scheme != "bfv":
            return None
        dp = self.dp_spec()
        if dp.noise_multiplier <= 0:
            raise ConfigError("bfv-lanes derives its quantisation from client-level σ > 0")
        return QuantSpec.for_dp(dp, max_clients=self.federation.max_clients)

    def dp_spec(self) -> DPSpec:
        """The client-level DP this kit demands (or, for the aggregator, proposes)."""
        p = self.privacy
        return DPSpec(
            clip_norm=p.clip_norm,
            noise_multiplier=p.noise_multiplier,
            min_clients=self.federation.min_clients,
            delta=p.delta,
        )


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {sorted(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a table")
            kwargs[key] = _build(hint, value, f"{where}.{key}")  # type: ignore[arg-type]
            continue
        allowed = get_args(hint) if get_origin(hint) is Literal else None
        if allowed is not None:
            if value not in allowed:
                raise ConfigError(f"{where}.{key} must be one of {allowed}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(hint, type) and (
            not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
        ):
            raise ConfigError(f"{where}.{key} must be {hint.__name__}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


SECTIONS: dict[str, type[Any]] = {
    "party": PartySettings,
    "federation": FederationSettings,
    "privacy": PrivacySettings,
    "round": RoundSettings,
    "endpoints": Endpoints,
    "transport": TransportConfig,
}


def parse_config(data: dict[str, Any], where: str = "config") -> KitConfig:
    """Build a :class:`KitConfig` from parsed TOML."""
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{key}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{key}] must be a table")
        sections[key] = _build(SECTIONS[key], value, f"{where}[{key}]")
    cfg = KitConfig(**sections)
    if cfg.federation.min_clients < 1 or cfg.federation.rounds < 1:
        raise ConfigError("federation.min_clients and federation.rounds must be ≥ 1")
    if cfg.privacy.noise_multiplier < 0 or cfg.privacy.clip_norm <= 0:
        raise ConfigError("privacy.noise_multiplier must be ≥ 0 and clip_norm > 0")
    if not 0 < cfg.privacy.delta < 1:
        raise ConfigError("privacy.delta must lie in (0, 1)")
    rec = cfg.privacy.record
    if rec.max_grad_norm <= 0 or rec.noise_multiplier < 0 or rec.target_epsilon < 0:
        raise ConfigError(
            "privacy.record: max_grad_norm must be > 0, noise_multiplier and target_epsilon ≥ 0"
        )
    if rec.enabled and rec.noise_multiplier == 0 and rec.target_epsilon == 0:
        raise ConfigError("privacy.record: set noise_multiplier or target_epsilon (both are 0)")
    if not cfg.has_dp and not cfg.privacy.allow_no_dp:
        raise ConfigError(
            f"{where}: no differential privacy configured (privacy.noise_multiplier = 0 and "
            "privacy.record.enabled = false); set privacy.allow_no_dp = true to run without"
        )
    return cfg


def load_config(path: Path) -> KitConfig:
    """Read and validate ``config.toml`` (size-bounded)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config(data, str(path))


def config_to_dict(cfg: KitConfig) -> dict[str, Any]:
    """The TOML-ready form (for writing kits)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        out[name] = _strip_none(dataclasses.asdict(getattr(cfg, name)))
    return out


def _strip_none(section: dict[str, Any]) -> dict[str, Any]:
    # TOML has no null; nested tables (privacy.record) are written as sub-tables.
    return {
        k: _strip_none(v) if isinstance(v, dict) else v for k, v in section.items() if v is not None
    }
