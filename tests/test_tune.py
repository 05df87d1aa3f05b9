"""`secure-dfml tune`: budget sweep points, the sweep itself and its CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import secure_dfml.orchestration.tune as tune_mod
from secure_dfml import config_from_dict
from secure_dfml.cli.tune import tune
from secure_dfml.config import PeerPrivacyConfig
from secure_dfml.errors import ConfigError, RunDirectoryError
from secure_dfml.orchestration.tune import (
    BudgetPoint,
    budget_point,
    parse_epsilons,
    render_tune_markdown,
    summarize_leakage,
    tune_budgets,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {
    "federation": {"peers": 4, "participants": 4, "rounds": 2, "seed": 0},
    "data": {"name": "digits", "auditor_pool": 200},
    "dfml": {"local_epochs": 1, "ml_epochs": 1},  # explicit: every peer spends budget in every round
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


def small_cfg(**privacy: Any):
    raw = json.loads(json.dumps(SMALL))
    raw["privacy"].update(privacy)
    return config_from_dict(raw)


# ----------------------------------------------------------------------------- parsing
def test_parse_epsilons_all_forms() -> None:
    pts = parse_epsilons("1, 2.5,inf,2/4/8,0=1/3=8,1e1,Infinity")
    assert [p.label for p in pts] == ["1", "2.5", "inf", "2/4/8", "0=1/3=8", "10", "inf"]
    assert [p.kind for p in pts] == ["uniform", "uniform", "non-private", "cycled", "per-peer", "uniform",
                                     "non-private"]
    assert pts[3].cycle == (2.0, 4.0, 8.0)
    assert pts[4].per_peer == {0: 1.0, 3: 8.0}
    assert not pts[2].private and pts[0].private
    assert len({p.slug for p in pts[:6]}) == 6


@pytest.mark.parametrize(
    ("text", "token"),
    [("1,abc,4", "abc"), ("0", "0"), ("-2", "-2"), ("nan", "nan"), ("2/inf", "inf"), ("1/0=2", "1/0=2"),
     ("x=2", "x=2"), ("1,,2", "empty point"), ("", "empty"), ("2//4", "2//4"), ("0=1/0=2", "listed twice")],
)
def test_parse_epsilons_errors_name_the_token(text: str, token: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_epsilons(text)
    msg = str(info.value)
    assert token in msg
    if "twice" not in token:
        assert "Accepted:" in msg and "2/4/8" in msg  # the accepted syntax is spelled out


def test_budget_point_from_python_values() -> None:
    assert budget_point(4).label == "4"
    assert budget_point(math.inf).private is False
    assert budget_point([2, 8]).cycle == (2.0, 8.0)
    assert budget_point({3: 1.0, 0: 2}).per_peer == {0: 2.0, 3: 1.0}
    assert budget_point("2/4").cycle == (2.0, 4.0)
    with pytest.raises(ConfigError):
        budget_point([2, math.inf])
    with pytest.raises(ConfigError):
        budget_point({-1: 2.0})
    with pytest.raises(ConfigError):
        budget_point("1,2")


def test_apply_uniform_cycled_explicit_and_non_private() -> None:
    cfg = small_cfg(
        noise_multiplier=1.3,
        peers={"1": {"epsilon": 0.5, "delta": 1e-6}, "2": {"max_grad_norm": 2.0}},
    )
    uni = BudgetPoint(epsilon=2.0).apply(cfg).privacy
    assert uni.enabled and uni.epsilon == 2.0 and uni.noise_multiplier is None
    # the per-peer epsilon override is dropped, its delta and clipping kept
    assert uni.peers["1"] == PeerPrivacyConfig(delta=1e-6)
    assert uni.peers["2"] == PeerPrivacyConfig(max_grad_norm=2.0)
    assert BudgetPoint(epsilon=2.0).targets(cfg) == {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0}

    cyc = BudgetPoint(cycle=(1.0, 8.0))
    assert cyc.targets(cfg) == {0: 1.0, 1: 8.0, 2: 1.0, 3: 8.0}
    assert cyc.apply(cfg).privacy.peers["1"].delta == 1e-6

    exp = BudgetPoint(per_peer={3: 8.0})
    assert exp.targets(cfg) == {0: 4.0, 1: 0.5, 2: 4.0, 3: 8.0}  # others keep their configured budget

    off = BudgetPoint(epsilon=math.inf).apply(cfg)
    assert off.privacy.enabled is False and off.federation == cfg.federation

    with pytest.raises(ConfigError, match="at most one value per peer"):
        BudgetPoint(cycle=(1, 2, 3, 4, 5)).apply(cfg)
    with pytest.raises(ConfigError, match="peers 0..3"):
        BudgetPoint(per_peer={7: 1.0}).apply(cfg)


def test_summarize_leakage_picks_the_strongest_attack_and_keeps_unsupported() -> None:
    def est(v, lo=None, hi=None, reason=None):
        return {"value": v, "ci_low": lo, "ci_high": hi, "reason": reason}

    unsupported = est(None, reason="FPR 0.001 is not supported by 42 non-members")
    results = {
        "status": "audited",
        "threat_model": {"name": "final-model"},
        "targets": [
            {"target": "0 final", "n_members": 100, "n_nonmembers": 42, "attacks": {
                "loss": {"metrics": {"auc": est(0.55, 0.5, 0.6), "tpr_at_fpr": {"0.001": unsupported}}},
                "rmia_offline": {"metrics": {"auc": est(0.61, 0.52, 0.7), "tpr_at_fpr": {"0.001": unsupported}}},
            }},
            {"target": "1 final", "n_members": 100, "n_nonmembers": 42, "attacks": {
                "loss": {"metrics": {"auc": est(0.51, 0.45, 0.58), "tpr_at_fpr": {"0.001": unsupported}}},
            }},
        ],
        "peers": {"0": {"empirical_epsilon_lower_bound": 0.2}, "1": {"empirical_epsilon_lower_bound": 0.0}},
    }
    s = summarize_leakage(results)
    assert s["worst"]["attack"] == "rmia_offline" and s["worst"]["target"] == "0 final"
    assert s["worst"]["auc"]["ci_low"] == 0.52
    assert s["tpr_at_fpr_status"] == "unsupported" and "not supported" in s["worst"]["tpr_at_fpr"]["reason"]
    assert s["attacks"]["loss"]["mean_auc"] == pytest.approx(0.53)
    assert s["empirical_epsilon_lower_bound_max"] == 0.2
    assert summarize_leakage({"status": "view_absent", "view_absent_reason": "x"})["status"] == "view_absent"


# ----------------------------------------------------------------------------- sweep with a stand-in trainer
def _fake_summary(cfg) -> dict[str, Any]:
    """A run summary shaped like run_federation's, without training."""
    peers = {}
    targets = {}
    if cfg.privacy.enabled:
        for i in range(cfg.federation.peers):
            o = cfg.privacy.peers.get(str(i))
            targets[i] = o.epsilon if o is not None and o.epsilon is not None else cfg.privacy.epsilon
    for i in range(cfg.federation.peers):
        entry: dict[str, Any] = {"arch": "mlp", "global_acc": 0.9 if not targets else 0.5 + 0.01 * targets[i],
                                 "local_acc": 0.8}
        if targets:
            entry.update({"epsilon_spent": 0.9 * targets[i], "epsilon_target": targets[i], "delta": 1e-5,
                          "status": "active", "noise_multiplier": 1.0 / targets[i]})
        peers[str(i)] = entry
    accs = [p["global_acc"] for p in peers.values()]
    return {"peers": peers, "mean_global_acc": sum(accs) / len(accs), "mean_local_acc": 0.8,
            "best_mean_global_acc": max(accs), "mean_peak_global_acc": None,
            "seconds_per_round": 2.0 if targets else 1.0, "compute_seconds_per_round": 1.5 if targets else 0.5,
            "wall_seconds": 4.0, "rounds": cfg.federation.rounds, "privacy_label": "x"}


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake(cfg, run_dir: Path, *, on_round, plot):
        calls.append(run_dir.name)
        if run_dir.name == "eps-3":
            raise RuntimeError("simulated crash in the middle of the sweep")
        run_dir.mkdir(parents=True, exist_ok=True)
        from secure_dfml.config import dump_toml

        (run_dir / "config.toml").write_text(dump_toml(cfg))
        summary = _fake_summary(cfg)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        on_round({"round": 0, "mean_global_acc": summary["mean_global_acc"], "peers": {}})
        return summary

    monkeypatch.setattr(tune_mod, "run_federation_for_tune", fake)
    return calls


def test_failed_point_keeps_the_others_and_resume_reuses_them(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = small_cfg()
    out = tmp_path / "sweep"
    events: list[str] = []
    res = tune_budgets(cfg, epsilons=[2, 3, [1, 8]], out_dir=out, progress=lambda e: events.append(e.kind), plot=False)
    assert fake_runs == ["eps-inf", "eps-2", "eps-3", "eps-1_8"]
    assert res["baseline_added"] is True and any("baseline" in n for n in res["notes"])
    status = {p["label"]: p["status"] for p in res["points"]}
    assert status == {"inf": "done", "2": "done", "3": "failed", "1/8": "done"}
    failed = next(p for p in res["points"] if p["label"] == "3")
    assert "simulated crash" in failed["error"]
    on_disk = json.loads((out / "tune.json").read_text())
    assert [p["status"] for p in on_disk["points"]] == ["done", "done", "failed", "done"]
    assert "FAILED" in (out / "tune.md").read_text()
    assert events.count("point_start") == 4 and events.count("point_end") == 4 and "round" in events
    # accuracy cost and overhead against the baseline
    two = next(p for p in res["points"] if p["label"] == "2")
    assert two["accuracy_cost"] == pytest.approx(0.9 - 0.52)
    assert two["accuracy_cost_last5"] == pytest.approx(0.9 - 0.52)  # the fake runs have one round
    assert two["overhead"]["seconds_per_round"] == pytest.approx(2.0)
    assert two["within_budget"] and two["budgets_honoured"]

    # a second sweep into the same folder is refused ...
    with pytest.raises(RunDirectoryError, match="--resume"):
        tune_budgets(cfg, epsilons=[2], out_dir=out, plot=False)
    # ... resumed: finished points with an identical config are reused, the failed one reruns
    fake_runs.clear()
    res2 = tune_budgets(cfg, epsilons=[2, 3, [1, 8]], out_dir=out, resume=True, plot=False)
    assert fake_runs == ["eps-3"]
    assert [p.get("resumed", False) for p in res2["points"]] == [True, True, False, True]
    # ... or replaced
    fake_runs.clear()
    tune_budgets(cfg, epsilons=[2], out_dir=out, overwrite=True, plot=False)
    assert fake_runs == ["eps-inf", "eps-2"] and not (out / "points" / "eps-1_8").exists()


def test_resume_adds_the_leakage_axis_without_retraining(
    tmp_path: Path, fake_runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    audited: list[str] = []

    def fake_audit(run_dir, *, threat_model, attacks, reference_models, rng, progress=None, peers=None):
        assert threat_model == "final-model" and reference_models == 1
        audited.append(Path(run_dir).name)
        est = {"value": 0.6, "ci_low": 0.55, "ci_high": 0.65, "reason": None}
        return {"status": "audited", "output_dir": str(Path(run_dir) / "audit" / "final-model"),
                "targets": [{"target": "0 final", "attacks": {a: {"metrics": {"auc": est, "tpr_at_fpr": {
                    "0.001": {"value": 0.01, "ci_low": 0.0, "ci_high": 0.03, "reason": None}}}} for a in attacks}}],
                "peers": {}}

    monkeypatch.setattr(tune_mod, "audit_run_dir", fake_audit)
    out = tmp_path / "s"
    tune_budgets(small_cfg(), epsilons=[2], out_dir=out, plot=False)
    fake_runs.clear()
    res = tune_budgets(small_cfg(), epsilons=[2], out_dir=out, resume=True, audit=True, reference_models=1,
                       audit_attacks=("loss", "rmia"), plot=False)
    assert fake_runs == [] and audited == ["eps-inf", "eps-2"]
    for p in res["points"]:
        assert p["resumed"] and p["leakage"]["worst"]["auc"]["value"] == 0.6
        assert p["leakage"]["tpr_at_fpr_status"] == "estimated"
    assert res["audit"]["attacks"] == ["loss", "rmia_offline"]
    assert "0.600 [0.550, 0.650]" in (out / "tune.md").read_text()


def test_budget_errors_are_raised_before_anything_trains(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = small_cfg(delta=0.5)  # delta >= 1/n for every peer
    with pytest.raises(Exception, match="sweep point 2: .*delta"):
        tune_budgets(cfg, epsilons=[2], out_dir=tmp_path / "s", plot=False)
    assert fake_runs == []
    with pytest.raises(ConfigError, match="peers 0..3"):
        tune_budgets(small_cfg(), epsilons=[{9: 1.0}], out_dir=tmp_path / "s2", plot=False)
    assert fake_runs == []


def test_markdown_is_one_table_with_every_point(tmp_path: Path, fake_runs: list[str]) -> None:
    res = tune_budgets(small_cfg(), epsilons=["inf", 2, "0=1"], out_dir=tmp_path / "s", plot=True)
    assert res["baseline_added"] is False
    md = render_tune_markdown(res)
    header = [line for line in md.splitlines() if line.startswith("| epsilon |")]
    assert len(header) == 2  # the sweep table and the per-peer detail
    assert "| inf (non-private) |" in md and "| 2 |" in md and "| 0=1 |" in md
    assert (tmp_path / "s" / "tune.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- real sweep (digits)
@pytest.mark.slow
def test_real_sweep_on_digits(tmp_path: Path) -> None:
    """One real sweep (baseline + 2 DP points, with the leakage axis), checked from several sides.
    A single test so that pytest-xdist runs the sweep once."""
    out = tmp_path / "sweep"
    res = tune_budgets(small_cfg(), epsilons=[8, "2/6"], out_dir=out, audit=True, audit_attacks=("loss", "rmia"),
                       reference_models=1)
    _check_files(out, res)
    _check_baseline(res)
    _check_budgets(out, res)
    _check_leakage(out, res)


def _check_files(out: Path, res: dict[str, Any]) -> None:
    for name in ("tune.json", "tune.md", "tune.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "tune.json").read_text())["points"][0]["label"] == "inf"
    for p in res["points"]:
        assert p["status"] == "done", p
        assert (out / p["run_dir"] / "summary.json").is_file()
        assert 0.0 <= p["mean_global_acc"] <= 1.0
        assert p["overhead"]["seconds_per_round"] > 0


def _check_baseline(res: dict[str, Any]) -> None:
    base = res["points"][0]
    assert res["baseline_added"] and base["private"] is False and base["label"] == "inf"
    assert all("epsilon_spent" not in p for p in base["peers"].values())
    assert base["overhead"]["seconds_per_round"] == pytest.approx(1.0)


def _check_budgets(out: Path, res: dict[str, Any]) -> None:
    """epsilon spent <= target for every DP point and peer; per-peer budgets honoured."""
    from secure_dfml.privacy import PrivacyLedger, ledger_path

    dp = [p for p in res["points"] if p["private"]]
    assert [p["label"] for p in dp] == ["8", "2/6"]
    for p in dp:
        assert p["within_budget"] and p["budgets_honoured"]
        for pid, v in p["peers"].items():
            assert 0 < v["epsilon_spent"] <= v["epsilon_target"]
            # the ledger on disk agrees and is reproducible from the file alone
            led = PrivacyLedger.load(ledger_path(out / p["run_dir"] / "ledgers", int(pid)))
            assert led.spent_epsilon == pytest.approx(v["epsilon_spent"]) and led.target_epsilon == v["epsilon_target"]
    per_peer = dp[1]["peers"]
    assert [per_peer[str(i)]["epsilon_target"] for i in range(4)] == [2.0, 6.0, 2.0, 6.0]
    assert [per_peer[str(i)]["epsilon_requested"] for i in range(4)] == [2.0, 6.0, 2.0, 6.0]
    # the peer with the smaller budget trains with more noise
    assert per_peer["0"]["noise_multiplier"] > per_peer["1"]["noise_multiplier"]
    assert per_peer["2"]["noise_multiplier"] > per_peer["3"]["noise_multiplier"]


def _check_leakage(out: Path, res: dict[str, Any]) -> None:
    for p in res["points"]:
        lk = p["leakage"]
        assert lk["status"] == "audited", lk
        assert (out / lk["results"]).is_file()
        w = lk["worst"]
        assert 0.0 <= w["auc"]["value"] <= 1.0 and w["auc"]["ci_low"] <= w["auc"]["value"] <= w["auc"]["ci_high"]
        # digits holdouts have far fewer than 1,000 non-members: TPR at 0.1% FPR cannot be estimated
        assert lk["tpr_at_fpr_status"] == "unsupported" and "not supported" in w["tpr_at_fpr"]["reason"]
    md = (out / "tune.md").read_text()
    assert "attack AUC (worst)" in md and "unsupported" in md


# ----------------------------------------------------------------------------- CLI
app = typer.Typer()
app.command("tune")(tune)


@app.command("noop")
def _noop() -> None:  # a second command keeps `tune` a sub-command, as in the real CLI
    pass


runner = CliRunner()


def test_cli_bad_epsilon_list_names_the_token(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tune", "--epsilons", "1,two,inf", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "'two'" in result.output and "2/4/8" in result.output
    assert not (tmp_path / "s").exists()


def test_cli_json_and_table(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_TOML)
    result = runner.invoke(
        app, ["tune", "-c", str(cfg), "--epsilons", "2,1/8", "--out", str(tmp_path / "j"), "--rounds", "3",
              "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["label"] for p in data["points"]] == ["inf", "2", "1/8"]
    assert data["rounds"] == 3 and data["baseline_added"] is True

    result = runner.invoke(app, ["tune", "-c", str(cfg), "--epsilons", "2,3", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1  # point 3 fails in the stand-in trainer
    assert "Budget sweep" in result.output and "failed" in result.output and "tune.json" in result.output
    assert json.loads((tmp_path / "t" / "tune.json").read_text())["points"][1]["status"] == "done"


def test_cli_existing_sweep_needs_resume_or_overwrite(tmp_path: Path, fake_runs: list[str]) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_TOML)
    args = ["tune", "-c", str(cfg), "--epsilons", "2", "--out", str(tmp_path / "s"), "--format", "json"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0
