"""Pure privacy math: epsilon of mechanism histories and noise calibration."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from secure_dfml.errors import PrivacyError
from secure_dfml.privacy import (
    ACCOUNTANTS,
    Mechanism,
    PrivacyValidationError,
    accountant_history,
    compute_epsilon,
    epsilon_for,
    make_accountant,
    noise_for_budget,
    sample_rate_for,
    steps_per_epoch,
)

HISTORY = [Mechanism(1.1, 0.05, 40), Mechanism(0.9, 0.1, 20), Mechanism(1.1, 0.05, 40), Mechanism(8.0, 1.0, 1)]


def test_registry_names_opacus_accountants() -> None:
    assert set(ACCOUNTANTS) == {"rdp", "prv"}
    assert ACCOUNTANTS["rdp"].opacus_class is RDPAccountant
    assert ACCOUNTANTS["prv"].opacus_class is PRVAccountant


def test_history_merges_equal_mechanisms_in_first_appearance_order() -> None:
    assert accountant_history([*HISTORY, Mechanism(2.0, 0.5, 0)]) == [(1.1, 0.05, 80), (0.9, 0.1, 20), (8.0, 1.0, 1)]


def test_rdp_matches_opacus_accountant_exactly() -> None:
    acc = RDPAccountant()
    acc.history = accountant_history(HISTORY)
    assert compute_epsilon(HISTORY, delta=1e-5, accountant="rdp") == acc.get_epsilon(1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_prv_matches_opacus_accountant() -> None:
    acc = PRVAccountant()
    acc.history = accountant_history(HISTORY)
    assert compute_epsilon(HISTORY, delta=1e-5, accountant="prv") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_make_accountant_holds_history() -> None:
    acc = make_accountant("rdp", HISTORY)
    assert acc.history == accountant_history(HISTORY)


def test_prv_is_tighter_than_rdp() -> None:
    rdp = compute_epsilon(HISTORY, delta=1e-5, accountant="rdp")
    prv = compute_epsilon(HISTORY, delta=1e-5, accountant="prv")
    assert 0 < prv < rdp


def test_empty_history_spends_nothing() -> None:
    assert compute_epsilon([], delta=1e-5) == 0.0


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    e = [epsilon_for(noise_multiplier=1.0, sample_rate=0.05, steps=s, delta=1e-5) for s in (10, 100, 1000)]
    assert e[0] < e[1] < e[2]
    assert epsilon_for(noise_multiplier=2.0, sample_rate=0.05, steps=100, delta=1e-5) < e[1]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_budget_spends_target(accountant: str) -> None:
    sigma = noise_for_budget(target_epsilon=4.0, delta=1e-5, sample_rate=0.05, steps=300, accountant=accountant)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=0.05, steps=300, delta=1e-5, accountant=accountant)
    assert 4.0 * (1 - 5e-3) - 1e-9 <= eps <= 4.0


def test_noise_for_budget_accounts_for_fixed_mechanisms() -> None:
    fixed = [Mechanism(5.0, 1.0, 1)]
    alone = noise_for_budget(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=100)
    with_prior = noise_for_budget(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=100, fixed=fixed)
    assert with_prior > alone
    total = compute_epsilon([*fixed, Mechanism(with_prior, 0.1, 100)], delta=1e-5)
    assert 2.0 * 0.99 <= total <= 2.0


def test_noise_for_budget_errors() -> None:
    with pytest.raises(PrivacyValidationError):
        noise_for_budget(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=10)
    with pytest.raises(PrivacyValidationError):
        noise_for_budget(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=0)
    with pytest.raises(PrivacyValidationError, match="fixed mechanisms"):
        noise_for_budget(target_epsilon=0.1, delta=1e-5, sample_rate=0.1, steps=10, fixed=[Mechanism(0.5, 1.0, 1)])


@pytest.mark.parametrize(
    "args",
    [(0.0, 0.1, 1), (-1.0, 0.1, 1), (math.inf, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (1.0, 0.1, 1.5)],
)
def test_mechanism_validation(args: tuple[float, float, int]) -> None:
    with pytest.raises(PrivacyError):
        Mechanism(*args)  # type: ignore[arg-type]


def test_unknown_accountant_and_bad_delta() -> None:
    with pytest.raises(PrivacyValidationError, match="accountant"):
        compute_epsilon(HISTORY, delta=1e-5, accountant="gdp-ish")
    with pytest.raises(PrivacyValidationError, match="delta"):
        compute_epsilon(HISTORY, delta=1.0)


def test_sample_rate_and_steps() -> None:
    assert sample_rate_for(32, 320) == 0.1
    assert sample_rate_for(64, 10) == 1.0
    assert steps_per_epoch(0.1) == 10
    assert steps_per_epoch(32 / 500) == 16
    assert steps_per_epoch(1.0) == 1
