"""The one-run canary audit's driver: train a whole federation once with canaries.

The canaries are drawn and scored, and the epsilon lower bounds computed, by
the audit library (:mod:`secure_dfml.audit`, see its ``_canary`` module for the
method); this driver builds the federation with each peer's canaries inserted
into its private data (``build_federation(..., peer_data_hook=...)``, so the
DP trainer plans its sampling rate from the augmented size and charges the
peer's ledger as usual), runs all its rounds, and writes the audit's folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secure_dfml._fsutil import staging_dir, write_output_dir
from secure_dfml._jsonutil import json_text, utc_now
from secure_dfml._run import build_federation, copy_lifetime_ledgers, hold_lifetime_ledgers, load_federation_data
from secure_dfml.audit import (
    CANARY_FORMAT,
    CANARY_VERSION,
    DEFAULT_CANARY_KIND,
    AuditProgress,
    CanaryScores,
    LedgerComparison,
    canary_findings,
    canary_k_grid,
    canary_peer_entry,
    check_canary_settings,
    draw_canaries,
    pooled_canary_entry,
    render_canary_html,
    render_canary_markdown,
)
from secure_dfml.audit.report import finding
from secure_dfml.config import RunConfig, dump_toml
from secure_dfml.errors import AuditError
from secure_dfml.rundir import AUDIT, CANARY, CANARY_RESULTS, CONFIG, ledgers_dir, read_summary

__all__ = ["CANARY_FILES", "DEFAULT_CANARIES", "canary_dir", "run_canary_audit", "run_state_root"]

_LOG = logging.getLogger(__name__)

DEFAULT_CANARIES = 100


def run_state_root(run_dir: str | Path) -> Path | None:
    """The state root whose lifetime ledgers a finished run charged (None: research ledgers)."""
    root = (read_summary(Path(run_dir)) or {}).get("state_root")
    return Path(root) if isinstance(root, str) and root else None


def _not_configured(phase: Mapping[str, Any]) -> bool:
    """A phase that did not run because the configuration has none (not a refusal)."""
    return str(phase.get("reason") or "").startswith("no ")


def canary_dir(run_dir: str | Path) -> Path:
    """Where a run's canary audit lives: ``RUN/audit/canary``, next to the threat-model audits."""
    return Path(run_dir) / AUDIT / CANARY


#: What a canary audit's folder holds besides ``ledgers/`` (the audit run's own budget).
CANARY_FILES = (CANARY_RESULTS, "canary.md", "canary.html", CONFIG)


def run_canary_audit(
    cfg: RunConfig,
    *,
    canaries_per_peer: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
    kind: str = DEFAULT_CANARY_KIND,
    state_root: str | Path | None = None,
    rng: np.random.Generator,
    out_dir: str | Path,
    progress: AuditProgress | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` once with canaries and bound each peer's epsilon from below.

    Writes ``out_dir/canary.json``, ``canary.md``, ``canary.html``,
    ``config.toml`` and the audit run's ``ledgers/``. This is a separate training
    run on the peers' records: with ``state_root`` it is charged to their lifetime
    ledgers (copied into ``ledgers/``), otherwise to ledgers of its own. ``out_dir`` must be new,
    empty, or an earlier canary audit's folder (then it is replaced only once
    this one succeeds).
    """
    m = check_canary_settings(canaries_per_peer, confidence)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "canary.json").is_file())):
        raise AuditError(f"{out} already holds other files; choose a new or empty folder for the canary audit")

    ds, split = load_federation_data(cfg)  # the same data and split as the real build (deterministic seeds)
    draw = draw_canaries(ds.x_train, ds.y_train, split.auditor_pool, peers=len(split.peers), per_peer=m,
                         num_classes=ds.num_classes, rng=rng, kind=kind)

    staging = staging_dir(out)
    held = contextlib.ExitStack()
    try:
        if state_root is not None:  # charge the peers' lifetime ledgers: this run reads their records too
            hold_lifetime_ledgers(held, state_root, range(cfg.federation.peers))
        fed = build_federation(cfg, ledger_dir=ledgers_dir(staging), peer_data_hook=draw.insert, state_root=state_root,
                               run_id=f"canary-audit-{uuid.uuid4().hex}")
        for i, p in enumerate(fed.peers):
            want = len(split.peers[i].train) + int(draw.included[i].sum())
            if p.num_train != want:
                raise AuditError(f"peer {i} trains on {p.num_train} samples, expected {want} with its canaries")
        rounds = cfg.federation.rounds
        last: Mapping[str, Any] = {}
        if progress is not None:
            progress(0, rounds, "training rounds (with canaries)")
        n = len(fed.peers)
        scorer = CanaryScores(draw, [p.model for p in fed.peers])
        refused: list[dict[str, Any]] = []  # phases the privacy gate refused: no training on that data
        for t, record in enumerate(fed.rounds(), 1):
            last = record
            refused += [ph for ph in record.get("phases", []) if not ph.get("ran") and not _not_configured(ph)]
            scorer.after_round([p.model for p in fed.peers], [  # per group: the models just trained on its data
                (int(g["aggregator"]), [int(g["aggregator"]), *(int(j) for j in g.get("returned", []) if 0 <= int(j) < n)])
                for g in record.get("groups", []) if 0 <= int(g["aggregator"]) < n])
            if progress is not None:
                progress(t, rounds, "training rounds (with canaries)")
        private = bool(cfg.privacy.enabled)
        peers_out: dict[str, Any] = {}
        comparisons: list[LedgerComparison] = []
        all_scores = scorer.scores()
        statuses = [dict(fed.nodes[i].trainer.peer_status(i)) if private else None for i in range(len(fed.peers))]
        for i, p in enumerate(fed.peers):
            entry, cmp = canary_peer_entry(i, p.arch, all_scores[i], draw, train_samples=len(split.peers[i].train),
                                           confidence=confidence, status=statuses[i])
            if cmp is not None:
                comparisons.append(cmp)
            peers_out[str(i)] = entry
        pooled, pooled_cmp = pooled_canary_entry(all_scores, draw, confidence=confidence, statuses=statuses)
        if pooled_cmp is not None:
            comparisons.append(pooled_cmp)
        k_pos, k_neg = canary_k_grid(m)
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
            "canary_kind": kind,
            "snapshots_per_peer": scorer.snapshots,
            "ledger_scope": "lifetime" if state_root is not None else "own",
            "state_root": None if state_root is None else str(state_root),
            "confidence": confidence,
            "k_pos_grid": k_pos,
            "k_neg_grid": k_neg,
            "mean_global_acc": last.get("mean_global_acc"),
            "peers": peers_out,
            "pooled": pooled,
            "epsilon_lower_bound": max(pooled["epsilon_lower_bound"], *(e["epsilon_lower_bound"] for e in peers_out.values())),
            "attainable_epsilon": pooled["attainable_epsilon"],
            "phases_refused": len(refused),
            "fail": any(c.failed for c in comparisons),
            "findings": canary_findings(peers_out, pooled, comparisons, private=private, confidence=confidence,
                                        per_peer=m),
            "config": cfg.to_dict(),
        }
        if state_root is not None:
            copy_lifetime_ledgers(state_root, range(n), ledgers_dir(staging))
        if refused:  # an audit that trained on less than the configuration says is weaker than it looks
            results["findings"].insert(0, finding(
                "warning",
                f"{len(refused)} training phase(s) were refused by the privacy gate (e.g. peer {refused[0]['peer']}: "
                f"{refused[0].get('reason')}): the canary audit trained on less than the configuration plans, so its "
                "lower bounds are weaker than its attainable bound suggests. Audit on public or proxy data, or before "
                "the lifetime budgets are spent."))
        files = dict(zip(CANARY_FILES, (json_text(results), render_canary_markdown(results),
                                        render_canary_html(results), dump_toml(cfg)), strict=True))
        write_output_dir(out, files, staging=staging)
    except BaseException:
        held.close()
        if any(ledgers_dir(staging).glob("*")):  # spent budget is never rolled back
            _LOG.warning("canary audit failed; the privacy ledgers it wrote are kept in %s", staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    held.close()
    _LOG.info("canary audit written to %s", out)
    return results
