"""One-run canary audit (Steinke, Nasr, Jagielski 2023): the canaries and the statistics.

For every peer, ``m`` canaries are made (:data:`CANARY_KINDS`: synthetic
out-of-distribution ``noise`` records with random labels by default, or
auditor-pool records with a wrong label, ``mislabelled``), so that a model that
trains on one has to memorise it. Each canary is inserted into its peer's
private training data independently with probability 1/2
(:meth:`CanaryDraw.insert`, a peer data hook).

Every canary is scored by how much training on its peer's data moved the
models towards its label (:class:`CanaryScores`: the change of the label's
log-probability over each round its peer aggregated, standardised per model;
higher = more likely included). The auditor guesses IN for the ``k_pos`` highest scores and OUT for
the ``k_neg`` lowest, abstaining on the rest; the number of correct guesses
gives an empirical epsilon lower bound at the stated confidence
(:func:`~secure_dfml.audit.one_run_audit`; a small grid of (k_pos, k_neg) is
tried with a Bonferroni correction), per peer and pooled over all peers
(:func:`pooled_canary_entry`, far stronger). Each result states its strength:
the largest bound it could have shown with every guess right
(:func:`~secure_dfml.audit.one_run_attainable`). A lower bound above a ledger
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_dfml.audit._epsilon import (
    LedgerComparison,
    ledger_entry,
    one_run_attainable,
    one_run_audit,
)
from secure_dfml.audit._signals import compute_signals
from secure_dfml.audit.report import (
    Finding,
    finding,
    finding_line,
    html_table,
    render_simple_html,
)
from secure_dfml.errors import AuditError

__all__ = [
    "CANARY_FORMAT",
    "CANARY_KINDS",
    "CANARY_VERSION",
    "CanaryDraw",
    "CanaryScores",
    "DEFAULT_CANARY_KIND",
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

    chosen: np.ndarray  # (peers, m) indices into the training set (auditor pool); -1 for synthetic canaries
    x: np.ndarray  # (peers, m, *input shape)
    labels: np.ndarray  # (peers, m) the labels they are trained with, int64
    included: np.ndarray  # (peers, m) bool
    kind: str = "mislabelled"

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


CanaryMaker = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def _mislabelled(x_train: np.ndarray, y_train: np.ndarray, pool: np.ndarray, *, peers: int, m: int,
                 num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Auditor-pool records with a random wrong label."""
    need = peers * m
    if pool.size < need:
        raise AuditError(
            f"{m} mislabelled canaries for each of {peers} peers need {need} auditor-pool samples, but "
            f"data.auditor_pool = {pool.size}; raise data.auditor_pool, lower --canaries, or use --canary-kind noise"
        )
    sel_rng, lab_rng = rng.spawn(2)
    chosen = sel_rng.choice(pool, size=need, replace=False).reshape(peers, m)
    y_true = y_train[chosen].astype(np.int64)
    labels = (y_true + lab_rng.integers(1, num_classes, size=y_true.shape)) % num_classes
    return chosen, x_train[chosen], labels


def _noise(x_train: np.ndarray, y_train: np.ndarray, pool: np.ndarray, *, peers: int, m: int,
           num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic out-of-distribution records: every input value uniform over the
    data's range, a uniformly random label. Nothing like them is in any peer's
    data, so a model that trains on one has to memorise it; they use no auditor-pool records."""
    lo, hi = float(x_train.min()), float(x_train.max())
    x_rng, lab_rng = rng.spawn(2)
    x = x_rng.uniform(lo, hi, size=(peers, m, *x_train.shape[1:])).astype(np.float32)
    labels = lab_rng.integers(0, num_classes, size=(peers, m)).astype(np.int64)
    return np.full((peers, m), -1, dtype=np.int64), x, labels


#: How canaries are made (``--canary-kind``); ``noise`` is the stronger (see the audit-strength benchmark).
CANARY_KINDS: dict[str, CanaryMaker] = {"noise": _noise, "mislabelled": _mislabelled}
DEFAULT_CANARY_KIND = "noise"


def draw_canaries(
    x_train: np.ndarray,
    y_train: np.ndarray,
    auditor_pool: Sequence[int] | np.ndarray,
    *,
    peers: int,
    per_peer: int,
    num_classes: int,
    rng: np.random.Generator,
    kind: str = DEFAULT_CANARY_KIND,
) -> CanaryDraw:
    """``per_peer`` canaries of ``kind`` (:data:`CANARY_KINDS`) for each of
    ``peers`` peers, each included in its peer's data with probability 1/2."""
    maker = CANARY_KINDS.get(kind)
    if maker is None:
        raise AuditError(f"unknown canary kind {kind!r}; choose one of: {', '.join(CANARY_KINDS)}")
    if num_classes < 2:
        raise AuditError("canaries need at least two classes")
    make_rng, inc_rng = rng.spawn(2)
    chosen, x, labels = maker(x_train, y_train, np.asarray(auditor_pool, dtype=np.int64), peers=peers,
                              m=int(per_peer), num_classes=num_classes, rng=make_rng)
    included = inc_rng.random((peers, int(per_peer))) < 0.5
    return CanaryDraw(chosen=chosen, x=x, labels=labels, included=included, kind=kind)


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


class CanaryScores:
    """Each canary's membership score: how much training on its peer's data moved
    the models towards it.

    Every round, each model's log-probability of every canary's label is taken
    before and after the round. For a peer that aggregated, the models of its
    group have just been trained on its data (its own model and the models it
    returned); for each of them the change (after - before) is standardised over
    all canaries of all peers -- the changes on other peers' canaries are the
    null -- and a canary's score is the mean of its peer's standardised changes
    over every round that peer aggregated (its final model's standardised score
    when it never did). The model itself before training is the reference that
    removes each canary's own difficulty. Every model of every round is DP-SGD
    output or post-processing of it (the ledger's accounting covers every
    iterate), so any function of them is a legitimate guess.
    """

    def __init__(self, draw: CanaryDraw, models: Sequence[torch.nn.Module]) -> None:
        peers, m = draw.labels.shape
        self._x = np.ascontiguousarray(draw.x.reshape(peers * m, *draw.x.shape[2:]), dtype=np.float32)
        self._labels = draw.labels.reshape(-1)
        self._shape = (peers, m)
        self._total = np.zeros((peers, m))
        self._count = np.zeros(peers, dtype=np.int64)
        self._before = [self._log_prob(model) for model in models]

    def _log_prob(self, model: torch.nn.Module) -> np.ndarray:
        return compute_signals(model, self._x, self._labels).log_prob

    @staticmethod
    def _standardized(v: np.ndarray) -> np.ndarray:
        spread = float(v.std())
        return (v - v.mean()) / (spread if spread > 0 else 1.0)

    def after_round(self, models: Sequence[torch.nn.Module], groups: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Record a round: ``models`` as they are now, and per group (aggregator, the
        models trained on its data) -- one snapshot for each aggregator's canaries."""
        changed = {j for _, trained in groups for j in trained}  # only a group's models were trained this round
        after = [self._log_prob(model) if j in changed else self._before[j] for j, model in enumerate(models)]
        for owner, trained in groups:
            if not trained:
                continue
            changes = [self._standardized(after[j] - self._before[j]).reshape(self._shape)[owner] for j in trained]
            self._total[owner] += np.mean(changes, axis=0)
            self._count[owner] += 1
        self._before = after

    @property
    def snapshots(self) -> list[int]:
        return self._count.tolist()

    def scores(self) -> np.ndarray:
        """(peers, m) scores on one scale for all peers; a peer that never aggregated
        is scored by its last model (standardised minus the loss)."""
        out = self._total / np.maximum(self._count, 1)[:, None]
        for i in np.flatnonzero(self._count == 0):
            out[i] = self._standardized(self._before[i]).reshape(self._shape)[i]
        return out


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
    ``scores`` is (peers, m), on one scale for all peers (:class:`CanaryScores`).
    """
    z = np.asarray(scores, dtype=np.float64).ravel()
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
        "score": "mean, over every round the canary's peer aggregated and every model trained on its data in it, of "
                 "the change of the log-probability of the canary's label over the round, standardised over all "
                 "canaries",
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
        f"{per_peer} canaries per peer, each included in its peer's training data with probability 1/2, scored by "
        "the change of the models trained on its peer's data over each round that peer aggregated; guesses "
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
