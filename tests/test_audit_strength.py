"""Audit strength: the largest lower bound an audit could show, the pooled canary
test, and how certification requires, reads and runs canary audits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from _runs import TINY_PRIVATE, copy_run
from secure_dfml import config_from_dict, run_federation
from secure_dfml.audit import (
    CanaryDraw,
    canary_k_grid,
    one_run_attainable,
    one_run_audit,
    pooled_canary_entry,
)
from secure_dfml.certify import (
    RequirementsError,
    certify,
    check_run,
    load_requirements,
    list_profiles,
    requirements_from_dict,
    verify,
)
from secure_dfml.cli.main import app
from secure_dfml.errors import AuditError
from secure_dfml.orchestration.canary import canary_dir, run_canary_audit
from secure_dfml.orchestration.certification import (
    canaries_for_strength,
    certify_with_audits,
    missing_audits,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()

TINY = TINY_PRIVATE


# ----------------------------------------------------------------------------- the math
def test_attainable_is_every_guess_right() -> None:
    for m in (10, 50, 500):
        k_pos, k_neg = canary_k_grid(m)
        top = one_run_attainable(m, k_pos=k_pos, k_neg=k_neg, confidence=0.95)
        perfect = one_run_audit(np.r_[np.ones(m // 2), np.zeros(m - m // 2)], np.r_[np.ones(m // 2), np.zeros(m - m // 2)],
                                k_pos=k_pos, k_neg=k_neg, confidence=0.95)
        assert perfect.epsilon_lower_bound == pytest.approx(top, rel=1e-6)
    grid = [one_run_attainable(m, k_pos=canary_k_grid(m)[0], k_neg=canary_k_grid(m)[1]) for m in (20, 50, 200, 1000)]
    assert grid == sorted(grid) and grid[0] > 0
    # 50 canaries can never show more than about 2.15; 1,000 pooled reach above 5
    assert 2.0 < grid[1] < 2.3 and grid[-1] > 5.0


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 120), st.integers(0, 2**31 - 1))
def test_no_audit_exceeds_its_attainable_bound(m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = included * rng.normal(1.0, 1.0, m) + rng.normal(0.0, 1.0, m)
    k_pos, k_neg = canary_k_grid(m)
    res = one_run_audit(scores, included, k_pos=k_pos, k_neg=k_neg, delta=1e-5)
    assert 0.0 <= res.epsilon_lower_bound <= one_run_attainable(m, k_pos=k_pos, k_neg=k_neg, delta=1e-5) + 1e-9


def _draw(included: np.ndarray) -> CanaryDraw:
    peers, m = included.shape
    return CanaryDraw(chosen=np.zeros((peers, m), dtype=np.int64), x=np.zeros((peers, m, 1)),
                      labels=np.zeros((peers, m), dtype=np.int64), included=included)


def test_pooled_test_is_stronger_and_compares_with_the_largest_ledger() -> None:
    rng = np.random.default_rng(0)
    included = rng.random((10, 50)) < 0.5
    # every canary's score (on one scale for all peers, as CanaryScores gives them) separates perfectly
    scores = np.where(included, 1.0, 0.0) + rng.uniform(0, 0.4, included.shape)
    statuses = [{"delta": 1e-5, "epsilon_spent": 1.0 + i / 10} for i in range(10)]
    pooled, cmp = pooled_canary_entry(scores, _draw(included), confidence=0.95, statuses=statuses)
    assert pooled["canaries"] == 500 and pooled["v"] == pooled["r"]  # every guess right
    assert pooled["epsilon_lower_bound"] <= pooled["attainable_epsilon"]
    per_peer = one_run_attainable(50, k_pos=canary_k_grid(50)[0], k_neg=canary_k_grid(50)[1], delta=1e-5)
    assert pooled["epsilon_lower_bound"] > per_peer + 2  # 500 pooled canaries show far more than 50
    assert cmp is not None and cmp.failed and pooled["ledger_epsilon"] == pytest.approx(1.9)
    # scores that carry no signal find nothing, and nothing is flagged
    noise, cmp = pooled_canary_entry(rng.normal(size=(10, 50)), _draw(included), confidence=0.95, statuses=statuses)
    assert noise["epsilon_lower_bound"] < 1.0 and cmp is not None and not cmp.failed
    # non-private: no ledger to compare with
    free, cmp = pooled_canary_entry(scores, _draw(included), confidence=0.95, statuses=[None] * 10)
    assert cmp is None and free["status"] == "NON-PRIVATE"


def test_canaries_for_strength() -> None:
    assert canaries_for_strength(2.0, 10) == 100  # the default count already reaches about 5.1
    assert canaries_for_strength(5.0, 4) == 500
    with pytest.raises(AuditError, match="min_strength"):
        canaries_for_strength(50.0, 2)


# ----------------------------------------------------------------------------- requirements
def test_min_strength_field_and_profiles_by_name(tmp_path: Path) -> None:
    req = requirements_from_dict({"audits": {"min_strength": 2.5}})
    assert req.audits.min_strength == 2.5 and req.to_dict()["audits"]["min_strength"] == 2.5
    with pytest.raises(RequirementsError, match="audits.min_strength"):
        requirements_from_dict({"audits": {"min_strength": -1}})
    assert {"hospital", "factory", "research"} <= set(list_profiles())
    assert load_requirements("hospital").name == "hospital"
    with pytest.raises(RequirementsError, match="shipped profile"):
        load_requirements(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- certification
@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strength") / "run"
    run_federation(config_from_dict(TINY), out, plot=False)
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return copy_run(base_run, tmp_path)


@pytest.fixture(scope="module")
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(b"\x07" * 32)


def _rows(cert: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in cert["results"] if r["requirement"] == name]


@pytest.mark.slow
def test_min_strength_missing_weak_and_met(run: Path, key: nacl.signing.SigningKey) -> None:
    req = requirements_from_dict({"privacy": {"max_epsilon": 16.0}, "audits": {"min_strength": 2.0}})
    (row,) = _rows(certify(run, req, key, write=False), "audit strength")
    assert row["status"] == "FAIL" and "no canary audit" in row["reason"]
    assert [s.kind for s in missing_audits(run, req)] == ["canary"]

    # too weak: 5 canaries per peer (20 pooled) can never show eps >= 2
    from secure_dfml.rundir import read_config
    cfg = read_config(run)
    run_canary_audit(cfg, canaries_per_peer=5, rng=np.random.default_rng(0), out_dir=canary_dir(run))
    cert = certify(run, req, key, write=False)
    (row,) = _rows(cert, "audit strength")
    assert row["status"] == "FAIL" and "audit too weak" in row["reason"]
    (lb,) = _rows(cert, "canary audit lower bound")
    assert lb["status"] == "PASS"
    ev = [e for e in cert["audit_evidence"] if e["threat_model"] == "canary"]
    assert ev and ev[0]["attainable_epsilon"] < 2.0 and ev[0]["canaries"] == 20
    assert "audit/canary/canary.json" in cert["manifest"]["files"]
    assert not [f for f in check_run(run) if f.severity == "error"]  # an added audit is no tampering

    # certify --run-audits replaces it with one strong enough, and the certificate verifies
    cert, steps = certify_with_audits(run, req, key, rng=np.random.default_rng(1))
    assert [s.canaries_per_peer for s in steps] == [canaries_for_strength(2.0, 4, delta=1e-5)]
    (row,) = _rows(cert, "audit strength")
    assert row["status"] == "PASS" and cert["certified"], cert["results"]
    assert verify(run / "certificate.json", _pub(run, key), run).ok


def _pub(run: Path, key: nacl.signing.SigningKey) -> Path:
    path = run.parent / "auditor.pub"
    path.write_text(bytes(key.verify_key).hex() + "\n")
    return path


def _write_canary(run: Path, **over: Any) -> None:
    from secure_dfml.rundir import read_config
    out = canary_dir(run)
    out.mkdir(parents=True)
    res = {"format": "secure-dfml-canary-audit", "version": 3, "config": read_config(run).to_dict(), "fail": False,
           "pooled": {"canaries": 400}, "epsilon_lower_bound": 0.5, "attainable_epsilon": 4.4, **over}
    (out / "canary.json").write_text(json.dumps(res))


def test_canary_lower_bound_above_ledger_fails(run: Path, key: nacl.signing.SigningKey) -> None:
    _write_canary(run, epsilon_lower_bound=50.0)
    cert = certify(run, requirements_from_dict({"audits": {"min_strength": 2.0}}), key, write=False)
    (row,) = _rows(cert, "canary audit lower bound")
    assert row["status"] == "FAIL" and "exceeds the largest ledger epsilon" in row["reason"]
    assert _rows(cert, "audit strength")[0]["status"] == "PASS"


def test_canary_of_another_config_fails(run: Path, key: nacl.signing.SigningKey) -> None:
    from secure_dfml.rundir import read_config
    other = read_config(run).to_dict()
    other["federation"]["rounds"] = 99
    _write_canary(run, config=other)
    cert = certify(run, requirements_from_dict({}), key, write=False)
    (row,) = _rows(cert, "canary audit")
    assert row["status"] == "FAIL" and "another configuration" in row["reason"]
    (step,) = missing_audits(run, requirements_from_dict({"audits": {"min_strength": 2.0}}))
    assert step.kind == "canary" and "this configuration" in step.reason  # --run-audits trains a matching one


def test_canary_audit_of_a_run_cli(run: Path) -> None:
    r = runner.invoke(app, ["audit", "canary", "--run", str(run), "--canaries", "5", "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["pooled"]["canaries"] == 20 and data["attainable_epsilon"] == data["pooled"]["attainable_epsilon"]
    assert (canary_dir(run) / "canary.json").is_file() and (canary_dir(run) / "ledgers").is_dir()
    r = runner.invoke(app, ["audit", "canary", "--run", str(run), "--config", str(run / "config.toml")])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(app, ["audit", str(run), "--run", str(run), "--threat-model", "final-model"])
    assert r.exit_code == 2 and "--run and --state belong to the canary audit" in r.output


@pytest.mark.slow
def test_pipeline_cli_trains_audits_certifies_verifies(tmp_path: Path) -> None:
    cfg = tmp_path / "fed.toml"
    from secure_dfml.config import dump_toml
    cfg.write_text(dump_toml(config_from_dict(TINY)))
    req = tmp_path / "req.toml"
    req.write_text('name = "t"\n[privacy]\nmax_epsilon = 16.0\n[exchange]\nchannel_encryption_required = true\n'
                   '[audits]\nthreat_models_required = ["final-model"]\nmin_strength = 2.0\n')
    out = tmp_path / "job"
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "--requirements", str(req), "--out", str(out),
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["ok"] and data["trained"] and data["verdict"] == "CERTIFIED" and data["verify"]["ok"]
    assert {s["name"] for s in data["audits_run"]} == {"final-model", "canary"}
    assert (out / "run" / "audit" / "final-model" / "results.json").is_file()
    assert (out / "auditor" / "auditor.key").is_file()
    # run again: the finished run and its audits are reused, nothing retrained
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "--requirements", str(req), "--out", str(out),
                            "--format", "json"])
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and not data["trained"] and data["audits_run"] == []
    # another configuration into the same folder is refused, not silently certified as the old run
    cfg.write_text(dump_toml(config_from_dict({**TINY, "federation": {**TINY["federation"], "rounds": 3}})))
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "--requirements", str(req), "--out", str(out)])
    assert r.exit_code == 2 and "another configuration" in r.output


def test_canary_audit_with_state_charges_the_lifetime_ledgers(tmp_path: Path) -> None:
    """The canary audit reads the peers' records again: with --state it is charged to their one ledger."""
    from secure_dfml._run import peer_state_dir
    from secure_dfml.privacy import PrivacyLedger, ledger_path

    cfg = config_from_dict({**TINY, "federation": {**TINY["federation"], "rounds": 1}})
    state = tmp_path / "state"
    summary = run_federation(cfg, tmp_path / "run", plot=False, state_root=state)
    assert summary["state_root"] == str(state)
    before = {pid: PrivacyLedger.load(ledger_path(peer_state_dir(state, pid), pid)) for pid in range(4)}
    r = runner.invoke(app, ["audit", "canary", "--run", str(tmp_path / "run"), "--canaries", "5", "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ledger_scope"] == "lifetime" and res["state_root"] == str(state)
    for pid in range(4):
        after = PrivacyLedger.load(ledger_path(peer_state_dir(state, pid), pid))
        assert len(after.entries) >= len(before[pid].entries) and after.spent_epsilon >= before[pid].spent_epsilon
        assert [e.hash for e in after.entries[: len(before[pid].entries)]] == [e.hash for e in before[pid].entries]
        assert {e.run for e in after.entries[len(before[pid].entries):]} <= {e.run for e in after.entries if e.run.startswith("canary-audit-")}
    assert any(len(PrivacyLedger.load(ledger_path(peer_state_dir(state, p), p)).entries) > len(before[p].entries)
               for p in range(4))
    assert (canary_dir(tmp_path / "run") / "ledgers" / "peer_0.json").is_file()


def test_a_canary_audit_on_spent_lifetime_budgets_says_it_trained_on_less(tmp_path: Path) -> None:
    """One budget per data: a canary audit after the release run has spent the lifetime budget is refused
    phase by phase; the audit says so instead of reporting a weak lower bound as if it were the full one."""
    cfg = config_from_dict({**TINY, "federation": {**TINY["federation"], "rounds": 1}})
    state = tmp_path / "state"
    run_federation(cfg, tmp_path / "run", plot=False, state_root=state)  # spends the budget it plans for
    res = run_canary_audit(cfg, canaries_per_peer=5, rng=np.random.default_rng(0), out_dir=tmp_path / "canary",
                           state_root=state)
    assert res["phases_refused"] > 0
    assert res["findings"][0]["level"] == "warning" and "refused by the privacy gate" in res["findings"][0]["text"]
