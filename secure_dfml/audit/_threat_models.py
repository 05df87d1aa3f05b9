"""Declarative threat models (TOML) and their validated, frozen form.

The canonical files ship as package data in ``secure_dfml/resources/threat_models``
(the repository's top-level ``threat_models/`` points there), so both a source
checkout and an installed CLI find them. Adding a threat model is adding a file.

Schema (all keys required, no others)::

    name         = "curious-aggregator"      # must equal the file name without .toml
    description  = "..."
    attacker     = "who the adversary is"
    view         = "sender_models_as_received" | "returned_models" | "final_and_peak" | "envelopes"
    targets      = "whose membership is attacked (members vs non-members)"
    assets       = ["...", ...]
    assumptions  = ["...", ...]
    mitigations  = ["...", ...]
    attacks      = ["loss", "rmia_online", ...]   # registered attacks or analyses
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from secure_dfml.audit._attacks import ATTACKS
from secure_dfml.errors import AuditError

__all__ = [
    "ENVELOPE_ANALYSES",
    "THREAT_MODEL_VIEWS",
    "ThreatModel",
    "list_threat_models",
    "load_threat_model",
    "threat_models_dir",
]

#: The attacker's view: which artefacts of a run the adversary gets.
THREAT_MODEL_VIEWS: dict[str, str] = {
    "sender_models_as_received": "each sender's model as the aggregator receives it",
    "returned_models": "models returned to a sender after mutual learning on the aggregator's data",
    "final_and_peak": "each peer's final model and its peak-round snapshots",
    "envelopes": "captured encrypted envelopes (ciphertexts and their sizes)",
}

#: Analyses that are not membership-inference attacks on model outputs.
ENVELOPE_ANALYSES: dict[str, str] = {
    "envelope_size": "what captured envelope sizes reveal (e.g. architectures) and that payloads reveal nothing",
}

_STR_FIELDS = ("name", "description", "attacker", "view", "targets")
_LIST_FIELDS = ("assets", "assumptions", "mitigations", "attacks")


@dataclass(frozen=True)
class ThreatModel:
    name: str
    description: str
    attacker: str
    view: str
    targets: str
    assets: tuple[str, ...]
    assumptions: tuple[str, ...]
    mitigations: tuple[str, ...]
    attacks: tuple[str, ...]
    source: str = ""

    @property
    def membership_attacks(self) -> tuple[str, ...]:
        return tuple(a for a in self.attacks if a in ATTACKS)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def threat_models_dir() -> Path:
    """The folder holding the bundled threat-model files."""
    return Path(str(resources.files("secure_dfml").joinpath("resources", "threat_models")))


def _bundled() -> dict[str, Path]:
    d = threat_models_dir()
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.glob("*.toml"))}


def list_threat_models() -> list[str]:
    """Names of the bundled threat models."""
    return sorted(_bundled())


def _validate(data: dict[str, Any], where: str, expect_name: str | None) -> ThreatModel:
    unknown = sorted(set(data) - set(_STR_FIELDS) - set(_LIST_FIELDS))
    if unknown:
        raise AuditError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_STR_FIELDS + _LIST_FIELDS)}")
    values: dict[str, Any] = {}
    for key in _STR_FIELDS:
        v = data.get(key)
        if not isinstance(v, str) or not v.strip():
            raise AuditError(f"{where}: '{key}' must be a non-empty string")
        values[key] = v.strip()
    for key in _LIST_FIELDS:
        v = data.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(i, str) and i.strip() for i in v):
            raise AuditError(f"{where}: '{key}' must be a non-empty list of non-empty strings")
        values[key] = tuple(i.strip() for i in v)
    if values["view"] not in THREAT_MODEL_VIEWS:
        raise AuditError(
            f"{where}: 'view' is {values['view']!r}; allowed: {', '.join(THREAT_MODEL_VIEWS)}"
        )
    known = set(ATTACKS) | set(ENVELOPE_ANALYSES)
    bad = [a for a in values["attacks"] if a not in known]
    if bad:
        raise AuditError(f"{where}: unknown attack(s) {', '.join(bad)}; allowed: {', '.join(sorted(known))}")
    if expect_name is not None and values["name"] != expect_name:
        raise AuditError(f"{where}: 'name' is {values['name']!r} but the file is named {expect_name!r}.toml")
    return ThreatModel(**values, source=where)


def load_threat_model(name_or_path: str | Path) -> ThreatModel:
    """Load a bundled threat model by name, or any threat-model TOML file by path."""
    s = str(name_or_path)
    path = Path(s)
    if s.endswith(".toml") or path.is_file() or isinstance(name_or_path, Path):
        if not path.is_file():
            raise AuditError(f"threat-model file {s!r} does not exist")
    else:
        found = _bundled().get(s)
        if found is None:
            names = list_threat_models()
            raise AuditError(
                f"unknown threat model {s!r}; available: {', '.join(names) if names else '(none found in ' + str(threat_models_dir()) + ')'}"
            )
        path = found
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuditError(f"{path}: cannot read threat model: {exc}") from exc
    return _validate(data, str(path), path.stem)
