"""Pure privacy math: epsilon of a history of subsampled Gaussian mechanisms.

Everything here is stateless.  A *mechanism* is Opacus' unit of accounting: a
Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma`` and
sample rate ``q``, composed ``steps`` times.  A full-data Gaussian release (for
example a class histogram with L2 sensitivity 1) is the special case ``q = 1``,
``steps = 1``, so it composes with DP-SGD steps in the same accountant.

Accountants come from a registry (:data:`ACCOUNTANTS`); each entry names the
Opacus accountant class and how to evaluate epsilon for a history.  The RDP
evaluation uses Opacus' own analysis functions exactly as
:class:`opacus.accountants.RDPAccountant` does (same orders, same arithmetic),
with the per-(sigma, q) RDP vector cached, so results are bit-identical to the
accountant's.  The PRV evaluation instantiates
:class:`opacus.accountants.PRVAccountant`.

History convention: composition is commutative, so a history is the list of
distinct ``(sigma, q)`` pairs in order of first appearance with their steps
summed (mechanisms with ``steps == 0`` are dropped).  :func:`accountant_history`
is that function; a ledger file is recomputed by feeding its output to an
Opacus accountant (``accountant.history = accountant_history(...)``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from secure_dfml.privacy._errors import PrivacyValidationError

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyValidationError(
                f"noise_multiplier = {self.noise_multiplier!r} is invalid: expected a finite number > 0."
            )
        if not (0 < self.sample_rate <= 1):
            raise PrivacyValidationError(f"sample_rate = {self.sample_rate!r} is invalid: expected a number in (0, 1].")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PrivacyValidationError(f"steps = {self.steps!r} is invalid: expected an integer >= 0.")


def accountant_history(mechanisms: Iterable[Mechanism]) -> History:
    """Opacus accountant history for ``mechanisms``: distinct (sigma, q) pairs in
    order of first appearance, steps summed, zero-step mechanisms dropped."""
    merged: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        if m.steps == 0:
            continue
        key = (float(m.noise_multiplier), float(m.sample_rate))
        merged[key] = merged.get(key, 0) + int(m.steps)
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


# ---------------------------------------------------------------------------
# Epsilon evaluation per accountant


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    out = np.asarray(rdp, dtype=np.float64)
    out.setflags(write=False)
    return out


def _rdp_epsilon(history: History, delta: float) -> float:
    if not history:
        return 0.0
    # Same arithmetic as RDPAccountant.get_privacy_spent: sum of per-entry
    # compute_rdp(q, sigma, steps) (= one-step vector * steps).
    rdp = sum([_rdp_one_step(sigma, q) * steps for (sigma, q, steps) in history])
    with warnings.catch_warnings():
        # "optimal order is the smallest alpha": only a looser (still valid) bound
        warnings.simplefilter("ignore")
        eps, _alpha = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(history: History, delta: float) -> float:
    if not history:
        return 0.0
    acc = PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class AccountantSpec:
    """How one accounting method is evaluated."""

    name: str
    opacus_class: type[IAccountant]
    epsilon: Callable[[History, float], float]
    description: str


ACCOUNTANTS: dict[str, AccountantSpec] = {
    "rdp": AccountantSpec(
        "rdp",
        RDPAccountant,
        _rdp_epsilon,
        "Renyi DP (Mironov et al.), Opacus' default orders; a fast, slightly loose upper bound",
    ),
    "prv": AccountantSpec(
        "prv",
        PRVAccountant,
        _prv_epsilon,
        "privacy loss random variables (Gopi et al. 2021); tighter, slower; returns the upper bound",
    ),
}


def accountant_spec(name: str) -> AccountantSpec:
    spec = ACCOUNTANTS.get(name)
    if spec is None:
        raise PrivacyValidationError(
            f"privacy.accountant = {name!r} is invalid: expected one of {', '.join(repr(a) for a in ACCOUNTANTS)}."
        )
    return spec


def make_accountant(name: str, mechanisms: Iterable[Mechanism] = ()) -> IAccountant:
    """A fresh Opacus accountant of kind ``name`` holding ``mechanisms``."""
    acc = accountant_spec(name).opacus_class()
    acc.history = accountant_history(mechanisms)
    return acc


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise PrivacyValidationError(f"delta = {delta!r} is invalid: expected a number in (0, 1).")


def compute_epsilon(mechanisms: Iterable[Mechanism], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` spent by the composition of ``mechanisms``."""
    _check_delta(delta)
    return accountant_spec(accountant).epsilon(accountant_history(mechanisms), delta)


def epsilon_for(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of one mechanism composed ``steps`` times."""
    return compute_epsilon([Mechanism(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


MAX_NOISE_MULTIPLIER = 1e4


def noise_for_budget(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    fixed: Sequence[Mechanism] = (),
    rtol: float = 5e-3,
) -> float:
    """Smallest noise multiplier (to relative tolerance) such that ``fixed`` plus
    ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon`` at ``delta``.

    The returned sigma always satisfies the budget; its epsilon is within
    ``rtol`` (relative) below the target unless the search hits its bounds.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyValidationError(f"target epsilon = {target_epsilon!r} is invalid: expected a finite number > 0.")
    _check_delta(delta)
    if steps < 1:
        raise PrivacyValidationError(f"steps = {steps!r}: there is nothing to calibrate noise for (need >= 1 step).")
    eps_fn = accountant_spec(accountant).epsilon
    base = accountant_history(fixed)
    if base and eps_fn(base, delta) >= target_epsilon:
        raise PrivacyValidationError(
            f"the fixed mechanisms alone already spend epsilon >= {target_epsilon}; no noise level fits the budget."
        )

    def eps(sigma: float) -> float:
        return eps_fn(accountant_history([*fixed, Mechanism(sigma, sample_rate, steps)]), delta)

    if accountant != "rdp":
        # RDP upper-bounds the tighter accountants, so its sigma brackets from above.
        hi = noise_for_budget(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            fixed=fixed,
            rtol=0.05,
        )
        if eps(hi) > target_epsilon:
            hi *= 1.5
    else:
        hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyValidationError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} at delta {delta}; "
                "raise the budget or lower the number of steps."
            )
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi = lo
        lo /= 2.0
        if lo < 1e-3:
            return hi
    # invariant: eps(lo) > target >= eps(hi)
    for _ in range(60):
        e_hi = eps(hi)
        if e_hi >= target_epsilon * (1 - rtol) or (hi - lo) <= 1e-6 * hi:
            break
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson-sampled steps per epoch: ``ceil(1/q)`` (``k`` for ``q = 1/k``)."""
    return max(1, math.ceil(1.0 / sample_rate - 1e-9))


def sample_rate_for(batch_size: int, num_samples: int) -> float:
    """Poisson sample rate for batches of about ``batch_size`` out of ``num_samples``.

    As Opacus' ``DPDataLoader``: an epoch is ``k = ceil(n / b)`` steps and
    ``q = 1 / k``, so an epoch draws ``n`` records in expectation and the
    expected batch is ``n / k <= b`` (``q = b / n`` exactly when ``b`` divides ``n``)."""
    if num_samples < 1:
        raise PrivacyValidationError("a peer with no training samples cannot run DP-SGD.")
    if batch_size < 1:
        raise PrivacyValidationError(f"batch size {batch_size!r} is invalid: expected an integer >= 1.")
    return 1.0 / math.ceil(num_samples / batch_size)
