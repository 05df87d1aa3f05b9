"""Deployment requirements a certificate is checked against (TOML).

    name = "hospital"
    [privacy]
    max_epsilon = 2.0            # per peer, with the accountant below (default: the ledger's)
    delta = 1e-5                 # largest delta accepted
    accountant = "rdp"           # "rdp" or "prv"
    secure_mode_required = true  # DP noise and sampling from the OS CSPRNG
    [privacy.peers.3]
    max_epsilon = 1.0            # overrides for one peer
    [exchange]
    channel_encryption_required = true
    secure_aggregation_required = true
    min_group_size = 3           # fewest sender models in any aggregation (CKKS sum)
    [audits]
    threat_models_required = ["final-model"]
    [audits.limits.final-model]
    max_auc = 0.6                # compared with the upper confidence bound
    max_tpr = 0.05
    at_fpr = 0.01

Unknown keys and wrong types are refused with the field's name and what it accepts.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from secure_dfml.errors import ConfigError
from secure_dfml.privacy import ACCOUNTANTS

__all__ = [
    "AuditLimit",
    "AuditRequirements",
    "ExchangeRequirements",
    "PeerRequirement",
    "PrivacyRequirements",
    "Requirements",
    "RequirementsError",
    "list_profiles",
    "load_requirements",
    "profiles_dir",
    "requirements_from_dict",
    "requirements_profile",
]


class RequirementsError(ConfigError):
    """A requirements file is missing, not TOML, or has an invalid field."""


def _bad(path: str, value: Any, expected: str) -> RequirementsError:
    return RequirementsError(f"requirements: {path} = {value!r} is invalid: expected {expected}")


def _keys(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RequirementsError(f"requirements: unknown field {name}; allowed fields here: {', '.join(allowed)}")


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise _bad(f"{where}{key}", value, "a table")
    return value


def _number(raw: Mapping[str, Any], key: str, where: str, *, low: float, high: float | None, high_open: bool = False) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    rng = f"a number > {low:g}" + ("" if high is None else f" and {'<' if high_open else '<='} {high:g}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise _bad(f"{where}.{key}", value, rng)
    if high is not None and (value >= high if high_open else value > high):
        raise _bad(f"{where}.{key}", value, rng)
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}.{key}", value, "true or false")
    return value


@dataclass(frozen=True)
class PeerRequirement:
    max_epsilon: float | None = None


@dataclass(frozen=True)
class PrivacyRequirements:
    max_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    secure_mode_required: bool = False
    peers: Mapping[int, PeerRequirement] = field(default_factory=lambda: MappingProxyType({}))

    def max_epsilon_for(self, peer_id: int) -> float | None:
        own = self.peers.get(peer_id)
        if own is not None and own.max_epsilon is not None:
            return own.max_epsilon
        return self.max_epsilon


@dataclass(frozen=True)
class ExchangeRequirements:
    channel_encryption_required: bool = False
    secure_aggregation_required: bool = False
    min_group_size: int | None = None


@dataclass(frozen=True)
class AuditLimit:
    max_auc: float | None = None
    max_tpr: float | None = None
    at_fpr: float | None = None


@dataclass(frozen=True)
class AuditRequirements:
    threat_models_required: tuple[str, ...] = ()
    limits: Mapping[str, AuditLimit] = field(default_factory=lambda: MappingProxyType({}))
    #: The canary audit must be present and able to show at least this epsilon
    #: (its attainable lower bound, with every guess right); None: not required.
    min_strength: float | None = None


@dataclass(frozen=True)
class Requirements:
    name: str = "requirements"
    description: str = ""
    privacy: PrivacyRequirements = PrivacyRequirements()
    exchange: ExchangeRequirements = ExchangeRequirements()
    audits: AuditRequirements = AuditRequirements()
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "privacy": {
                "max_epsilon": self.privacy.max_epsilon,
                "delta": self.privacy.delta,
                "accountant": self.privacy.accountant,
                "secure_mode_required": self.privacy.secure_mode_required,
                "peers": {str(k): {"max_epsilon": v.max_epsilon} for k, v in sorted(self.privacy.peers.items())},
            },
            "exchange": {
                "channel_encryption_required": self.exchange.channel_encryption_required,
                "secure_aggregation_required": self.exchange.secure_aggregation_required,
                "min_group_size": self.exchange.min_group_size,
            },
            "audits": {
                "threat_models_required": list(self.audits.threat_models_required),
                "limits": {k: {"max_auc": v.max_auc, "max_tpr": v.max_tpr, "at_fpr": v.at_fpr}
                           for k, v in sorted(self.audits.limits.items())},
                "min_strength": self.audits.min_strength,
            },
        }


def _privacy(raw: Mapping[str, Any]) -> PrivacyRequirements:
    w = "privacy"
    _keys(raw, ("max_epsilon", "delta", "accountant", "secure_mode_required", "peers"), w)
    accountant = raw.get("accountant")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise _bad(f"{w}.accountant", accountant, " or ".join(repr(a) for a in ACCOUNTANTS))
    peers: dict[int, PeerRequirement] = {}
    for key, value in _table(raw, "peers", f"{w}.").items():
        if not str(key).isdigit():
            raise _bad(f"{w}.peers.{key}", key, "a table named by a peer id (an integer >= 0), e.g. [privacy.peers.3]")
        if not isinstance(value, Mapping):
            raise _bad(f"{w}.peers.{key}", value, "a table")
        _keys(value, ("max_epsilon",), f"{w}.peers.{key}")
        peers[int(key)] = PeerRequirement(_number(value, "max_epsilon", f"{w}.peers.{key}", low=0, high=None))
    return PrivacyRequirements(
        max_epsilon=_number(raw, "max_epsilon", w, low=0, high=None),
        delta=_number(raw, "delta", w, low=0, high=1, high_open=True),
        accountant=accountant,
        secure_mode_required=_bool(raw, "secure_mode_required", w),
        peers=MappingProxyType(peers),
    )


def _exchange(raw: Mapping[str, Any]) -> ExchangeRequirements:
    w = "exchange"
    _keys(raw, ("channel_encryption_required", "secure_aggregation_required", "min_group_size"), w)
    size = raw.get("min_group_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise _bad(f"{w}.min_group_size", size, "an integer >= 1 (sender models per aggregation)")
    return ExchangeRequirements(
        channel_encryption_required=_bool(raw, "channel_encryption_required", w),
        secure_aggregation_required=_bool(raw, "secure_aggregation_required", w),
        min_group_size=size,
    )


def _audits(raw: Mapping[str, Any]) -> AuditRequirements:
    w = "audits"
    _keys(raw, ("threat_models_required", "limits", "min_strength"), w)
    tms = raw.get("threat_models_required", [])
    if not isinstance(tms, list) or not all(isinstance(t, str) and t for t in tms):
        raise _bad(f"{w}.threat_models_required", tms, 'a list of threat model names, e.g. ["final-model"]')
    limits: dict[str, AuditLimit] = {}
    for name, value in _table(raw, "limits", f"{w}.").items():
        where = f"{w}.limits.{name}"
        if not isinstance(value, Mapping):
            raise _bad(where, value, "a table")
        _keys(value, ("max_auc", "max_tpr", "at_fpr"), where)
        lim = AuditLimit(
            max_auc=_number(value, "max_auc", where, low=0, high=1),
            max_tpr=_number(value, "max_tpr", where, low=0, high=1),
            at_fpr=_number(value, "at_fpr", where, low=0, high=1, high_open=True),
        )
        if lim.max_tpr is not None and lim.at_fpr is None:
            raise RequirementsError(f"requirements: {where}.max_tpr needs {where}.at_fpr (e.g. at_fpr = 0.01)")
        limits[str(name)] = lim
    return AuditRequirements(threat_models_required=tuple(tms), limits=MappingProxyType(limits),
                             min_strength=_number(raw, "min_strength", w, low=0, high=None))


def requirements_from_dict(raw: Mapping[str, Any], *, source: str | None = None) -> Requirements:
    _keys(raw, ("name", "description", "privacy", "exchange", "audits"), "")
    name = raw.get("name", Path(source).stem if source else "requirements")
    description = raw.get("description", "")
    if not isinstance(name, str) or not name:
        raise _bad("name", name, "a non-empty string")
    if not isinstance(description, str):
        raise _bad("description", description, "a string")
    return Requirements(
        name=name,
        description=description,
        privacy=_privacy(_table(raw, "privacy", "")),
        exchange=_exchange(_table(raw, "exchange", "")),
        audits=_audits(_table(raw, "audits", "")),
        source=source,
    )


def profiles_dir() -> Path:
    """The shipped requirement profiles (package data; ``audits/`` in a checkout)."""
    return Path(str(resources.files("secure_dfml").joinpath("resources", "audits")))


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def requirements_profile(name: str) -> Path:
    """The path of the shipped profile ``name`` (e.g. ``hospital``)."""
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        raise RequirementsError(f"no requirements profile {name!r}; shipped profiles: {', '.join(list_profiles())}")
    return path


def load_requirements(path: str | Path) -> Requirements:
    """Requirements from a TOML file, or a shipped profile by name (``hospital``);
    :class:`RequirementsError` names the bad field."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1 and path.name in list_profiles():
        path = requirements_profile(path.name)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequirementsError(f"requirements file {path} does not exist; give a path, or a shipped profile by name: "
                                f"{', '.join(list_profiles())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RequirementsError(f"requirements file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RequirementsError(f"requirements file {path} is not valid TOML: {exc}") from exc
    return requirements_from_dict(raw, source=str(path))
