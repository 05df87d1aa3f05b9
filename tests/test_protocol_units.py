"""Selection, schedule, losses: the pure parts of the DFML protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from secure_dfml.config import DFMLConfig
from secure_dfml.protocol.losses import JointModel, kl_to_peers, mutual_learning_loss, wsm_loss
from secure_dfml.protocol.schedule import alpha_at, is_peak, lr_at
from secure_dfml.protocol.selection import select_groups, select_key_holder


def _select(t: int, **kw):
    args = dict(federation_id="fed", seed=3, round_index=t, num_peers=12, participants=6, groups=2)
    args.update(kw)
    return select_groups(**args)


def test_selection_is_deterministic_and_coordinator_free():
    # Every peer recomputes the same selection from public values alone.
    assert [_select(t) for t in range(20)] == [_select(t) for t in range(20)]
    assert _select(0) != _select(0, seed=4) or _select(1) != _select(1, seed=4)
    assert _select(5) != _select(5, federation_id="other") or _select(6) != _select(6, federation_id="other")


@given(st.integers(0, 10_000), st.integers(2, 30), st.data())
def test_selection_groups_are_disjoint_and_sized(t, peers, data):
    participants = data.draw(st.integers(2, peers))
    groups = data.draw(st.integers(1, participants // 2))
    sel = select_groups(
        federation_id="f", seed=1, round_index=t, num_peers=peers, participants=participants, groups=groups
    )
    members = [m for g in sel for m in g.members]
    assert len(sel) == groups
    assert len(members) == len(set(members)) == participants
    assert all(0 <= m < peers for m in members)
    assert all(len(g.members) >= 2 for g in sel)


def test_selection_is_fair_over_many_rounds():
    peers, participants, rounds = 10, 4, 4000
    chosen = np.zeros(peers)
    aggregated = np.zeros(peers)
    for t in range(rounds):
        for g in _select(t, num_peers=peers, participants=participants, groups=1):
            chosen[list(g.members)] += 1
            aggregated[g.aggregator] += 1
    expected = rounds * participants / peers
    assert np.all(np.abs(chosen - expected) < 0.08 * expected), chosen
    assert np.all(np.abs(aggregated - rounds / peers) < 0.15 * rounds / peers), aggregated


def test_key_holder_excludes_group():
    kh = select_key_holder(federation_id="f", seed=0, round_index=2, num_peers=6, exclude={0, 1, 2})
    assert kh in {3, 4, 5}
    assert select_key_holder(federation_id="f", seed=0, round_index=2, num_peers=3, exclude={0, 1, 2}) is None


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alpha_cycles_between_min_and_max_with_peaks(schedule):
    cfg = DFMLConfig(alpha_min=0.1, alpha_max=0.9, period=5, schedule=schedule)
    alphas = [alpha_at(t, cfg) for t in range(15)]
    assert alphas[0] == pytest.approx(0.1) and alphas[4] == pytest.approx(0.9)
    assert alphas[:5] == sorted(alphas[:5])  # rises within a cycle
    assert alphas[5:10] == pytest.approx(alphas[:5])  # periodic
    assert [t for t in range(15) if is_peak(t, cfg)] == [4, 9, 14]
    assert all(alpha_at(t, cfg) == pytest.approx(0.9) for t in range(15) if is_peak(t, cfg))
    assert all(0.1 - 1e-12 <= a <= 0.9 + 1e-12 for a in alphas)


def test_period_one_is_always_peak():
    cfg = DFMLConfig(alpha_min=0.0, alpha_max=0.5, period=1)
    assert all(is_peak(t, cfg) and alpha_at(t, cfg) == 0.5 for t in range(4))


def test_lr_schedule_decays_from_lr_to_the_floor():
    const = DFMLConfig(lr=0.1)
    assert all(lr_at(t, 20, const) == 0.1 for t in range(20))
    cos = DFMLConfig(lr=0.1, lr_schedule="cosine", lr_floor=0.1)
    lrs = [lr_at(t, 20, cos) for t in range(20)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_at(0, 1, cos) == pytest.approx(0.1) and lr_at(99, 20, cos) == pytest.approx(0.01)


def test_wsm_with_uniform_prior_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    uniform = torch.full((5,), 0.2)
    assert torch.allclose(wsm_loss(z, y, uniform), F.cross_entropy(z, y), atol=1e-6)
    assert torch.allclose(wsm_loss(z, y, None), F.cross_entropy(z, y))


def test_wsm_ignores_absent_classes():
    z = torch.randn(8, 4, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    prior = torch.tensor([0.5, 0.5, 0.0, 0.0])
    loss = wsm_loss(z, y, prior)
    loss.backward()
    assert torch.all(z.grad[:, 2:] == 0)  # absent classes get no gradient
    # and equals the cross-entropy restricted to the present classes
    assert torch.allclose(loss, F.cross_entropy(z[:, :2], y), atol=1e-6)


def test_wsm_reweights_towards_rare_classes():
    z = torch.zeros(1, 2)
    y = torch.tensor([1])
    skewed = wsm_loss(z, y, torch.tensor([0.9, 0.1]))
    assert skewed > F.cross_entropy(z, y)  # a rare class's logit must work harder


def test_kl_term_is_zero_for_identical_models_and_detached():
    z = torch.randn(6, 3, requires_grad=True)
    other = torch.randn(6, 3, requires_grad=True)
    assert kl_to_peers([z, z.detach().clone()], 0, 2.0).abs() < 1e-6
    loss = kl_to_peers([z, other], 0, 2.0)
    loss.backward()
    assert other.grad is None and z.grad is not None  # only model i receives gradient


def test_mutual_loss_gradient_sanity():
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    joint = JointModel(models)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    logits = list(joint(x).unbind(0))
    loss = mutual_learning_loss(logits, y, alpha=0.5, temperature=3.0, class_prior=None)
    loss.backward()
    # gradient of the sum w.r.t. model 0 equals the gradient of its own L_0
    g_sum = models[0].weight.grad.clone()
    for m in models:
        m.zero_grad()
    z = [m(x) for m in models]
    l0 = 0.5 * F.cross_entropy(z[0], y) + 0.5 * 9.0 * kl_to_peers(z, 0, 3.0)
    l0.backward()
    assert torch.allclose(g_sum, models[0].weight.grad, atol=1e-6)
    # alpha = 0 is pure supervision; alpha = 1 pure distillation
    z = [m(x) for m in models]
    sup = mutual_learning_loss(z, y, alpha=0.0, temperature=3.0, class_prior=None)
    assert torch.allclose(sup, sum(F.cross_entropy(zi, y) for zi in z))
    assert math.isfinite(float(mutual_learning_loss(z, y, alpha=1.0, temperature=3.0, class_prior=None).detach()))
