"""One-run canary audit (Steinke, Nasr, Jagielski 2023): the canaries and the statistics.

For every peer, ``m`` canaries are drawn from the auditor pool (disjoint from
all peers' data and between peers) and given a random *wrong* label, so that a
model that trains on one has to memorise it. Each canary is inserted into its
peer's private training data independently with probability 1/2
(:meth:`CanaryDraw.insert`, a peer data hook).

Afterwards every canary is scored by its peer's final model (score = minus the
cross-entropy loss on the canary's wrong label; higher = more likely
included). The auditor guesses IN for the ``k_pos`` highest scores and OUT for
the ``k_neg`` lowest, abstaining on the rest; the number of correct guesses
gives an empirical epsilon lower bound at the stated confidence
(:func:`~secure_dfml.audit.one_run_audit`; a small grid of (k_pos, k_neg) is
tried with a Bonferroni correction). A lower bound above the peer's ledger
epsilon is flagged FAIL: the DP implementation, its accounting or its
assumptions are wrong. A small lower bound is not evidence of privacy: one-run
audits of DP-SGD with black-box scores are known to be far from tight.

This module holds what does not depend on how the federation is trained: the
draw, the per-peer statistics, the findings and the reports. The driver that
trains a federation with the canaries is
:func:`secure_dfml.orchestration.canary.run_canary_audit`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_dfml.audit._epsilon import LedgerComparison, ledger_entry, one_run_attainable, one_run_audit
from secure_dfml.audit.report import Finding, finding, finding_line, html_table, render_simple_html
from secure_dfml.errors import AuditError

__all__ = [
    "CANARY_FORMAT",
    "CANARY_VERSION",
    "CanaryDraw",
    "canary_findings",
    "canary_k_grid",
    "canary_peer_entry",
    "check_canary_settings",
    "draw_canaries",
    "render_canary_html",
    "render_canary_markdown",
]

CANARY_FORMAT = "secure-dfml-canary-audit"
CANARY_VERSION = 3  # 2: findings are {level, text} records (were strings); 3: pooled test, attainable_epsilon
_K_FRACTIONS = (0.1, 0.25, 0.5)


def canary_k_grid(m: int) -> tuple[list[int], list[int]]:
    """The (k_pos, k_neg) values tried for ``m`` canaries per peer."""
    ks = sorted({max(1, int(round(f * m))) for f in _K_FRACTIONS})
    return ks, [0, *ks]


def check_canary_settings(canaries_per_peer: int, confidence: float) -> int:
    """``canaries_per_peer`` as an int, once both settings are valid."""
    m = int(canaries_per_peer)
    if m < 2:
        raise AuditError(f"canaries per peer must be >= 2; got {canaries_per_peer}")
    if not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence must lie in (0, 1); got {confidence}")
    return m


@dataclass(frozen=True)
class CanaryDraw:
    """The canaries of every peer: auditor-pool indices, inputs, wrong labels,
    and which ones are inserted into the peer's training data."""

    chosen: np.ndarray  # (peers, m) indices into the training set (auditor pool)
    x: np.ndarray  # (peers, m, *input shape)
    labels: np.ndarray  # (peers, m) wrong labels, int64
    included: np.ndarray  # (peers, m) bool

    @property
    def per_peer(self) -> int:
        return int(self.chosen.shape[1])

    def insert(self, peer_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Peer ``peer_id``'s training data with its included canaries appended
        (a peer data hook for building the federation)."""
        inc = self.included[peer_id]
        xc = torch.from_numpy(np.ascontiguousarray(self.x[peer_id][inc], dtype=np.float32)).to(x.dtype)
        yc = torch.from_numpy(self.labels[peer_id][inc]).to(y.dtype)
        return torch.cat([x, xc]), torch.cat([y, yc])


def draw_canaries(
    x_train: np.ndarray,
    y_train: np.ndarray,
    auditor_pool: Sequence[int] | np.ndarray,
    *,
    peers: int,
    per_peer: int,
    num_classes: int,
    rng: np.random.Generator,
) -> CanaryDraw:
    """``per_peer`` canaries for each of ``peers`` peers from the auditor pool,
    each with a random wrong label and included with probability 1/2."""
    m = int(per_peer)
    pool = np.asarray(auditor_pool, dtype=np.int64)
    need = peers * m
    if pool.size < need:
        raise AuditError(
            f"{m} canaries for each of {peers} peers need {need} auditor-pool samples, but data.auditor_pool = "
            f"{pool.size}; raise data.auditor_pool or lower --canaries"
        )
    if num_classes < 2:
        raise AuditError("canaries need at least two classes (they get a wrong label)")
    sel_rng, lab_rng, inc_rng = rng.spawn(3)
    chosen = sel_rng.choice(pool, size=need, replace=False).reshape(peers, m)
    y_true = y_train[chosen].astype(np.int64)
    labels = (y_true + lab_rng.integers(1, num_classes, size=y_true.shape)) % num_classes
    included = inc_rng.random((peers, m)) < 0.5
    return CanaryDraw(chosen=chosen, x=x_train[chosen], labels=labels, included=included)


def canary_peer_entry(
    peer: int,
    arch: str,
    scores: np.ndarray,
    draw: CanaryDraw,
    *,
    train_samples: int,
    confidence: float,
    status: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], LedgerComparison | None]:
    """Peer ``peer``'s canary result from its final model's ``scores`` (minus
    the loss on each canary); ``status`` is its trainer's privacy status (None
    when the run is not private). Returns the report entry and the comparison
    with its ledger (None when non-private)."""
    included = draw.included[peer]
    m = draw.per_peer
    k_pos, k_neg = canary_k_grid(m)
    private = status is not None
    delta = float((status or {}).get("delta") or 0.0)
    res = one_run_audit(scores, included, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta)
    entry: dict[str, Any] = {
        "peer": peer,
        "arch": arch,
        "canaries": m,
        "canaries_included": int(included.sum()),
        "train_samples_without_canaries": int(train_samples),
        **res.to_dict(),
        "attainable_epsilon": one_run_attainable(m, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta),
        "mean_score_included": float(scores[included].mean()) if included.any() else None,
        "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else None,
        "canary_indices": draw.chosen[peer].tolist(),
        "canary_labels": draw.labels[peer].tolist(),
        "included": included.astype(int).tolist(),
        "scores": scores.tolist(),
    }
    spent = (status or {}).get("epsilon_spent") if private else None
    ledger, cmp = ledger_entry(res.epsilon_lower_bound, None if spent is None else float(spent),  # type: ignore[arg-type]
                               delta, what=f"peer {peer} (canary audit)")
    entry.update(ledger)
    if cmp is not None:
        entry["ledger_target"] = (status or {}).get("epsilon_target")
    return entry, cmp


def standardized_scores(scores: np.ndarray) -> np.ndarray:
    """Each peer's canary scores standardised over its own canaries (zero mean,
    unit spread), so that canaries scored by different models can be ranked
    together. A function of the models' outputs only, as the audit requires."""
    s = np.asarray(scores, dtype=np.float64)
    spread = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)


def pooled_canary_entry(
    scores: np.ndarray,
    draw: CanaryDraw,
    *,
    confidence: float,
    statuses: Sequence[Mapping[str, Any] | None],
) -> tuple[dict[str, Any], LedgerComparison | None]:
    """The federation-wide audit: every peer's canaries in one test.

    Each canary sits in exactly one peer's data and reaches the released models
    only through that peer's DP-SGD (everything else is post-processing), so the
    whole federation's output is (max_i eps_i, max_i delta_i)-DP with respect
    to any one canary, and the one-run bound over all ``peers * m`` canaries
    bounds the largest ledger epsilon from below. Many more canaries make this
    test far stronger than any single peer's (see ``attainable_epsilon``).
    ``scores`` is (peers, m): each canary scored by its own peer's final model.
    """
    z = standardized_scores(scores).ravel()
    included = draw.included.ravel()
    m = int(z.size)
    k_pos, k_neg = canary_k_grid(m)
    private = all(st is not None for st in statuses)
    delta = max((float(st.get("delta") or 0.0) for st in statuses if st is not None), default=0.0)
    res = one_run_audit(z, included, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta)
    entry: dict[str, Any] = {
        "canaries": m,
        "canaries_included": int(included.sum()),
        **res.to_dict(),
        "attainable_epsilon": one_run_attainable(m, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta),
        "score": "minus the loss on the canary's label under its own peer's final model, standardised per peer",
    }
    spent = [st.get("epsilon_spent") for st in statuses if st is not None] if private else []
    ceiling = max((float(e) for e in spent if e is not None), default=None) if private else None
    ledger, cmp = ledger_entry(res.epsilon_lower_bound, ceiling, delta if private else None,
                               what="the federation (all peers' canaries pooled; against the largest ledger epsilon)")
    entry.update(ledger)
    return entry, cmp


def canary_findings(
    peers: Mapping[str, Mapping[str, Any]],
    pooled: Mapping[str, Any],
    comparisons: Sequence[LedgerComparison],
    *,
    private: bool,
    confidence: float,
    per_peer: int,
) -> list[Finding]:
    """The findings of a canary audit: FAILs first, then what the bounds say and
    how strong the audit was."""
    fail = any(c.failed for c in comparisons)
    findings = [finding("fail", c.message) for c in comparisons if c.failed]
    best = max([pooled["epsilon_lower_bound"], *(e["epsilon_lower_bound"] for e in peers.values())])
    if not private:
        findings.append(finding(
            "leak" if best > 0 else "note",
            f"The run is NON-PRIVATE (epsilon = inf). Largest canary lower bound: eps >= {best:.3f} "
            f"at {confidence:.0%} confidence" + (" -- the models measurably memorise their training data."
                                                 if best > 0 else "."),
        ))
    elif not fail:
        findings.append(finding(
            "note",
            f"No canary lower bound exceeds a ledger epsilon (largest lower bound {best:.3f}): "
            "consistent with the DP claim. This does not prove the claim; one-run audits with black-box "
            "scores are far from tight.",
        ))
    findings.append(finding(
        "note",
        f"Audit strength: with every guess right, this audit could show at most eps >= "
        f"{pooled['attainable_epsilon']:.3f} for the federation ({pooled['canaries']} canaries pooled) and eps >= "
        f"{max(e['attainable_epsilon'] for e in peers.values()):.3f} for one peer ({per_peer} canaries); a larger "
        "epsilon can never be detected by it.",
    ))
    k_pos, k_neg = canary_k_grid(per_peer)
    findings.append(finding(
        "note",
        f"{per_peer} canaries per peer, each included in its peer's training data with probability 1/2; guesses "
        f"from the top k_pos / bottom k_neg scores, per peer over (k_pos, k_neg) in {k_pos} x {k_neg} and pooled "
        f"over all peers' standardised scores, each with a Bonferroni correction (Steinke, Nasr, Jagielski 2023).",
    ))
    return findings


def _eps_text(e: Mapping[str, Any]) -> str:
    v = e.get("ledger_epsilon")
    return "inf (non-private)" if v is None else f"{v:.3f}"


def _rows(r: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Table rows: every peer, then the pooled test (``pooled``)."""
    return [*r["peers"].items(), *([("pooled", r["pooled"])] if r.get("pooled") else [])]


def render_canary_markdown(r: Mapping[str, Any]) -> str:
    """``canary.md``: one table per peer and the findings."""
    lines = [
        f"# One-run canary audit: {r['federation']} ({r['algorithm']} on {r['dataset']})",
        "",
        f"{r['canaries_per_peer']} canaries per peer, confidence {r['confidence']:.0%}, {r['rounds']} rounds, "
        f"{'DP' if r['private'] else 'NON-PRIVATE'}.",
        "",
        "| peer | arch | included | guesses r | correct v | eps lower bound | attainable | ledger eps | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pid, e in _rows(r):
        lines.append(f"| {pid} | {e.get('arch', 'all')} | {e['canaries_included']}/{e['canaries']} | {e['r']} | "
                     f"{e['v']} | {e['epsilon_lower_bound']:.3f} | {e['attainable_epsilon']:.3f} | {_eps_text(e)} | "
                     f"{e['status']} |")
    lines += ["", "## Findings", ""] + [f"- {finding_line(f)}" for f in r["findings"]]
    lines += ["", "A lower bound that stays below the ledger epsilon is consistent with the privacy claim; it never "
              "proves it.", ""]
    return "\n".join(lines)


def render_canary_html(r: Mapping[str, Any]) -> str:
    """``canary.html``: a self-contained page in the audit report's style."""
    rows = [[pid, e.get("arch", "all"), f"{e['canaries_included']}/{e['canaries']}", e["r"], e["v"], e["k_pos"],
             e["k_neg"], f"{e['epsilon_lower_bound']:.3f}", f"{e['attainable_epsilon']:.3f}", _eps_text(e), e["status"]]
            for pid, e in _rows(r)]
    body = [
        "<h2>Per peer</h2>",
        f"<p>{r['canaries_per_peer']} canaries per peer, confidence {r['confidence']:.0%}, {r['rounds']} rounds, "
        f"{'DP' if r['private'] else 'NON-PRIVATE'}; final mean global accuracy "
        f"{'n/a' if r['mean_global_acc'] is None else format(r['mean_global_acc'], '.3f')}.</p>",
        html_table(["peer", "arch", "included", "guesses r", "correct v", "k_pos", "k_neg", "eps lower bound",
                    "attainable", "ledger eps", "status"], rows, fail_col=10),
        "<p class='caveat'>" + html.escape(
            "A lower bound that stays below the ledger epsilon is consistent with the privacy claim; it never proves "
            "it. FAIL means the measured leakage is impossible under the claimed epsilon.") + "</p>",
    ]
    title = f"One-run canary audit: {r['federation']}"
    return render_simple_html(title, None, body, r["findings"])
