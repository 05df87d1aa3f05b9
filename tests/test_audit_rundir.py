"""Auditing run directories: threat-model views, results layout, ledgers, eavesdropper, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from secure_dfml import build_federation, config_from_dict, load_config, run_federation
from secure_dfml.audit import (
    audit_run_dir,
    byte_uniformity_p_value,
    load_threat_model,
    rebuild_federation,
    resolve_attacks,
)
from secure_dfml.audit._epsilon import CountsBound
from secure_dfml.cli.audit import audit
from secure_dfml.errors import AuditError

TINY: dict[str, Any] = {
    "data": {"name": "digits", "auditor_pool": 200},
    "federation": {"peers": 4, "participants": 3, "rounds": 3},
    "models": {"mix": ["mlp"]},
}


def _cfg(**sections: Any) -> Any:
    raw = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "run"
    run_federation(_cfg(), out, plot=False)
    return out


@pytest.fixture(scope="module")
def dp_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit-dp") / "run"
    # every peer spends budget (senders train locally too)
    run_federation(_cfg(privacy={"enabled": True, "epsilon": 2.0}, dfml={"local_epochs": 1}), out, plot=False)
    return out


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _check_layout(res: dict[str, Any], run: Path, tm: str) -> None:
    out = run / "audit" / tm
    assert Path(res["output_dir"]) == out
    assert (out / "results.json").is_file() and (out / "report.html").is_file()
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["format"] == "secure-dfml-audit" and on_disk["threat_model"]["name"] == tm
    assert on_disk["status"] == res["status"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert not list((run / "audit").glob(".*partial*")), "temporary folders must not be left behind"


def _sizes(run: Path) -> tuple[list[int], list[int]]:
    fed = rebuild_federation(load_config(run / "config.toml"))
    return [len(p.train) for p in fed.split.peers], [len(p.holdout) for p in fed.split.peers]


# ----------------------------------------------------------------------------- unit-level
def test_resolve_attacks_aliases() -> None:
    assert resolve_attacks(None) == ("loss", "population", "lira_offline", "rmia_offline")
    assert resolve_attacks(["lira", "rmia"], online=True) == ("lira_online", "rmia_online")
    assert resolve_attacks(["RMIA", "rmia_offline", "loss"]) == ("rmia_offline", "loss")
    with pytest.raises(AuditError, match="unknown attack 'bogus'"):
        resolve_attacks(["bogus"])


def test_byte_uniformity() -> None:
    rng = np.random.default_rng(1)
    assert byte_uniformity_p_value(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()) > 1e-4
    structured = np.linspace(0, 1, 20_000, dtype=np.float32).tobytes()
    assert byte_uniformity_p_value(structured) < 1e-12


def test_rebuild_is_deterministic(run_dir: Path) -> None:
    cfg = load_config(run_dir / "config.toml")
    a = build_federation(cfg)
    b = rebuild_federation(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [len(p.train) for p in b.split.peers] == summary["train_samples_per_peer"]
    for pa, pb in zip(a.peers, b.peers):
        assert torch.equal(pa.x_train, pb.x_train) and torch.equal(pa.y_train, pb.y_train)
    for sa, sb in zip(a.split.peers, b.split.peers):
        assert np.array_equal(sa.holdout, sb.holdout)
    assert np.array_equal(a.split.auditor_pool, b.split.auditor_pool)


# ----------------------------------------------------------------------------- model views
def test_final_model_audit(run_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    res = audit_run_dir(run_dir, threat_model="final-model", attacks=["loss", "population", "lira", "rmia"],
                        reference_models=2, rng=_rng(), progress=lambda d, t, w: seen.append((d, t)))
    _check_layout(res, run_dir, "final-model")
    assert res["status"] == "audited" and res["fail"] is False
    assert res["attacks"] == ["loss", "population", "lira_offline", "rmia_offline"]
    train, hold = _sizes(run_dir)
    finals = [t for t in res["targets"] if t["model"] == "final"]
    assert [t["data_owner"] for t in finals] == [0, 1, 2, 3]
    for t in finals:
        assert t["n_members"] == train[t["data_owner"]] and t["n_nonmembers"] == hold[t["data_owner"]]
        assert set(t["attacks"]) == set(res["attacks"])
        for a in t["attacks"].values():
            assert 0.0 <= a["metrics"]["auc"]["value"] <= 1.0
            assert a["epsilon_lower_bound"]["epsilon_lower_bound"] >= 0.0
    # offline reference models are shared: one set of 2 for the single architecture
    assert seen[-1] == (2, 2)
    assert finals[0]["n_reference"] == 2 and finals[0]["reference_online"] is False
    for pid, p in res["peers"].items():
        assert p["status"] == "NON-PRIVATE" and p["ledger_epsilon"] is None
        assert np.isfinite(p["empirical_epsilon_lower_bound"])
    assert any("not evidence" in f["text"] or "does not show" in f["text"] for f in res["findings"])
    assert json.loads((run_dir / "audit" / "final-model" / "results.json").read_text())["findings"] == res["findings"]
    page = (run_dir / "audit" / "final-model" / "report.html").read_text()
    assert "data:image/png;base64," in page and "Empirical epsilon per peer" in page
    assert page.index("Empirical epsilon per peer") < page.index("<h2>Results</h2>")  # before the attack table


def test_curious_aggregator_and_sender(run_dir: Path) -> None:
    agg = audit_run_dir(run_dir, threat_model="curious-aggregator", attacks=["loss", "population"],
                        reference_models=1, rng=_rng())
    _check_layout(agg, run_dir, "curious-aggregator")
    assert all(t["model"] == "received" and t["via_peer"] == t["data_owner"] for t in agg["targets"])
    assert agg["reference_models"] == 0  # loss / population need no reference models
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_agg: dict[int, int] = {}
    for r in records:
        for g in r["groups"]:
            for s in g["returned"]:
                last_agg[s] = g["aggregator"]
    snd = audit_run_dir(run_dir, threat_model="curious-sender", attacks=["loss"], reference_models=1, rng=_rng())
    _check_layout(snd, run_dir, "curious-sender")
    train, hold = _sizes(run_dir)
    assert snd["targets"]
    for t in snd["targets"]:
        assert t["model"] == "returned"
        assert t["data_owner"] == last_agg[t["via_peer"]]  # members: the aggregator's data
        assert t["n_members"] == train[t["data_owner"]] and t["n_nonmembers"] == hold[t["data_owner"]]
    # --peers restricts whose data is attacked
    only = audit_run_dir(run_dir, threat_model="curious-aggregator", attacks=["loss"], reference_models=1,
                         rng=_rng(), peers=[1])
    assert [t["data_owner"] for t in only["targets"]] == [1]


def test_online_attack_trains_per_peer(run_dir: Path) -> None:
    res = audit_run_dir(run_dir, threat_model="final-model", attacks=["rmia"], online=True, reference_models=2,
                        rng=_rng(), peers=[3], reference_epochs=3)
    (t,) = [t for t in res["targets"] if t["model"] == "final"]
    assert res["attacks"] == ["rmia_online"] and t["reference_online"] is True and t["n_reference"] == 2
    assert res["reference"]["epochs"] == 3


def test_dp_run_ledger_comparison(dp_run_dir: Path) -> None:
    res = audit_run_dir(dp_run_dir, threat_model="final-model", attacks=["loss", "population"], reference_models=1,
                        rng=_rng())
    assert res["run"]["private"] is True and res["fail"] is False
    for pid, p in res["peers"].items():
        assert p["status"] == "CONSISTENT"
        assert 0 < p["ledger_epsilon"] <= 2.0 + 1e-9 and p["ledger_delta"] > 0
        assert p["empirical_epsilon_lower_bound"] <= p["ledger_epsilon"]
        assert res["ledgers"][pid]["epsilon"] == p["ledger_epsilon"]


def test_fail_flagged_when_bound_exceeds_ledger(dp_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_dfml.audit._rundir as rd

    def huge(scores: Any, labels: Any, **kw: Any) -> CountsBound:
        return CountsBound(7.5, 10, 10, 0, 10, (0.9, 1.0), (0.0, 0.1), kw.get("confidence", 0.95), kw.get("delta", 0.0))

    monkeypatch.setattr(rd, "epsilon_lower_bound_from_scores", huge)
    res = audit_run_dir(dp_run_dir, threat_model="final-model", attacks=["loss"], reference_models=1, rng=_rng(),
                        peers=[0])
    assert res["fail"] is True and res["peers"]["0"]["status"] == "FAIL"
    assert res["findings"][0]["level"] == "fail"
    page = (dp_run_dir / "audit" / "final-model" / "report.html").read_text()
    assert "class='fail'" in page


def test_failed_audit_keeps_earlier_results(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_dfml.audit._rundir as rd

    res = audit_run_dir(run_dir, threat_model="final-model", attacks=["loss"], reference_models=1, rng=_rng())
    before = (Path(res["output_dir"]) / "results.json").read_text()

    def broken(*a: Any, **k: Any) -> Any:
        raise AuditError("simulated failure while writing")

    monkeypatch.setattr(rd, "_render_html", broken)
    with pytest.raises(AuditError, match="simulated"):
        audit_run_dir(run_dir, threat_model="final-model", attacks=["loss"], reference_models=1, rng=_rng())
    assert (Path(res["output_dir"]) / "results.json").read_text() == before
    assert not list((run_dir / "audit").glob(".*partial*"))


def test_write_output_dir_is_atomic(tmp_path: Path) -> None:
    from secure_dfml._fsutil import write_output_dir

    final = tmp_path / "out"
    write_output_dir(final, {"results.json": "old", "report.html": "old"})
    with pytest.raises(TypeError):
        write_output_dir(final, {"results.json": "new", "report.html": object()})  # type: ignore[dict-item]
    assert (final / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_output_dir(final, {"results.json": "new"})
    assert sorted(p.name for p in final.iterdir()) == ["results.json"]


def test_errors_are_clear(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        audit_run_dir(tmp_path / "nope", threat_model="final-model", rng=_rng())
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match="config.toml"):
        audit_run_dir(tmp_path / "empty", threat_model="final-model", rng=_rng())
    with pytest.raises(AuditError, match="available: curious-aggregator, curious-sender, eavesdropper, final-model"):
        audit_run_dir(run_dir, threat_model="bogus", rng=_rng())
    with pytest.raises(AuditError, match="need at least 2 reference models"):
        audit_run_dir(run_dir, threat_model="final-model", attacks=["lira_online"], reference_models=1, rng=_rng())
    with pytest.raises(AuditError, match="do not exist"):
        audit_run_dir(run_dir, threat_model="final-model", attacks=["loss"], peers=[9], rng=_rng())
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("audit"))
    shutil.rmtree(broken / "models")
    with pytest.raises(AuditError, match="models/"):
        audit_run_dir(broken, threat_model="final-model", attacks=["loss"], rng=_rng())


def test_view_absent_under_ckks_is_reported(tmp_path: Path) -> None:
    run = tmp_path / "ckks"
    run_federation(_cfg(crypto={"secure_aggregation": "ckks"}, federation={"rounds": 2}), run, plot=False)
    assert not (run / "views" / "received").exists()
    res = audit_run_dir(run, threat_model="curious-aggregator", rng=_rng())
    _check_layout(res, run, "curious-aggregator")
    assert res["status"] == "view_absent" and res["fail"] is False and res["targets"] == []
    assert "CKKS" in res["view_absent_reason"] and "mitigation worked" in res["view_absent_reason"]
    assert "CKKS" in (run / "audit" / "curious-aggregator" / "report.html").read_text()


# eavesdropper: tests/test_audit_eavesdropper.py


# ----------------------------------------------------------------------------- CLI
def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("audit")(audit)

    @app.command("noop")
    def noop() -> None:  # a second command keeps "audit" as a sub-command
        pass

    return app


def test_cli_audit_run_dir(run_dir: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(_app(), ["audit", str(run_dir), "--threat-model", "final-model", "--attacks", "loss,population",
                               "--peers", "0,1", "--format", "json", "--seed", "3"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {t["data_owner"] for t in data["targets"]} == {0, 1}
    r = runner.invoke(_app(), ["audit", str(run_dir), "-t", "eavesdropper"])
    assert r.exit_code == 0, r.output
    assert "opened none" in r.output
    r = runner.invoke(_app(), ["audit", "--list-threat-models", "--format", "json"])
    assert r.exit_code == 0 and {t["name"] for t in json.loads(r.stdout)} >= {"final-model", "eavesdropper"}


def test_cli_errors(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(_app(), ["audit", str(run_dir), "--threat-model", "bogus"])
    assert r.exit_code == 2 and "curious-aggregator" in r.output
    r = runner.invoke(_app(), ["audit", str(tmp_path / "missing"), "-t", "final-model"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(_app(), ["audit", str(run_dir)])
    assert r.exit_code == 2 and "--threat-model" in r.output
    r = runner.invoke(_app(), ["audit", str(run_dir), "-t", "final-model", "--attacks", "bogus"])
    assert r.exit_code == 2 and "unknown attack" in r.output
    r = runner.invoke(_app(), ["audit", "canary"])
    assert r.exit_code == 2 and "--config" in r.output


def test_cli_fail_exit_code(dp_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_dfml.audit._rundir as rd

    monkeypatch.setattr(rd, "epsilon_lower_bound_from_scores",
                        lambda s, y, **kw: CountsBound(9.0, 1, 1, 0, 1, (1.0, 1.0), (0.0, 0.0), 0.95, 0.0))
    r = CliRunner().invoke(_app(), ["audit", str(dp_run_dir), "-t", "final-model", "--attacks", "loss", "--peers", "2"])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output


def test_threat_model_files_load() -> None:
    for name in ("curious-aggregator", "curious-sender", "final-model", "eavesdropper"):
        assert load_threat_model(name).name == name
