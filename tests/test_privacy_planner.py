"""Budget resolution, validation messages and the planner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from secure_dfml._run import run_federation
from secure_dfml.config import PeerPrivacyConfig, PrivacyConfig, RunConfig, config_from_dict
from secure_dfml.privacy import (
    Mechanism,
    PrivacyLedger,
    PrivacyValidationError,
    compute_epsilon,
    default_delta,
    expected_participation,
    plan_budgets,
    resolve_budget,
)
from secure_dfml.protocol.strategies import public_schedule


def run_cfg(**privacy: object) -> RunConfig:
    return config_from_dict(
        {
            "federation": {"peers": 4, "participants": 4, "groups": 1, "rounds": 8},
            "dfml": {"batch_size": 32, "local_epochs": 1, "ml_epochs": 2},
            "privacy": {"enabled": True, **privacy},
        }
    )


def test_default_delta() -> None:
    assert default_delta(500) == 1e-5
    assert default_delta(50_000) == pytest.approx(2e-6)


def test_resolve_uses_overrides_field_by_field() -> None:
    privacy = PrivacyConfig(
        enabled=True, epsilon=8.0, peers={"1": PeerPrivacyConfig(epsilon=2.0, max_grad_norm=0.5)}
    )
    b0 = resolve_budget(privacy, 0, 400)
    b1 = resolve_budget(privacy, 1, 400)
    assert (b0.epsilon, b0.max_grad_norm, b0.delta, b0.delta_is_default) == (8.0, 1.0, 1e-5, True)
    assert (b1.epsilon, b1.max_grad_norm) == (2.0, 0.5)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_epsilon_must_be_positive(eps: float) -> None:
    with pytest.raises(PrivacyValidationError, match="epsilon must be > 0"):
        resolve_budget(PrivacyConfig(enabled=True, epsilon=eps), 0, 400)


def test_infinite_epsilon_is_refused() -> None:
    with pytest.raises(PrivacyValidationError, match="enabled = false"):
        resolve_budget(PrivacyConfig(enabled=True, epsilon=float("inf")), 0, 400)


def test_delta_must_be_well_below_one_over_n() -> None:
    with pytest.raises(PrivacyValidationError, match=r"well below 1/100.*publish a whole record"):
        resolve_budget(PrivacyConfig(enabled=True, delta=0.01), 0, 100)
    with pytest.raises(PrivacyValidationError, match=r"privacy\.peers\.3\.delta"):
        resolve_budget(PrivacyConfig(enabled=True, peers={"3": PeerPrivacyConfig(delta=0.05)}), 3, 100)


@pytest.mark.parametrize("clip", [0.0, -1.0, None])
def test_max_grad_norm_must_be_positive(clip: float | None) -> None:
    with pytest.raises(PrivacyValidationError, match="max_grad_norm"):
        resolve_budget(PrivacyConfig(enabled=True, max_grad_norm=clip), 0, 400)


def test_epsilon_or_noise_required() -> None:
    with pytest.raises(PrivacyValidationError, match="noise_multiplier"):
        resolve_budget(PrivacyConfig(enabled=True, epsilon=None), 0, 400)
    b = resolve_budget(PrivacyConfig(enabled=True, epsilon=None, noise_multiplier=1.2), 0, 400)
    assert b.epsilon is None and not b.capped


def test_expected_participation() -> None:
    cfg = config_from_dict({"federation": {"peers": 10, "participants": 5, "groups": 1}})
    part = expected_participation(cfg)
    assert (part.probability, part.aggregator_share) == (0.5, 0.2)
    cfg2 = cfg.replace(privacy={"expected_participation": 0.8})
    assert expected_participation(cfg2).probability == 0.8


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_planner_spends_target_by_last_round_of_expected_schedule(accountant: str) -> None:
    # peers = participants = 4, one group: every peer takes part every round and
    # aggregates with probability 1/4 -> 6 local phases (1 epoch) + 2 mutual phases (2 epochs).
    cfg = run_cfg(epsilon=3.0, accountant=accountant, plan_on="expected", class_prior="uniform")
    sizes = [320, 400, 640, 1000]
    plans = plan_budgets(cfg, sizes)
    for plan, n in zip(plans, sizes, strict=True):
        assert plan.noise_source == "planned"
        k = plan.steps_per_epoch
        assert plan.expected_steps == 6 * 1 * k + 2 * 2 * k
        ledger = PrivacyLedger(peer_id=plan.peer_id, target_epsilon=3.0, delta=plan.delta, accountant=accountant)
        sigma = plan.noise_multiplier
        assert sigma is not None
        for r in range(8):
            phase, epochs = ("mutual", 2) if r in (2, 6) else ("local", 1)
            ledger.record(round_index=r, phase=phase, mechanism=Mechanism(sigma, plan.sample_rate, epochs * k))
        assert 3.0 * 0.99 <= ledger.spent_epsilon <= 3.0
        assert plan.planned_epsilon == pytest.approx(ledger.spent_epsilon, rel=1e-9)
        assert plan.epsilon_first_round < plan.planned_epsilon
        assert plan.delta == default_delta(n)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_planner_reserves_the_dp_class_prior(epsilon: float) -> None:
    plans = plan_budgets(run_cfg(epsilon=epsilon, class_prior="dp"), [500])
    plan = plans[0]
    assert plan.prior_noise_multiplier is not None
    # classic Gaussian calibration for 10% of epsilon
    assert plan.prior_noise_multiplier == pytest.approx((2 * math.log(1.25 / plan.delta)) ** 0.5 / (0.1 * epsilon))
    prior = Mechanism(plan.prior_noise_multiplier, 1.0, 1)
    total = compute_epsilon([prior, Mechanism(plan.noise_multiplier, plan.sample_rate, plan.expected_steps)], delta=plan.delta)
    assert epsilon * 0.99 <= total <= epsilon  # composed with DP-SGD, the whole budget is spent exactly


def test_explicit_noise_multiplier_and_per_peer_budgets() -> None:
    cfg = run_cfg(
        epsilon=8.0, peers={"0": {"noise_multiplier": 3.0}, "1": {"epsilon": 1.0}}
    )
    plans = plan_budgets(cfg, [400, 400, 400])
    assert plans[0].noise_source == "explicit" and plans[0].noise_multiplier == 3.0
    assert plans[1].noise_multiplier > plans[2].noise_multiplier  # smaller budget, more noise
    assert plans[1].planned_epsilon <= 1.0 and plans[2].planned_epsilon <= 8.0


def test_overrides_for_unknown_peers_are_refused() -> None:
    with pytest.raises(PrivacyValidationError, match="peer"):
        plan_budgets(run_cfg(peers={"7": {"epsilon": 1.0}}), [400, 400, 400, 400])


def test_no_training_steps_means_no_noise() -> None:
    cfg = run_cfg().replace(dfml={"local_epochs": 0, "ml_epochs": 0})
    plan = plan_budgets(cfg, [400])[0]
    assert plan.noise_multiplier is None and plan.planned_epsilon == 0.0


def test_schedule_plan_counts_each_peers_public_phases() -> None:
    cfg = config_from_dict(
        {
            "federation": {"peers": 7, "participants": 4, "groups": 2, "rounds": 9},
            "dfml": {"batch_size": 32, "local_epochs": 1, "ml_epochs": 2},
            "privacy": {"enabled": True, "epsilon": 4.0},
        }
    )
    sizes = [400] * 7
    plans = plan_budgets(cfg, sizes)
    schedule = public_schedule(cfg, 7)
    assert schedule == public_schedule(cfg, 7)  # a pure function of public values
    for plan in plans:
        mine = [(ph, ep) for rnd in schedule for (peer, ph, ep) in rnd if peer == plan.peer_id]
        assert plan.plan_on == "schedule"
        assert plan.expected_local_phases == sum(ph == "local" for ph, _ in mine)
        assert plan.expected_mutual_phases == sum(ph == "mutual" for ph, _ in mine)
        assert plan.expected_steps == sum(ep for _, ep in mine) * plan.steps_per_epoch
        if mine:
            assert plan.noise_source == "planned" and plan.planned_epsilon == pytest.approx(4.0, rel=0.02)
        else:
            assert plan.noise_source == "none"
    # peers that read their data more often need more noise per step
    by_steps = sorted((p.expected_steps, p.noise_multiplier) for p in plans if p.noise_multiplier is not None)
    assert all(a[1] <= b[1] + 1e-9 for a, b in zip(by_steps, by_steps[1:], strict=False))
    assert len({p.expected_steps for p in plans}) > 1  # the schedule is not uniform: this is what it buys


def test_schedule_plan_spends_each_budget_without_refusals_in_a_run(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "federation": {"peers": 5, "participants": 4, "groups": 2, "rounds": 5},
            "data": {"name": "digits", "auditor_pool": 100},
            "models": {"mix": ["mlp", "cnn-small"]},
            "dfml": {"ml_epochs": 1, "local_epochs": 1, "batch_size": 64},
            "privacy": {"enabled": True, "epsilon": 2.0},
        }
    )
    summary = run_federation(cfg, tmp_path / "run", plot=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phases = [ph for r in records for ph in r["phases"]]
    assert phases and all(ph["ran"] for ph in phases)  # nobody hits the gate
    readers = {ph["peer"] for ph in phases}
    for pid, entry in summary["peers"].items():
        if int(pid) in readers:
            assert 2.0 * 0.98 <= entry["epsilon_spent"] <= 2.0  # spent exactly by its last phase
        else:
            assert entry["epsilon_spent"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, mix",
    [("dfml", ["mlp", "cnn-small"]), ("def-kt", ["mlp", "cnn-small"]), ("local", ["mlp"]), ("gossip-avg", ["mlp"])],
)
def test_public_schedule_is_exactly_what_the_engine_runs(tmp_path: Path, algorithm: str, mix: list[str]) -> None:
    cfg = config_from_dict(
        {
            "federation": {"peers": 5, "participants": 4, "groups": 2, "rounds": 3, "algorithm": algorithm},
            "data": {"name": "digits", "auditor_pool": 100},
            "models": {"mix": mix},
            "dfml": {"ml_epochs": 1, "local_epochs": 1, "batch_size": 128},
            "privacy": {"enabled": True, "epsilon": 4.0, "class_prior": "uniform"},
        }
    )
    run_federation(cfg, tmp_path / "run", plot=False)
    ran = sorted(
        (e["round"], int(path.stem.split("_")[1]), e["phase"])
        for path in (tmp_path / "run" / "ledgers").glob("peer_*.json")
        for e in json.loads(path.read_text())["entries"]
    )
    planned = sorted((t, peer, phase) for t, rnd in enumerate(public_schedule(cfg, 5)) for peer, phase, _ in rnd)
    assert ran == planned
