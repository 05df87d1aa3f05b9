"""Signals: stable phi, probabilities, losses, computed once per model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secure_dfml.audit import Signals, reinit_parameters, compute_signals, stable_phi, stack_signals, true_class_log_prob
from secure_dfml.errors import AuditError, SecureDFMLError


def test_phi_matches_naive_formula_for_moderate_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7))
    y = rng.integers(0, 7, size=50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(stable_phi(z, y), np.log(py) - np.log(1 - py), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(true_class_log_prob(z, y), np.log(py), rtol=1e-12, atol=1e-12)


def test_phi_is_finite_when_probability_saturates() -> None:
    z = np.array([[60.0, 0.0, 0.0], [0.0, 800.0, -5.0], [-700.0, 0.0, 1.0]])
    y = np.array([0, 1, 0])
    phi = stable_phi(z, y)
    assert np.all(np.isfinite(phi))
    # p = 1 - 2e^-60 exactly rounds to 1.0, but phi = 60 - log 2
    assert phi[0] == pytest.approx(60.0 - np.log(2.0))
    assert phi[1] == pytest.approx(800.0 - np.logaddexp(0.0, -5.0))
    assert phi[2] == pytest.approx(-700.0 - np.logaddexp(0.0, 1.0))


def test_binary_single_logit_is_sigmoid() -> None:
    z = np.array([2.0, -1.0, 0.0])
    s = Signals(z, np.array([1, 1, 0]))
    np.testing.assert_allclose(s.true_prob, [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(1.0)), 0.5])
    np.testing.assert_allclose(s.phi, [2.0, -1.0, 0.0])


def test_loss_is_cross_entropy() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([1, 0])
    s = Signals(z.numpy(), y.numpy())
    ref = torch.nn.functional.cross_entropy(z.double(), y, reduction="none").numpy()
    np.testing.assert_allclose(s.loss, ref, rtol=1e-12)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(AuditError):
        Signals(np.zeros((3, 4)), np.array([0, 1]))
    with pytest.raises(AuditError):
        Signals(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(SecureDFMLError):
        Signals(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError):  # AuditError is also a ValueError
        stack_signals([], "nonsense")


def test_compute_signals_batches_and_restores_mode() -> None:
    gen = torch.Generator().manual_seed(0)
    model = reinit_parameters(torch.nn.Sequential(torch.nn.Linear(5, 3)), np.random.default_rng(0))
    model.train()
    x = torch.randn(23, 5, generator=gen)
    y = np.arange(23) % 3
    s = compute_signals(model, x.numpy(), y, batch_size=4)
    assert model.training
    with torch.no_grad():
        ref = model(x).double().numpy()
    np.testing.assert_allclose(s.logits, ref, rtol=1e-5, atol=1e-6)
    assert len(s) == 23 and not s.logits.flags.writeable
    st = stack_signals([s, s], "phi")
    assert st.shape == (2, 23)
