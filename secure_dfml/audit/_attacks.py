"""Membership-inference attacks as pure functions over numpy arrays.

Every attack returns one score per audit sample; **higher means "more likely a
member"**. Shapes: target arrays are ``(n,)``; reference-model arrays are
``(k, n)`` with a boolean ``in_mask`` of the same shape that is True where the
reference model was trained on the sample.

Implemented (methods re-derived from the papers, own code):

* ``loss``        -- loss threshold (Yeom et al. 2018): score = -loss.
* ``population``  -- Attack-P (Ye et al. 2022): where the target's loss on x
  falls in the distribution of the target's losses on population data
  (non-members by construction). Rank-equivalent to ``loss``; its value is that
  a threshold at population quantile alpha has an expected FPR of alpha without
  any labelled non-members.
* ``lira_offline`` / ``lira_online`` -- Likelihood-ratio attack (Carlini et al.
  2022) on phi = log(p / (1 - p)) with a *fixed* (global) variance per IN/OUT
  side. Online: log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out). Offline:
  the one-sided test Pr[Z <= phi], Z ~ N(mu_out, s_out), returned as
  -log Pr[Z > phi] so that large scores keep their resolution.
* ``rmia_offline`` / ``rmia_online`` -- RMIA (Zarifzadeh et al. 2024):
  score(x) = Pr_z[ (p(x|theta)/p(x)) / (p(z|theta)/p(z)) >= gamma ] over
  population samples z. Online: p(x) = (mean_IN + mean_OUT) / 2. Offline:
  p(x) = ((1 + a) * mean_OUT + (1 - a)) / 2, the linear approximation of the
  unseen IN models, with ``a`` tuned on the reference models
  (:func:`tune_rmia_offline_a`). Note: for one fixed population set the
  score is a non-decreasing function of p(x|theta)/p(x), so the ROC curve
  equals that of the ratio whenever ties are broken by it (as here); z
  calibrates the score to "fraction of population dominated", and gamma only
  moves thresholds, not the ranking.

Attacks are looked up by name in :data:`ATTACKS` (an :class:`AttackSpec`
registry that also says which signals and reference models each needs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from scipy import stats

from secure_dfml.audit._signals import Signals, stack_signals
from secure_dfml.errors import AuditError

__all__ = [
    "ATTACKS",
    "DEFAULT_RMIA_OFFLINE_A",
    "AttackInputs",
    "AttackOutput",
    "AttackSpec",
    "lira_offline",
    "lira_online",
    "loss_attack",
    "population_attack",
    "rmia",
    "rmia_offline",
    "rmia_online",
    "tune_rmia_offline_a",
]

_LOG = logging.getLogger(__name__)

#: Fallback for RMIA's ``a`` when it cannot be tuned (fewer than two reference
#: models). 0.3 is the value the RMIA authors use for CIFAR-10-like settings.
DEFAULT_RMIA_OFFLINE_A = 0.3
_TINY = 1e-300


# --------------------------------------------------------------------------- helpers
def _vec(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise AuditError(f"{name} must be a 1-D array; got shape {arr.shape}")
    if np.isnan(arr).any():
        raise AuditError(f"{name} contains NaN")
    return arr


def _mat(name: str, a: Any, n: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n:
        raise AuditError(f"{name} must have shape (k, {n}); got {arr.shape}")
    if arr.shape[0] < 1:
        raise AuditError(f"{name} needs at least one reference model")
    if np.isnan(arr).any():
        raise AuditError(f"{name} contains NaN")
    return arr


def _mask(name: str, m: Any, shape: tuple[int, ...]) -> np.ndarray:
    if m is None:
        return np.zeros(shape, dtype=bool)
    arr = np.asarray(m)
    if arr.shape != shape:
        raise AuditError(f"{name} must have shape {shape}; got {arr.shape}")
    return arr.astype(bool)


def _tie_break(primary_count: np.ndarray, denom: int, secondary: np.ndarray) -> np.ndarray:
    """A score in [0, 1) ordered by ``primary_count`` (0..denom), ties broken by ``secondary``.

    score = (count + u) / (denom + 1) with u in (0, 1) the rank of
    ``secondary``, so ``floor(score * (denom + 1)) == count`` and the secondary
    term never reorders different counts.
    """
    squash = stats.rankdata(secondary) / (secondary.size + 1.0)  # in (0, 1), order-preserving
    return (primary_count + squash) / float(denom + 1)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = mask.sum(axis=0)
    total = np.where(mask, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return mean, count


def _fixed_std(values: np.ndarray, mask: np.ndarray, means: np.ndarray) -> float:
    """One global standard deviation for one side (IN or OUT).

    The pooled within-sample deviation around each sample's own mean when any
    sample has two or more observations on this side; otherwise (e.g. two
    online reference models, one IN and one OUT per sample) the spread of all
    observations, as in the original LiRA code.
    """
    count = mask.sum(axis=0)
    dof = int(np.sum(np.maximum(count - 1, 0)))
    if dof >= 1:
        resid = np.where(mask, values - means[None, :], 0.0)
        std = float(np.sqrt(np.sum(resid**2) / dof))
    else:
        std = float(np.std(values[mask])) if mask.any() else 0.0
    return max(std, 1e-6)


# --------------------------------------------------------------------------- attacks
def loss_attack(target_loss: Any) -> np.ndarray:
    """Loss threshold attack: score = -loss (low loss -> member)."""
    return -_vec("target_loss", target_loss)


def population_attack(target_loss: Any, population_loss: Any) -> np.ndarray:
    """Attack-P: the fraction of population losses at or above the target's loss.

    ``floor(score * (m + 1))`` is the number of the m population losses at or
    above x's loss: a threshold admitting x flags population (non-member)
    points at a rate of about ``1 - score``. Ties are broken by the raw loss.
    """
    t = _vec("target_loss", target_loss)
    pop = np.sort(_vec("population_loss", population_loss))
    if pop.size == 0:
        raise AuditError("population attack needs at least one population sample")
    at_or_above = pop.size - np.searchsorted(pop, t, side="left")
    return _tie_break(at_or_above.astype(np.float64), pop.size, -t)


def lira_online(target_phi: Any, ref_phi: Any, in_mask: Any) -> np.ndarray:
    """LiRA online with fixed variance (Carlini et al. 2022).

    score = log N(phi; mu_in(x), s_in^2) - log N(phi; mu_out(x), s_out^2), where
    mu_in / mu_out are per-sample means over IN / OUT reference models and
    s_in / s_out are global (see :func:`_fixed_std`).
    """
    t = _vec("target_phi", target_phi)
    r = _mat("ref_phi", ref_phi, t.size)
    inm = _mask("in_mask", in_mask, r.shape)
    mu_in, n_in = _masked_mean(r, inm)
    mu_out, n_out = _masked_mean(r, ~inm)
    if (n_in == 0).any() or (n_out == 0).any():
        raise AuditError(
            "online LiRA needs at least one IN and one OUT reference model per sample; "
            f"{int((n_in == 0).sum())} samples have no IN model and "
            f"{int((n_out == 0).sum())} have no OUT model (train more reference models)"
        )
    s_in = _fixed_std(r, inm, mu_in)
    s_out = _fixed_std(r, ~inm, mu_out)
    return stats.norm.logpdf(t, mu_in, s_in) - stats.norm.logpdf(t, mu_out, s_out)


def lira_offline(target_phi: Any, ref_phi: Any, in_mask: Any | None = None) -> np.ndarray:
    """LiRA offline with fixed variance: one-sided test against the OUT Gaussian.

    Uses only OUT reference models (entries where ``in_mask`` is False).
    score = -log Pr[Z > phi], Z ~ N(mu_out(x), s_out^2).
    """
    t = _vec("target_phi", target_phi)
    r = _mat("ref_phi", ref_phi, t.size)
    out = ~_mask("in_mask", in_mask, r.shape)
    mu_out, n_out = _masked_mean(r, out)
    if (n_out == 0).any():
        raise AuditError(
            f"offline LiRA needs an OUT reference model for every sample; {int((n_out == 0).sum())} have none"
        )
    s_out = _fixed_std(r, out, mu_out)
    return -stats.norm.logsf(t, mu_out, s_out)


def _marginal(p_ref: np.ndarray, in_mask: np.ndarray, offline_a: float | None, what: str) -> np.ndarray:
    """p(x) averaged over models that did / did not see x (RMIA's denominator)."""
    mean_out, n_out = _masked_mean(p_ref, ~in_mask)
    if (n_out == 0).any():
        raise AuditError(f"RMIA needs an OUT reference model for every {what}; {int((n_out == 0).sum())} have none")
    if offline_a is not None:
        return 0.5 * ((1.0 + offline_a) * mean_out + (1.0 - offline_a))
    mean_in, n_in = _masked_mean(p_ref, in_mask)
    if (n_in == 0).any():
        raise AuditError(
            f"online RMIA needs an IN reference model for every {what}; {int((n_in == 0).sum())} have none"
        )
    return 0.5 * (mean_in + mean_out)


def rmia(
    target_prob: Any,
    ref_prob: Any,
    target_prob_pop: Any,
    ref_prob_pop: Any,
    *,
    in_mask: Any | None = None,
    in_mask_pop: Any | None = None,
    offline_a: float | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """RMIA score Pr_z[LR(x, z) >= gamma] (Zarifzadeh et al. 2024).

    ``offline_a=None`` runs the online attack (needs IN and OUT reference
    models for every x and z); a number runs the offline attack with that
    ``a`` (only OUT entries are used). Ties in the fraction (e.g. every z
    dominated) are broken by the likelihood ratio p(x|theta)/p(x) itself;
    ``floor(score * (m + 1))`` is the number of z with LR(x, z) >= gamma.
    """
    if gamma <= 0:
        raise AuditError(f"gamma must be > 0; got {gamma}")
    if offline_a is not None and not 0.0 <= offline_a <= 1.0:
        raise AuditError(f"offline_a must lie in [0, 1]; got {offline_a}")
    tx = _vec("target_prob", target_prob)
    rx = _mat("ref_prob", ref_prob, tx.size)
    tz = _vec("target_prob_pop", target_prob_pop)
    rz = _mat("ref_prob_pop", ref_prob_pop, tz.size)
    if rz.shape[0] != rx.shape[0]:
        raise AuditError("ref_prob and ref_prob_pop must come from the same reference models")
    if tz.size == 0:
        raise AuditError("RMIA needs at least one population sample z")
    mx = _mask("in_mask", in_mask, rx.shape)
    mz = _mask("in_mask_pop", in_mask_pop, rz.shape)
    px = _marginal(rx, mx, offline_a, "audit sample")
    pz = _marginal(rz, mz, offline_a, "population sample")
    log_ratio_x = np.log(np.maximum(tx, _TINY)) - np.log(np.maximum(px, _TINY))
    log_ratio_z = np.sort(np.log(np.maximum(tz, _TINY)) - np.log(np.maximum(pz, _TINY)))
    # LR(x, z) >= gamma  <=>  log_ratio_z <= log_ratio_x - log(gamma)
    count = np.searchsorted(log_ratio_z, log_ratio_x - np.log(gamma), side="right")
    return _tie_break(count.astype(np.float64), tz.size, log_ratio_x)


def rmia_online(
    target_prob: Any,
    ref_prob: Any,
    target_prob_pop: Any,
    ref_prob_pop: Any,
    *,
    in_mask: Any,
    in_mask_pop: Any,
    gamma: float = 1.0,
) -> np.ndarray:
    """Online RMIA: p(x) from IN and OUT reference models."""
    return rmia(
        target_prob, ref_prob, target_prob_pop, ref_prob_pop,
        in_mask=in_mask, in_mask_pop=in_mask_pop, offline_a=None, gamma=gamma,
    )


def rmia_offline(
    target_prob: Any,
    ref_prob: Any,
    target_prob_pop: Any,
    ref_prob_pop: Any,
    *,
    offline_a: float,
    in_mask: Any | None = None,
    in_mask_pop: Any | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """Offline RMIA: p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2 from OUT models only."""
    return rmia(
        target_prob, ref_prob, target_prob_pop, ref_prob_pop,
        in_mask=in_mask, in_mask_pop=in_mask_pop, offline_a=offline_a, gamma=gamma,
    )


def _auc_fast(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = labels.sum()
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tune_rmia_offline_a(
    ref_prob: Any,
    in_mask: Any,
    ref_prob_pop: Any,
    *,
    in_mask_pop: Any | None = None,
    grid: Sequence[float] | None = None,
    gamma: float = 1.0,
    min_per_class: int = 10,
) -> float | None:
    """Tune RMIA's offline ``a`` on the reference models alone (as in the paper).

    Each reference model in turn plays the target; its own training mask gives
    members / non-members, the *other* reference models act as OUT models,
    and ``a`` is chosen on a grid to maximise the mean AUC. Uses no
    information about the real target's membership. Returns ``None`` when it
    cannot be tuned (fewer than two reference models, or fewer than
    ``min_per_class`` usable members / non-members for every simulated target).
    """
    rx = np.asarray(ref_prob, dtype=np.float64)
    rz = np.asarray(ref_prob_pop, dtype=np.float64)
    if rx.ndim != 2 or rz.ndim != 2 or rx.shape[0] != rz.shape[0]:
        raise AuditError("ref_prob and ref_prob_pop must be (k, n) and (k, m) arrays of the same k")
    k = rx.shape[0]
    mx = _mask("in_mask", in_mask, rx.shape)
    mz = _mask("in_mask_pop", in_mask_pop, rz.shape)
    if k < 2:
        return None
    grid_arr = np.round(np.linspace(0.0, 1.0, 21), 4) if grid is None else np.asarray(list(grid), dtype=float)
    totals = np.zeros(grid_arr.size)
    used = 0
    for j in range(k):
        others = np.array([i for i in range(k) if i != j])
        ox, oz = rx[others], rz[others]
        omx, omz = mx[others], mz[others]
        keep_x = (~omx).any(axis=0)  # samples with at least one other OUT model
        keep_z = (~omz).any(axis=0) & ~mz[j]  # population points the simulated target did not see
        labels = mx[j][keep_x]
        if labels.sum() < min_per_class or (~labels).sum() < min_per_class or keep_z.sum() < min_per_class:
            continue
        for g, a in enumerate(grid_arr):
            sc = rmia(
                rx[j][keep_x], ox[:, keep_x], rz[j][keep_z], oz[:, keep_z],
                in_mask=omx[:, keep_x], in_mask_pop=omz[:, keep_z], offline_a=float(a), gamma=gamma,
            )
            totals[g] += _auc_fast(sc, labels)
        used += 1
    if used == 0:
        return None
    best = float(grid_arr[int(np.argmax(totals))])
    _LOG.debug("tuned RMIA offline a=%.3f on %d simulated targets", best, used)
    return best


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class AttackInputs:
    """Everything the registered attacks may read, computed once.

    ``target`` / ``population``: the target model on the audit samples and on
    population samples z. ``ref_*``: the reference models on the same samples,
    with their IN masks. ``ref_tuning`` / ``tuning_mask``: reference models on
    samples whose reference-membership is known (used only to tune RMIA's a).
    """

    target: Signals
    population: Signals | None = None
    ref_targets: Sequence[Signals] = ()
    ref_population: Sequence[Signals] = ()
    in_mask_targets: np.ndarray | None = None
    in_mask_population: np.ndarray | None = None
    ref_tuning: Sequence[Signals] = ()
    tuning_mask: np.ndarray | None = None

    @property
    def n_reference(self) -> int:
        return len(self.ref_targets)


@dataclass(frozen=True)
class AttackOutput:
    scores: np.ndarray
    details: Mapping[str, Any] = field(default_factory=dict)


ReferenceNeed = Literal["none", "out", "in_out"]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: what it needs and how to run it on :class:`AttackInputs`."""

    name: str
    description: str
    signal: Literal["loss", "phi", "true_prob"]
    reference: ReferenceNeed
    needs_population: bool
    min_reference: int
    run: Callable[[AttackInputs, Mapping[str, Any]], AttackOutput]
    paper: str = ""

    @property
    def online(self) -> bool:
        return self.reference == "in_out"


def _need(inputs: AttackInputs, spec_name: str, *, population: bool, k_min: int) -> None:
    if population and inputs.population is None:
        raise AuditError(f"attack {spec_name!r} needs population samples (target model on z)")
    if inputs.n_reference < k_min:
        raise AuditError(f"attack {spec_name!r} needs at least {k_min} reference models; got {inputs.n_reference}")
    if population and k_min > 0 and len(inputs.ref_population) != inputs.n_reference:
        raise AuditError(f"attack {spec_name!r} needs the reference models' signals on the population samples")


def _masks(inputs: AttackInputs) -> tuple[np.ndarray, np.ndarray | None]:
    k = inputs.n_reference
    mx = (
        np.zeros((k, len(inputs.target)), dtype=bool)
        if inputs.in_mask_targets is None
        else np.asarray(inputs.in_mask_targets, dtype=bool)
    )
    mz = None if inputs.in_mask_population is None else np.asarray(inputs.in_mask_population, dtype=bool)
    return mx, mz


def _run_loss(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    return AttackOutput(loss_attack(inputs.target.loss))


def _run_population(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    _need(inputs, "population", population=True, k_min=0)
    assert inputs.population is not None
    return AttackOutput(
        population_attack(inputs.target.loss, inputs.population.loss), {"n_population": len(inputs.population)}
    )


def _run_lira_online(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    _need(inputs, "lira_online", population=False, k_min=2)
    mx, _ = _masks(inputs)
    scores = lira_online(inputs.target.phi, stack_signals(inputs.ref_targets, "phi"), mx)
    return AttackOutput(scores, {"n_reference": inputs.n_reference})


def _run_lira_offline(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    _need(inputs, "lira_offline", population=False, k_min=1)
    mx, _ = _masks(inputs)
    scores = lira_offline(inputs.target.phi, stack_signals(inputs.ref_targets, "phi"), mx)
    return AttackOutput(scores, {"n_reference": inputs.n_reference, "n_out_models_used": int((~mx).sum(0).min())})


def _run_rmia_online(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    _need(inputs, "rmia_online", population=True, k_min=2)
    assert inputs.population is not None
    mx, mz = _masks(inputs)
    if mz is None:
        raise AuditError("online RMIA needs the population samples to be IN for some reference models")
    gamma = float(params.get("gamma", 1.0))
    scores = rmia_online(
        inputs.target.true_prob, stack_signals(inputs.ref_targets, "true_prob"),
        inputs.population.true_prob, stack_signals(inputs.ref_population, "true_prob"),
        in_mask=mx, in_mask_pop=mz, gamma=gamma,
    )
    return AttackOutput(scores, {"n_reference": inputs.n_reference, "gamma": gamma, "n_population": len(inputs.population)})


def _run_rmia_offline(inputs: AttackInputs, params: Mapping[str, Any]) -> AttackOutput:
    _need(inputs, "rmia_offline", population=True, k_min=1)
    assert inputs.population is not None
    mx, mz = _masks(inputs)
    gamma = float(params.get("gamma", 1.0))
    a = params.get("offline_a")
    tuned = False
    if a is None:
        if inputs.ref_tuning and inputs.tuning_mask is not None:
            a = tune_rmia_offline_a(
                stack_signals(inputs.ref_tuning, "true_prob"), inputs.tuning_mask,
                stack_signals(inputs.ref_population, "true_prob"), in_mask_pop=mz, gamma=gamma,
            )
            tuned = a is not None
        if a is None:
            a = DEFAULT_RMIA_OFFLINE_A
            _LOG.info("RMIA offline: could not tune a (need >= 2 reference models); using a=%s", a)
    scores = rmia_offline(
        inputs.target.true_prob, stack_signals(inputs.ref_targets, "true_prob"),
        inputs.population.true_prob, stack_signals(inputs.ref_population, "true_prob"),
        offline_a=float(a), in_mask=mx, in_mask_pop=mz, gamma=gamma,
    )
    return AttackOutput(
        scores,
        {"n_reference": inputs.n_reference, "gamma": gamma, "offline_a": float(a), "a_tuned": tuned,
         "n_population": len(inputs.population)},
    )


ATTACKS: Mapping[str, AttackSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            AttackSpec("loss", "loss threshold: low loss on x suggests membership", "loss", "none", False, 0,
                       _run_loss, "Yeom et al. 2018"),
            AttackSpec("population", "Attack-P: target loss on x against its losses on population data", "loss",
                       "none", True, 0, _run_population, "Ye et al. 2022"),
            AttackSpec("lira_offline", "LiRA offline, fixed variance: phi against OUT reference models", "phi",
                       "out", False, 1, _run_lira_offline, "Carlini et al. 2022"),
            AttackSpec("lira_online", "LiRA online, fixed variance: phi against IN and OUT reference models",
                       "phi", "in_out", False, 2, _run_lira_online, "Carlini et al. 2022"),
            AttackSpec("rmia_offline", "RMIA offline: likelihood ratio vs population, p(x) from OUT models with a",
                       "true_prob", "out", True, 1, _run_rmia_offline, "Zarifzadeh et al. 2024"),
            AttackSpec("rmia_online", "RMIA online: likelihood ratio vs population, p(x) from IN and OUT models",
                       "true_prob", "in_out", True, 2, _run_rmia_online, "Zarifzadeh et al. 2024"),
        )
    }
)


def get_attack(name: str) -> AttackSpec:
    try:
        return ATTACKS[name]
    except KeyError:
        raise AuditError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}") from None
