"""Frozen, validated configuration objects, loaded from TOML.

Every section is a frozen dataclass.  Values are validated when the object is
built, and errors name the field (``section.key``), the value received and the
allowed values, so a bad config fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import re
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from secure_dfml.errors import ConfigError

Algorithm = Literal["dfml", "local", "gossip-avg", "def-kt", "fedavg-central"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


def _require(cond: bool, path: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{path} = {value!r} is invalid: expected {allowed}.")


#: Largest ``federation.rounds``: selection and DP planning walk the public
#: schedule round by round, so a bound up front beats a silent hang.
MAX_ROUNDS = 100_000


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Who takes part and for how long."""

    id: str = "secure-dfml-demo"
    peers: int = 10
    rounds: int = 30
    participants: int = 5
    groups: int = 1
    seed: int = 0
    algorithm: Algorithm = "dfml"
    eval_every: int = 1
    # Peers evaluated on the global test set in an evaluation round: 0 = all; N = a
    # public sample of N peers drawn from (federation id, seed, round). The last round
    # always evaluates every peer.
    eval_peers: int = 0
    # Fixed features (the scattering front end of scatter-* models) computed once per
    # sample and reused for training and evaluation; false recomputes them in every
    # forward pass (same results up to float rounding, same privacy accounting).
    feature_cache: bool = True

    def validate(self, path: str) -> None:
        _require(bool(self.id), f"{path}.id", self.id, "a non-empty string")
        _require(self.peers >= 2, f"{path}.peers", self.peers, "an integer >= 2")
        _require(
            1 <= self.rounds <= MAX_ROUNDS,
            f"{path}.rounds",
            self.rounds,
            f"an integer between 1 and {MAX_ROUNDS} (every peer walks the public schedule round by round)",
        )
        _require(
            2 <= self.participants <= self.peers,
            f"{path}.participants",
            self.participants,
            f"an integer between 2 and peers ({self.peers})",
        )
        _require(
            self.groups >= 1 and self.groups * 2 <= self.participants,
            f"{path}.groups",
            self.groups,
            f"an integer >= 1 with at least 2 participants per group (participants = {self.participants})",
        )
        _require(self.seed >= 0, f"{path}.seed", self.seed, "an integer >= 0")
        _require(self.eval_every >= 1, f"{path}.eval_every", self.eval_every, "an integer >= 1 (rounds)")
        _require(
            0 <= self.eval_peers <= self.peers,
            f"{path}.eval_peers",
            self.eval_peers,
            f"an integer between 0 (every peer) and peers ({self.peers})",
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data set, and how it is split among peers."""

    name: str = "fashion-mnist-mini"
    path: str | None = None
    format: Literal["auto", "idx", "image-folder", "csv"] = "auto"
    label_column: str | None = None
    csv_delimiter: str | None = None
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_peer: int = 2
    local_test_fraction: float = 0.15
    holdout_fraction: float = 0.15
    auditor_pool: int = 1000
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    # Real peers with data of their own: per peer id, the path of its own records
    # ("" = its shard of the data set above, derived from the public partition
    # seed), and every peer's declared training-set size (public: the averaging
    # weight and the DP sample rate; a peer refuses to start if its data differ).
    peer_paths: tuple[str, ...] = ()
    declared_train: tuple[int, ...] = ()

    def validate(self, path: str) -> None:
        _require(
            self.dirichlet_alpha > 0, f"{path}.dirichlet_alpha", self.dirichlet_alpha, "a number > 0"
        )
        _require(self.shards_per_peer >= 1, f"{path}.shards_per_peer", self.shards_per_peer, "an integer >= 1")
        for name in ("local_test_fraction", "holdout_fraction"):
            value = getattr(self, name)
            _require(0.0 <= value < 0.5, f"{path}.{name}", value, "a fraction in [0, 0.5)")
        _require(
            self.local_test_fraction + self.holdout_fraction < 0.8,
            f"{path}.holdout_fraction",
            self.holdout_fraction,
            "local_test_fraction + holdout_fraction < 0.8 (peers need training data)",
        )
        _require(self.auditor_pool >= 0, f"{path}.auditor_pool", self.auditor_pool, "an integer >= 0")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 10, f"{path}.{name}", value, "an integer >= 10 or absent")
        for i, n in enumerate(self.declared_train):
            _require(n >= 1, f"{path}.declared_train[{i}]", n, "an integer >= 1 (training records of that peer)")


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """Architecture per peer: an explicit list, or a mix cycled over peers."""

    mix: tuple[str, ...] = ()
    per_peer: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        _require(
            not (self.mix and self.per_peer),
            f"{path}.per_peer",
            self.per_peer,
            "either models.mix or models.per_peer, not both",
        )


@dataclass(frozen=True, kw_only=True)
class DFMLConfig:
    """Parameters of the DFML protocol and of local optimisation."""

    alpha_min: float = 0.0
    alpha_max: float = 0.8
    period: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    ml_epochs: int = 2
    temperature: float = 2.0
    # Senders' local epochs before sending.  With 0 (the default) only the
    # aggregator trains, by mutual learning on its data; measured on
    # Fashion-MNIST dirichlet(0.1) with 20 peers, local epochs at senders drift the
    # models towards their own classes and cost ~20 points of global accuracy.
    local_epochs: int = 0
    average_same_arch: bool = True
    sender_timeout: float = 30.0
    # How long a sender waits for its model to come back (the aggregator's mutual
    # learning runs in between), and a CKKS key holder for the sum to decrypt.
    return_timeout: float = 900.0
    batch_size: int = 32
    lr: float = 0.05
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_floor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    drop_probability: float = 0.0

    def validate(self, path: str) -> None:
        _require(0.0 <= self.alpha_min <= 1.0, f"{path}.alpha_min", self.alpha_min, "a number in [0, 1]")
        _require(
            self.alpha_min <= self.alpha_max <= 1.0,
            f"{path}.alpha_max",
            self.alpha_max,
            f"a number in [alpha_min={self.alpha_min}, 1]",
        )
        _require(self.period >= 1, f"{path}.period", self.period, "an integer >= 1")
        _require(self.ml_epochs >= 0, f"{path}.ml_epochs", self.ml_epochs, "an integer >= 0")
        _require(self.local_epochs >= 0, f"{path}.local_epochs", self.local_epochs, "an integer >= 0")
        _require(self.temperature > 0, f"{path}.temperature", self.temperature, "a number > 0")
        _require(self.sender_timeout > 0, f"{path}.sender_timeout", self.sender_timeout, "seconds > 0")
        _require(self.return_timeout > 0, f"{path}.return_timeout", self.return_timeout, "seconds > 0")
        _require(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{path}.lr", self.lr, "a number > 0")
        _require(0.0 <= self.lr_floor <= 1.0, f"{path}.lr_floor", self.lr_floor, "a fraction of lr in [0, 1]")
        _require(0.0 <= self.momentum < 1.0, f"{path}.momentum", self.momentum, "a number in [0, 1)")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        _require(
            0.0 <= self.drop_probability < 1.0,
            f"{path}.drop_probability",
            self.drop_probability,
            "a probability in [0, 1) (simulated sender failures)",
        )


@dataclass(frozen=True, kw_only=True)
class PeerPrivacyConfig:
    """Per-peer override of the privacy budget."""

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None

    def validate(self, path: str) -> None:
        _validate_privacy_numbers(self, path)


def _validate_privacy_numbers(obj: Any, path: str) -> None:
    eps = obj.epsilon
    _require(
        eps is None or (eps > 0 and not math.isnan(eps)),
        f"{path}.epsilon",
        eps,
        "a number > 0 (use privacy.enabled = false for a non-private run)",
    )
    _require(obj.delta is None or 0 < obj.delta < 1, f"{path}.delta", obj.delta, "a number in (0, 1)")
    _require(
        obj.noise_multiplier is None or obj.noise_multiplier > 0,
        f"{path}.noise_multiplier",
        obj.noise_multiplier,
        "a number > 0",
    )
    _require(
        obj.max_grad_norm is None or obj.max_grad_norm > 0,
        f"{path}.max_grad_norm",
        obj.max_grad_norm,
        "a number > 0",
    )


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Differential privacy: one budget per peer, enforced as a hard gate."""

    enabled: bool = False
    epsilon: float | None = 8.0
    delta: float | None = None
    max_grad_norm: float | None = 1.0
    noise_multiplier: float | None = None
    accountant: Literal["prv", "rdp"] = "rdp"
    secure_mode: bool = False
    class_prior: Literal["uniform", "dp"] = "dp"
    grad_sample_mode: Literal["auto", "bk", "hooks", "functorch", "ew", "ghost"] = "auto"
    clipping: Literal["per-model", "joint"] = "per-model"
    plan_on: Literal["schedule", "expected"] = "schedule"
    expected_participation: float | None = None
    peers: Mapping[str, PeerPrivacyConfig] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        _validate_privacy_numbers(self, path)
        _require(
            self.expected_participation is None or 0 < self.expected_participation <= 1,
            f"{path}.expected_participation",
            self.expected_participation,
            "a fraction in (0, 1]",
        )
        _require(
            self.clipping == "joint" or self.grad_sample_mode in ("auto", "bk"),
            f"{path}.clipping",
            self.clipping,
            f'"joint" with grad_sample_mode = "{self.grad_sample_mode}" (per-model clipping needs "auto" or "bk")',
        )
        for key, peer in self.peers.items():
            _require(key.isdigit(), f"{path}.peers", key, "peer ids as integers, e.g. [privacy.peers.3]")
            peer.validate(f"{path}.peers.{key}")


#: Smallest ``crypto.max_message_bytes``: an envelope's fixed overhead (96-byte
#: header + 16-byte MAC + 64-byte signature, ``crypto.envelope_overhead()``)
#: plus 1024 bytes of payload, the floor ``NaClChannel`` enforces.  A literal
#: because the crypto package imports this module (a test keeps them equal).
MIN_MESSAGE_BYTES = 176 + 1024


@dataclass(frozen=True, kw_only=True)
class CryptoConfig:
    """Secure exchange: encrypted envelopes and optional CKKS averaging."""

    channel: Literal["nacl", "none"] = "nacl"
    allow_insecure: bool = False
    secure_aggregation: Literal["none", "ckks"] = "none"
    pad_messages: bool = False
    keys_dir: str | None = None
    allow_exposed_keys: bool = False  # load private key files other users can read (refused by default)
    max_message_bytes: int = 256 * 1024 * 1024

    def validate(self, path: str) -> None:
        _require(
            self.channel != "none" or self.allow_insecure,
            f"{path}.channel",
            self.channel,
            '"nacl"; "none" sends models in clear and needs crypto.allow_insecure = true',
        )
        _require(
            self.max_message_bytes >= MIN_MESSAGE_BYTES,
            f"{path}.max_message_bytes",
            self.max_message_bytes,
            f"an integer >= {MIN_MESSAGE_BYTES} (bytes: the 176-byte envelope overhead plus 1024), or leave it unset",
        )


_TCP_RE = re.compile(r"tcp://[A-Za-z0-9.\-]+:\d{1,5}")


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """Where real peers listen (``secure-dfml peer`` / ``launch``): one
    ``tcp://HOST:PORT`` per peer id, in order (and one more for the virtual
    server of ``fedavg-central``).  Empty: ``launch`` assigns free loopback ports."""

    addresses: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        for i, addr in enumerate(self.addresses):
            _require(
                bool(_TCP_RE.fullmatch(addr)) and 0 < int(addr.rsplit(":", 1)[1]) < 65536,
                f"{path}.addresses[{i}]",
                addr,
                'an address "tcp://HOST:PORT" with a port in 1..65535',
            )
        _require(
            len(set(self.addresses)) == len(self.addresses),
            f"{path}.addresses",
            list(self.addresses),
            "one distinct address per peer",
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole federation run."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    dfml: DFMLConfig = field(default_factory=DFMLConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)

    def replace(self, **sections: Any) -> RunConfig:
        """Return a copy with whole sections or ``section={key: value}`` updates."""
        updates: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            updates[name] = dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``dump_toml`` writes and ``config_from_dict``
        reads back); a non-private config has no privacy settings but ``enabled``."""
        plain = _to_plain(self)
        if not self.privacy.enabled:
            plain["privacy"] = {"enabled": False}
        return plain


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
# Loading from plain dicts / TOML with strict type checks


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "absent"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path} = {value!r} is invalid: expected {_describe(tp)}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path} = {value!r} is invalid: expected {_describe(tp)}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} is invalid: expected a list.")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} is invalid: expected a table.")
        _key_tp, val_tp = get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} is invalid: expected true or false.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} is invalid: expected an integer.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} is invalid: expected a number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} = {value!r} is invalid: expected a string.")
        return value
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{path}] must be a table, got {type(raw).__name__}.")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"[{path}]" if path else "the top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(u) for u in unknown)} in {where}; "
            f"allowed keys: {', '.join(names)}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in raw.items()}
    if cls is RunConfig:
        return cls(**kwargs)
    obj = cls(**kwargs)
    return obj


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested dict.

    Privacy keys mean privacy: a ``[privacy]`` table that sets anything while
    ``enabled`` is not true is refused (it would otherwise run non-private and
    look as if the budget applied)."""
    cfg = _build(RunConfig, raw, "")  # bad values are named first
    privacy = raw.get("privacy")
    if isinstance(privacy, Mapping) and privacy.get("enabled") is not True:
        extra = sorted(str(k) for k in privacy if k != "enabled")
        if extra:
            raise ConfigError(
                f"[privacy] sets {', '.join(extra)} but privacy.enabled is not true: the run would be NON-PRIVATE "
                "and those keys would have no effect. Add `enabled = true` to [privacy] for a differentially "
                "private run, or remove them for a non-private one."
            )
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Load a TOML config file; errors name the file and the offending key."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass the path of a TOML file inside it (see README).")
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; pass the path of a TOML file (see README).")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file; pass the path of a TOML file (see README).")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def dump_toml(cfg: RunConfig) -> str:
    """Render a config as TOML (the resolved config saved in each run directory)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(v)  # pragma: no cover

    def section(name: str, table: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and v is not None}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in table.items():
            if isinstance(v, Mapping):
                for sub, subtable in v.items():
                    section(f"{name}.{k}.{sub}", subtable)

    for name, table in cfg.to_dict().items():
        section(name, table)
    return "\n".join(lines)


#: The built-in federation's architectures: three small, heterogeneous models
#: (a linear, a convolutional and an MLP head) on fixed first-order scattering
#: features (data-independent Morlet wavelets: DP-SGD then trains few parameters
#: on good features, Tramer & Boneh, ICLR 2021).  Measured at epsilon 8 against
#: small models that learn their features end to end, and against the zoo's large
#: models: benchmarks/results/dp_utility_ablation.md.
BUILT_IN_MIX: tuple[str, ...] = ("scatter-linear", "scatter-cnn", "scatter-mlp")


def default_config() -> RunConfig:
    """The built-in federation `secure-dfml run` trains when given no config:
    10 peers with 3 small architectures on a dirichlet(0.5) split of the bundled
    Fashion-MNIST-mini (all 60,000 training images at 14x14: 1,600 to 7,900
    training records per peer, 4,100 on average, so a batch of 256 is a small
    sample of a peer's data and subsampling amplifies privacy); every round all
    peers take part in 2 groups of 5; models travel in NaCl envelopes; DP-SGD with a budget
    of (epsilon 8, delta 1e-5) per peer (secure by default: privacy is on).

    Training settings are tuned for DP at epsilon 8: batch 256, lr 0.1 decayed
    by a cosine over the rounds, 4 mutual-learning epochs per aggregation
    (benchmarks/results/dp_utility.md and dp_utility_ablation.md)."""
    return RunConfig(
        federation=FederationConfig(rounds=20, participants=10, groups=2),
        data=DataConfig(name="fashion-mnist-mini"),
        models=ModelsConfig(mix=BUILT_IN_MIX),
        dfml=DFMLConfig(batch_size=256, lr=0.1, lr_schedule="cosine", ml_epochs=4),
        privacy=PrivacyConfig(enabled=True, epsilon=8.0, delta=1e-5),
    )
