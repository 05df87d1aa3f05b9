"""Attacks as pure functions over arrays, and the registry."""

from __future__ import annotations

import numpy as np
import pytest

from secure_dfml.audit import (
    ATTACKS,
    AttackInputs,
    Signals,
    auc,
    get_attack,
    lira_offline,
    lira_online,
    loss_attack,
    membership_design,
    population_attack,
    rmia,
    run_attacks,
    tune_rmia_offline_a,
)
from secure_dfml.errors import AuditError


def _synthetic_phi(rng: np.random.Generator, n: int = 400, k: int = 8, shift: float = 1.0):
    """Per-sample difficulty d_i; a model that trained on i has phi ~ d_i + shift."""
    d = rng.normal(0.0, 3.0, size=n)
    members = rng.random(n) < 0.5
    in_mask = membership_design(k, n, rng)
    ref = d[None, :] + shift * in_mask + rng.normal(0, 0.5, size=(k, n))
    target = d + shift * members + rng.normal(0, 0.5, size=n)
    return target, ref, in_mask, members


def test_registry_is_declarative() -> None:
    assert set(ATTACKS) == {"loss", "population", "lira_offline", "lira_online", "rmia_offline", "rmia_online"}
    assert ATTACKS["lira_online"].online and ATTACKS["rmia_online"].online
    assert not ATTACKS["rmia_offline"].online and ATTACKS["rmia_offline"].needs_population
    assert ATTACKS["loss"].reference == "none"
    with pytest.raises(AuditError, match="available"):
        get_attack("nope")


def test_loss_and_population_rank_alike() -> None:
    rng = np.random.default_rng(1)
    loss = rng.exponential(size=200)
    pop = rng.exponential(size=300)
    a = loss_attack(loss)
    b = population_attack(loss, pop)
    assert np.all(np.argsort(a, kind="stable") == np.argsort(b, kind="stable"))
    # score ~ fraction of population losses at or above the target loss
    assert np.floor(population_attack([0.0], pop)[0] * 301) == 300
    assert np.floor(population_attack([1e9], pop)[0] * 301) == 0


def test_lira_beats_loss_when_difficulty_varies() -> None:
    rng = np.random.default_rng(2)
    target, ref, in_mask, members = _synthetic_phi(rng)
    a_loss = auc(target, members)  # phi as a global threshold: hurt by per-sample difficulty
    a_on = auc(lira_online(target, ref, in_mask), members)
    a_off = auc(lira_offline(target, ref, in_mask), members)
    assert a_on > 0.8 and a_off > 0.8
    assert a_on > a_loss + 0.1


def test_lira_needs_in_and_out_models() -> None:
    with pytest.raises(AuditError, match="IN"):
        lira_online(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3), bool))
    with pytest.raises(AuditError, match="OUT"):
        lira_offline(np.zeros(3), np.zeros((2, 3)), np.ones((2, 3), bool))


def test_lira_with_two_models_uses_global_spread() -> None:
    rng = np.random.default_rng(3)
    target, ref, in_mask, members = _synthetic_phi(rng, k=2)
    sc = lira_online(target, ref, in_mask)
    assert np.all(np.isfinite(sc)) and auc(sc, members) > 0.6


def _synthetic_probs(rng, n=400, m=300, k=4, lift=0.25, online=True):
    base_x = rng.uniform(0.05, 0.7, size=n)
    base_z = rng.uniform(0.05, 0.7, size=m)
    members = rng.random(n) < 0.5
    mask_all = membership_design(k, n + m, rng) if online else np.zeros((k, n + m), bool)
    base = np.concatenate([base_x, base_z])
    ref = np.clip(base[None, :] + lift * mask_all + rng.normal(0, 0.03, size=(k, n + m)), 1e-6, 1.0)
    tx = np.clip(base_x + lift * members + rng.normal(0, 0.03, size=n), 1e-6, 1.0)
    tz = np.clip(base_z + rng.normal(0, 0.03, size=m), 1e-6, 1.0)
    return tx, ref[:, :n], tz, ref[:, n:], mask_all[:, :n], mask_all[:, n:], members


def test_rmia_online_and_offline_detect_members() -> None:
    rng = np.random.default_rng(4)
    tx, rx, tz, rz, mx, mz, members = _synthetic_probs(rng)
    on = rmia(tx, rx, tz, rz, in_mask=mx, in_mask_pop=mz)
    off = rmia(tx, rx, tz, rz, in_mask=mx, in_mask_pop=mz, offline_a=0.5)
    assert auc(on, members) > 0.85
    assert auc(off, members) > 0.75
    assert np.all((on >= 0) & (on < 1))


def test_rmia_score_is_fraction_of_dominated_population() -> None:
    # one reference model, offline with a=1 -> p(x) = p_out(x)
    tx = np.array([0.9, 0.1])
    rx = np.array([[0.3, 0.3]])
    tz = np.array([0.3, 0.6, 0.9])
    rz = np.array([[0.3, 0.3, 0.3]])  # LR_z = 1, 2, 3
    sc = rmia(tx, rx, tz, rz, offline_a=1.0, gamma=1.0)  # LR_x = 3 and 1/3
    assert np.floor(sc * 4).tolist() == [3.0, 0.0]
    sc2 = rmia(tx, rx, tz, rz, offline_a=1.0, gamma=2.0)  # LR_x / LR_z >= 2 only for z with LR_z <= 1.5
    assert np.floor(sc2 * 4).tolist() == [1.0, 0.0]


def test_rmia_tie_break_keeps_primary_order() -> None:
    rng = np.random.default_rng(5)
    tx = rng.uniform(0.01, 1, 100)
    rx = rng.uniform(0.01, 1, (3, 100))
    tz = rng.uniform(0.01, 1, 7)
    rz = rng.uniform(0.01, 1, (3, 7))
    sc = rmia(tx, rx, tz, rz, offline_a=0.3)
    frac = np.floor(sc * 8)
    assert np.all(np.diff(frac[np.argsort(sc)]) >= 0)


def test_tune_a_prefers_matching_value() -> None:
    rng = np.random.default_rng(6)
    k, n, m = 4, 600, 200
    base = rng.uniform(0.05, 0.6, size=n)
    mask = np.stack([rng.random(n) < 0.5 for _ in range(k)])
    # IN probability is a linear function of OUT probability: p_in = a p_out + (1 - a) with a = 0.4
    p_in = 0.4 * base + 0.6
    ref = np.where(mask, p_in[None, :], base[None, :]) + rng.normal(0, 0.01, size=(k, n))
    rz = rng.uniform(0.05, 0.6, size=(1, m)).repeat(k, 0) + rng.normal(0, 0.01, size=(k, m))
    a = tune_rmia_offline_a(np.clip(ref, 1e-6, 1), mask, np.clip(rz, 1e-6, 1))
    assert a is not None and 0.0 <= a <= 1.0
    assert tune_rmia_offline_a(ref[:1], mask[:1], rz[:1]) is None


def test_run_attacks_via_registry() -> None:
    rng = np.random.default_rng(7)
    n, k = 200, 4
    members = rng.random(n) < 0.5
    logits = rng.normal(size=(n, 3))
    labels = rng.integers(0, 3, n)
    logits[np.arange(n), labels] += 2.0 * members
    pop = Signals(rng.normal(size=(150, 3)), rng.integers(0, 3, 150))
    refs = [Signals(rng.normal(size=(n, 3)), labels) for _ in range(k)]
    refs_z = [Signals(pop.logits + rng.normal(0, 0.1, size=(150, 3)), pop.labels) for _ in range(k)]
    inputs = AttackInputs(
        target=Signals(logits, labels), population=pop, ref_targets=refs, ref_population=refs_z,
        in_mask_targets=np.zeros((k, n), bool), in_mask_population=np.zeros((k, 150), bool),
    )
    out = run_attacks(inputs, members, attacks=["loss", "population", "lira_offline", "rmia_offline"],
                      rng=rng, n_bootstrap=50)
    assert out["loss"].metrics.auc.value > 0.7
    assert out["rmia_offline"].details["a_tuned"] is False  # no tuning data given -> documented default
    with pytest.raises(AuditError, match="IN"):
        run_attacks(inputs, members, attacks=["lira_online"], rng=rng, n_bootstrap=10)
