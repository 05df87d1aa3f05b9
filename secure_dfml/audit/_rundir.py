"""Audit a run directory from the point of view of one threat model.

:func:`audit_run_dir` is the engine-facing half of the audit: it reloads a
run's config, rebuilds the (deterministic) data set and split, picks the
models the threat model's adversary would hold, and runs the pure audit
library (:func:`~secure_dfml.audit.audit_model`) on each of them:

* ``sender_models_as_received`` (curious aggregator): ``views/received/peer_XXX``,
  the latest model peer XXX sent as the aggregator decrypted it. Members are
  peer XXX's train split, non-members its audit-holdout split.
* ``returned_models`` (curious sender): ``views/returned/peer_XXX``, the model
  returned to sender XXX after mutual learning on the *aggregator's* data; the
  aggregator is read from ``metrics.jsonl`` (the last group that returned a
  model to XXX). Members are the aggregator's train split.
* ``final_and_peak`` (final-model attacker): ``models/peer_XXX_final`` and
  ``models/peer_XXX_peak``; members are peer XXX's train split.
* ``envelopes`` (eavesdropper): see :mod:`secure_dfml.audit._eavesdropper`.

Reference models are trained by the auditor on the auditor pool only (disjoint
from every peer's data), with the run's optimiser settings. Offline attacks
share one set of reference models per architecture across all targets of that
architecture; online attacks need the target's challenge points inside the
reference models' training sets, so they cost one set per attacked peer.

Results go to ``RUN_DIR/audit/<threat-model>/results.json`` and ``report.html``,
written to a temporary folder first and renamed into place, so a failed audit
never destroys earlier results.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml._fsutil import write_output_dir
from secure_dfml._jsonutil import json_text
from secure_dfml.audit._attacks import ATTACKS, get_attack
from secure_dfml.audit._epsilon import (
    LedgerComparison,
    clopper_pearson_epsilon_lower_bound,
    dp_consistency_violations,
    epsilon_lower_bound_from_scores,
    ledger_entry,
)
from secure_dfml.audit._eavesdropper import analyse_envelopes
from secure_dfml.audit._federation import (
    RESULTS_FORMAT,
    ModelTarget,
    load_model,
    rebuild_federation,
    results_header,
    selected_peers,
)
from secure_dfml.audit._reference import ReferenceModels, train_reference_models
from secure_dfml.audit._runner import AuditResult, audit_model
from secure_dfml.audit._threat_models import ThreatModel, load_threat_model
from secure_dfml.audit._training import make_trainer, torch_generator
from secure_dfml.audit.report import Finding, finding, html_table, render_html_report, render_simple_html
from secure_dfml.audit.report import findings as _findings
from secure_dfml.errors import AuditError, RunDirectoryError, SecureDFMLError
from secure_dfml.models import build_model
from secure_dfml.privacy import PrivacyLedger
from secure_dfml.rundir import (
    METRICS,
    MODELS,
    VIEW_RECEIVED,
    VIEW_RETURNED,
    VIEWS,
    audit_dir,
    check_run_dir,
    ledger_file,
    ledgers_dir,
    metrics_file,
    model_file,
    models_dir,
    read_config,
    read_metrics,
    read_summary,
    view_file,
    views_dir,
)

__all__ = [
    "ATTACK_ALIASES",
    "AuditProgress",
    "DEFAULT_RUN_ATTACKS",
    "RESULTS_FORMAT",
    "audit_run_dir",
    "default_reference_epochs",
    "rebuild_federation",
    "resolve_attacks",
]

_LOG = logging.getLogger(__name__)

#: ``progress(done, total, what)``: called after each reference model is trained.
AuditProgress = Callable[[int, int, str], None]

#: Offline-capable attacks (one set of reference models per architecture) plus
#: the reference-free ones. Online attacks are opt-in (cost: one set per peer).
DEFAULT_RUN_ATTACKS: tuple[str, ...] = ("loss", "population", "lira_offline", "rmia_offline")

#: Short names accepted on the command line: ``lira`` / ``rmia`` mean the
#: offline variant (shared reference models), or the online one when
#: ``online=True`` (``--online``).
ATTACK_ALIASES: dict[str, tuple[str, str]] = {
    "lira": ("lira_offline", "lira_online"),
    "rmia": ("rmia_offline", "rmia_online"),
}

_VIEW_DIRS = {"sender_models_as_received": VIEW_RECEIVED, "returned_models": VIEW_RETURNED}


# ----------------------------------------------------------------------------- helpers
def resolve_attacks(names: Sequence[str] | None, *, online: bool = False) -> tuple[str, ...]:
    """Registered attack names for ``names`` (aliases expanded, order kept, no duplicates).

    ``None`` or empty gives :data:`DEFAULT_RUN_ATTACKS` (with ``lira``/``rmia``
    switched to online when ``online``).
    """
    raw = list(names) if names else ["loss", "population", "lira", "rmia"]
    out: list[str] = []
    for n in raw:
        n = n.strip().lower().replace("-", "_")
        if not n:
            continue
        if n in ATTACK_ALIASES:
            n = ATTACK_ALIASES[n][1 if online else 0]
        if n not in ATTACKS:
            allowed = sorted(set(ATTACKS) | set(ATTACK_ALIASES))
            raise AuditError(f"unknown attack {n!r}; available: {', '.join(allowed)}")
        if n not in out:
            out.append(n)
    if not out:
        raise AuditError("no attacks requested")
    return tuple(out)


# ----------------------------------------------------------------------------- run directory
@dataclass(frozen=True)
class _RunDir:
    path: Path
    cfg: Any  # RunConfig
    summary: Mapping[str, Any] | None
    records: tuple[Mapping[str, Any], ...]


def _load_run_dir(run_dir: str | Path) -> _RunDir:
    try:
        path = check_run_dir(run_dir)
        return _RunDir(path, read_config(path), read_summary(path), tuple(read_metrics(path)))
    except RunDirectoryError as exc:
        raise AuditError(str(exc)) from exc


def _check_rebuild(run: _RunDir, fed: Any) -> None:
    if run.summary is None:
        return
    want = run.summary.get("train_samples_per_peer")
    got = [int(len(p.train)) for p in fed.split.peers]
    if want is not None and list(want) != got:
        raise AuditError(
            f"rebuilding the data of {run.path} gives per-peer training sizes {got}, but the run recorded {list(want)}; "
            "the data files or the code changed since the run, so members and non-members cannot be recovered."
        )
    archs = run.summary.get("architectures")
    have = [p.arch for p in fed.peers]
    if archs is not None and list(archs) != have:
        raise AuditError(f"the run used architectures {list(archs)} but its config now gives {have}")


@dataclass(frozen=True)
class _LedgerInfo:
    epsilon: float | None
    delta: float | None
    target: float | None
    accountant: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ledgers(run: _RunDir, n_peers: int) -> tuple[dict[int, _LedgerInfo], list[Finding]]:
    """Ledger epsilon per peer (empty when the run is not private) and warnings
    about missing or unverifiable ledgers."""
    notes: list[Finding] = []
    if not run.cfg.privacy.enabled:
        return {}, notes
    led_dir = ledgers_dir(run.path)
    if not led_dir.is_dir():
        notes.append(finding("warning", f"privacy is enabled in the config but {led_dir} is missing: no ledger "
                                        "epsilon to compare with."))
        return {}, notes
    out: dict[int, _LedgerInfo] = {}
    for i in range(n_peers):
        p = ledger_file(run.path, i)
        if not p.is_file():
            out[i] = _LedgerInfo(None, None, None, None, f"ledger file {p.name} is missing")
            notes.append(finding("warning", f"peer {i}: ledger file {p} is missing; its epsilon is unknown."))
            continue
        try:
            led = PrivacyLedger.load(p)
        except SecureDFMLError as exc:
            out[i] = _LedgerInfo(None, None, None, None, str(exc))
            notes.append(finding("warning", f"peer {i}: ledger failed verification: {exc}"))
            continue
        out[i] = _LedgerInfo(float(led.spent_epsilon), float(led.delta), led.target_epsilon, led.accountant)
    return out, notes


# ----------------------------------------------------------------------------- targets
def _ckks_on(cfg: Any) -> bool:
    return cfg.crypto.secure_aggregation == "ckks"


def _sender_history(records: Sequence[Mapping[str, Any]], n_peers: int) -> dict[int, dict[str, Any]]:
    """Per peer: rounds as sender, rounds its model went into a CKKS sum, rounds received individually."""
    hist: dict[int, dict[str, Any]] = {
        i: {"sent": 0, "ckks": 0, "individual": 0, "last_returned_by": None} for i in range(n_peers)
    }
    for rec in records:
        for g in rec.get("groups", []):
            for s in g.get("senders", []):
                if s in hist:
                    hist[s]["sent"] += 1
            for ss in g.get("secure_sums", []) or []:
                for s in ss.get("contributors", []):
                    if s in hist:
                        hist[s]["ckks"] += 1
            for s in g.get("received", []) or []:
                if s in hist:
                    hist[s]["individual"] += 1
            for s in g.get("returned", []) or []:
                if s in hist:
                    hist[s]["last_returned_by"] = int(g.get("aggregator"))
    return hist


def _absent_reason_received(cfg: Any, h: Mapping[str, Any], peer: int) -> str:
    if cfg.federation.algorithm == "local":
        return "algorithm 'local' exchanges no models"
    if h["sent"] == 0:
        return f"peer {peer} was never selected as a sender"
    if h["ckks"] and not h["individual"]:
        return (
            f"every model peer {peer} sent ({h['ckks']} time(s)) was protected by CKKS secure averaging: the "
            "aggregator only saw encrypted sums, never this peer's individual model (the mitigation worked)"
        )
    return f"no model from peer {peer} reached an aggregator individually (dropped links or rejected messages)"


def _select_targets(
    run: _RunDir, tm: ThreatModel, fed: Any, peers: Sequence[int] | None
) -> tuple[list[ModelTarget], list[dict[str, Any]], str | None]:
    """(targets, skipped entries, view-absent reason when nothing can be attacked)."""
    cfg = run.cfg
    archs = [p.arch for p in fed.peers]
    n = len(archs)
    wanted = set(selected_peers(peers, n))
    targets: list[ModelTarget] = []
    skipped: list[dict[str, Any]] = []
    hist = _sender_history(run.records, n)

    if tm.view == "final_and_peak":
        mdir = models_dir(run.path)
        if not mdir.is_dir():
            raise AuditError(f"{run.path} has no {MODELS}/ folder: the final-model view needs "
                             f"{MODELS}/peer_XXX_final.safetensors")
        no_peak: list[int] = []
        for i in sorted(wanted):
            final = model_file(run.path, i, "final")
            peak = model_file(run.path, i, "peak")
            if final.is_file():
                targets.append(ModelTarget(f"{i} final", i, final, "final", archs[i]))
            else:
                skipped.append({"data_owner": i, "model": "final", "reason": f"{final.name} is missing"})
            if peak.is_file():
                targets.append(ModelTarget(f"{i} peak", i, peak, "peak", archs[i]))
            else:
                no_peak.append(i)
        if no_peak:
            skipped.append({"data_owner": None, "model": "peak",
                            "reason": f"no peak snapshot for peer(s) {no_peak} (no peak round within the run's rounds)"})
        if not targets:
            raise AuditError(f"{mdir} holds no final models for peers {sorted(wanted)}")
        return targets, skipped, None

    if tm.view not in _VIEW_DIRS:
        raise AuditError(f"view {tm.view!r} is not a model view")
    vdir = views_dir(run.path, _VIEW_DIRS[tm.view])
    if tm.view == "sender_models_as_received":
        for i in sorted(wanted):
            f = view_file(run.path, VIEW_RECEIVED, i)
            if f.is_file():
                t = ModelTarget(f"{i} as received", i, f, "received", archs[i], via=i)
                targets.append(t)
                if _ckks_on(cfg) and hist[i]["individual"]:
                    skipped.append({
                        "data_owner": i, "model": "received", "reason": None,
                        "note": (f"CKKS secure averaging is on, yet peer {i}'s individual model reached an aggregator "
                                 f"{hist[i]['individual']} time(s) (fallback: too few contributors of its architecture "
                                 "or no key holder outside the group)"),
                    })
            else:
                skipped.append({"data_owner": i, "model": "received", "reason": _absent_reason_received(cfg, hist[i], i)})
    else:  # returned_models
        if not run.records:
            raise AuditError(
                f"{metrics_file(run.path)} is missing or empty: the curious-sender view needs it to know which "
                "aggregator's data each returned model was trained on"
            )
        for s in range(n):
            f = view_file(run.path, VIEW_RETURNED, s)
            a = hist[s]["last_returned_by"]
            if a is None:
                if peers is None:
                    reason = ("algorithm 'local' exchanges no models" if cfg.federation.algorithm == "local"
                              else f"no model was ever returned to peer {s}")
                    skipped.append({"data_owner": None, "model": "returned", "via_peer": s, "reason": reason})
                continue
            if a >= n:
                if peers is None:
                    skipped.append({"data_owner": None, "model": "returned", "via_peer": s,
                                    "reason": f"the model returned to peer {s} came from the central server, "
                                              "which holds no data"})
                continue
            if a not in wanted:
                continue
            if not f.is_file():
                skipped.append({"data_owner": a, "model": "returned", "via_peer": s, "reason": f"{f.name} is missing"})
                continue
            targets.append(ModelTarget(f"{a} returned to {s}", a, f, "returned", archs[s], via=s))
    if targets:
        return targets, skipped, None
    if not vdir.is_dir():
        if cfg.federation.algorithm == "local":
            reason = "algorithm 'local' exchanges no models, so this adversary sees nothing"
        elif tm.view == "sender_models_as_received" and _ckks_on(cfg):
            reason = ("CKKS secure averaging protected every exchange: the aggregator only ever saw encrypted sums "
                      "of models, never an individual sender's model. There is nothing for this adversary to attack "
                      "-- the mitigation worked.")
        elif not run.records and not views_dir(run.path).exists():
            raise AuditError(
                f"{run.path} has no {VIEWS}/ folder and no {METRICS}: was it written by an older version or "
                "an interrupted run? Re-run it with `secure-dfml run`."
            )
        else:
            reason = f"the run recorded no models for this view ({vdir} is absent)"
        return [], skipped, reason
    return [], skipped, "no model in this view belongs to the requested peers: " + "; ".join(
        str(s.get("reason")) for s in skipped if s.get("reason")
    )


def default_reference_epochs(cfg: Any) -> int:
    """Epochs for reference models: about as many passes over its data as a peer's model made.

    A peer sends (local epochs) or aggregates (mutual-learning epochs) in a
    fraction participants/peers of the rounds; clipped to [3, 30] to keep the
    auditor's cost bounded.
    """
    f, d = cfg.federation, cfg.dfml
    passes = f.rounds * (f.participants / f.peers) * max(1, d.local_epochs + d.ml_epochs)
    return int(min(30, max(3, math.ceil(passes))))


# ----------------------------------------------------------------------------- main entry
def audit_run_dir(
    run_dir: str | Path,
    *,
    threat_model: str,
    attacks: Sequence[str] | None = None,
    reference_models: int = 4,
    rng: np.random.Generator,
    progress: AuditProgress | None = None,
    peers: Sequence[int] | None = None,
    online: bool = False,
    reference_epochs: int | None = None,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Audit ``run_dir`` as the adversary of ``threat_model`` sees it; returns the results dict.

    * ``attacks``: registered names or the aliases ``lira`` / ``rmia`` (offline,
      or online with ``online=True``); default :data:`DEFAULT_RUN_ATTACKS`
      restricted to those the threat model lists.
    * ``peers``: audit only these peers' data (for the curious sender: only
      these aggregators' data).
    * ``reference_models``: reference models per architecture (offline) or per
      attacked peer (online).

    Writes ``run_dir/audit/<threat-model>/results.json`` and ``report.html``
    (returned dict has ``output_dir``). A view that is absent because a
    mitigation removed it (e.g. CKKS) is reported with ``status = "view_absent"``,
    not raised.
    """
    tm = load_threat_model(threat_model)
    run = _load_run_dir(run_dir)
    out_dir = audit_dir(run.path, tm.name)
    if tm.view == "envelopes":
        results, report = analyse_envelopes(run.path, run.cfg, tm, peers=peers)
        results["output_dir"] = str(out_dir)
        _write(out_dir, results, report)
        return results

    if not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence must lie in (0, 1); got {confidence}")
    names = _attacks_for(tm, attacks, online)
    specs = [get_attack(a) for a in names]
    need_ref = any(s.reference != "none" for s in specs)
    need_online = any(s.online for s in specs)
    need_pop = any(s.needs_population or s.reference != "none" for s in specs)
    if need_ref:
        k_min = max(s.min_reference for s in specs)
        if reference_models < k_min:
            raise AuditError(
                f"attacks {', '.join(n for n, s in zip(names, specs) if s.min_reference > reference_models)} need at "
                f"least {k_min} reference models; got --reference-models {reference_models}"
            )

    fed = rebuild_federation(run.cfg)
    _check_rebuild(run, fed)
    targets, skipped, absent = _select_targets(run, tm, fed, peers)
    n_peers = len(fed.peers)
    ledgers, ledger_notes = _ledgers(run, n_peers)
    base = _base_results(run, tm, fed, names, reference_models if need_ref else 0, need_online, out_dir)
    base["skipped"] = skipped
    base["confidence"] = confidence
    base["ledgers"] = {str(i): info.to_dict() for i, info in ledgers.items()}
    if absent is not None:
        base["status"] = "view_absent"
        base["view_absent_reason"] = absent
        base["targets"] = []
        base["peers"] = {}
        base["fail"] = False
        base["findings"] = [
            finding("note", f"Nothing to attack for the '{tm.name}' threat model: {absent}"),
            *ledger_notes,
            finding("note", "This is a statement about what the adversary could observe in this run; other threat "
                            "models (e.g. final-model) still apply."),
        ]
        _write(out_dir, base, _render_absent_html(base, tm))
        return base

    ds = fed.dataset
    pool = np.asarray(fed.split.auditor_pool, dtype=np.int64)
    if need_pop and pool.size < 3:
        raise AuditError(
            f"attacks {', '.join(names)} need the auditor pool, but this run has data.auditor_pool = {pool.size}; "
            "re-run with an auditor pool (e.g. 1000) or use --attacks loss"
        )
    pop_rng, ref_rng, audit_rng, eps_rng = rng.spawn(4)
    perm = pop_rng.permutation(pool.size)
    n_pop = min(pool.size // 3, 2000) if need_pop else 0
    pop_idx, rest_idx = np.sort(pool[perm[:n_pop]]), np.sort(pool[perm[n_pop:]])
    pop_x, pop_y = ds.x_train[pop_idx], ds.y_train[pop_idx]
    rest_x, rest_y = ds.x_train[rest_idx], ds.y_train[rest_idx]

    epochs = reference_epochs if reference_epochs is not None else default_reference_epochs(run.cfg)
    d = run.cfg.dfml
    train_fn = make_trainer(epochs=epochs, lr=d.lr, batch_size=d.batch_size, weight_decay=d.weight_decay,
                            optimizer="sgd")
    base["reference"] = {
        "epochs": epochs, "optimizer": "sgd", "lr": d.lr, "batch_size": d.batch_size,
        "trained_on": f"auditor pool only ({rest_idx.size} samples; {n_pop} more held out as population z)",
        "shared": "per architecture (offline attacks)" if not need_online else "per attacked peer (online attacks)",
        "private_training": False,
        "train_size": {},
    }

    def factory_for(arch: str) -> Callable[[np.random.Generator], torch.nn.Module]:
        def make(g: np.random.Generator) -> torch.nn.Module:
            return build_model(arch, input_shape=ds.input_shape, num_classes=ds.num_classes, kind=ds.kind,
                               generator=torch_generator(g))

        return make

    def members(owner: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ps = fed.split.peers[owner]
        tr, ho = np.asarray(ps.train, dtype=np.int64), np.asarray(ps.holdout, dtype=np.int64)
        return ds.x_train[tr], ds.y_train[tr], ds.x_train[ho], ds.y_train[ho]

    # reference-model jobs, for one progress total
    if need_ref:
        jobs = sorted({(t.owner, t.arch) for t in targets if len(fed.split.peers[t.owner].holdout)}) if need_online \
            else sorted({(-1, t.arch) for t in targets})
    else:
        jobs = []
    total = len(jobs) * reference_models
    done = 0
    refs: dict[tuple[int, str], ReferenceModels] = {}

    def train_job(owner: int, arch: str) -> ReferenceModels:
        nonlocal done
        start = done
        what = f"reference models for {arch}" + (f" around peer {owner}'s data" if owner >= 0 else "")

        def step(j: int, k: int) -> None:
            if progress is not None:
                progress(start + j, total, what)

        g = ref_rng.spawn(1)[0]
        if owner >= 0:
            xm, ym, xn, yn = members(owner)
            ref = train_reference_models(
                model_factory=factory_for(arch), train_fn=train_fn, pool_x=rest_x, pool_y=rest_y,
                k=reference_models, rng=g, challenge_x=np.concatenate([xm, xn, pop_x]),
                challenge_y=np.concatenate([ym, yn, pop_y]), train_size=len(ym), progress=step,
            )
            base["reference"]["train_size"][f"{arch} around peer {owner}"] = len(ym)
        else:
            if rest_idx.size < 2:
                raise AuditError("the auditor pool is too small to train reference models")
            # as many samples as a peer of this architecture holds, but at most half the pool, so that
            # reference models see different random subsets (RMIA's 'a' is tuned on their IN / OUT split)
            sizes = [len(fed.split.peers[i].train) for i in range(n_peers) if fed.peers[i].arch == arch]
            size = max(1, min(int(round(float(np.mean(sizes)))), rest_idx.size // 2))
            base["reference"]["train_size"][arch] = size
            ref = train_reference_models(
                model_factory=factory_for(arch), train_fn=train_fn, pool_x=rest_x, pool_y=rest_y,
                k=reference_models, rng=g, train_size=size, progress=step,
            )
        done = start + reference_models
        _LOG.info("%s: trained %d in %.1fs", what, reference_models, sum(ref.train_seconds))
        return ref

    if progress is not None and total:
        progress(0, total, "reference models")
    audits: dict[str, AuditResult] = {}
    target_entries: list[dict[str, Any]] = []
    for t in targets:
        xm, ym, xn, yn = members(t.owner)
        entry = t.describe()
        entry.update({"n_members": int(len(ym)), "n_nonmembers": int(len(yn))})
        if len(yn) == 0 or len(ym) == 0:
            skipped.append({"data_owner": t.owner, "model": t.model_kind,
                            "reason": f"peer {t.owner} has no audit-holdout samples (data.holdout_fraction = 0)"
                            if len(yn) == 0 else f"peer {t.owner} has no training samples"})
            continue
        ref = None
        if need_ref:
            key = (t.owner, t.arch) if need_online else (-1, t.arch)
            if key not in refs:
                refs[key] = train_job(*key)
            ref = refs[key]
        model = load_model(t, ds)
        res = audit_model(
            model, x_members=xm, y_members=ym, x_nonmembers=xn, y_nonmembers=yn, pool_x=rest_x, pool_y=rest_y,
            rng=audit_rng.spawn(1)[0], attacks=names, reference=ref, population=(pop_x, pop_y),
            n_bootstrap=n_bootstrap, confidence=confidence,
        )
        audits[t.key] = res
        entry.update(res.to_dict())
        entry["_owner"] = t.owner
        target_entries.append(entry)

    if not target_entries:
        raise AuditError("no target could be audited: " + "; ".join(_skip_text(s) for s in skipped))

    # empirical epsilon per data owner (Bonferroni over its targets x attacks)
    per_owner: dict[int, list[str]] = {}
    for e in target_entries:
        per_owner.setdefault(e["_owner"], []).append(e["target"])
    peers_out: dict[str, Any] = {}
    checks: list[LedgerComparison] = []
    extra_findings: list[Finding] = list(ledger_notes)
    fail = False
    for owner, keys in sorted(per_owner.items()):
        tests = len(keys) * len(names)
        per_conf = 1.0 - (1.0 - confidence) / tests
        led = ledgers.get(owner)
        delta = led.delta if led is not None and led.delta is not None else 0.0
        best: dict[str, Any] | None = None
        attainable = 0.0  # what a perfect attack would show on the same counts: the audit's strength
        for e in target_entries:
            if e["_owner"] != owner:
                continue
            for name in names:
                r = audits[e["target"]].results[name]
                try:
                    cb = epsilon_lower_bound_from_scores(r.scores, r.labels, rng=eps_rng, delta=delta,
                                                         confidence=per_conf)
                    lb: dict[str, Any] = {**cb.to_dict(), "reason": None}
                    perfect = clopper_pearson_epsilon_lower_bound(cb.n_members, cb.n_members, 0, cb.n_nonmembers,
                                                                  delta=delta, confidence=per_conf)
                    attainable = max(attainable, perfect.epsilon_lower_bound)
                except AuditError as exc:
                    lb = {"epsilon_lower_bound": 0.0, "reason": str(exc), "confidence": per_conf, "delta": delta}
                e["attacks"][name]["epsilon_lower_bound"] = lb
                if best is None or lb["epsilon_lower_bound"] > best["epsilon_lower_bound"]:
                    best = {**lb, "target": e["target"], "attack": name}
                if led is not None and led.epsilon is not None:
                    for v in dp_consistency_violations(r.metrics, led.epsilon, led.delta or 0.0):
                        extra_findings.append(finding("warning", f"Peer {owner}, {e['target']}, {name}: {v} "
                                                      "(bootstrap interval; indicative, not a certified violation)."))
        assert best is not None
        entry_o: dict[str, Any] = {
            "data_owner": owner,
            "targets": keys,
            "empirical_epsilon_lower_bound": best["epsilon_lower_bound"],
            "attainable_epsilon": attainable,
            "best": {"target": best["target"], "attack": best["attack"]},
            "confidence": confidence,
            "tests_corrected_for": tests,
            "delta": delta,
        }
        if led is not None and led.epsilon is None:
            entry_o.update({"ledger_epsilon": None, "status": "UNKNOWN",
                            "message": f"ledger unavailable: {led.error}"})
        else:
            ledger, cmp = ledger_entry(
                best["epsilon_lower_bound"], None if led is None else led.epsilon, None if led is None else led.delta,
                what=f"peer {owner} ({tm.name}, best: {best['attack']} on {best['target']})",
            )
            entry_o.update(ledger)
            if cmp is not None:
                checks.append(cmp)
                fail |= cmp.failed
        peers_out[str(owner)] = entry_o
    for e in target_entries:
        e.pop("_owner", None)


    base.update({
        "status": "audited",
        "targets": target_entries,
        "peers": peers_out,
        "fail": fail,
    })
    notes = [_skip_text(s) for s in skipped]
    lib = _collapse_unsupported(_findings(audits, threat_model=tm), target_entries)
    base["findings"] = (
        [finding("fail", c.message) for c in checks if c.failed]
        + extra_findings
        + lib[:-2]
        + [finding("note", f"Not audited: {n}") for n in notes]
        + [finding("note", "Empirical epsilon lower bounds use Clopper-Pearson intervals on one threshold (chosen on "
                           "half of the samples, evaluated on the other half), treating audit samples as independent "
                           "trials, at the stated confidence after a Bonferroni correction over each peer's targets "
                           "and attacks.")]
        + lib[-2:]  # the threat model's assumptions, then: a failed attack is not proof of privacy
    )
    report = _render_html(base, tm, audits, checks, skipped)
    _write(out_dir, base, report)
    return base


def _collapse_unsupported(lines: Sequence[Finding], entries: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """Replace the per-(target, attack, level) "TPR not reported" findings by one."""
    unsupported = [f for f in lines if f["level"] == "unsupported"]
    out = [f for f in lines if f["level"] != "unsupported"]
    if unsupported:
        levels: set[str] = set()
        for e in entries:
            for a in e["attacks"].values():
                levels.update(k for k, v in a["metrics"]["tpr_at_fpr"].items() if v["value"] is None)
        sizes = [e["n_nonmembers"] for e in entries]
        out.insert(max(0, len(out) - 2), finding(
            "unsupported",
            f"TPR at FPR {', '.join(sorted(levels, key=float))} is not reported for {len(unsupported)} "
            f"(target, attack, level) combinations: {min(sizes)}-{max(sizes)} non-members per target cannot support "
            "such low false-positive rates (n_nonmembers x FPR >= 1 is needed); the report table gives the reasons.",
        ))
    return out


def _skip_text(s: Mapping[str, Any]) -> str:
    who = "all peers" if s.get("data_owner") is None else f"peer {s['data_owner']}"
    return f"{who} ({s.get('model')}): {s.get('reason') or s.get('note')}"


def _attacks_for(tm: ThreatModel, attacks: Sequence[str] | None, online: bool) -> tuple[str, ...]:
    applicable = tm.membership_attacks
    if not applicable:
        raise AuditError(f"threat model {tm.name!r} lists no membership-inference attacks")
    if attacks:
        names = resolve_attacks(attacks, online=online)
        bad = [a for a in names if a not in applicable]
        if bad:
            raise AuditError(
                f"attack(s) {', '.join(bad)} do not apply to threat model {tm.name!r}; it lists: {', '.join(applicable)}"
            )
        return names
    names = tuple(a for a in resolve_attacks(None, online=online) if a in applicable)
    if not names:
        names = applicable
    return names


def _base_results(run: _RunDir, tm: ThreatModel, fed: Any, names: Sequence[str], k: int, online: bool,
                  out_dir: Path) -> dict[str, Any]:
    return {
        **results_header(run.path, run.cfg, tm, fed),
        "output_dir": str(out_dir),
        "attacks": list(names),
        "reference_models": k,
        "online": online,
        "confidence": None,
    }


def _write(out_dir: Path, results: Mapping[str, Any], report_html: str) -> None:
    write_output_dir(out_dir, {"results.json": json_text(results), "report.html": report_html})
    _LOG.info("wrote %s", out_dir)


# ----------------------------------------------------------------------------- HTML
def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def _epsilon_section(results: Mapping[str, Any], skipped: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for owner, e in results["peers"].items():
        rows.append([owner, ", ".join(e["targets"]), _fmt(e["empirical_epsilon_lower_bound"]),
                     f"{e['best']['attack']} on {e['best']['target']}",
                     "non-private" if e["status"] == "NON-PRIVATE" else _fmt(e.get("ledger_epsilon")),
                     e["status"]])
    parts = [
        "<h2>Empirical epsilon per peer</h2>",
        "<p>For each peer whose data is attacked: the largest empirical epsilon lower bound over its targets and "
        f"attacks (confidence {results['confidence']:.0%} after a "
        "Bonferroni correction), next to the epsilon its privacy ledger claims. FAIL means the lower bound exceeds "
        "the claimed upper bound: an implementation, accounting or assumption bug. A small lower bound is not "
        "evidence of privacy.</p>",
        html_table(["data owner", "targets", "empirical eps lower bound", "from", "ledger eps", "status"], rows,
                   fail_col=5),
    ]
    if skipped:
        parts.append("<h2>Not audited, and notes on the view</h2><ul>")
        for s in skipped:
            parts.append(f"<li>{html.escape(_skip_text(s))}</li>")
        parts.append("</ul>")
    return "\n".join(parts)


def _render_html(results: Mapping[str, Any], tm: ThreatModel, audits: Mapping[str, AuditResult],
                 checks: Sequence[LedgerComparison], skipped: Sequence[Mapping[str, Any]]) -> str:
    run = results["run"]
    extra = {
        "run directory": results["run_dir"],
        "data set / algorithm": f"{run['dataset']} / {run['algorithm']}",
        "architectures": ", ".join(run["architectures"]),
        "privacy": "DP (per-peer ledgers)" if run["private"] else "NON-PRIVATE",
        "channel / secure aggregation": f"{run['channel']} / {run['secure_aggregation']}",
        "attacks": ", ".join(results["attacks"]),
        "reference models": results["reference_models"],
        "reference training": json.dumps(results.get("reference", {})),
        "targets (label = data owner + model)": "; ".join(
            f"{t['target']}: {t['n_members']} members / {t['n_nonmembers']} non-members" for t in results["targets"]),
    }
    return render_html_report(audits, title=f"Membership-inference audit: {tm.name}", threat_model=tm,
                              ledger_checks=checks, extra=extra, sections=[_epsilon_section(results, skipped)],
                              report_findings=results["findings"])


def _render_absent_html(results: Mapping[str, Any], tm: ThreatModel) -> str:
    rows = [[s.get("data_owner"), s.get("model"), s.get("reason") or s.get("note")] for s in results["skipped"]]
    body = ["<h2>What this adversary observed</h2>",
            f"<p>{html.escape(str(results['view_absent_reason']))}</p>"]
    if rows:
        body += ["<h2>Per peer</h2>", html_table(["peer", "model", "why no model"], rows)]
    return render_simple_html(f"Membership-inference audit: {tm.name}", tm, body, results["findings"])
