"""Empirical epsilon lower bounds: one-run canary audit and Clopper-Pearson."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special, stats

from secure_dfml.audit import (
    clopper_pearson,
    clopper_pearson_epsilon_lower_bound,
    compare_with_ledger,
    epsilon_lower_bound_from_scores,
    evaluate_attack,
    dp_consistency_violations,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from secure_dfml.errors import AuditError


@pytest.mark.parametrize("r", [1, 5, 10, 50, 100, 1000])
def test_all_correct_guesses_reproduce_closed_form(r: int) -> None:
    # delta = 0, v = r: P[V >= r] = q^r <= beta  <=>  eps <= logit(beta^(1/r))
    q = 0.05 ** (1.0 / r)
    expected = max(math.log(q / (1.0 - q)), 0.0)  # r = 1: logit(0.05) < 0, nothing rejected
    got = one_run_epsilon_lower_bound(10 * r, r, r, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-6)


def test_known_values() -> None:
    # 100 correct guesses at 95%: logit(0.05^(1/100)) = 3.4929...
    assert one_run_epsilon_lower_bound(1000, 100, 100) == pytest.approx(3.49297, abs=1e-4)
    # 1000 correct guesses at 95%: logit(0.05^(1/1000)) = 5.8091...
    assert one_run_epsilon_lower_bound(1000, 1000, 1000) == pytest.approx(5.80907, abs=1e-4)
    # a guess record consistent with chance rejects nothing: P[Bin(10, 1/2) >= 7] = 0.17 > 0.05
    assert one_run_epsilon_lower_bound(100, 10, 7) == 0.0
    assert one_run_epsilon_lower_bound(100, 0, 0) == 0.0


def test_bound_is_the_root_of_the_binomial_tail() -> None:
    m, r, v = 5000, 400, 330
    got = one_run_epsilon_lower_bound(m, r, v, confidence=0.95)
    ref = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, special.expit(e)) - 0.05, 0.0, 20.0)
    assert got == pytest.approx(ref, abs=1e-6)
    assert one_run_p_value(m, r, v, got) == pytest.approx(0.05, abs=1e-6)


def test_delta_weakens_the_bound() -> None:
    m, r, v = 1000, 200, 180
    e0 = one_run_epsilon_lower_bound(m, r, v)
    e1 = one_run_epsilon_lower_bound(m, r, v, delta=1e-6)
    e2 = one_run_epsilon_lower_bound(m, r, v, delta=1e-4)
    assert e0 >= e1 >= e2 >= 0.0
    assert one_run_p_value(m, r, v, 1.0, delta=1e-5) >= one_run_p_value(m, r, v, 1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_monotone_in_correct_guesses_and_confidence(r: int, data: st.DataObject) -> None:
    v = data.draw(st.integers(0, r))
    m = r + data.draw(st.integers(0, 100))
    base = one_run_epsilon_lower_bound(m, r, v)
    if v < r:
        assert one_run_epsilon_lower_bound(m, r, v + 1) >= base - 1e-9
    assert one_run_epsilon_lower_bound(m, r, v, confidence=0.99) <= base + 1e-9
    assert one_run_epsilon_lower_bound(m, r, v, confidence=0.8) >= base - 1e-9


def test_one_run_audit_from_canary_scores() -> None:
    rng = np.random.default_rng(0)
    m = 1000
    included = rng.random(m) < 0.5
    perfect = included.astype(float) + rng.uniform(0, 0.1, m)
    res = one_run_audit(perfect, included, k_pos=100)
    assert res.r == 100 and res.v == 100
    assert res.epsilon_lower_bound == pytest.approx(one_run_epsilon_lower_bound(m, 100, 100))
    # sweeping several k pays a Bonferroni price
    swept = one_run_audit(perfect, included, k_pos=[100, 200], k_neg=[0])
    assert swept.configurations_tried == 2
    assert swept.epsilon_lower_bound >= one_run_epsilon_lower_bound(m, 100, 100, confidence=0.975) - 1e-9
    noise = one_run_audit(rng.normal(size=m), included, k_pos=[50, 100], k_neg=[0, 50])
    assert noise.epsilon_lower_bound < 0.7
    with pytest.raises(AuditError):
        one_run_audit(perfect, included, k_pos=0, k_neg=0)


def test_clopper_pearson_known_values() -> None:
    lo, hi = clopper_pearson(0, 10, confidence=0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))  # 0.3085
    lo, hi = clopper_pearson(10, 10, confidence=0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)


def test_clopper_pearson_epsilon() -> None:
    # TPR 0.5 at FPR 0 with many trials: eps_lb = log(TPR_lo / FPR_hi)
    b = clopper_pearson_epsilon_lower_bound(500, 1000, 0, 1000, confidence=0.95)
    t_lo, _ = clopper_pearson(500, 1000, confidence=0.975)
    _, f_hi = clopper_pearson(0, 1000, confidence=0.975)
    assert b.epsilon_lower_bound == pytest.approx(max(math.log(t_lo / f_hi), 0.0))
    assert b.epsilon_lower_bound > 4.0
    # delta is subtracted from the TPR lower end
    assert clopper_pearson_epsilon_lower_bound(500, 1000, 0, 1000, delta=0.1).epsilon_lower_bound < b.epsilon_lower_bound
    # no separation, no bound
    assert clopper_pearson_epsilon_lower_bound(100, 1000, 100, 1000).epsilon_lower_bound == 0.0


def test_threshold_chosen_on_calibration_split() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(4000) < 0.5
    strong = rng.normal(size=4000) + 4.0 * labels
    weak = rng.normal(size=4000)
    b_strong = epsilon_lower_bound_from_scores(strong, labels, rng=rng)
    b_weak = epsilon_lower_bound_from_scores(weak, labels, rng=rng)
    assert b_strong.epsilon_lower_bound > 2.0 and b_strong.threshold is not None
    assert b_weak.epsilon_lower_bound < 0.5


def test_compare_with_ledger_flags_fail_only_above() -> None:
    bad = compare_with_ledger(2.5, 1.0)
    assert bad.status == "FAIL" and bad.failed
    ok = compare_with_ledger(0.4, 1.0)
    assert ok.status == "CONSISTENT" and not ok.failed
    assert "does not prove" in ok.message
    with pytest.raises(AuditError):
        compare_with_ledger(-1.0, 1.0)


def test_dp_consistency_check() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(3000) < 0.5
    strong = evaluate_attack(rng.normal(size=3000) + 5.0 * labels, labels, rng=rng, n_bootstrap=100)
    assert dp_consistency_violations(strong, epsilon=1.0, delta=1e-5)  # TPR@1% ~ 0.95 >> e * 0.01
    assert not dp_consistency_violations(strong, epsilon=10.0, delta=1e-5)
