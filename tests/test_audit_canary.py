"""One-run canary audit of a federation (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from secure_dfml import config_from_dict
from secure_dfml.audit import canary_k_grid, rebuild_federation
from secure_dfml.orchestration.canary import run_canary_audit
from secure_dfml.cli.audit import audit
from secure_dfml.config import dump_toml
from secure_dfml.errors import AuditError


def _cfg(**sections: Any) -> Any:
    raw: dict[str, Any] = {
        "data": {"name": "digits", "auditor_pool": 200},
        "federation": {"peers": 4, "participants": 3, "rounds": 2},
        "models": {"mix": ["mlp"]},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def _check_structure(res: dict[str, Any], out: Path, m: int, cfg: Any) -> None:
    for name in ("canary.json", "canary.md", "canary.html", "config.toml"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "canary.json").read_text())
    assert on_disk["format"] == "secure-dfml-canary-audit" and on_disk["canaries_per_peer"] == m
    split = rebuild_federation(cfg).split
    pool = set(split.auditor_pool.tolist())
    seen: set[int] = set()
    for pid, e in res["peers"].items():
        assert len(e["scores"]) == len(e["included"]) == len(e["canary_indices"]) == m
        assert sum(e["included"]) == e["canaries_included"]
        if res["canary_kind"] == "mislabelled":
            assert set(e["canary_indices"]) <= pool and not seen & set(e["canary_indices"])  # disjoint across peers
            seen |= set(e["canary_indices"])
        else:  # synthetic: no auditor-pool record is used
            assert set(e["canary_indices"]) == {-1}
        assert e["attainable_epsilon"] >= e["epsilon_lower_bound"]
        assert e["train_samples_without_canaries"] == len(split.peers[int(pid)].train)
        assert np.isfinite(e["epsilon_lower_bound"]) and e["epsilon_lower_bound"] >= 0
        assert 0 <= e["v"] <= e["r"] <= m and e["confidence"] == 0.95
    pooled = res["pooled"]
    assert pooled["canaries"] == m * cfg.federation.peers and pooled["attainable_epsilon"] >= pooled["epsilon_lower_bound"]
    assert res["attainable_epsilon"] == pooled["attainable_epsilon"] > max(e["attainable_epsilon"] for e in res["peers"].values())
    assert len(res["snapshots_per_peer"]) == cfg.federation.peers and sum(res["snapshots_per_peer"]) >= 1
    assert not list(out.parent.glob(".*partial*"))


def test_k_grid() -> None:
    assert canary_k_grid(50) == ([5, 12, 25], [0, 5, 12, 25])
    assert canary_k_grid(2) == ([1], [0, 1])


def test_canary_audit_non_private(tmp_path: Path) -> None:
    cfg = _cfg()
    out = tmp_path / "canary"
    ticks: list[int] = []
    res = run_canary_audit(cfg, canaries_per_peer=20, confidence=0.95, rng=np.random.default_rng(0), out_dir=out,
                           progress=lambda d, t, w: ticks.append(d), kind="mislabelled")
    _check_structure(res, out, 20, cfg)
    assert ticks[-1] == cfg.federation.rounds
    assert res["private"] is False and res["fail"] is False
    assert all(e["status"] == "NON-PRIVATE" and e["ledger_epsilon"] is None for e in res["peers"].values())
    # canary labels are wrong labels
    ds = rebuild_federation(cfg).dataset
    for e in res["peers"].values():
        assert all(int(ds.y_train[i]) != lab for i, lab in zip(e["canary_indices"], e["canary_labels"]))
    # the same seed reproduces the same canaries and inclusion
    again = run_canary_audit(cfg, canaries_per_peer=20, confidence=0.95, rng=np.random.default_rng(0), out_dir=out,
                             kind="mislabelled")
    assert [e["included"] for e in again["peers"].values()] == [e["included"] for e in res["peers"].values()]


def test_noise_canaries_are_synthetic_and_need_no_auditor_pool(tmp_path: Path) -> None:
    cfg = _cfg(data={"auditor_pool": 20})  # 4 peers x 60 noise canaries: far more than the pool
    res = run_canary_audit(cfg, canaries_per_peer=60, confidence=0.95, rng=np.random.default_rng(0),
                           out_dir=tmp_path / "noise")
    _check_structure(res, tmp_path / "noise", 60, cfg)
    assert res["canary_kind"] == "noise"


def test_canary_audit_dp_flags_nothing(tmp_path: Path) -> None:
    cfg = _cfg(privacy={"enabled": True, "epsilon": 2.0}, dfml={"local_epochs": 1})  # every peer spends
    out = tmp_path / "canary-dp"
    res = run_canary_audit(cfg, canaries_per_peer=20, confidence=0.95, rng=np.random.default_rng(1), out_dir=out)
    _check_structure(res, out, 20, cfg)
    assert res["private"] is True and res["fail"] is False
    for pid, e in res["peers"].items():
        assert e["status"] == "CONSISTENT"
        assert 0 < e["ledger_epsilon"] <= 2.0 + 1e-9 and e["delta"] == e["ledger_delta"] > 0
        assert e["epsilon_lower_bound"] <= e["ledger_epsilon"]
        assert (out / "ledgers" / f"peer_{pid}.json").is_file()


def test_crashed_canary_audit_keeps_its_ledgers(tmp_path: Path) -> None:
    """Budget spent before a crash is never rolled back: the ledgers stay on disk."""
    cfg = _cfg(privacy={"enabled": True, "epsilon": 2.0}, dfml={"local_epochs": 1})

    def crash_after_round_one(done: int, total: int, what: str) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_canary_audit(cfg, canaries_per_peer=20, confidence=0.95, rng=np.random.default_rng(1),
                         out_dir=tmp_path / "canary", progress=crash_after_round_one)
    assert not (tmp_path / "canary").exists()
    (staging,) = tmp_path.glob(".canary.partial-*")
    ledgers = [json.loads(p.read_text()) for p in sorted((staging / "ledgers").glob("peer_*.json"))]
    assert ledgers and any(led["entries"] for led in ledgers)


def test_canary_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(AuditError, match="auditor_pool"):
        run_canary_audit(_cfg(), canaries_per_peer=60, confidence=0.95, rng=rng, out_dir=tmp_path / "a",
                         kind="mislabelled")
    with pytest.raises(AuditError, match="unknown canary kind"):
        run_canary_audit(_cfg(), canaries_per_peer=5, confidence=0.95, rng=rng, out_dir=tmp_path / "a", kind="odd")
    with pytest.raises(AuditError, match=">= 2"):
        run_canary_audit(_cfg(), canaries_per_peer=1, confidence=0.95, rng=rng, out_dir=tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(AuditError, match="other files"):
        run_canary_audit(_cfg(), canaries_per_peer=5, confidence=0.95, rng=rng, out_dir=busy)
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_canary(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("audit")(audit)

    @app.command("noop")
    def noop() -> None:
        pass

    cfg_file = tmp_path / "fed.toml"
    cfg_file.write_text(dump_toml(_cfg(federation={"rounds": 1})))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["audit", "canary", "--config", str(cfg_file), "--canaries", "10", "--out", str(out),
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["canaries_per_peer"] == 10 and (out / "canary.json").is_file()
    r = CliRunner().invoke(app, ["audit", "canary", "--config", str(cfg_file), "--threat-model", "final-model"])
    assert r.exit_code == 2 and "do not apply" in r.output
