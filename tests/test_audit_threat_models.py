"""Threat models: bundled TOML files, validated frozen dataclass, helpful errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from secure_dfml.audit import ATTACKS, THREAT_MODEL_VIEWS, ThreatModel, list_threat_models, load_threat_model
from secure_dfml.audit._threat_models import threat_models_dir
from secure_dfml.errors import AuditError

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    "curious-aggregator": "sender_models_as_received",
    "curious-sender": "returned_models",
    "final-model": "final_and_peak",
    "eavesdropper": "envelopes",
}


def test_bundled_threat_models_load_and_validate() -> None:
    assert set(EXPECTED) <= set(list_threat_models())
    for name, view in EXPECTED.items():
        tm = load_threat_model(name)
        assert isinstance(tm, ThreatModel)
        assert tm.name == name and tm.view == view and tm.view in THREAT_MODEL_VIEWS
        assert tm.assets and tm.assumptions and tm.mitigations and tm.attacks
        with pytest.raises(dataclasses.FrozenInstanceError):
            tm.name = "x"  # type: ignore[misc]


def test_membership_attacks_per_view() -> None:
    assert set(load_threat_model("curious-aggregator").membership_attacks) == set(ATTACKS)
    eav = load_threat_model("eavesdropper")
    assert eav.membership_attacks == () and eav.attacks == ("envelope_size",)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(AuditError) as err:
        load_threat_model("curious-janitor")
    for name in EXPECTED:
        assert name in str(err.value)


def test_top_level_folder_is_the_bundled_one() -> None:
    top = REPO / "threat_models"
    assert top.is_dir()
    assert {p.name for p in top.glob("*.toml")} == {p.name for p in threat_models_dir().glob("*.toml")}


def _write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(body, encoding="utf-8")
    return p


_VALID = """
name = "insider"
description = "a peer with a grudge"
attacker = "any peer"
view = "final_and_peak"
targets = "every peer's train split"
assets = ["membership"]
assumptions = ["no collusion"]
mitigations = ["DP-SGD"]
attacks = ["loss", "rmia_online"]
"""


def test_custom_file_by_path(tmp_path: Path) -> None:
    tm = load_threat_model(_write(tmp_path, "insider", _VALID))
    assert tm.name == "insider" and tm.attacks == ("loss", "rmia_online")
    assert load_threat_model(str(tmp_path / "insider.toml")).source.endswith("insider.toml")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('view = "final_and_peak"', 'view = "everything"'), "view"),
        (('attacks = ["loss", "rmia_online"]', 'attacks = ["loss", "mind_reading"]'), "mind_reading"),
        (('assets = ["membership"]', "assets = []"), "assets"),
        (('name = "insider"', 'name = "outsider"'), "file is named"),
        (('targets = "every peer\'s train split"', 'targets = "x"\ncolour = "red"'), "colour"),
        (('description = "a peer with a grudge"', ""), "description"),
    ],
)
def test_invalid_files_name_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    body = _VALID.replace(*edit)
    with pytest.raises(AuditError, match=message):
        load_threat_model(_write(tmp_path, "insider", body))


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read"):
        load_threat_model(_write(tmp_path, "broken", "name = ["))
    with pytest.raises(AuditError, match="does not exist"):
        load_threat_model(tmp_path / "nope.toml")
