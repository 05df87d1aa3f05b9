"""One-run canary audit (Steinke, Nasr, Jagielski 2023) of a whole federation.

For every peer, ``m`` canaries are drawn from the auditor pool (disjoint from
all peers' data and between peers) and given a random *wrong* label, so that a
model that trains on one has to memorise it. Each canary is inserted into its
peer's private training data independently with probability 1/2 (through
``build_federation(..., peer_data_hook=...)``, so the DP trainer plans its
sampling rate from the augmented size and charges the peer's ledger as usual).
The federation then runs all its rounds.

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
"""

from __future__ import annotations

import html
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml.audit._epsilon import ledger_entry, one_run_audit
from secure_dfml.audit._rundir import AuditProgress
from secure_dfml.audit._signals import compute_signals
from secure_dfml.audit.report import Finding, finding, finding_line
from secure_dfml.errors import AuditError

__all__ = ["CANARY_FORMAT", "run_canary_audit"]

_LOG = logging.getLogger(__name__)

CANARY_FORMAT = "secure-dfml-canary-audit"
CANARY_VERSION = 2  # 2: findings are {level, text} records (were strings)
_K_FRACTIONS = (0.1, 0.25, 0.5)


def _k_grid(m: int) -> tuple[list[int], list[int]]:
    ks = sorted({max(1, int(round(f * m))) for f in _K_FRACTIONS})
    return ks, [0, *ks]


def run_canary_audit(
    cfg: Any,
    *,
    canaries_per_peer: int = 50,
    confidence: float = 0.95,
    rng: np.random.Generator,
    out_dir: str | Path,
    progress: AuditProgress | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` once with canaries and bound each peer's epsilon from below.

    Writes ``out_dir/canary.json``, ``canary.md``, ``canary.html`` and the
    audit run's ``ledgers/`` (a fresh budget: this is a separate training run,
    not the deployment's). ``out_dir`` must be new, empty, or an earlier
    canary audit's folder (then it is replaced only once this one succeeds).
    """
    from secure_dfml._jsonutil import json_text, utc_now
    from secure_dfml._run import build_federation, load_federation_data
    from secure_dfml.audit._rundir import staging_dir, write_output_dir

    m = int(canaries_per_peer)
    if m < 2:
        raise AuditError(f"canaries per peer must be >= 2; got {canaries_per_peer}")
    if not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence must lie in (0, 1); got {confidence}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "canary.json").is_file())):
        raise AuditError(f"{out} already holds other files; choose a new or empty folder for the canary audit")

    ds, split = load_federation_data(cfg)  # the same data and split as the real build (deterministic seeds)
    n_peers = len(split.peers)
    pool = np.asarray(split.auditor_pool, dtype=np.int64)
    need = n_peers * m
    if pool.size < need:
        raise AuditError(
            f"{m} canaries for each of {n_peers} peers need {need} auditor-pool samples, but data.auditor_pool = "
            f"{pool.size}; raise data.auditor_pool or lower --canaries"
        )
    if ds.num_classes < 2:
        raise AuditError("canaries need at least two classes (they get a wrong label)")
    sel_rng, lab_rng, inc_rng = rng.spawn(3)
    chosen = sel_rng.choice(pool, size=need, replace=False).reshape(n_peers, m)
    x_can = ds.x_train[chosen]
    y_true = ds.y_train[chosen].astype(np.int64)
    y_can = (y_true + lab_rng.integers(1, ds.num_classes, size=y_true.shape)) % ds.num_classes
    included = inc_rng.random((n_peers, m)) < 0.5

    def hook(peer_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inc = included[peer_id]
        xc = torch.from_numpy(np.ascontiguousarray(x_can[peer_id][inc], dtype=np.float32)).to(x.dtype)
        yc = torch.from_numpy(y_can[peer_id][inc]).to(y.dtype)
        return torch.cat([x, xc]), torch.cat([y, yc])

    staging = staging_dir(out)
    try:
        fed = build_federation(cfg, ledger_dir=staging / "ledgers", peer_data_hook=hook)
        for i, p in enumerate(fed.peers):
            want = len(split.peers[i].train) + int(included[i].sum())
            if p.num_train != want:
                raise AuditError(f"peer {i} trains on {p.num_train} samples, expected {want} with its canaries")
        rounds = cfg.federation.rounds
        last: Mapping[str, Any] = {}
        if progress is not None:
            progress(0, rounds, "training rounds (with canaries)")
        for t, record in enumerate(fed.rounds(), 1):
            last = record
            if progress is not None:
                progress(t, rounds, "training rounds (with canaries)")
        private = bool(cfg.privacy.enabled)
        k_pos, k_neg = _k_grid(m)
        peers_out: dict[str, Any] = {}
        findings_fail: list[Finding] = []
        fail = False
        for i, p in enumerate(fed.peers):
            scores = compute_signals(p.model, x_can[i], y_can[i]).log_prob  # minus the loss
            status = dict(fed.nodes[i].trainer.peer_status(i)) if private else {}
            delta = float(status.get("delta") or 0.0) if private else 0.0
            res = one_run_audit(scores, included[i], k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta)
            entry: dict[str, Any] = {
                "peer": i,
                "arch": p.arch,
                "canaries": m,
                "canaries_included": int(included[i].sum()),
                "train_samples_without_canaries": int(len(split.peers[i].train)),
                **res.to_dict(),
                "mean_score_included": float(scores[included[i]].mean()) if included[i].any() else None,
                "mean_score_excluded": float(scores[~included[i]].mean()) if (~included[i]).any() else None,
                "canary_indices": chosen[i].tolist(),
                "canary_labels": y_can[i].tolist(),
                "included": included[i].astype(int).tolist(),
                "scores": scores.tolist(),
            }
            spent = status.get("epsilon_spent") if private else None
            ledger, cmp = ledger_entry(res.epsilon_lower_bound, None if spent is None else float(spent),  # type: ignore[arg-type]
                                       delta, what=f"peer {i} (canary audit)")
            entry.update(ledger)
            if cmp is not None:
                entry["ledger_target"] = status.get("epsilon_target")
                if cmp.failed:
                    fail = True
                    findings_fail.append(finding("fail", cmp.message))
            peers_out[str(i)] = entry

        lbs = [e["epsilon_lower_bound"] for e in peers_out.values()]
        findings = list(findings_fail)
        if not private:
            findings.append(finding(
                "leak" if max(lbs) > 0 else "note",
                f"The run is NON-PRIVATE (epsilon = inf). Largest canary lower bound: eps >= {max(lbs):.3f} "
                f"at {confidence:.0%} confidence" + (" -- the models measurably memorise their training data."
                                                     if max(lbs) > 0 else "."),
            ))
        elif not fail:
            findings.append(finding(
                "note",
                f"No peer's canary lower bound exceeds its ledger epsilon (largest lower bound {max(lbs):.3f}): "
                "consistent with the DP claim. This does not prove the claim; one-run audits with black-box "
                "scores are far from tight.",
            ))
        findings.append(finding(
            "note",
            f"{m} canaries per peer from the auditor pool, wrong labels, each included with probability 1/2; "
            f"guesses from the top k_pos / bottom k_neg scores of each peer's final model, (k_pos, k_neg) over "
            f"{k_pos} x {k_neg} with a Bonferroni correction (Steinke, Nasr, Jagielski 2023).",
        ))
        results: dict[str, Any] = {
            "format": CANARY_FORMAT,
            "version": CANARY_VERSION,
            "created": utc_now(),
            "output_dir": str(out),
            "federation": cfg.federation.id,
            "algorithm": cfg.federation.algorithm,
            "dataset": ds.name,
            "rounds": rounds,
            "private": private,
            "canaries_per_peer": m,
            "confidence": confidence,
            "k_pos_grid": k_pos,
            "k_neg_grid": k_neg,
            "mean_global_acc": last.get("mean_global_acc"),
            "peers": peers_out,
            "fail": fail,
            "findings": findings,
            "config": cfg.to_dict(),
        }
        from secure_dfml.config import dump_toml

        write_output_dir(out, {"canary.json": json_text(results), "canary.md": _markdown(results), "canary.html": _html(results),
                               "config.toml": dump_toml(cfg)}, staging=staging)
    except BaseException:
        if any((staging / "ledgers").glob("*")):  # spent budget is never rolled back
            _LOG.warning("canary audit failed; the privacy ledgers it wrote are kept in %s", staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _LOG.info("canary audit written to %s", out)
    return results


def _eps_text(e: Mapping[str, Any]) -> str:
    v = e.get("ledger_epsilon")
    return "inf (non-private)" if v is None else f"{v:.3f}"


def _markdown(r: Mapping[str, Any]) -> str:
    lines = [
        f"# One-run canary audit: {r['federation']} ({r['algorithm']} on {r['dataset']})",
        "",
        f"{r['canaries_per_peer']} canaries per peer, confidence {r['confidence']:.0%}, {r['rounds']} rounds, "
        f"{'DP' if r['private'] else 'NON-PRIVATE'}.",
        "",
        "| peer | arch | included | guesses r | correct v | eps lower bound | ledger eps | status |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for pid, e in r["peers"].items():
        lines.append(f"| {pid} | {e['arch']} | {e['canaries_included']}/{e['canaries']} | {e['r']} | {e['v']} | "
                     f"{e['epsilon_lower_bound']:.3f} | {_eps_text(e)} | {e['status']} |")
    lines += ["", "## Findings", ""] + [f"- {finding_line(f)}" for f in r["findings"]]
    lines += ["", "A lower bound that stays below the ledger epsilon is consistent with the privacy claim; it never "
              "proves it.", ""]
    return "\n".join(lines)


def _html(r: Mapping[str, Any]) -> str:
    from secure_dfml.audit._rundir import render_simple_html
    from secure_dfml.audit.report import html_table

    rows = [[pid, e["arch"], f"{e['canaries_included']}/{e['canaries']}", e["r"], e["v"], e["k_pos"], e["k_neg"],
             f"{e['epsilon_lower_bound']:.3f}", _eps_text(e), e["status"]] for pid, e in r["peers"].items()]
    body = [
        "<h2>Per peer</h2>",
        f"<p>{r['canaries_per_peer']} canaries per peer, confidence {r['confidence']:.0%}, {r['rounds']} rounds, "
        f"{'DP' if r['private'] else 'NON-PRIVATE'}; final mean global accuracy "
        f"{'n/a' if r['mean_global_acc'] is None else format(r['mean_global_acc'], '.3f')}.</p>",
        html_table(["peer", "arch", "included", "guesses r", "correct v", "k_pos", "k_neg", "eps lower bound",
                    "ledger eps", "status"], rows, fail_col=9),
        "<p class='caveat'>" + html.escape(
            "A lower bound that stays below the ledger epsilon is consistent with the privacy claim; it never proves "
            "it. FAIL means the measured leakage is impossible under the claimed epsilon.") + "</p>",
    ]
    title = f"One-run canary audit: {r['federation']}"
    return render_simple_html(title, None, body, r["findings"])
