"""`secure-dfml tune --requirements` and `tune --state`: checks before training, per-peer
recommendations, what the sweep itself spent, and sweeps charged to lifetime ledgers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import secure_dfml.orchestration.tune as tune_mod
from secure_dfml import config_from_dict
from secure_dfml.certify import requirements_from_dict
from secure_dfml.cli.tune import tune
from secure_dfml.config import dump_toml
from secure_dfml.orchestration.tune import (
    check_config_requirements,
    render_tune_markdown,
    requirement_points,
    tune_budgets,
)
from secure_dfml.privacy import PrivacyLedger, ledger_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {
    "federation": {"peers": 4, "participants": 4, "rounds": 2, "seed": 0},
    "data": {"name": "digits", "auditor_pool": 200},
    "dfml": {"local_epochs": 1, "ml_epochs": 1},
    "privacy": {"enabled": True, "epsilon": 4.0},
}
SMALL_TOML = """
[federation]
peers = 4
participants = 4
rounds = 2
[data]
name = "digits"
auditor_pool = 200
[dfml]
local_epochs = 1
ml_epochs = 1
[privacy]
enabled = true
epsilon = 4.0
"""
#: Three peers, one round, the smallest model: a real point trains in about a second.
TINY = {
    "federation": {"peers": 3, "participants": 3, "rounds": 1, "seed": 0},
    "data": {"name": "digits", "auditor_pool": 200},
    "models": {"mix": ["mlp-small"]},
    "dfml": {"local_epochs": 1, "ml_epochs": 1},
    "privacy": {"enabled": True, "epsilon": 2.0},
}


def cfg_of(base: dict[str, Any], **sections: dict[str, Any]):
    raw = json.loads(json.dumps(base))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def req_of(**raw: Any):
    return requirements_from_dict(raw, source="test.toml")


# ----------------------------------------------------------------------------- a stand-in trainer
#: Per peer id, the factor of its target that the stand-in ledger "spends" (default 0.9).
SPEND = {"factor": {}}


def _fake_summary(cfg) -> dict[str, Any]:
    """A run summary shaped like run_federation's; accuracy grows with the peer's budget."""
    peers: dict[str, Any] = {}
    for i in range(cfg.federation.peers):
        entry: dict[str, Any] = {"arch": "mlp", "local_acc": 0.8}
        if cfg.privacy.enabled:
            o = cfg.privacy.peers.get(str(i))
            t = o.epsilon if o is not None and o.epsilon is not None else cfg.privacy.epsilon
            entry.update({"global_acc": 0.5 + 0.01 * t, "epsilon_spent": SPEND["factor"].get(i, 0.9) * t,
                          "epsilon_target": t, "delta": 1e-5, "status": "active", "noise_multiplier": 1.0 / t,
                          "accountant": "rdp"})
        else:
            entry["global_acc"] = 0.9
        peers[str(i)] = entry
    accs = [p["global_acc"] for p in peers.values()]
    return {"peers": peers, "mean_global_acc": sum(accs) / len(accs), "mean_local_acc": 0.8,
            "best_mean_global_acc": max(accs), "mean_peak_global_acc": None, "seconds_per_round": 1.0,
            "compute_seconds_per_round": 0.5, "wall_seconds": 2.0, "rounds": cfg.federation.rounds,
            "privacy_label": "x", "run_id": f"fake-{len(accs)}"}


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    SPEND["factor"] = {}

    def fake(cfg, run_dir: Path, *, on_round, plot):
        calls.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(cfg))
        summary = _fake_summary(cfg)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        on_round({"round": 0, "mean_global_acc": summary["mean_global_acc"], "peers": {}})
        return summary

    monkeypatch.setattr(tune_mod, "run_federation_for_tune", fake)
    return calls


def _recs(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in res["recommendations"]["peers"].items()}


# ----------------------------------------------------------------------------- default points
def test_default_points_are_capped_at_each_peers_limit() -> None:
    hospital = req_of(privacy={"max_epsilon": 2.0, "peers": {"3": {"max_epsilon": 1.0}}})
    assert [p.label for p in requirement_points(4, hospital)] == ["0.5", "1", "0=2/1=2/2=2/3=1", "inf"]
    research = req_of(privacy={"max_epsilon": 16.0})
    assert [p.label for p in requirement_points(4, research)] == ["0.5", "1", "2", "4", "8", "16", "inf"]
    odd = req_of(privacy={"max_epsilon": 3.0})
    assert [p.label for p in requirement_points(2, odd)] == ["0.5", "1", "2", "3", "inf"]
    assert [p.label for p in requirement_points(2, req_of())] == ["0.5", "1", "2", "4", "8", "inf"]


# ----------------------------------------------------------------------------- recommendations
def test_recommendation_per_peer_respects_max_epsilon_and_per_peer_limits(tmp_path: Path, fake_runs: list[str]) -> None:
    req = req_of(privacy={"max_epsilon": 2.0, "peers": {"3": {"max_epsilon": 1.0}}})
    res = tune_budgets(cfg_of(SMALL), out_dir=tmp_path / "s", requirements=req, plot=False)
    assert res["default_points"] and fake_runs == ["eps-inf", "eps-0.5", "eps-1", "eps-0-2_1-2_2-2_3-1"]
    recs = _recs(res)
    assert res["recommendations"]["all_recommended"] and res["recommendations"]["accuracy_metric"] == "global_acc"
    for pid in (0, 1, 2):
        r = recs[pid]
        assert r["recommended"] and r["epsilon"] == 2.0 and r["point"] == "0=2/1=2/2=2/3=1"
        assert r["epsilon_spent"] == pytest.approx(1.8) and r["accuracy"] == pytest.approx(0.52)
        assert r["accuracy_cost"] == pytest.approx(0.9 - 0.52) and "highest global_acc" in r["reason"]
        assert r["config"] == f"[privacy.peers.{pid}] epsilon = 2"
    assert recs[3]["epsilon"] == 1.0 and recs[3]["max_epsilon"] == 1.0  # tie at accuracy 0.51: both give it 1
    release = res["recommendations"]["release"]
    assert release["epsilons"] == "0=2/1=2/2=2/3=1" and release["measured_as"] == "0=2/1=2/2=2/3=1"

    # explicit points above a limit run (research ledgers) but are never recommended for that peer
    fake_runs.clear()
    res = tune_budgets(cfg_of(SMALL), epsilons=[1, 2, 4], out_dir=tmp_path / "e", requirements=req, plot=False)
    recs = _recs(res)
    assert [recs[i]["epsilon"] for i in range(4)] == [2.0, 2.0, 2.0, 1.0]
    assert "above max_epsilon 2" in recs[0]["rejected"]["4"] and "above max_epsilon 1" in recs[3]["rejected"]["2"]
    release = res["recommendations"]["release"]  # no point trained peers 0-2 at 2 with peer 3 at 1
    assert release["measured_as"] is None and "--epsilons 0=2/1=2/2=2/3=1" in release["text"]


def test_the_ledger_epsilon_not_the_target_decides(tmp_path: Path, fake_runs: list[str]) -> None:
    SPEND["factor"] = {1: 1.01}  # peer 1's "ledger" spends a little more than its target
    req = req_of(privacy={"max_epsilon": 2.0})
    res = tune_budgets(cfg_of(SMALL), epsilons=[1, 2], out_dir=tmp_path / "s", requirements=req, plot=False)
    recs = _recs(res)
    assert recs[0]["epsilon"] == 2.0
    assert recs[1]["epsilon"] == 1.0 and "ledger epsilon 2.02 is above max_epsilon 2" in recs[1]["rejected"]["2"]


def test_audit_limits_gate_the_recommendation(tmp_path: Path, fake_runs: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_audit(run_dir, *, threat_model, attacks, reference_models, rng, progress=None, peers=None):
        assert threat_model == "final-model"
        name = Path(run_dir).name
        eps = {"eps-inf": 64.0, "eps-1": 1.0, "eps-2": 2.0, "eps-4": 4.0}[name]
        hi = 0.5 + 0.05 * eps  # leakage grows with the budget
        est = {"value": hi - 0.02, "ci_low": hi - 0.04, "ci_high": hi, "reason": None}
        return {"status": "audited", "output_dir": str(Path(run_dir) / "audit" / "final-model"),
                "targets": [{"target": "0 final", "attacks": {a: {"metrics": {"auc": est, "tpr_at_fpr": {}}}
                                                              for a in attacks}}], "peers": {}}

    monkeypatch.setattr(tune_mod, "audit_run_dir", fake_audit)
    req = req_of(privacy={"max_epsilon": 8.0}, audits={"limits": {"final-model": {"max_auc": 0.6}}})
    res = tune_budgets(cfg_of(SMALL), epsilons=[1, 2, 4], out_dir=tmp_path / "s", requirements=req,
                       audit_attacks=("loss",), reference_models=1, plot=False)
    assert res["audit"]["enabled"] and res["audit"]["required_by_requirements"]
    assert any("every point was audited" in n for n in res["notes"])
    r = _recs(res)[0]
    assert r["epsilon"] == 2.0  # AUC upper bound 0.6 <= 0.6; at 4 it is 0.7
    assert "AUC upper bound 0.700" in r["rejected"]["4"] and "max_auc 0.6" in r["rejected"]["4"]


def test_composition_statement_gives_the_sums(tmp_path: Path, fake_runs: list[str]) -> None:
    req = req_of(privacy={"max_epsilon": 2.0})
    res = tune_budgets(cfg_of(SMALL), epsilons=[1, 2], out_dir=tmp_path / "s", requirements=req, plot=False)
    sp = res["sweep_privacy"]
    for pid in range(4):
        row = sp["peers"][str(pid)]
        assert row["dp_points"] == 2 and row["sum_epsilon"] == pytest.approx(0.9 + 1.8)
        assert row["recommended_epsilon"] == 2.0 and row["release_after_sweep_epsilon"] == pytest.approx(4.7)
    assert "the sweep itself spent privacy" in sp["statement"] and "public or proxy data" in sp["statement"]
    assert "non-private baseline also read the same records" in sp["statement"]
    assert any(n == sp["statement"] for n in res["notes"])
    assert any("peer 0 2.7 (recommended 2)" in n for n in res["notes"])
    # research mode says that no lifetime ledger was charged
    assert res["ledger_scope"]["mode"] == "research"
    assert any("not charged to any lifetime ledger" in n for n in res["notes"])
    md = (tmp_path / "s" / "tune.md").read_text()
    assert "## What the sweep itself spent" in md and "the sweep itself spent privacy" in md
    assert "| 0 | 2 | 2.7 | 2 | 4.7 |" in md and "## Recommended budget per peer" in md
    assert "not charged to any lifetime ledger" in md
    on_disk = json.loads((tmp_path / "s" / "tune.json").read_text())
    assert on_disk["sweep_privacy"]["peers"]["0"]["sum_epsilon"] == pytest.approx(2.7)
    assert on_disk["recommendations"]["peers"]["0"]["epsilon"] == 2.0


# ----------------------------------------------------------------------------- requirements no budget can fix
def test_unmet_requirements_are_reported_and_nothing_trains(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = cfg_of(SMALL, federation={"groups": 2}, crypto={"channel": "none", "allow_insecure": True})
    req = req_of(privacy={"max_epsilon": 2.0, "delta": 1e-7, "secure_mode_required": True},
                 exchange={"channel_encryption_required": True, "min_group_size": 2})
    res = tune_budgets(cfg, out_dir=tmp_path / "s", requirements=req, plot=False)
    assert fake_runs == []  # no point trained: a sweep on this config spends budget for nothing
    assert res["requirements"]["met"] is False
    unmet = {c["requirement"]: c for c in res["requirements"]["checks"] if not c["met"]}
    assert set(unmet) == {"privacy.delta", "privacy.secure_mode_required", "exchange.channel_encryption_required",
                          "exchange.min_group_size"}
    assert "set privacy.delta = 1e-07" in unmet["privacy.delta"]["fix"]
    assert 'set crypto.channel = "nacl"' in unmet["exchange.channel_encryption_required"]["fix"]
    assert "1 sender model(s)" in unmet["exchange.min_group_size"]["detail"]
    assert all("no budget can fix this" in t for t in res["requirements"]["unmet"])
    assert {p["status"] for p in res["points"]} == {"skipped"}
    recs = _recs(res)
    assert not res["recommendations"]["all_recommended"] and res["recommendations"]["missing"] == [0, 1, 2, 3]
    for r in recs.values():
        assert r["reason"].startswith("no budget can fix this: set privacy.delta")
        assert "set privacy.secure_mode = true" in r["reason"] and 'set crypto.channel = "nacl"' in r["reason"]
    md = render_tune_markdown(res)
    assert "- **privacy.delta: NOT met" in md and "no budget can fix this" in md


def test_config_checks_pass_when_met() -> None:
    req = req_of(privacy={"delta": 1e-5}, exchange={"channel_encryption_required": True, "min_group_size": 3},
                 audits={"limits": {"final-model": {"max_tpr": 0.05, "at_fpr": 0.05}}})
    checks = {c.requirement: c for c in check_config_requirements(cfg_of(SMALL), req, num_train=[300] * 4,
                                                                   archs=["mlp"] * 4)}
    assert checks["privacy.delta"].met and checks["exchange.channel_encryption_required"].met
    assert checks["exchange.min_group_size"].met  # 4 participants, 1 group: 3 senders per aggregation
    fpr = checks["audits.limits.final-model.at_fpr"]
    assert not fpr.met and "0.001, 0.01" in fpr.fix


# ----------------------------------------------------------------------------- CLI
app = typer.Typer()
app.command("tune")(tune)


@app.command("noop")
def _noop() -> None:  # a second command keeps `tune` a sub-command, as in the real CLI
    pass


runner = CliRunner()


def test_cli_peer_without_a_qualifying_point_exits_1(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_TOML)
    req = tmp_path / "r.toml"
    req.write_text('name = "strict"\n[privacy]\nmax_epsilon = 4.0\n[privacy.peers.1]\nmax_epsilon = 0.5\n')
    args = ["tune", "-c", str(cfg), "--epsilons", "1,2", "--requirements", str(req), "--format", "json"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "j")])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["recommendations"]["missing"] == [1]
    why = data["recommendations"]["peers"]["1"]["reason"]
    assert "none of the 2 DP point(s) qualifies" in why and "budget 1 is above max_epsilon 0.5" in why
    assert data["recommendations"]["peers"]["0"]["epsilon"] == 2.0
    table = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "t")])
    assert table.exit_code == 1
    assert "Recommended budget per peer" in table.output and "NONE" in table.output
    assert "What the sweep itself spent" in table.output
    # every peer recommended: exit 0
    req.write_text('[privacy]\nmax_epsilon = 4.0\n')
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["recommendations"]["all_recommended"] is True


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("[privacy\nmax_epsilon = 2", "is not valid TOML"),
    ("[privacy]\nmax_eps = 2.0\n", "unknown field privacy.max_eps"),
    ("[privacy]\nmax_epsilon = -1\n", "privacy.max_epsilon = -1 is invalid"),
])
def test_cli_malformed_requirements_exit_2(tmp_path: Path, fake_runs: list[str], content: str | None,
                                           message: str) -> None:
    req = tmp_path / "r.toml"
    if content is not None:
        req.write_text(content)
    result = runner.invoke(app, ["tune", "--requirements", str(req), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output
    assert fake_runs == [] and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- --state (real runs)
def _lifetime(state: Path, pid: int) -> PrivacyLedger:
    return PrivacyLedger.load(ledger_path(state / f"peer_{pid:03d}", pid))


def test_state_charges_one_lifetime_ledger_across_points(tmp_path: Path) -> None:
    """Two real points against one ledger per peer; a second sweep finds the budget spent."""
    state = tmp_path / "state"
    cfg = cfg_of(TINY)  # epsilon 2: each peer's lifetime budget
    res = tune_budgets(cfg, epsilons=[1, 2], out_dir=tmp_path / "s", state_dir=state, plot=False)
    status = {p["label"]: p["status"] for p in res["points"]}
    assert status == {"inf": "refused", "1": "done", "2": "done"}
    assert "cannot be charged to a lifetime ledger" in res["points"][0]["reason"]
    assert res["ledger_scope"]["mode"] == "lifetime" and res["ledger_scope"]["lifetime_budgets"]["0"] == 2.0
    one, two = res["points"][1], res["points"][2]
    assert one["run_id"] != two["run_id"]
    for pid in range(3):
        led = _lifetime(state, pid)
        runs = [e.run for e in led.entries]
        order = [one["run_id"], two["run_id"]]
        assert set(runs) == set(order) and runs == sorted(runs, key=order.index)  # point 1's entries, then 2's
        after = [e.epsilon_after for e in led.entries]
        assert after == sorted(after) and 0 < after[-1] <= 2.0 * (1 + 1e-9)
        # the second point planned after the first: cumulative spent, and only the rest of the budget its own
        v1, v2 = one["peers"][str(pid)], two["peers"][str(pid)]
        assert v1["epsilon_spent"] <= 1.0 + 1e-9 and v2["epsilon_spent"] == pytest.approx(led.spent_epsilon)
        assert v2["epsilon_point"] < v2["epsilon_spent"]
        row = res["sweep_privacy"]["peers"][str(pid)]
        assert row["sum_epsilon"] == pytest.approx(v1["epsilon_point"] + v2["epsilon_point"])
        assert row["lifetime_ledger_epsilon"] == pytest.approx(led.spent_epsilon)
    assert "charged to the peers' lifetime ledgers" in res["sweep_privacy"]["statement"]

    # a later sweep on the same data: the ledger already holds the budget; nothing runs, nothing is lowered
    spent = [_lifetime(state, pid).spent_epsilon for pid in range(3)]
    again = tune_budgets(cfg, epsilons=[2, 3], out_dir=tmp_path / "s2", state_dir=state, plot=False)
    by = {p["label"]: p for p in again["points"]}
    assert {k: p["status"] for k, p in by.items()} == {"inf": "refused", "2": "refused", "3": "refused"}
    assert "already holds epsilon" in by["2"]["reason"] and "lifetime budget is exhausted" in by["2"]["reason"]
    assert "above its lifetime budget 2" in by["3"]["reason"]
    assert [_lifetime(state, pid).spent_epsilon for pid in range(3)] == spent


def test_ledger_epsilon_is_recomputed_with_the_requirements_accountant(tmp_path: Path) -> None:
    from secure_dfml.privacy import Mechanism, compute_epsilon

    run_dir = tmp_path / "point"
    led = PrivacyLedger(peer_id=0, target_epsilon=None, delta=1e-5, accountant="rdp",
                        path=ledger_path(run_dir / "ledgers", 0))
    led.run_id = "r1"
    mech = Mechanism(1.1, 0.05, 200)
    led.record(round_index=0, phase="mutual", mechanism=mech)
    got = tune_mod._point_ledgers(run_dir, 1, state=None, before={}, finished=True, accountant="prv")["0"]
    assert got["epsilon"] == pytest.approx(led.spent_epsilon) and got["runs"] == ["r1"]
    assert got["ledger_accountant"] == "prv"
    assert got["ledger_epsilon"] == pytest.approx(compute_epsilon([mech], delta=1e-5, accountant="prv"))
    assert got["ledger_epsilon"] < led.spent_epsilon  # PRV is tighter than RDP here
