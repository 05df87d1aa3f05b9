"""Budget sweeps: the same federation at several privacy budgets (``secure-dfml tune``).

:func:`tune_budgets` runs one federation (same config, same seed, same data
split) once per *sweep point* and collects, per point, the utility (mean and
per-peer global / local accuracy), the privacy actually spent (ledger epsilon
against each peer's target, phases the hard gate refused), the time per round
and its overhead against the non-private run, and optionally the leakage axis
(membership-inference AUC and TPR at 0.1% FPR on the published final models,
via :func:`secure_dfml.audit.audit_run_dir` with the ``final-model``
threat model).

A driver above the protocol and the audits: it runs the simulation
(:func:`secure_dfml.run_federation`) once per point and audits each point's
run directory.

Sweep points (:func:`parse_epsilons` for the CLI text, :func:`budget_point`
for Python values)
-------------------------------------------------------------------------------

``--epsilons`` is a comma-separated list of points. Each point is one of:

* ``4`` -- one budget for every peer (privacy.epsilon = 4; per-peer epsilon
  overrides in the config are dropped for this point);
* ``inf`` -- the non-private run (privacy.enabled = false);
* ``2/4/8`` -- per-peer budgets **cycled over the peers by id**: peer 0 gets
  2, peer 1 gets 4, peer 2 gets 8, peer 3 gets 2 again, ... (at most one value
  per peer);
* ``0=1/3=8`` -- explicit per-peer budgets: peer 0 gets 1, peer 3 gets 8, every
  other peer keeps the budget its config gives it (privacy.epsilon or its
  ``[privacy.peers.<id>]`` override).

In Python, a point is a float (``math.inf`` for non-private), a sequence of
floats (cycled), a ``Mapping[int, float]`` (explicit), or a string in the CLI
syntax.

Every point keeps the rest of the config: delta, clipping norm and accountant,
including per-peer delta / max_grad_norm overrides. Explicit noise multipliers
(``privacy.noise_multiplier``) are dropped at DP points so that the planner
calibrates the noise to each budget -- otherwise every point would train with
the same noise.

The non-private baseline is always run (first), even when ``inf`` is not
listed: the accuracy cost and the time overhead are measured against it
(``baseline_added`` in the result says whether it was added).

Output (``out_dir``)
--------------------

* ``points/<slug>/`` -- each point's full run directory (config, metrics,
  ledgers, models; ``audit/final-model/`` with ``audit=True``);
* ``tune.json`` -- rewritten atomically after every point, so an interrupted
  or failed sweep keeps every finished point; a point that raises is recorded
  with ``status = "failed"`` and its error, and the sweep goes on;
* ``tune.md`` -- one table (rewritten after every point);
* ``tune.png`` -- accuracy vs epsilon (log x axis, non-private drawn at the
  right), per-peer accuracy vs each peer's own epsilon, time overhead, and with
  ``audit=True`` a Pareto plot of accuracy vs the strongest attack's AUC.

A word on what a sweep costs in privacy: every DP point is a separate training
run on the same private data. Each run respects its own budget, but releasing
the results of several runs, or picking the best of them, composes their
budgets (and the choice itself depends on the data). Tune on public or proxy
data, or account for the sweep as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_dfml._jsonutil import json_text, pct, utc_now
from secure_dfml._run import peer_train_sizes, run_federation
from secure_dfml.audit import audit_run_dir, resolve_attacks
from secure_dfml.config import PeerPrivacyConfig, RunConfig, dump_toml
from secure_dfml.errors import ConfigError, RunDirectoryError, SecureDFMLError
from secure_dfml.privacy import atomic_write_bytes, resolve_budgets
from secure_dfml.rundir import audit_dir, config_file, summary_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TUNE_ATTACKS",
    "EPSILONS_SYNTAX",
    "TUNE_FORMAT",
    "BudgetPoint",
    "TuneEvent",
    "budget_point",
    "parse_epsilons",
    "render_tune_markdown",
    "tune_budgets",
]

TUNE_FORMAT = "secure-dfml-tune"
TUNE_VERSION = 1
TUNE_THREAT_MODEL = "final-model"
#: Offline attacks share one set of reference models per architecture.
DEFAULT_TUNE_ATTACKS: tuple[str, ...] = ("loss", "lira", "rmia")
#: The FPR level of the leakage axis (0.1%).
LEAKAGE_FPR = 0.001
#: DP runs fluctuate from round to round: results also give the mean over the last rounds.
TAIL_ROUNDS = 5

EPSILONS_SYNTAX = (
    "a comma-separated list of points, each one of: a number > 0 (one budget for all peers, e.g. 4), "
    "'inf' (non-private), a per-peer list cycled over the peers by id (e.g. 2/4/8: peer 0 gets 2, peer 1 "
    "gets 4, peer 2 gets 8, peer 3 gets 2, ...), or explicit per-peer budgets (e.g. 0=1/3=8; other peers keep "
    "their configured budget). Example: --epsilons 1,2,4,8,inf"
)

_INF_WORDS = {"inf", "+inf", "infinity", "+infinity", "∞", "nonprivate", "non-private"}


# --------------------------------------------------------------------------- sweep points
@dataclass(frozen=True)
class BudgetPoint:
    """One point of a sweep.

    Exactly one of: ``epsilon`` (one budget for all peers; ``math.inf`` means
    non-private), ``cycle`` (per-peer budgets cycled over peers by id) or
    ``per_peer`` (explicit peer id -> budget; unlisted peers keep the config).
    """

    epsilon: float | None = None
    cycle: tuple[float, ...] = ()
    per_peer: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = sum((self.epsilon is not None, bool(self.cycle), bool(self.per_peer)))
        if kinds != 1:
            raise ConfigError("a sweep point needs exactly one of: epsilon, cycle (per-peer list), per_peer (mapping)")
        if self.epsilon is not None:
            _check_value(self.epsilon, f"sweep point {self.epsilon!r}", allow_inf=True)
        for v in self.cycle:
            _check_value(v, f"sweep point {self.label!r}", allow_inf=False)
        for k, v in self.per_peer.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(f"per-peer budget key {k!r} is invalid: expected a peer id (an integer >= 0).")
            _check_value(v, f"sweep point {self.label!r}", allow_inf=False)
        object.__setattr__(self, "per_peer", dict(sorted(self.per_peer.items())))

    @property
    def private(self) -> bool:
        return not (self.epsilon is not None and math.isinf(self.epsilon))

    @property
    def kind(self) -> str:
        if not self.private:
            return "non-private"
        if self.epsilon is not None:
            return "uniform"
        return "cycled" if self.cycle else "per-peer"

    @property
    def label(self) -> str:
        """The point in CLI syntax (``4``, ``inf``, ``2/4/8``, ``0=1/3=8``)."""
        if self.epsilon is not None:
            return "inf" if math.isinf(self.epsilon) else _num(self.epsilon)
        if self.cycle:
            return "/".join(_num(v) for v in self.cycle)
        return "/".join(f"{k}={_num(v)}" for k, v in self.per_peer.items())

    @property
    def slug(self) -> str:
        """A folder name for the point's run directory."""
        text = self.label.replace("/", "_").replace("=", "-")
        return "eps-" + re.sub(r"[^A-Za-z0-9._-]", "", text)

    def validate_for(self, num_peers: int) -> None:
        if self.cycle and len(self.cycle) > num_peers:
            raise ConfigError(
                f"sweep point {self.label!r} lists {len(self.cycle)} per-peer budgets but the federation has "
                f"{num_peers} peers; give at most one value per peer (values are cycled over peers by id)."
            )
        bad = [k for k in self.per_peer if k >= num_peers]
        if bad:
            raise ConfigError(
                f"sweep point {self.label!r} names peer(s) {', '.join(map(str, bad))} but the federation has "
                f"peers 0..{num_peers - 1}."
            )

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with this point's budgets (see the module docstring)."""
        n = cfg.federation.peers
        self.validate_for(n)
        if not self.private:
            return cfg.replace(privacy={"enabled": False})
        old = dict(cfg.privacy.peers)
        peers: dict[str, PeerPrivacyConfig] = {}
        for i in range(n):
            key = str(i)
            base = old.get(key, PeerPrivacyConfig())
            if self.epsilon is not None:
                eps = None
            elif self.cycle:
                eps = self.cycle[i % len(self.cycle)]
            else:
                eps = self.per_peer.get(i, base.epsilon)
            new = dataclasses.replace(base, epsilon=eps, noise_multiplier=None)
            if new != PeerPrivacyConfig():
                peers[key] = new
        update: dict[str, Any] = {"enabled": True, "noise_multiplier": None, "peers": peers}
        if self.epsilon is not None:
            update["epsilon"] = float(self.epsilon)
        out = cfg.replace(privacy=update)
        out.privacy.validate("privacy")
        return out

    def targets(self, cfg: RunConfig) -> dict[int, float | None] | None:
        """Requested epsilon per peer (None for the non-private point)."""
        if not self.private:
            return None
        applied = self.apply(cfg).privacy
        out: dict[int, float | None] = {}
        for i in range(cfg.federation.peers):
            override = applied.peers.get(str(i))
            out[i] = override.epsilon if override is not None and override.epsilon is not None else applied.epsilon
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "epsilon": None if self.epsilon is None or math.isinf(self.epsilon) else self.epsilon,
            "cycle": list(self.cycle) or None,
            "per_peer": {str(k): v for k, v in self.per_peer.items()} or None,
        }


def _num(v: float) -> str:
    return f"{v:g}"


def _check_value(v: Any, where: str, *, allow_inf: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{where}: epsilon {v!r} is not a number. Accepted: {EPSILONS_SYNTAX}")
    f = float(v)
    if math.isnan(f) or f <= 0:
        raise ConfigError(f"{where}: epsilon {v!r} must be > 0. Accepted: {EPSILONS_SYNTAX}")
    if math.isinf(f) and not allow_inf:
        raise ConfigError(
            f"{where}: 'inf' cannot be one peer's budget -- privacy is on or off for the whole "
            "federation; list 'inf' as a point of its own for the non-private run. "
            f"Accepted: {EPSILONS_SYNTAX}"
        )


NON_PRIVATE = BudgetPoint(epsilon=math.inf)


def _parse_number(token: str, *, full: str, allow_inf: bool) -> float:
    where = f"bad epsilon token {token!r} in {full!r}"
    t = token.strip().lower()
    try:
        v = math.inf if t in _INF_WORDS else float(t)
    except ValueError:
        raise ConfigError(f"{where}: not a number. Accepted: {EPSILONS_SYNTAX}") from None
    _check_value(v, where, allow_inf=allow_inf)
    return v


def _parse_point(token: str, full: str) -> BudgetPoint:
    t = token.strip()
    if not t:
        raise ConfigError(f"empty point in --epsilons {full!r} (two commas in a row?). Accepted: {EPSILONS_SYNTAX}")
    if "/" not in t and "=" not in t:
        return BudgetPoint(epsilon=_parse_number(t, full=full, allow_inf=True))
    parts = [p.strip() for p in t.split("/")]
    if any(not p for p in parts):
        raise ConfigError(f"bad epsilon token {t!r} in {full!r}: empty per-peer value. Accepted: {EPSILONS_SYNTAX}")
    explicit = ["=" in p for p in parts]
    if any(explicit) and not all(explicit):
        raise ConfigError(
            f"bad epsilon token {t!r} in {full!r}: mixes cycled values (2/4) and explicit peers (0=2); use one "
            f"form per point. Accepted: {EPSILONS_SYNTAX}"
        )
    if not all(explicit):
        return BudgetPoint(cycle=tuple(_parse_number(p, full=full, allow_inf=False) for p in parts))
    mapping: dict[int, float] = {}
    for p in parts:
        key, _, value = p.partition("=")
        key = key.strip()
        if not key.isdigit():
            raise ConfigError(
                f"bad epsilon token {p!r} in {full!r}: {key!r} is not a peer id (an integer >= 0). "
                f"Accepted: {EPSILONS_SYNTAX}"
            )
        if int(key) in mapping:
            raise ConfigError(f"bad epsilon token {t!r} in {full!r}: peer {key} is listed twice.")
        mapping[int(key)] = _parse_number(value, full=full, allow_inf=False)
    return BudgetPoint(per_peer=mapping)


def parse_epsilons(text: str) -> list[BudgetPoint]:
    """Parse the CLI syntax (see the module docstring); errors name the bad token."""
    if not text or not text.strip():
        raise ConfigError(f"--epsilons is empty. Accepted: {EPSILONS_SYNTAX}")
    return [_parse_point(tok, text) for tok in text.split(",")]


def budget_point(value: Any) -> BudgetPoint:
    """A :class:`BudgetPoint` from a float, a sequence of floats (cycled), a
    ``Mapping[int, float]`` (explicit per-peer) or a one-point string."""
    if isinstance(value, BudgetPoint):
        return value
    if isinstance(value, str):
        pts = parse_epsilons(value)
        if len(pts) != 1:
            raise ConfigError(f"{value!r} holds {len(pts)} points; pass them as separate items.")
        return pts[0]
    if isinstance(value, Mapping):
        out: dict[int, float] = {}
        for k, v in value.items():
            key = int(k) if isinstance(k, str) and k.isdigit() else k
            out[key] = float(v) if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) else v
        return BudgetPoint(per_peer=out)
    if isinstance(value, Sequence):
        return BudgetPoint(cycle=tuple(value))
    return BudgetPoint(epsilon=value)


# --------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class TuneEvent:
    """What :func:`tune_budgets` reports to its ``progress`` callback.

    ``kind``: ``"point_start"``, ``"round"`` (``detail``: the round record),
    ``"audit"`` (``detail``: done, total, what), ``"point_end"`` (``detail``:
    the point's result dict).
    """

    kind: str
    index: int
    total: int
    label: str
    detail: Mapping[str, Any] = field(default_factory=dict)


TuneProgress = Callable[[TuneEvent], None]


# --------------------------------------------------------------------------- the sweep
def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json_text(data).encode("utf-8"))


def _tail_accuracy(records: Sequence[Mapping[str, Any]], k: int = TAIL_ROUNDS) -> float | None:
    """Mean global accuracy over the last ``k`` evaluated rounds: DP runs fluctuate
    from round to round, so this is steadier than the final round alone."""
    accs = [r["mean_global_acc"] for r in records if r.get("mean_global_acc") is not None]
    return float(np.mean(accs[-k:])) if accs else None


def _phase_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Phases run / refused by the budget gate, from the run's metrics records."""
    counts: dict[str, Any] = {"run": 0, "refused": 0, "refused_by_phase": {}, "refused_peers": []}
    refused_peers: set[int] = set()
    for rec in records:
        for ph in rec.get("phases", []):
            if ph.get("ran"):
                counts["run"] += 1
            elif "budget exhausted" in str(ph.get("reason", "")):
                counts["refused"] += 1
                name = str(ph.get("phase"))
                counts["refused_by_phase"][name] = counts["refused_by_phase"].get(name, 0) + 1
                refused_peers.add(int(ph.get("peer", -1)))
    counts["refused_peers"] = sorted(refused_peers)
    return counts


def _point_from_summary(point: BudgetPoint, cfg: RunConfig, summary: Mapping[str, Any],
                        records: Sequence[Mapping[str, Any]], run_dir: Path, out_dir: Path) -> dict[str, Any]:
    targets = point.targets(cfg)
    peers: dict[str, Any] = {}
    within = True
    honoured = True
    for pid, p in summary["peers"].items():
        entry = {k: p.get(k) for k in ("arch", "global_acc", "local_acc", "peak_global_acc", "peak_local_acc")}
        if point.private:
            spent = p.get("epsilon_spent")
            target = p.get("epsilon_target")
            requested = None if targets is None else targets.get(int(pid))
            entry.update({
                "epsilon_requested": requested,
                "epsilon_target": target,
                "epsilon_spent": spent,
                "delta": p.get("delta"),
                "noise_multiplier": p.get("noise_multiplier"),
                "status": p.get("status"),
                "steps": p.get("steps"),
            })
            if spent is None or target is None or spent > target * (1 + 1e-9):
                within = False
            if requested is not None and (target is None or not math.isclose(target, requested, rel_tol=1e-9)):
                honoured = False
        peers[pid] = entry
    globals_ = [p["global_acc"] for p in peers.values() if p.get("global_acc") is not None]
    out: dict[str, Any] = {
        **point.to_dict(),
        "private": point.private,
        "status": "done",
        "run_dir": str(run_dir.relative_to(out_dir)) if run_dir.is_relative_to(out_dir) else str(run_dir),
        "mean_global_acc": summary.get("mean_global_acc"),
        "mean_local_acc": summary.get("mean_local_acc"),
        "best_mean_global_acc": summary.get("best_mean_global_acc"),
        "mean_peak_global_acc": summary.get("mean_peak_global_acc"),
        "min_peer_global_acc": min(globals_) if globals_ else None,
        "max_peer_global_acc": max(globals_) if globals_ else None,
        "seconds_per_round": summary.get("seconds_per_round"),
        "compute_seconds_per_round": summary.get("compute_seconds_per_round"),
        "wall_seconds": summary.get("wall_seconds"),
        "rounds": summary.get("rounds"),
        "privacy_label": summary.get("privacy_label"),
        "peers": peers,
        "phases": _phase_counts(records),
        f"mean_global_acc_last{TAIL_ROUNDS}": _tail_accuracy(records),
    }
    if point.private:
        spent = [p["epsilon_spent"] for p in peers.values() if p.get("epsilon_spent") is not None]
        out["epsilon_spent_max"] = max(spent) if spent else None
        out["within_budget"] = within
        out["budgets_honoured"] = honoured
    return out


def _add_baseline_deltas(points: Sequence[dict[str, Any]]) -> None:
    base = next((p for p in points if not p["private"] and p["status"] == "done"), None)
    for p in points:
        if p["status"] != "done" or base is None:
            continue
        tail = f"mean_global_acc_last{TAIL_ROUNDS}"
        for key, cost in (("mean_global_acc", "accuracy_cost"), (tail, f"accuracy_cost_last{TAIL_ROUNDS}")):
            acc, bacc = p.get(key), base.get(key)
            p[cost] = None if acc is None or bacc is None else bacc - acc
        overhead: dict[str, float | None] = {}
        for key in ("seconds_per_round", "compute_seconds_per_round"):
            a, b = p.get(key), base.get(key)
            overhead[key] = a / b if a is not None and b else None
        p["overhead"] = overhead


# ------------------------------------------------------------------ leakage axis
def _estimate(d: Mapping[str, Any] | None) -> dict[str, Any]:
    d = d or {}
    return {"value": d.get("value"), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"), "reason": d.get("reason")}


def summarize_leakage(results: Mapping[str, Any], *, fpr: float = LEAKAGE_FPR) -> dict[str, Any]:
    """The leakage axis of one point from an audit ``results.json`` dict.

    * per attack: mean AUC over targets, and the target with the highest AUC;
    * ``worst``: the (target, attack) with the highest AUC point estimate, with
      its AUC interval and its TPR at ``fpr`` (or the reason the sample size
      cannot support that FPR, as ``"unsupported"``);
    * the largest empirical epsilon lower bound over peers.
    """
    key = f"{fpr:g}"
    if results.get("status") != "audited":
        return {"status": results.get("status", "unknown"), "reason": results.get("view_absent_reason")}
    per_attack: dict[str, Any] = {}
    worst: dict[str, Any] | None = None
    for t in results.get("targets", []):
        for name, a in t.get("attacks", {}).items():
            m = a.get("metrics", {})
            auc = _estimate(m.get("auc"))
            tpr = _estimate(m.get("tpr_at_fpr", {}).get(key))
            if auc["value"] is None:
                continue
            slot = per_attack.setdefault(name, {"aucs": [], "max": None})
            slot["aucs"].append(auc["value"])
            cand = {"target": t.get("target"), "attack": name, "auc": auc, "tpr_at_fpr": tpr,
                    "n_members": t.get("n_members"), "n_nonmembers": t.get("n_nonmembers")}
            if slot["max"] is None or auc["value"] > slot["max"]["auc"]["value"]:
                slot["max"] = cand
            if worst is None or auc["value"] > worst["auc"]["value"]:
                worst = cand
    attacks = {
        name: {"mean_auc": float(np.mean(s["aucs"])), "targets": len(s["aucs"]), "max": s["max"]}
        for name, s in per_attack.items()
    }
    lbs = [p.get("empirical_epsilon_lower_bound") for p in results.get("peers", {}).values()]
    lbs = [x for x in lbs if x is not None]
    tpr_state = None
    if worst is not None:
        tpr_state = "estimated" if worst["tpr_at_fpr"]["value"] is not None else "unsupported"
    return {
        "status": "audited",
        "threat_model": (results.get("threat_model") or {}).get("name", TUNE_THREAT_MODEL),
        "fpr": fpr,
        "attacks": attacks,
        "worst": worst,
        "tpr_at_fpr_status": tpr_state,
        "empirical_epsilon_lower_bound_max": max(lbs) if lbs else None,
        "fail": bool(results.get("fail")),
        "targets": len(results.get("targets", [])),
    }


# --------------------------------------------------------------------------- main entry
def tune_budgets(
    cfg: RunConfig,
    *,
    epsilons: Sequence[Any],
    out_dir: str | Path,
    audit: bool = False,
    audit_attacks: Sequence[str] = DEFAULT_TUNE_ATTACKS,
    reference_models: int = 2,
    progress: TuneProgress | None = None,
    overwrite: bool = False,
    resume: bool = False,
    plot: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` once per budget in ``epsilons`` (plus the non-private
    baseline) and write ``tune.json``, ``tune.md`` and ``tune.png`` to ``out_dir``.

    ``epsilons``: sweep points -- floats (``math.inf`` = non-private), per-peer
    sequences (cycled over peers), ``Mapping[int, float]`` (explicit peers) or
    strings in the CLI syntax; see the module docstring. ``overwrite``: replace
    an earlier sweep in ``out_dir``; ``resume``: reuse its finished points whose
    saved config is identical (anything else is rerun). ``audit``: add the
    leakage axis (final-model threat model, ``audit_attacks`` with
    ``reference_models`` reference models per architecture).

    Returns the ``tune.json`` dict. Errors in the sweep definition or in any
    point's budget (e.g. delta >= 1/n) are raised before anything trains; a
    point that fails while training is recorded as failed and the sweep goes on.
    """
    out = Path(out_dir)
    requested = [budget_point(e) for e in epsilons]
    if not requested:
        raise ConfigError(f"no sweep points given. Accepted: {EPSILONS_SYNTAX}")
    n_peers = cfg.federation.peers
    notes: list[str] = []
    points: list[BudgetPoint] = []
    for p in requested:
        p.validate_for(n_peers)
        if p in points:
            notes.append(f"point {p.label} was listed more than once; it runs once.")
            continue
        points.append(p)
    baseline_added = NON_PRIVATE not in points
    # the baseline runs first: overhead and accuracy cost are measured against it
    points = [NON_PRIVATE] + [p for p in points if p != NON_PRIVATE]
    if baseline_added:
        notes.append("the non-private baseline (inf) was not listed; it was run anyway, as the reference for "
                     "accuracy cost and time overhead.")
    audit_fn: Callable[..., dict[str, Any]] | None
    if audit:
        audit_fn = audit_run_dir
        if reference_models < 1:
            raise ConfigError(f"reference_models = {reference_models}: the leakage axis needs at least 1.")
        attack_names = resolve_attacks(list(audit_attacks))
    else:
        audit_fn = None
        attack_names = ()

    # pre-flight: every point's config and budgets, before anything trains
    point_cfgs = [p.apply(cfg) for p in points]
    if any(p.private for p in points):
        sizes = peer_train_sizes(cfg)
        for p, pc in zip(points, point_cfgs, strict=True):
            if p.private:
                try:
                    resolve_budgets(pc, sizes)
                except SecureDFMLError as exc:
                    raise type(exc)(f"sweep point {p.label}: {exc}") from None
    if cfg.privacy.noise_multiplier is not None or any(
        pp.noise_multiplier is not None for pp in cfg.privacy.peers.values()
    ):
        notes.append("the config's explicit noise multipliers were dropped at DP points: the planner calibrates the "
                     "noise to each point's budget.")
    if any(p.private for p in points) and not cfg.privacy.secure_mode:
        notes.append("DP points ran in research-grade mode (seeded RNG), as configured.")
    notes.append("every DP point is a separate training run on the same private data: each respects its own "
                 "budget, but publishing several points (or choosing the best) composes their budgets. Tune on "
                 "public or proxy data, or account for the whole sweep.")

    # the output folder
    json_path, md_path, png_path = out / "tune.json", out / "tune.md", out / "tune.png"
    previous: dict[str, Any] = {}
    if json_path.exists() or (out / "points").exists():
        if resume:
            try:
                old = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
            except (OSError, json.JSONDecodeError):
                old = {}
            previous = {p["label"]: p for p in old.get("points", []) if p.get("status") == "done"}
        elif overwrite:
            for f in (json_path, md_path, png_path):
                f.unlink(missing_ok=True)
            shutil.rmtree(out / "points", ignore_errors=True)
        else:
            raise RunDirectoryError(
                f"{out} already holds a sweep (tune.json or points/); choose another --out, pass --resume to reuse "
                "its finished points, or --overwrite to replace it."
            )
    out.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {
        "format": TUNE_FORMAT,
        "version": TUNE_VERSION,
        "created": utc_now(),
        "finished": None,
        "out_dir": str(out),
        "federation": cfg.federation.id,
        "algorithm": cfg.federation.algorithm,
        "dataset": cfg.data.name,
        "peers": n_peers,
        "rounds": cfg.federation.rounds,
        "seed": cfg.federation.seed,
        "accountant": cfg.privacy.accountant,
        "requested": [p.label for p in requested],
        "baseline_added": baseline_added,
        "audit": {
            "enabled": bool(audit),
            "threat_model": TUNE_THREAT_MODEL if audit else None,
            "attacks": list(attack_names),
            "reference_models": reference_models if audit else 0,
            "fpr": LEAKAGE_FPR,
        },
        "notes": notes,
        "config": cfg.to_dict(),
        "points": [{**p.to_dict(), "private": p.private, "status": "pending", "run_dir": f"points/{p.slug}"}
                   for p in points],
        "files": {"json": str(json_path), "md": str(md_path), "png": str(png_path)},
    }

    def save() -> None:
        _add_baseline_deltas(result["points"])
        _write_json(json_path, result)
        atomic_write_bytes(md_path, render_tune_markdown(result).encode("utf-8"))

    save()
    total = len(points)
    try:
        for i, (p, pc) in enumerate(zip(points, point_cfgs, strict=True)):
            run_dir = out / "points" / p.slug
            label = p.label
            if progress is not None:
                progress(TuneEvent("point_start", i, total, label))
            reused = previous.get(label)
            entry: dict[str, Any]
            if (
                reused is not None
                and summary_file(run_dir).is_file()
                and config_file(run_dir).is_file()
                and config_file(run_dir).read_text(encoding="utf-8") == dump_toml(pc)
            ):
                entry = dict(reused)
                entry["resumed"] = True
                logger.info("point %s: reusing the finished run in %s", label, run_dir)
                if audit_fn is not None and (entry.get("leakage") or {}).get("status") != "audited":
                    entry["leakage"] = _audit_point(audit_fn, run_dir, pc, attack_names, reference_models,
                                                    progress, i, total, label, out)
            else:
                t0 = time.perf_counter()
                records: list[dict[str, Any]] = []
                try:
                    def on_round(record: dict[str, Any], _i: int = i, _label: str = label,
                                 _records: list[dict[str, Any]] = records) -> None:
                        _records.append(record)
                        if progress is not None:
                            progress(TuneEvent("round", _i, total, _label, record))

                    summary = run_federation_for_tune(pc, run_dir, on_round=on_round, plot=plot)
                    entry = _point_from_summary(p, pc, summary, records, run_dir, out)
                except SecureDFMLError as exc:
                    logger.error("sweep point %s failed: %s", label, exc)
                    entry = {**result["points"][i], "status": "failed", "error": str(exc),
                             "error_type": type(exc).__name__, "seconds": time.perf_counter() - t0}
                except Exception as exc:  # noqa: BLE001 - one failed point must not end the sweep
                    logger.exception("sweep point %s failed", label)
                    entry = {**result["points"][i], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                             "error_type": type(exc).__name__, "seconds": time.perf_counter() - t0}
                if entry["status"] == "done" and audit_fn is not None:
                    entry["leakage"] = _audit_point(audit_fn, run_dir, pc, attack_names, reference_models,
                                                    progress, i, total, label, out)
            result["points"][i] = entry
            save()
            if progress is not None:
                progress(TuneEvent("point_end", i, total, label, entry))
    finally:
        result["finished"] = utc_now()
        save()
        if plot:
            try:
                plot_tune(result, png_path)
            except Exception:  # noqa: BLE001 - a plot must not hide the results
                logger.exception("could not draw %s", png_path)
                result["files"]["png"] = None
                _write_json(json_path, result)
    return result


def run_federation_for_tune(cfg: RunConfig, run_dir: Path, *, on_round: Callable[[dict[str, Any]], None],
                            plot: bool) -> dict[str, Any]:
    """One point's run (its own run directory; an earlier one is replaced only when the new run succeeds)."""
    return run_federation(cfg, run_dir, overwrite=True, on_round=on_round, plot=plot)


def _audit_point(audit_fn: Callable[..., dict[str, Any]], run_dir: Path, cfg: RunConfig, attacks: Sequence[str],
                 reference_models: int, progress: TuneProgress | None, index: int, total: int, label: str,
                 out: Path) -> dict[str, Any]:
    def on_audit(done: int, n: int, what: str) -> None:
        if progress is not None:
            progress(TuneEvent("audit", index, total, label, {"done": done, "total": n, "what": what}))

    rng = np.random.default_rng([cfg.federation.seed, 0x7A4E])
    try:
        results = audit_fn(run_dir, threat_model=TUNE_THREAT_MODEL, attacks=list(attacks),
                           reference_models=reference_models, rng=rng, progress=on_audit)
    except Exception as exc:  # noqa: BLE001 - the accuracy result stands without the audit
        logger.exception("audit of sweep point %s failed", label)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    summary = summarize_leakage(results)
    res_path = Path(results.get("output_dir", audit_dir(run_dir, TUNE_THREAT_MODEL))) / "results.json"
    summary["results"] = str(res_path.relative_to(out)) if res_path.is_relative_to(out) else str(res_path)
    return summary


# --------------------------------------------------------------------------- rendering
def _fmt_est(e: Mapping[str, Any] | None, *, pct: bool = False) -> str:
    if not e or e.get("value") is None:
        return "unsupported" if e and e.get("reason") else "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    if e.get("ci_low") is None or e.get("ci_high") is None:
        return f(e["value"])
    return f"{f(e['value'])} [{f(e['ci_low'])}, {f(e['ci_high'])}]"


def point_rows(result: Mapping[str, Any], *, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sweep table (shared by tune.md and the CLI; ``compact``: short headers)."""
    audit = bool(result.get("audit", {}).get("enabled"))
    if compact:  # the terminal table: fewer, shorter columns (tune.md has them all)
        head = ["eps", "global %", "vs inf", "spent/target", "refused", "time/round"]
    else:
        head = ["epsilon", "mean global %", "vs non-private", "mean local %", "peer global % (min-max)",
                "eps spent max / target", "within budget", "phases refused", "s/round", "overhead"]
    if audit:
        head += ["AUC (worst)", "TPR@0.1%"] if compact else ["attack AUC (worst)", "TPR@0.1%FPR"]
    rows: list[list[str]] = []
    for p in result["points"]:
        label = p["label"] + ("" if p["private"] or compact else " (non-private)")
        if p["status"] != "done":
            why = p.get("error", "") if p["status"] == "failed" else ""
            rows.append([label, p["status"].upper() + (f": {why}" if why else "")] + [""] * (len(head) - 2))
            continue
        ov = (p.get("overhead") or {}).get("seconds_per_round")
        cost = p.get("accuracy_cost")
        cost_s = "-" if cost is None or not p["private"] else f"{-100 * cost:+.1f}" + ("" if compact else " pts")
        if p["private"]:
            targets = sorted({v["epsilon_target"] for v in p["peers"].values() if v.get("epsilon_target") is not None})
            tgt = _num(targets[0]) if len(targets) == 1 else f"{_num(targets[0])}..{_num(targets[-1])}"
            eps = f"{p.get('epsilon_spent_max') or 0:.2f} / {tgt}"
            within = "yes" if p.get("within_budget") else "NO"
            ph = p.get("phases", {})
            refused = f"{ph.get('refused', 0)} of {ph.get('run', 0) + ph.get('refused', 0)}"
        else:
            eps, within, refused = "non-private", "-", "-"
        if compact:
            within_mark = "" if not p["private"] or p.get("within_budget") else " OVER"
            row = [label, pct(p.get("mean_global_acc")), cost_s, eps + within_mark, refused,
                   f"{p.get('seconds_per_round') or 0:.2f}s" + ("" if ov is None else f" ({ov:.2f}x)")]
        else:
            row = [
                label, pct(p.get("mean_global_acc")), cost_s, pct(p.get("mean_local_acc")),
                f"{pct(p.get('min_peer_global_acc'))}-{pct(p.get('max_peer_global_acc'))}",
                eps, within, refused, f"{p.get('seconds_per_round') or 0:.2f}",
                "-" if ov is None else f"{ov:.2f}x",
            ]
        if audit:
            lk = p.get("leakage") or {}
            w = lk.get("worst")
            if lk.get("status") == "audited" and w:
                where = "" if compact else f" ({w['attack']}, {w['target']})"
                row += [f"{_fmt_est(w['auc'])}{where}", _fmt_est(w["tpr_at_fpr"], pct=True)]
            else:
                row += [str(lk.get("status", "-")) + (f": {lk['error']}" if lk.get("error") else ""), "-"]
        rows.append(row)
    return head, rows


def render_tune_markdown(result: Mapping[str, Any]) -> str:
    """``tune.md``: one table plus the notes that qualify it."""
    head, rows = point_rows(result)
    lines = [
        f"# Budget sweep: {result['algorithm']} on {result['dataset']}",
        "",
        f"{result['peers']} peers, {result['rounds']} rounds, seed {result['seed']}, "
        f"{str(result['accountant']).upper()} accountant; the same federation and data split at every point.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    lines += [
        "",
        "Epsilon: one budget for all peers, `a/b/c` per-peer budgets cycled over peers by id, `p=e` explicit "
        "per-peer budgets. 'vs non-private': mean global accuracy minus the non-private run's. 'phases refused': "
        "local or mutual-learning phases the hard budget gate skipped. Overhead: seconds per round / the "
        "non-private run's (wall clock on a shared machine: indicative).",
    ]
    if result.get("audit", {}).get("enabled"):
        a = result["audit"]
        lines.append(
            f"Leakage: threat model {a['threat_model']}, attacks {', '.join(a['attacks'])}, {a['reference_models']} "
            "reference model(s) per architecture; the (target model, attack) with the highest AUC, 95% bootstrap "
            "intervals. TPR at 0.1% FPR is 'unsupported' when a target has fewer than 1,000 non-members. "
            "A low AUC is not a proof of privacy."
        )
    for n in result.get("notes", []):
        lines.append(f"- {n}")
    failed = [p for p in result["points"] if p["status"] == "failed"]
    for p in failed:
        lines.append(f"- point {p['label']} FAILED: {p.get('error')}")
    per_peer = [p for p in result["points"] if p["status"] == "done" and p["private"]]
    if per_peer:
        lines += ["", "Per peer (global % / eps spent of target):", ""]
        ids = sorted({int(k) for p in per_peer for k in p["peers"]})
        archs = {k: v.get("arch") for k, v in per_peer[0]["peers"].items()}
        lines.append("| epsilon | " + " | ".join(f"peer {i} ({archs.get(str(i), '?')})" for i in ids) + " |")
        lines.append("|---|" + "|".join("---:" for _ in ids) + "|")
        for p in [q for q in result["points"] if q["status"] == "done"]:
            cells = []
            for i in ids:
                v = p["peers"].get(str(i), {})
                if p["private"]:
                    cells.append(f"{pct(v.get('global_acc'))} / {v.get('epsilon_spent') or 0:.2f} of "
                                 f"{_num(v['epsilon_target']) if v.get('epsilon_target') is not None else '-'}")
                else:
                    cells.append(pct(v.get("global_acc")))
            lines.append(f"| {p['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _x_positions(points: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], float | None, list[float]]:
    """x position per point label: its epsilon (median of per-peer budgets for
    mixed points); the non-private point sits to the right of the largest."""
    finite: dict[str, float] = {}
    for p in points:
        if not p["private"]:
            continue
        if p.get("epsilon") is not None:
            finite[p["label"]] = float(p["epsilon"])
        else:
            tg = [v.get("epsilon_target") or v.get("epsilon_requested") for v in p.get("peers", {}).values()]
            tg = [t for t in tg if t]
            if not tg and p.get("cycle"):
                tg = list(p["cycle"])
            if not tg and p.get("per_peer"):
                tg = list(p["per_peer"].values())
            if tg:
                finite[p["label"]] = float(np.median(tg))
    for p in points:  # per-peer budgets of mixed points get ticks too (panel b)
        if p["private"] and p.get("epsilon") is None:
            for v in p.get("peers", {}).values():
                t = v.get("epsilon_target") or v.get("epsilon_requested")
                if t:
                    finite.setdefault(f"_peer {t}", float(t))
    values = sorted(set(finite.values()))
    lo, hi = (values[0], values[-1]) if values else (1.0, 1.0)
    span = max(math.log10(hi) - math.log10(lo), 0.6)
    inf_x = hi * 10 ** (0.35 * span) if values else 1.0
    pos = dict(finite)
    for p in points:
        if not p["private"]:
            pos[p["label"]] = inf_x
    return pos, inf_x, values


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def plot_tune(result: Mapping[str, Any], path: Path) -> Path:
    """``tune.png``: see the module docstring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in result["points"] if p["status"] == "done"]
    audit = bool(result.get("audit", {}).get("enabled"))
    ncols = 2
    nrows = 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 8.5), dpi=110)
    ax_acc, ax_peer, ax_time, ax_pareto = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    pos, inf_x, finite_vals = _x_positions(done)

    def style_x(ax: Any) -> None:
        ax.set_xscale("log")
        ticks = list(finite_vals) + ([inf_x] if inf_x is not None and any(not p["private"] for p in done) else [])
        labels = [_num(v) for v in finite_vals] + (["inf\n(non-private)"] if len(ticks) > len(finite_vals) else [])
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.minorticks_off()
        if finite_vals and inf_x is not None and len(ticks) > len(finite_vals):
            ax.axvline(math.sqrt(finite_vals[-1] * inf_x), color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epsilon per peer (log scale)")
        ax.grid(alpha=0.3)

    uniform = sorted([p for p in done if p["kind"] in ("uniform", "non-private")], key=lambda p: pos.get(p["label"], 0))
    mixed = [p for p in done if p["kind"] in ("cycled", "per-peer") and p["label"] in pos]
    # (a) accuracy vs epsilon
    for key, name, ls in (("mean_global_acc", "mean global", "-o"), ("mean_local_acc", "mean local", "--s")):
        pts = [(pos[p["label"]], p[key]) for p in uniform if p.get(key) is not None and p["label"] in pos]
        if pts:
            ax_acc.plot([x for x, _ in pts], [y for _, y in pts], ls, label=f"{name} accuracy")
    spread = [(pos[p["label"]], p["min_peer_global_acc"], p["max_peer_global_acc"]) for p in uniform
              if p.get("min_peer_global_acc") is not None and p["label"] in pos]
    if spread:
        ax_acc.fill_between([s[0] for s in spread], [s[1] for s in spread], [s[2] for s in spread], alpha=0.15,
                            label="peer global accuracy (min-max)")
    for p in mixed:
        ax_acc.plot([pos[p["label"]]], [p["mean_global_acc"]], "D", ms=7, label=f"per-peer {p['label']} (at median eps)")
        ax_acc.annotate(p["label"], (pos[p["label"]], p["mean_global_acc"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7)
    style_x(ax_acc)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("accuracy vs privacy budget")
    _legend(ax_acc, fontsize=7, loc="best")

    # (b) per-peer accuracy vs each peer's own epsilon
    peer_ids = sorted({int(k) for p in done for k in p.get("peers", {})})
    cmap = plt.get_cmap("tab10" if len(peer_ids) <= 10 else "tab20")
    for j, pid in enumerate(peer_ids):
        xs, ys, mx, my = [], [], [], []
        arch = None
        for p in done:
            v = p.get("peers", {}).get(str(pid))
            if not v or v.get("global_acc") is None:
                continue
            arch = v.get("arch")
            if not p["private"]:
                x = inf_x
            else:
                x = v.get("epsilon_target") or v.get("epsilon_requested")
            if x is None:
                continue
            (xs if p["kind"] in ("uniform", "non-private") else mx).append(x)
            (ys if p["kind"] in ("uniform", "non-private") else my).append(v["global_acc"])
        order = np.argsort(xs)
        color = cmap(j % cmap.N)
        ax_peer.plot(np.asarray(xs)[order], np.asarray(ys)[order], "-o", ms=3, lw=1, color=color,
                     label=f"peer {pid} ({arch})")
        if mx:
            ax_peer.plot(mx, my, "D", ms=5, color=color, mfc="none")
    style_x(ax_peer)
    ax_peer.set_ylabel("global accuracy")
    ax_peer.set_ylim(0, 1)
    ax_peer.set_title("per-peer accuracy vs its own epsilon (hollow: per-peer points)")
    _legend(ax_peer, fontsize=6, ncol=2, loc="best")

    # (c) time overhead
    bars = [(pos[p["label"]], (p.get("overhead") or {}).get("seconds_per_round"),
             (p.get("overhead") or {}).get("compute_seconds_per_round"), p["label"]) for p in done if p["label"] in pos]
    bars = [b for b in bars if b[1] is not None]
    if bars:
        bars.sort()
        ax_time.plot([b[0] for b in bars], [b[1] for b in bars], "-o", label="seconds per round")
        comp = [(b[0], b[2]) for b in bars if b[2] is not None]
        if comp:
            ax_time.plot([c[0] for c in comp], [c[1] for c in comp], "--s", label="compute seconds per round")
        ax_time.axhline(1.0, color="grey", lw=0.8)
        for x, y, _c, _label in bars:
            ax_time.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    style_x(ax_time)
    ax_time.set_ylabel("time / non-private time")
    ax_time.set_ylim(bottom=0)
    ax_time.set_title("time overhead vs non-private")
    _legend(ax_time, fontsize=7, loc="best")

    # (d) Pareto: accuracy vs leakage (audit) -- otherwise accuracy vs spent epsilon
    if audit:
        pts = []
        for p in done:
            w = (p.get("leakage") or {}).get("worst")
            if w and w["auc"].get("value") is not None and p.get("mean_global_acc") is not None:
                pts.append((w["auc"]["value"], p["mean_global_acc"], p["label"], w["auc"].get("ci_low"),
                            w["auc"].get("ci_high")))
        for auc_v, acc, lab, lo, hi in pts:
            xerr = None if lo is None or hi is None else [[auc_v - lo], [hi - auc_v]]
            ax_pareto.errorbar([auc_v], [acc], xerr=xerr, fmt="o", capsize=3)
            ax_pareto.annotate(f"eps {lab}", (auc_v, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
        # Pareto front: lower AUC and higher accuracy are better
        front = []
        for auc_v, acc, _label, _lo, _hi in sorted(pts):
            if not front or acc > front[-1][1]:
                front.append((auc_v, acc))
        if len(front) > 1:
            ax_pareto.plot([f[0] for f in front], [f[1] for f in front], "-", color="tab:red", lw=1,
                           label="Pareto front")
            _legend(ax_pareto, fontsize=7, loc="lower right")
        ax_pareto.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax_pareto.set_xlabel("strongest attack AUC (final-model threat model; 0.5 = chance)")
        ax_pareto.set_ylabel("mean global accuracy")
        ax_pareto.set_title("accuracy vs leakage (Pareto)")
        ax_pareto.grid(alpha=0.3)
    else:
        for p in done:
            if p["private"] and p.get("epsilon_spent_max") is not None:
                ax_pareto.plot([p["epsilon_spent_max"]], [p["mean_global_acc"]], "o")
                ax_pareto.annotate(f"eps {p['label']}", (p["epsilon_spent_max"], p["mean_global_acc"]),
                                   textcoords="offset points", xytext=(5, 5), fontsize=8)
        base = next((p for p in done if not p["private"]), None)
        if base is not None and base.get("mean_global_acc") is not None:
            ax_pareto.axhline(base["mean_global_acc"], color="grey", ls="--", lw=1, label="non-private")
            _legend(ax_pareto, fontsize=7, loc="lower right")
        ax_pareto.set_xlabel("largest epsilon spent by a peer (ledger)")
        ax_pareto.set_ylabel("mean global accuracy")
        ax_pareto.set_title("accuracy vs spent budget (run with --audit for the leakage axis)")
        ax_pareto.grid(alpha=0.3)
    fig.suptitle(f"Budget sweep: {result['algorithm']} on {result['dataset']}, {result['peers']} peers, "
                 f"{result['rounds']} rounds")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
