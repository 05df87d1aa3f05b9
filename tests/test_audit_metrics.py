"""Metrics: ROC, AUC, TPR at low FPR, bootstrap intervals, unsupported FPR levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from secure_dfml.audit import (
    Estimate,
    auc,
    evaluate_attack,
    roc_curve,
    tpr_at_fpr,
    unsupported_fpr_reason,
)
from secure_dfml.errors import AuditError


def test_perfect_separation_gives_auc_one() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(2, 3, 500), rng.uniform(0, 1, 2000)])
    labels = np.concatenate([np.ones(500, bool), np.zeros(2000, bool)])
    m = evaluate_attack(scores, labels, rng=rng, n_bootstrap=100)
    assert m.auc.value == 1.0 and m.auc.ci_low == 1.0
    assert m.tpr_at_fpr[0.001].value == 1.0
    assert m.tpr_at_fpr[0.01].value == 1.0
    assert m.balanced_accuracy.value == 1.0 and m.advantage.value == 1.0


def test_identical_distributions_cover_chance() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=2000)
    labels = rng.random(2000) < 0.5
    m = evaluate_attack(scores, labels, rng=rng, n_bootstrap=400)
    assert m.auc.covers(0.5)
    assert abs(m.auc.value - 0.5) < 0.05
    assert m.advantage.ci_low >= 0.0


def test_unsupported_fpr_level_is_none_with_reason() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=700)
    labels = np.arange(700) < 200  # 500 non-members: 0.1% needs 1000
    m = evaluate_attack(scores, labels, rng=rng, n_bootstrap=20)
    est = m.tpr_at_fpr[0.001]
    assert est.value is None and est.ci_low is None and not est.supported
    assert "500 non-members" in est.reason and "1000" in est.reason
    assert m.tpr_at_fpr[0.01].supported
    assert "n/a" in f"{est}"
    assert unsupported_fpr_reason(1000, 0.001) is None
    assert unsupported_fpr_reason(999, 0.001) is not None
    assert m.to_dict()["tpr_at_fpr"]["0.001"]["value"] is None


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=300).astype(float)
    labels = rng.random(300) < 0.4
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_tpr_at_fpr_is_conservative() -> None:
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], float)
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0], bool)
    r = roc_curve(scores, labels)
    assert tpr_at_fpr(r, 0.0) == 0.5  # two members before the first non-member
    assert tpr_at_fpr(r, 1 / 6) == 0.75
    assert tpr_at_fpr(r, 0.99) == 1.0


def test_group_bootstrap_is_wider_when_models_differ() -> None:
    rng = np.random.default_rng(4)
    n_models, n = 8, 300
    scores, labels, groups = [], [], []
    for g in range(n_models):
        strength = rng.uniform(0.0, 1.5)  # models leak very differently
        lab = rng.random(n) < 0.5
        scores.append(rng.normal(size=n) + strength * lab)
        labels.append(lab)
        groups.append(np.full(n, g))
    s, y, g = map(np.concatenate, (scores, labels, groups))
    pooled = evaluate_attack(s, y, rng=np.random.default_rng(5), n_bootstrap=300)
    grouped = evaluate_attack(s, y, groups=g, rng=np.random.default_rng(5), n_bootstrap=300)
    assert grouped.n_groups == n_models and pooled.n_groups == 1
    assert pooled.auc.value == grouped.auc.value
    width = lambda e: e.ci_high - e.ci_low  # noqa: E731
    assert width(grouped.auc) > width(pooled.auc)


def test_invalid_inputs() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(AuditError):
        evaluate_attack([1.0, 2.0], [True, True], rng=rng)
    with pytest.raises(AuditError):
        evaluate_attack([1.0, np.nan], [True, False], rng=rng)
    with pytest.raises(AuditError):
        evaluate_attack([1.0, 2.0], [1, 0], fpr_levels=[0.0], rng=rng)
    assert f"{Estimate(0.5, 0.4, 0.6):.2f}" == "0.50 [0.40, 0.60]"


_scores = st.lists(st.integers(-1000, 1000), min_size=4, max_size=60)


@settings(max_examples=60, deadline=None)
@given(_scores, st.data())
def test_auc_in_unit_interval_and_antisymmetric(values: list[int], data: st.DataObject) -> None:
    labels = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
    s = np.array(values, float)
    a = auc(s, labels)
    assert 0.0 <= a <= 1.0
    assert auc(-s, labels) == pytest.approx(1.0 - a)


@settings(max_examples=60, deadline=None)
@given(_scores, st.data(), st.sampled_from(["affine", "cube", "exp", "arctan"]))
def test_metrics_invariant_to_monotone_transforms(values: list[int], data: st.DataObject, kind: str) -> None:
    labels = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
    s = np.array(values, float)
    f = {"affine": lambda v: 3.0 * v + 7.0, "cube": lambda v: v**3, "exp": lambda v: np.exp(v / 100.0),
         "arctan": np.arctan}[kind]
    m1 = evaluate_attack(s, labels, rng=np.random.default_rng(0), n_bootstrap=5, fpr_levels=(0.1, 0.5))
    m2 = evaluate_attack(f(s), labels, rng=np.random.default_rng(0), n_bootstrap=5, fpr_levels=(0.1, 0.5))
    assert m1.auc.value == pytest.approx(m2.auc.value)
    assert m1.advantage.value == pytest.approx(m2.advantage.value)
    for lvl in (0.1, 0.5):
        assert m1.tpr_at_fpr[lvl].value == m2.tpr_at_fpr[lvl].value
    assert m1.auc.ci_low == pytest.approx(m2.auc.ci_low)  # same resamples, same ranks
    assert math.isclose(m1.balanced_accuracy.value, 0.5 + m1.advantage.value / 2)
