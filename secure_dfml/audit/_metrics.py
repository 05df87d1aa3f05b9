"""Attack metrics with bootstrap confidence intervals.

Labels are booleans, True for members. Scores: higher = more likely member.

* ROC curve over every distinct threshold, AUC (Mann-Whitney, ties count 1/2).
* TPR at a fixed FPR level: the largest TPR among thresholds whose FPR is at
  most the level. A level is *unsupported* when ``n_nonmembers * level < 1``:
  no threshold can then have an FPR strictly between 0 and the level, so the
  number would be an artefact of the sample size; the estimate is ``None`` with
  the reason.
* Balanced accuracy max_t (TPR + TNR) / 2 and membership advantage
  max_t (TPR - FPR) (Yeom et al. 2018). Both choose the threshold on the data
  they are evaluated on, so they are optimistic for the attacker.

Confidence intervals are percentile bootstraps. Members and non-members are
resampled separately (class counts fixed); when ``groups`` is given (results
pooled over several target models), whole groups are resampled instead, so
the interval reflects the variation between models too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_dfml.errors import AuditError

__all__ = [
    "DEFAULT_FPR_LEVELS",
    "AttackMetrics",
    "Estimate",
    "ROC_MAX_POINTS",
    "RocCurve",
    "auc",
    "compact_roc",
    "evaluate_attack",
    "roc_curve",
    "tpr_at_fpr",
    "unsupported_fpr_reason",
]

DEFAULT_FPR_LEVELS: tuple[float, ...] = (0.001, 0.01)
#: At most this many (FPR, TPR) points of an ROC go into audit results (:func:`compact_roc`).
ROC_MAX_POINTS = 200
_ROC_DIGITS = 6  # significant digits of the stored points (byte-reproducible results)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval, or ``None`` with a reason."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    reason: str | None = None

    @property
    def supported(self) -> bool:
        return self.value is not None

    def covers(self, x: float) -> bool:
        if self.ci_low is None or self.ci_high is None:
            return False
        return self.ci_low <= x <= self.ci_high

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "reason": self.reason}

    def __format__(self, spec: str) -> str:
        if self.value is None:
            return f"n/a ({self.reason})"
        spec = spec or ".3f"
        if self.ci_low is None or self.ci_high is None:
            return format(self.value, spec)
        return f"{self.value:{spec}} [{self.ci_low:{spec}}, {self.ci_high:{spec}}]"


@dataclass(frozen=True)
class RocCurve:
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    def compact(self, max_points: int = ROC_MAX_POINTS) -> dict[str, Any]:
        """See :func:`compact_roc`."""
        return compact_roc(self, max_points=max_points)


@dataclass(frozen=True)
class AttackMetrics:
    n_members: int
    n_nonmembers: int
    n_groups: int
    confidence: float
    n_bootstrap: int
    auc: Estimate
    tpr_at_fpr: Mapping[float, Estimate]
    balanced_accuracy: Estimate
    advantage: Estimate
    roc: RocCurve = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "n_groups": self.n_groups,
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "auc": self.auc.to_dict(),
            "tpr_at_fpr": {f"{lvl:g}": est.to_dict() for lvl, est in self.tpr_at_fpr.items()},
            "balanced_accuracy": self.balanced_accuracy.to_dict(),
            "advantage": self.advantage.to_dict(),
        }


def _check(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise AuditError(f"scores and labels must be 1-D arrays of one length; got {s.shape} and {y.shape}")
    if np.isnan(s).any():
        raise AuditError("scores contain NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise AuditError("labels must be booleans or 0/1 (1 = member)")
        y = y.astype(bool)
    if y.all() or not y.any():
        raise AuditError("need at least one member and one non-member to evaluate an attack")
    return s, y


def _roc_arrays(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    distinct = np.flatnonzero(np.diff(s_sorted)) if s_sorted.size > 1 else np.array([], dtype=int)
    last = np.concatenate([distinct, [s_sorted.size - 1]])
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    p = y.sum()
    n = y.size - p
    tpr = np.concatenate([[0.0], tps / p])
    fpr = np.concatenate([[0.0], fps / n])
    thr = np.concatenate([[np.inf], s_sorted[last]])
    return fpr, tpr, thr


def roc_curve(scores: Any, labels: Any) -> RocCurve:
    """ROC over every distinct score (predict member when score >= threshold)."""
    s, y = _check(scores, labels)
    fpr, tpr, thr = _roc_arrays(s, y)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thr)


def _sig(x: float) -> float:
    return float(f"{float(x):.{_ROC_DIGITS}g}")


def _roc_picks(fpr: np.ndarray, lo: float, n_levels: int) -> np.ndarray:
    """Vertex indices for ``n_levels`` FPR levels (3/4 log-spaced from ``lo`` to 1, 1/4 linear), plus the endpoints."""
    n_log = (3 * n_levels) // 4
    levels = np.concatenate([
        np.geomspace(lo, 1.0, num=n_log) if lo < 1.0 else np.ones(n_log),
        np.linspace(0.0, 1.0, num=n_levels - n_log + 2)[1:-1],
    ])
    picked = np.searchsorted(fpr, levels * (1.0 + 1e-12), side="right") - 1
    return np.unique(np.concatenate([[0, fpr.size - 1], np.clip(picked, 0, fpr.size - 1)]))


def compact_roc(roc: RocCurve, *, max_points: int = ROC_MAX_POINTS) -> dict[str, Any]:
    """At most ``max_points`` vertices of ``roc`` as plain lists, for results files.

    Keeps (0, 0), (1, 1) and, for FPR levels spaced logarithmically from the
    smallest non-zero FPR to 1 (three quarters of the levels: the low-FPR region
    that matters for membership inference) and linearly over (0, 1) (the rest),
    the vertex with the largest TPR at FPR <= the level -- the point
    :func:`tpr_at_fpr` reads. Levels that land on one vertex (few distinct low
    FPRs) are made up for by a denser grid, as many as fit in ``max_points``.
    Values are rounded to 6 significant digits, so equal scores give equal bytes;
    both lists stay non-decreasing.
    ``{"fpr": [...], "tpr": [...], "points": <vertices of the full curve>}``.
    """
    if max_points < 2:
        raise AuditError(f"an ROC needs at least 2 points; got max_points={max_points}")
    fpr = np.asarray(roc.fpr, dtype=np.float64)
    tpr = np.asarray(roc.tpr, dtype=np.float64)
    n = int(fpr.size)
    if n <= max_points:
        keep = np.arange(n)
    else:
        positive = fpr[fpr > 0]
        lo = float(positive.min()) if positive.size else 1.0
        k_ok = max_points - 2  # at most k_ok + 2 indices: always fits
        keep = _roc_picks(fpr, lo, k_ok)
        k_bad = k_ok
        while k_bad < 8 * n:  # grow the grid until it no longer fits ...
            k_bad *= 2
            trial = _roc_picks(fpr, lo, k_bad)
            if trial.size > max_points:
                break
            k_ok, keep = k_bad, trial
        while k_bad - k_ok > 1:  # ... then the largest grid between that fits
            mid = (k_ok + k_bad) // 2
            trial = _roc_picks(fpr, lo, mid)
            if trial.size <= max_points:
                k_ok, keep = mid, trial
            else:
                k_bad = mid
    return {
        "fpr": [_sig(v) for v in fpr[keep]],
        "tpr": [_sig(v) for v in tpr[keep]],
        "points": n,
    }


def _auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (= P[score(member) > score(non-member)] + ties/2)."""
    r = roc_curve(scores, labels)
    return _auc_from_roc(r.fpr, r.tpr)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    ok = fpr <= level + 1e-12
    return float(np.max(tpr[ok]))


def tpr_at_fpr(roc: RocCurve, level: float) -> float:
    """Largest TPR among thresholds with FPR <= level."""
    return _tpr_at(roc.fpr, roc.tpr, level)


def unsupported_fpr_reason(n_nonmembers: int, level: float) -> str | None:
    """Why ``level`` cannot be estimated from ``n_nonmembers`` non-members, or None."""
    if n_nonmembers * level < 1.0:
        need = math.ceil(1.0 / level - 1e-9)
        return (
            f"FPR {level:g} is not supported by {n_nonmembers} non-members "
            f"(needs at least {need}: n_nonmembers * FPR >= 1)"
        )
    return None


def _all_metrics(s: np.ndarray, y: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    fpr, tpr, _ = _roc_arrays(s, y)
    out = [_auc_from_roc(fpr, tpr)]
    out.extend(_tpr_at(fpr, tpr, lvl) for lvl in levels)
    adv = float(np.max(tpr - fpr))
    out.append(0.5 + adv / 2.0)  # balanced accuracy = (TPR + 1 - FPR) / 2 at the same threshold
    out.append(adv)
    return np.asarray(out)


def evaluate_attack(
    scores: Any,
    labels: Any,
    *,
    groups: Any | None = None,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    rng: np.random.Generator,
) -> AttackMetrics:
    """All metrics with percentile-bootstrap intervals at ``confidence``.

    ``groups`` (optional, one id per sample, e.g. the target model a score
    came from) switches to resampling whole groups; with a single group it
    falls back to the stratified per-sample bootstrap.
    """
    s, y = _check(scores, labels)
    if not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence must lie in (0, 1); got {confidence}")
    if n_bootstrap < 0:
        raise AuditError(f"n_bootstrap must be >= 0; got {n_bootstrap}")
    levels = tuple(float(lvl) for lvl in fpr_levels)
    for lvl in levels:
        if not 0.0 < lvl < 1.0:
            raise AuditError(f"FPR levels must lie in (0, 1); got {lvl}")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)

    group_ids: np.ndarray | None = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != s.shape:
            raise AuditError(f"groups must have one entry per score; got {g.shape} for {s.shape}")
        _, group_ids = np.unique(g, return_inverse=True)
    n_groups = 1 if group_ids is None else int(group_ids.max()) + 1

    point = _all_metrics(s, y, levels)
    boots = np.empty((n_bootstrap, point.size))
    valid = np.ones(n_bootstrap, dtype=bool)
    pos_idx = np.flatnonzero(y)
    neg_idx = np.flatnonzero(~y)
    members_of = [np.flatnonzero(group_ids == gi) for gi in range(n_groups)] if group_ids is not None else []
    for b in range(n_bootstrap):
        if n_groups > 1:
            pick = rng.integers(0, n_groups, size=n_groups)
            idx = np.concatenate([members_of[gi] for gi in pick])
            yb = y[idx]
            if yb.all() or not yb.any():
                valid[b] = False
                continue
        else:
            idx = np.concatenate([rng.choice(pos_idx, size=n_pos), rng.choice(neg_idx, size=n_neg)])
            yb = y[idx]
        boots[b] = _all_metrics(s[idx], yb, levels)
    boots = boots[valid]
    alpha = (1.0 - confidence) / 2.0

    def est(col: int) -> Estimate:
        if boots.shape[0] == 0:
            return Estimate(float(point[col]))
        lo, hi = np.quantile(boots[:, col], [alpha, 1.0 - alpha])
        return Estimate(float(point[col]), float(lo), float(hi))

    tprs: dict[float, Estimate] = {}
    for i, lvl in enumerate(levels):
        reason = unsupported_fpr_reason(n_neg, lvl)
        tprs[lvl] = Estimate(None, reason=reason) if reason else est(1 + i)
    fpr, tpr, thr = _roc_arrays(s, y)
    return AttackMetrics(
        n_members=n_pos,
        n_nonmembers=n_neg,
        n_groups=n_groups,
        confidence=confidence,
        n_bootstrap=int(boots.shape[0]),
        auc=est(0),
        tpr_at_fpr=tprs,
        balanced_accuracy=est(1 + len(levels)),
        advantage=est(2 + len(levels)),
        roc=RocCurve(fpr=fpr, tpr=tpr, thresholds=thr),
    )
