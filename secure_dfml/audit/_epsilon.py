"""Empirical epsilon lower bounds and their comparison with a ledger's epsilon.

(a) One-run canary audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing
with One (1) Training Run"). m canaries are each included independently with
probability 1/2; the auditor guesses "in" / "out" for r of them (abstaining on
the rest) and gets v right. Under (eps, delta)-DP,

    P[V >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps).

epsilon is *rejected* at confidence 1 - beta when that bound is below beta; the
lower bound is the largest rejected epsilon, found by bisection. For
delta = 0 and v = r (every guess right) the bound is q^r, so the lower bound
has the closed form eps = log(q / (1 - q)) with q = beta^(1/r).

(b) Multi-run (or many-sample) bound from Clopper-Pearson intervals on one
threshold's TPR and FPR: eps >= log((TPR_lo - delta) / FPR_hi) and
eps >= log((TNR_lo - delta) / FNR_hi), with the four one-sided bounds holding
jointly at the stated confidence (each at (1 - confidence) / 4).

A lower bound above the ledger's epsilon (an upper bound) means an
implementation or assumption bug: :func:`compare_with_ledger` flags it FAIL.
A small lower bound is *not* evidence of privacy: it only says that this
audit did not find more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import special, stats

from secure_dfml.audit._metrics import AttackMetrics
from secure_dfml.errors import AuditError

__all__ = [
    "CountsBound",
    "LedgerComparison",
    "OneRunResult",
    "clopper_pearson",
    "clopper_pearson_epsilon_lower_bound",
    "compare_with_ledger",
    "dp_consistency_violations",
    "epsilon_lower_bound_from_scores",
    "one_run_attainable",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

_EPS_MAX = 200.0


def _check_mrv(m: int, r: int, v: int) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise AuditError("m, r and v must be integers")
    if not 0 <= v <= r <= m:
        raise AuditError(f"need 0 <= v <= r <= m; got m={m}, r={r}, v={v}")


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta <= 1.0:
        raise AuditError(f"delta must lie in [0, 1]; got {delta}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence must lie in (0, 1); got {confidence}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[>= v correct of r guesses] for an (epsilon, delta)-DP mechanism."""
    _check_mrv(m, r, v)
    _check_delta(delta)
    if epsilon < 0:
        raise AuditError(f"epsilon must be >= 0; got {epsilon}")
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # max over i of P[v - i <= B < v] / i, with B ~ Binomial(r, q)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    window = np.cumsum(pmf) / np.arange(1, v + 1)
    return min(tail + 2.0 * m * delta * float(window.max()), 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, *, confidence: float = 0.95, delta: float = 0.0, tol: float = 1e-9
) -> float:
    """Largest epsilon rejected at ``confidence`` by r guesses with v correct (0 if none)."""
    _check_mrv(m, r, v)
    _check_delta(delta)
    _check_confidence(confidence)
    beta = 1.0 - confidence
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2.0
        if hi > _EPS_MAX:
            return _EPS_MAX
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunResult:
    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    configurations_tried: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pairs(m: int, k_pos: int | Sequence[int], k_neg: int | Sequence[int]) -> list[tuple[int, int]]:
    kp = [int(k_pos)] if np.isscalar(k_pos) else [int(k) for k in k_pos]  # type: ignore[arg-type]
    kn = [int(k_neg)] if np.isscalar(k_neg) else [int(k) for k in k_neg]  # type: ignore[arg-type]
    pairs = [(a, b) for a in kp for b in kn if a >= 0 and b >= 0 and a + b <= m and a + b > 0]
    if not pairs:
        raise AuditError(f"no valid (k_pos, k_neg) with 0 < k_pos + k_neg <= m={m}")
    return pairs


def one_run_audit(
    scores: Any,
    included: Any,
    *,
    k_pos: int | Sequence[int],
    k_neg: int | Sequence[int] = 0,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> OneRunResult:
    """One-run audit from canary scores (higher = more likely included).

    Guesses "in" for the ``k_pos`` highest scores and "out" for the ``k_neg``
    lowest, abstaining on the rest. Several (k_pos, k_neg) pairs may be given;
    the best is reported with a Bonferroni correction (each pair is tested at
    (1 - confidence) / pairs), so the stated confidence still holds.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included).astype(bool)
    if s.ndim != 1 or inc.shape != s.shape:
        raise AuditError("scores and included must be 1-D arrays of one length")
    _check_confidence(confidence)
    m = int(s.size)
    pairs = _pairs(m, k_pos, k_neg)
    order = np.argsort(-s, kind="mergesort")
    inc_sorted = inc[order]
    correct_top = np.concatenate([[0], np.cumsum(inc_sorted)])
    correct_bottom = np.concatenate([[0], np.cumsum(~inc_sorted[::-1])])
    per_conf = 1.0 - (1.0 - confidence) / len(pairs)
    best: OneRunResult | None = None
    for a, b in pairs:
        v = int(correct_top[a] + correct_bottom[b])
        eps = one_run_epsilon_lower_bound(m, a + b, v, confidence=per_conf, delta=delta)
        if best is None or eps > best.epsilon_lower_bound:
            best = OneRunResult(m, a + b, v, a, b, confidence, delta, eps, len(pairs))
    assert best is not None
    return best


def one_run_attainable(
    m: int,
    *,
    k_pos: int | Sequence[int],
    k_neg: int | Sequence[int] = 0,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> float:
    """The largest lower bound :func:`one_run_audit` can ever report with ``m``
    canaries and this guess grid: every guess right, for the best (k_pos, k_neg),
    under the same Bonferroni correction. An audit's strength: a mechanism with a
    larger epsilon can never be shown to leak more than this."""
    _check_confidence(confidence)
    pairs = _pairs(int(m), k_pos, k_neg)
    per_conf = 1.0 - (1.0 - confidence) / len(pairs)
    return max(one_run_epsilon_lower_bound(int(m), a + b, a + b, confidence=per_conf, delta=delta) for a, b in pairs)


def clopper_pearson(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials."""
    _check_confidence(confidence)
    if n <= 0 or not 0 <= k <= n:
        raise AuditError(f"need 0 <= k <= n and n > 0; got k={k}, n={n}")
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def _log_ratio(num: float, den: float) -> float:
    if num <= 0.0:
        return 0.0
    if den <= 0.0:
        return math.inf
    return max(0.0, math.log(num / den))


@dataclass(frozen=True)
class CountsBound:
    epsilon_lower_bound: float
    tp: int
    n_members: int
    fp: int
    n_nonmembers: int
    tpr_ci: tuple[float, float]
    fpr_ci: tuple[float, float]
    confidence: float
    delta: float
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def clopper_pearson_epsilon_lower_bound(
    tp: int, n_members: int, fp: int, n_nonmembers: int, *, delta: float = 0.0, confidence: float = 0.95
) -> CountsBound:
    """eps lower bound from one threshold's counts (TPR = tp/n_members, FPR = fp/n_nonmembers).

    Typically over many training runs (one challenge point per run), or over
    many samples with the caveat that per-sample independence is assumed.
    """
    _check_delta(delta)
    _check_confidence(confidence)
    inner = 1.0 - (1.0 - confidence) / 2.0  # two two-sided intervals -> four one-sided at (1-c)/4
    t_lo, t_hi = clopper_pearson(tp, n_members, confidence=inner)
    f_lo, f_hi = clopper_pearson(fp, n_nonmembers, confidence=inner)
    # TPR <= e^eps FPR + delta  and  TNR <= e^eps FNR + delta, at the pessimistic interval ends
    eps = max(_log_ratio(t_lo - delta, f_hi), _log_ratio((1.0 - f_hi) - delta, 1.0 - t_lo))
    return CountsBound(min(eps, _EPS_MAX), tp, n_members, fp, n_nonmembers, (t_lo, t_hi), (f_lo, f_hi),
                       confidence, delta)


def epsilon_lower_bound_from_scores(
    scores: Any,
    labels: Any,
    *,
    rng: np.random.Generator,
    delta: float = 0.0,
    confidence: float = 0.95,
    calibration_fraction: float = 0.5,
) -> CountsBound:
    """Clopper-Pearson bound with the threshold chosen on a held-out calibration split.

    Choosing the threshold on the same samples it is evaluated on would void
    the confidence level; here a random ``calibration_fraction`` picks the
    threshold that maximises the bound, and the rest evaluates it.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.ndim != 1 or y.shape != s.shape:
        raise AuditError("scores and labels must be 1-D arrays of one length")
    if not 0.0 < calibration_fraction < 1.0:
        raise AuditError(f"calibration_fraction must lie in (0, 1); got {calibration_fraction}")
    perm = rng.permutation(s.size)
    n_cal = int(round(calibration_fraction * s.size))
    cal, ev = perm[:n_cal], perm[n_cal:]
    if y[cal].all() or not y[cal].any() or y[ev].all() or not y[ev].any():
        raise AuditError("both splits need members and non-members; use more samples")

    def counts(idx: np.ndarray, thr: float) -> tuple[int, int, int, int]:
        pred = s[idx] >= thr
        return int((pred & y[idx]).sum()), int(y[idx].sum()), int((pred & ~y[idx]).sum()), int((~y[idx]).sum())

    candidates = np.unique(s[cal])
    if candidates.size > 512:
        candidates = np.unique(np.quantile(s[cal], np.linspace(0.0, 1.0, 513)))
    best_thr, best_eps = float(candidates[-1]), -1.0
    for thr in candidates:
        eps = clopper_pearson_epsilon_lower_bound(*counts(cal, float(thr)), delta=delta, confidence=confidence)
        if eps.epsilon_lower_bound > best_eps:
            best_thr, best_eps = float(thr), eps.epsilon_lower_bound
    res = clopper_pearson_epsilon_lower_bound(*counts(ev, best_thr), delta=delta, confidence=confidence)
    return CountsBound(**{**res.__dict__, "threshold": best_thr})


@dataclass(frozen=True)
class LedgerComparison:
    status: Literal["FAIL", "CONSISTENT"]
    lower_bound: float
    ledger_epsilon: float
    message: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare_with_ledger(lower_bound: float, ledger_epsilon: float, *, what: str = "audit") -> LedgerComparison:
    """FAIL when an empirical lower bound exceeds the ledger's epsilon upper bound."""
    if ledger_epsilon < 0 or lower_bound < 0:
        raise AuditError("epsilons must be >= 0")
    if lower_bound > ledger_epsilon:
        return LedgerComparison(
            "FAIL", lower_bound, ledger_epsilon,
            f"{what}: empirical lower bound eps >= {lower_bound:.3f} exceeds the ledger's eps <= "
            f"{ledger_epsilon:.3f}; the DP implementation, its accounting or its assumptions are wrong.",
        )
    return LedgerComparison(
        "CONSISTENT", lower_bound, ledger_epsilon,
        f"{what}: empirical lower bound eps >= {lower_bound:.3f} does not exceed the ledger's eps <= "
        f"{ledger_epsilon:.3f}. This is consistent with the claim; it does not prove it (a stronger "
        "attack could find more).",
    )


NON_PRIVATE_MESSAGE = "no differential privacy (epsilon = inf): there is no epsilon claim to compare with"


def ledger_entry(
    lower_bound: float, ledger_epsilon: float | None, ledger_delta: float | None, *, what: str
) -> tuple[dict[str, Any], LedgerComparison | None]:
    """The report fields comparing ``lower_bound`` with a peer's ledger: ledger
    epsilon / delta, status (FAIL, CONSISTENT or NON-PRIVATE when there is no
    ledger epsilon) and message; and the comparison itself (None when non-private)."""
    if ledger_epsilon is None:
        return {"ledger_epsilon": None, "ledger_delta": None, "status": "NON-PRIVATE",
                "message": NON_PRIVATE_MESSAGE}, None
    cmp = compare_with_ledger(lower_bound, ledger_epsilon, what=what)
    return {"ledger_epsilon": ledger_epsilon, "ledger_delta": ledger_delta, "status": cmp.status,
            "message": cmp.message}, cmp


def dp_consistency_violations(metrics: AttackMetrics, epsilon: float, delta: float) -> list[str]:
    """FPR levels where even the lower CI end of TPR breaks TPR <= e^eps * FPR + delta."""
    out: list[str] = []
    for level, est in metrics.tpr_at_fpr.items():
        if est.value is None or est.ci_low is None:
            continue
        bound = math.exp(epsilon) * level + delta
        if est.ci_low > bound:
            out.append(
                f"TPR at FPR {level:g} is at least {est.ci_low:.4f} (CI lower end) > e^{epsilon:g} * {level:g} "
                f"+ {delta:g} = {bound:.4f}"
            )
    return out
