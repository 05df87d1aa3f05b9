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
* ``tune.md`` -- one table (rewritten after every point), and with
  requirements the checks, the recommended budget per peer and what the sweep
  itself spent;
* ``tune.png`` -- accuracy vs epsilon (log x axis, non-private drawn at the
  right), per-peer accuracy vs each peer's own epsilon, time overhead, and with
  ``audit=True`` a Pareto plot of accuracy vs the strongest attack's AUC.

Requirements (``requirements=``, ``secure-dfml tune --requirements R.toml``)
-------------------------------------------------------------------------------

With a requirement profile (:func:`secure_dfml.certify.load_requirements`):

* the config is checked against every requirement no budget can change --
  ``privacy.delta``, ``privacy.secure_mode_required``,
  ``exchange.channel_encryption_required`` / ``secure_aggregation_required`` /
  ``min_group_size`` (planned from the public schedule), and an
  ``audits.limits.final-model.at_fpr`` the audit can measure -- *before*
  anything trains (:func:`check_config_requirements`).  When one is unmet
  nothing trains: each is reported as "no budget can fix this: set X" and no
  peer gets a recommendation;
* without explicit points the sweep runs :func:`requirement_points`: 0.5, 1, 2,
  4, 8 capped at each peer's ``max_epsilon``, the limit itself, and the
  non-private baseline;
* limits for the ``final-model`` threat model turn the leakage axis on; a
  point meets them when the largest upper confidence bound of the attack AUC
  (and of the TPR at ``at_fpr``) over every target and attack is within them;
* per peer, :func:`recommend_budgets` picks, among the finished points whose
  budget *and* ledger epsilon (with the requirements' accountant) for that peer
  are within its ``max_epsilon`` and whose audit meets the limits, the one with
  the highest global accuracy of that peer's final model (tie: the smaller
  epsilon); a peer with no such point gets the reason.

Ledgers (``state_dir=``, ``--state DIR``)
-----------------------------------------

By default every point keeps its own *research* ledgers (its peers start from
nothing): the sweep is charged to no lifetime ledger, and the result says so.
With ``state_dir`` every point runs against the peers' lifetime ledgers
(``DIR/peer_XXX/peer_<id>.json``, as ``secure-dfml run --state DIR``): the
points run in the order given, a point's epsilon is each peer's cap on its
lifetime ledger after that point, so later points plan their noise after what
earlier ones spent; a point is refused (nothing runs) when it would need more
than a peer's lifetime budget (its ``max_epsilon`` in the requirements, else
its configured budget) or when a ledger already holds all but 1% of the
point's budget.  The non-private point is refused: a run without DP cannot be
charged to a ledger.  Nothing lowers spent budget: ``overwrite`` keeps the
replaced points' ledgers in ``out_dir/ledger-archive/``, and the lifetime
ledgers are never touched by it.

What the sweep itself spends
----------------------------

Every point trains on the same private records, so the sweep spends privacy of
its own: a model released after the sweep keeps its guarantee only if the
sweep's spend is charged too (at most the sum of the points' epsilons per peer
by basic composition; the lifetime ledger composes it more tightly), or if the
sweep ran on public or proxy data.  ``sweep_privacy`` in the result gives the
numbers per peer next to the recommended budget.
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
from secure_dfml._run import load_federation_data, peer_state_dir, run_federation
from secure_dfml.audit import DEFAULT_FPR_LEVELS, audit_run_dir, resolve_attacks
from secure_dfml.certify import AuditLimit, Requirements, audit_upper_bounds, load_requirements
from secure_dfml.config import PeerPrivacyConfig, RunConfig, dump_toml
from secure_dfml.errors import ConfigError, RunDirectoryError, SecureDFMLError
from secure_dfml.models import resolve_architectures
from secure_dfml.privacy import (
    PrivacyLedger,
    PrivacyValidationError,
    atomic_write_bytes,
    compute_epsilon,
    ledger_path,
    resolve_budgets,
)
from secure_dfml.protocol.selection import select_key_holder
from secure_dfml.protocol.strategies import build_strategy
from secure_dfml.rundir import audit_dir, config_file, ledgers_dir, partial_dir, summary_file

logger = logging.getLogger(__name__)

__all__ = [
    "ACCURACY_METRIC",
    "DEFAULT_EPSILONS",
    "DEFAULT_TUNE_ATTACKS",
    "EPSILONS_SYNTAX",
    "REQUIREMENTS_GRID",
    "TUNE_FORMAT",
    "BudgetPoint",
    "PeerRecommendation",
    "RequirementCheck",
    "TuneEvent",
    "budget_point",
    "check_config_requirements",
    "parse_epsilons",
    "planned_group_sizes",
    "recommend_budgets",
    "recommendation_rows",
    "release_budgets",
    "render_tune_markdown",
    "requirement_points",
    "sweep_privacy",
    "sweep_privacy_rows",
    "tune_budgets",
]

TUNE_FORMAT = "secure-dfml-tune"
TUNE_VERSION = 2  # 2: requirements, recommendations, ledger_scope, sweep_privacy, per-point charges
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


# --------------------------------------------------------------------------- requirements
#: The points of a sweep given no ``--epsilons`` (without requirements).
DEFAULT_EPSILONS = "1,2,4,8,inf"
#: With requirements and no ``--epsilons``: these values, capped at each peer's
#: ``max_epsilon``, plus the limit itself (and the non-private baseline).
REQUIREMENTS_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
#: What a recommendation maximises, per peer.
ACCURACY_METRIC = "global_acc"
ACCURACY_METRIC_TEXT = (
    "global_acc: the peer's final model's accuracy on the global, balanced test set in the point's last round"
)
QUALIFIES_TEXT = (
    "a finished DP point qualifies for a peer when the peer's budget there and its ledger epsilon (with the "
    "requirements' accountant) are within its max_epsilon"
)
AUDIT_QUALIFIES_TEXT = (
    f", and the point's {TUNE_THREAT_MODEL} audit meets the attack limits (largest upper confidence bound over every "
    "target and attack)"
)
_REL = 1e-9  # relative slack for float comparisons of epsilons
#: Under --state a point is refused when a peer's lifetime ledger already holds
#: all but this fraction of the point's budget: the planner spends each budget to
#: within 0.5% below it, so what such a ledger has left is rounding, not a budget.
LEFT_FRACTION = 0.01


@dataclass(frozen=True)
class RequirementCheck:
    """One requirement that no budget can change, checked against the config.

    ``requirement``: the requirements field (``exchange.channel_encryption_required``);
    ``detail``: what the config gives; ``fix``: the setting that meets it (unmet only).
    """

    requirement: str
    met: bool
    detail: str
    fix: str = ""

    @property
    def text(self) -> str:
        if self.met:
            return f"{self.requirement}: met ({self.detail})"
        return f"{self.requirement}: NOT met ({self.detail}); no budget can fix this: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"requirement": self.requirement, "met": self.met, "detail": self.detail, "fix": self.fix or None,
                "text": self.text}


def _as_requirements(value: Requirements | str | Path | None) -> Requirements | None:
    if value is None or isinstance(value, Requirements):
        return value
    return load_requirements(value)


def requirement_points(num_peers: int, req: Requirements, *,
                       grid: Sequence[float] = REQUIREMENTS_GRID) -> list[BudgetPoint]:
    """The default sweep with requirements: every value of ``grid`` below some
    peer's ``max_epsilon`` and every limit itself, each capped per peer at its
    limit (a point whose capped budgets differ between peers lists them per
    peer), then the non-private baseline.  Peers without a limit get ``grid``."""
    limits = [req.privacy.max_epsilon_for(i) for i in range(num_peers)]
    values = {float(g) for g in grid if any(lim is None or g < lim for lim in limits)}
    values |= {float(lim) for lim in limits if lim is not None}
    points: list[BudgetPoint] = []
    for v in sorted(values):
        per = {i: v if lim is None else min(v, lim) for i, lim in enumerate(limits)}
        distinct = set(per.values())
        point = BudgetPoint(epsilon=distinct.pop()) if len(distinct) == 1 else BudgetPoint(per_peer=per)
        if point not in points:
            points.append(point)
    return [*points, NON_PRIVATE]


def planned_group_sizes(cfg: RunConfig, archs: Sequence[str]) -> list[tuple[int, int, int]]:
    """(round, aggregator, size) of every aggregation the public schedule plans
    when every sender's model arrives, counted as certification counts a run's
    groups: each CKKS sum's contributors where the round's group has protected
    sums, else the sender models the aggregator receives."""
    strategy = build_strategy(cfg)
    f = cfg.federation
    all_archs = list(archs) + ([archs[0]] if strategy.uses_server and archs else [])
    endpoints = len(all_archs)
    protect = strategy.averages and cfg.crypto.secure_aggregation == "ckks"
    out: list[tuple[int, int, int]] = []
    for t in range(f.rounds):
        for g in strategy.select(endpoints, t):
            sizes: list[int] = []
            if protect and select_key_holder(federation_id=f.id, seed=f.seed, round_index=t, num_peers=endpoints,
                                             exclude={g.aggregator, *g.senders}) is not None:
                by_arch: dict[str, int] = {}
                for s in g.senders:
                    by_arch[all_archs[s]] = by_arch.get(all_archs[s], 0) + 1
                sizes = [c for c in by_arch.values() if c >= 2]
            if not sizes and g.senders:
                sizes = [len(g.senders)]
            out += [(t, g.aggregator, n) for n in sizes]
    return out


def check_config_requirements(cfg: RunConfig, req: Requirements, *, num_train: Sequence[int],
                              archs: Sequence[str]) -> list[RequirementCheck]:
    """Every requirement of ``req`` that no budget can change, checked against
    ``cfg`` as each sweep point runs it (DP on); ``num_train``: training-set size
    per peer (the default delta depends on it), ``archs``: architecture per peer."""
    checks: list[RequirementCheck] = []
    pr, ex = req.privacy, req.exchange
    if pr.delta is not None:
        budgets = resolve_budgets(BudgetPoint(epsilon=1.0).apply(cfg), num_train)
        over = [b for b in budgets if b.delta > pr.delta]
        largest = max(b.delta for b in budgets)
        if not over:
            checks.append(RequirementCheck("privacy.delta", True, f"every peer's delta <= {pr.delta:g} "
                                                                   f"(largest {largest:g})"))
        else:
            own = [b.peer_id for b in over if (o := cfg.privacy.peers.get(str(b.peer_id))) is not None
                   and o.delta is not None]
            fix = f"privacy.delta = {pr.delta:g} (or lower)"
            if own:
                fix += " and " + ", ".join(f"privacy.peers.{i}.delta" for i in own) + f" <= {pr.delta:g}"
            peers = ", ".join(f"peer {b.peer_id} {b.delta:g}" for b in over[:5]) + (" ..." if len(over) > 5 else "")
            checks.append(RequirementCheck("privacy.delta", False, f"delta above {pr.delta:g}: {peers}", "set " + fix))
    if pr.accountant is not None and pr.accountant != cfg.privacy.accountant:
        checks.append(RequirementCheck(
            "privacy.accountant", True,
            f"the config plans with {cfg.privacy.accountant!r}; every ledger epsilon is recomputed with "
            f"{pr.accountant!r} before it is compared with max_epsilon (set privacy.accountant = "
            f"{pr.accountant!r} to plan with it too)"))
    if pr.secure_mode_required:
        ok = bool(cfg.privacy.secure_mode)
        checks.append(RequirementCheck(
            "privacy.secure_mode_required", ok,
            "DP noise and sampling from the OS CSPRNG" if ok else "privacy.secure_mode = false: seeded, research-grade "
            "randomness", "" if ok else "set privacy.secure_mode = true"))
    if ex.channel_encryption_required:
        ok = cfg.crypto.channel == "nacl"
        checks.append(RequirementCheck(
            "exchange.channel_encryption_required", ok, f"crypto.channel = {cfg.crypto.channel!r}",
            "" if ok else 'set crypto.channel = "nacl" (and drop crypto.allow_insecure)'))
    if ex.secure_aggregation_required:
        ok = cfg.crypto.secure_aggregation == "ckks"
        checks.append(RequirementCheck(
            "exchange.secure_aggregation_required", ok, f"crypto.secure_aggregation = {cfg.crypto.secure_aggregation!r}",
            "" if ok else 'set crypto.secure_aggregation = "ckks"'))
    if ex.min_group_size is not None:
        sizes = planned_group_sizes(cfg, archs)
        if not sizes:
            checks.append(RequirementCheck(
                "exchange.min_group_size", False,
                f"algorithm {cfg.federation.algorithm!r} plans no aggregation with a sender model",
                f'set federation.algorithm = "dfml" with groups of at least {ex.min_group_size + 1} participants'))
        else:
            rnd, agg, smallest = min(sizes, key=lambda t: t[2])
            ok = smallest >= ex.min_group_size
            detail = (f"smallest planned aggregation: {smallest} sender model(s) (round {rnd}, aggregator {agg}; "
                      "planned from the public schedule with every model arriving)")
            per_group = -(-cfg.federation.participants // max(1, cfg.federation.groups))
            fix = "" if ok else (
                f"set federation.participants / federation.groups so that every group has at least "
                f"{ex.min_group_size + 1} peers (now up to {per_group})"
                + ("; under CKKS each architecture's sum counts apart: fewer architectures (models.mix) give larger "
                   "sums" if cfg.crypto.secure_aggregation == "ckks" else ""))
            checks.append(RequirementCheck("exchange.min_group_size", ok, detail, fix))
    limit = req.audits.limits.get(TUNE_THREAT_MODEL)
    if limit is not None and limit.max_tpr is not None and limit.at_fpr is not None:
        ok = any(math.isclose(limit.at_fpr, f) for f in DEFAULT_FPR_LEVELS)
        levels = ", ".join(f"{f:g}" for f in DEFAULT_FPR_LEVELS)
        checks.append(RequirementCheck(
            f"audits.limits.{TUNE_THREAT_MODEL}.at_fpr", ok, f"at_fpr = {limit.at_fpr:g}; the audit measures TPR at "
            f"FPR {levels}", "" if ok else f"set audits.limits.{TUNE_THREAT_MODEL}.at_fpr to one of {levels}"))
    return checks


def _requirement_notes(req: Requirements) -> list[str]:
    """What certification will ask of a released run that the sweep does not check."""
    notes: list[str] = []
    others = [tm for tm in req.audits.threat_models_required if tm != TUNE_THREAT_MODEL]
    limited = [tm for tm in req.audits.limits if tm != TUNE_THREAT_MODEL]
    if others:
        notes.append(f"the requirements also ask for audits of {', '.join(others)}: the sweep audits only "
                     f"{TUNE_THREAT_MODEL}; run `secure-dfml audit RUN --threat-model NAME` on the released run.")
    if limited:
        notes.append(f"attack limits for {', '.join(limited)} are not checked by the sweep (it audits only "
                     f"{TUNE_THREAT_MODEL}); certify checks them on the released run.")
    strength = getattr(req.audits, "min_strength", None)
    if strength is not None:
        notes.append(f"the requirements ask for a canary audit of strength >= {strength:g}: the sweep does not run it "
                     "(`secure-dfml audit canary`); certify checks it on the released run.")
    if req.privacy.max_epsilon is None and not req.privacy.peers:
        notes.append("the requirements set no max_epsilon: every budget of the sweep is within them.")
    return notes


@dataclass(frozen=True)
class PeerRecommendation:
    """The budget recommended for one peer, or why there is none.

    ``epsilon``: the budget to configure (the point's target for the peer);
    ``epsilon_spent``: what the peer's ledger spent at that point (with the
    requirements' accountant); ``accuracy``: :data:`ACCURACY_METRIC` at that
    point; ``accuracy_cost``: the non-private run's minus it; ``rejected``:
    point label -> why that point does not qualify for this peer.
    """

    peer: int
    arch: str | None
    max_epsilon: float | None
    point: str | None = None
    epsilon: float | None = None
    epsilon_spent: float | None = None
    accountant: str | None = None
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    accuracy_cost: float | None = None
    reason: str = ""
    rejected: Mapping[str, str] = field(default_factory=dict)

    @property
    def recommended(self) -> bool:
        return self.point is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer, "arch": self.arch, "recommended": self.recommended, "max_epsilon": self.max_epsilon,
            "point": self.point, "epsilon": self.epsilon, "epsilon_spent": self.epsilon_spent,
            "accountant": self.accountant, "accuracy_metric": ACCURACY_METRIC, "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy, "accuracy_cost": self.accuracy_cost, "reason": self.reason,
            "config": None if self.epsilon is None else f"[privacy.peers.{self.peer}] epsilon = {_num(self.epsilon)}",
            "rejected": dict(self.rejected),
        }


def _audit_verdict(lk: Mapping[str, Any] | None, limit: AuditLimit) -> str | None:
    """Why a point's final-model audit does not meet ``limit`` (None: it does)."""
    if not lk:
        return f"no {TUNE_THREAT_MODEL} audit"
    status = lk.get("status")
    if status == "view_absent":
        return None  # nothing to attack (certification passes it too)
    if status != "audited":
        return f"the {TUNE_THREAT_MODEL} audit {status}" + (f": {lk['error']}" if lk.get("error") else "")
    if lk.get("fail"):
        return "the audit found an empirical epsilon lower bound above the ledger's (FAIL)"
    upper = lk.get("upper") or {}
    if limit.max_auc is not None:
        auc = (upper.get("auc") or {}).get("value")
        if auc is None:
            return "the audit gives no AUC upper confidence bound"
        if auc > limit.max_auc:
            return f"attack AUC upper bound {auc:.3f} ({upper['auc'].get('where')}) > max_auc {limit.max_auc:g}"
    if limit.max_tpr is not None and limit.at_fpr is not None:
        tpr = (upper.get("tpr_at_fpr") or {}).get(f"{limit.at_fpr:g}") or {}
        if tpr.get("value") is None:
            return f"TPR at FPR {limit.at_fpr:g} could not be measured ({tpr.get('reason') or 'not in the audit'})"
        if tpr["value"] > limit.max_tpr:
            return (f"attack TPR upper bound {tpr['value']:.3f} at FPR {limit.at_fpr:g} ({tpr.get('where')}) > "
                    f"max_tpr {limit.max_tpr:g}")
    return None


def _point_verdict(p: Mapping[str, Any], pid: int, lim: float | None,
                   audit_limit: AuditLimit | None) -> tuple[str | None, dict[str, Any]]:
    """Why point ``p`` does not qualify for peer ``pid`` (None: it does), and the peer's numbers there."""
    if p["status"] != "done":
        why = p.get("reason") or p.get("error") or ""
        return f"{p['status']}" + (f": {why}" if why else ""), {}
    v = p.get("peers", {}).get(str(pid))
    if v is None:
        return "no result for this peer", {}
    target = v.get("epsilon_target") if v.get("epsilon_target") is not None else v.get("epsilon_requested")
    spent = v.get("epsilon_checked") if v.get("epsilon_checked") is not None else v.get("epsilon_spent")
    nums = {"epsilon": target, "spent": spent, "accuracy": v.get(ACCURACY_METRIC),
            "accountant": v.get("epsilon_checked_accountant")}
    if lim is not None and target is not None and target > lim * (1 + _REL):
        return f"budget {_num(target)} is above max_epsilon {_num(lim)}", nums
    if spent is None:
        return "the ledger gives no spent epsilon", nums
    if lim is not None and spent > lim * (1 + _REL):
        return f"ledger epsilon {spent:.4g} is above max_epsilon {_num(lim)}", nums
    if pid in (p.get("phases") or {}).get("lifetime_exhausted_peers", []):
        return "its phases were refused: earlier runs had exhausted its lifetime budget", nums
    if audit_limit is not None:
        why = _audit_verdict(p.get("leakage"), audit_limit)
        if why is not None:
            return why, nums
    if nums["accuracy"] is None:
        return f"no {ACCURACY_METRIC} for this peer", nums
    return None, nums


def recommend_budgets(points: Sequence[Mapping[str, Any]], num_peers: int, req: Requirements, *,
                      unmet: Sequence[RequirementCheck] = ()) -> list[PeerRecommendation]:
    """Per peer, the point that meets ``req`` at the least accuracy cost (see the module docstring)."""
    base = next((p for p in points if not p["private"] and p["status"] == "done"), None)
    audit_limit = req.audits.limits.get(TUNE_THREAT_MODEL)
    if audit_limit is not None and audit_limit.max_auc is None and audit_limit.max_tpr is None:
        audit_limit = None
    archs = next(({k: v.get("arch") for k, v in p.get("peers", {}).items()} for p in points
                  if p["status"] == "done"), {})
    out: list[PeerRecommendation] = []
    for pid in range(num_peers):
        lim = req.privacy.max_epsilon_for(pid)
        arch = archs.get(str(pid))
        base_acc = None if base is None else base.get("peers", {}).get(str(pid), {}).get(ACCURACY_METRIC)
        if unmet:
            out.append(PeerRecommendation(
                peer=pid, arch=arch, max_epsilon=lim, baseline_accuracy=base_acc,
                reason="no budget can fix this: " + "; ".join(c.fix for c in unmet)))
            continue
        rejected: dict[str, str] = {}
        best: tuple[float, float, str, dict[str, Any]] | None = None
        for p in points:
            if not p["private"]:
                continue
            why, nums = _point_verdict(p, pid, lim, audit_limit)
            if why is not None:
                rejected[p["label"]] = why
                continue
            key = (float(nums["accuracy"]), -float(nums["epsilon"] if nums["epsilon"] is not None else nums["spent"]))
            if best is None or key > best[:2]:
                best = (*key, p["label"], nums)
        if best is None:
            tried = len([p for p in points if p["private"]])
            detail = "; ".join(f"{k}: {v}" for k, v in rejected.items()) if rejected else "the sweep has no DP point"
            out.append(PeerRecommendation(
                peer=pid, arch=arch, max_epsilon=lim, baseline_accuracy=base_acc, rejected=rejected,
                reason=f"none of the {tried} DP point(s) qualifies -- {detail}"))
            continue
        _acc, _neg, label, nums = best
        qualifying = sum(1 for p in points if p["private"] and p["label"] not in rejected)
        cost = None if base_acc is None else base_acc - nums["accuracy"]
        out.append(PeerRecommendation(
            peer=pid, arch=arch, max_epsilon=lim, point=label, epsilon=nums["epsilon"], epsilon_spent=nums["spent"],
            accountant=nums["accountant"], accuracy=nums["accuracy"], baseline_accuracy=base_acc, accuracy_cost=cost,
            rejected=rejected,
            reason=f"highest {ACCURACY_METRIC} of the {qualifying} qualifying point(s)"))
    return out


def release_budgets(points: Sequence[Mapping[str, Any]], recs: Sequence[PeerRecommendation], *,
                    lifetime: bool = False) -> dict[str, Any] | None:
    """The recommended budgets of all peers together, as one sweep point, and
    whether the sweep trained exactly that combination (each peer's best point
    may be a different one: what a peer learns depends on the others' budgets).
    ``lifetime``: the points were charged to lifetime ledgers (``--state``)."""
    if not recs or not all(r.recommended and r.epsilon is not None for r in recs):
        return None
    eps = {r.peer: float(r.epsilon) for r in recs if r.epsilon is not None}
    distinct = set(eps.values())
    label = BudgetPoint(epsilon=distinct.pop()).label if len(distinct) == 1 else BudgetPoint(per_peer=eps).label
    measured = None
    for p in points:
        if p["status"] != "done" or not p["private"]:
            continue
        targets = {int(k): v.get("epsilon_target") for k, v in p.get("peers", {}).items()}
        if targets and all(t is not None and math.isclose(t, eps.get(k, math.nan)) for k, t in targets.items()):
            measured = p["label"]
            break
    used = sorted({str(r.point) for r in recs})
    if measured is not None:
        text = (f"release with these budgets ({label}, as [privacy.peers.N] epsilon per peer): the sweep measured "
                f"exactly this combination as point {measured}.")
    else:
        text = (f"the peers' best points differ ({', '.join(used)}): the combination {label} was not trained as one "
                "point, and what a peer learns depends on the others' budgets -- add it to the sweep "
                f"(--epsilons {label}) to measure it before release.")
    if lifetime:
        text += (" Under --state each point's epsilon capped the lifetime ledger, earlier points included: the "
                 "measured model is itself covered by its ledger epsilon, while a new release run is charged on top of "
                 "everything the sweep spent and refused once a lifetime budget is gone.")
    return {"epsilons": label, "per_peer": {str(k): v for k, v in eps.items()}, "from_points": used,
            "measured_as": measured, "text": text}


# ----------------------------------------------------------------- ledgers and what the sweep spent
NON_PRIVATE_STATE_REASON = (
    "not run: a non-private run reads every peer's records without DP and cannot be charged to a lifetime ledger "
    "(its epsilon is unbounded); accuracy cost vs non-private is not measured under --state (measure it on public or "
    "proxy data)"
)


def _lifetime_budgets(cfg: RunConfig, req: Requirements | None) -> dict[int, float | None]:
    """Per peer, the lifetime budget a --state sweep may spend: its ``max_epsilon``
    in the requirements, else its configured budget (privacy.epsilon or its override)."""
    out: dict[int, float | None] = {}
    for i in range(cfg.federation.peers):
        lim = None if req is None else req.privacy.max_epsilon_for(i)
        if lim is None:
            o = cfg.privacy.peers.get(str(i))
            lim = o.epsilon if o is not None and o.epsilon is not None else cfg.privacy.epsilon
        out[i] = lim
    return out


def _lifetime_ledger(state: Path, pid: int) -> PrivacyLedger | None:
    path = ledger_path(peer_state_dir(state, pid), pid)
    return PrivacyLedger.load(path, verify=False) if path.is_file() else None


def _state_refusal(point: BudgetPoint, cfg: RunConfig, state: Path, lifetime: Mapping[int, float | None]) -> str | None:
    """Why ``point`` cannot run against the lifetime ledgers in ``state`` (None: it can)."""
    if not point.private:
        return NON_PRIVATE_STATE_REASON
    targets = point.targets(cfg) or {}
    reasons: list[str] = []
    for pid, target in sorted(targets.items()):
        lim = lifetime.get(pid)
        if target is not None and lim is not None and target > lim * (1 + _REL):
            reasons.append(f"peer {pid}: budget {_num(target)} is above its lifetime budget {_num(lim)}")
            continue
        try:
            led = _lifetime_ledger(state, pid)
        except SecureDFMLError as exc:
            reasons.append(f"peer {pid}: its lifetime ledger cannot be used: {exc}")
            continue
        if led is not None and target is not None and led.spent_epsilon >= target * (1 - LEFT_FRACTION):
            exhausted = lim is not None and led.spent_epsilon >= lim * (1 - LEFT_FRACTION)
            left = "its lifetime budget is exhausted" if exhausted else "nothing is left to plan for this point"
            reasons.append(f"peer {pid}: its lifetime ledger already holds epsilon {led.spent_epsilon:.4g} of this "
                           f"point's budget {_num(target)} (less than {100 * LEFT_FRACTION:g}% left: {left})")
    if not reasons:
        return None
    return "refused before training, nothing charged: " + "; ".join(reasons)


def _ledger_counts(state: Path | None, num_peers: int) -> dict[int, int]:
    """Entries in each lifetime ledger now (what a point adds comes after)."""
    if state is None:
        return {}
    out: dict[int, int] = {}
    for pid in range(num_peers):
        try:
            led = _lifetime_ledger(state, pid)
        except SecureDFMLError:
            led = None
        out[pid] = 0 if led is None else len(led.entries)
    return out


def _point_ledgers(run_dir: Path, num_peers: int, *, state: Path | None, before: Mapping[int, int],
                   finished: bool, accountant: str | None) -> dict[str, dict[str, Any]]:
    """Per peer, from the ledgers a point's run wrote: ``epsilon`` its own
    mechanisms spent (what the point charged), the ``runs`` that charged them,
    and ``ledger_epsilon`` the ledger's total after it, with ``accountant`` (the
    ledger's own when None).  Under ``state`` the lifetime ledgers (entries
    after ``before``); else the point's own run (``finished``) or what its
    interrupted run left in ``<run_dir>.partial``."""
    out: dict[str, dict[str, Any]] = {}
    folder = ledgers_dir(run_dir if finished else partial_dir(run_dir))
    for pid in range(num_peers):
        try:
            if state is not None:
                led = _lifetime_ledger(state, pid)
            else:
                path = ledger_path(folder, pid)
                led = PrivacyLedger.load(path, verify=False) if path.is_file() else None
        except SecureDFMLError as exc:
            logger.warning("the ledger of peer %d for %s cannot be read: %s", pid, run_dir, exc)
            continue
        if led is None:
            continue
        new = led.entries[before.get(pid, 0):] if state is not None else led.entries
        mechs = [e.mechanism for e in new]
        acc = accountant or led.accountant
        total = led.spent_epsilon if acc == led.accountant else (
            compute_epsilon(led.mechanisms, delta=led.delta, accountant=acc) if led.entries else 0.0)
        out[str(pid)] = {
            "epsilon": compute_epsilon(mechs, delta=led.delta, accountant=led.accountant) if mechs else 0.0,
            "runs": sorted({e.run for e in new}),
            "ledger_epsilon": total,
            "ledger_accountant": acc,
            "ledger_entries": len(led.entries),
        }
    return out


def _attach_charges(entry: dict[str, Any], charges: Mapping[str, Mapping[str, Any]]) -> None:
    """Record on a point what it charged per peer (``charged``) and, for a finished
    point, each peer's ``epsilon_point`` and ``epsilon_checked`` (the ledger's
    total, with the requirements' accountant, that max_epsilon is compared with)."""
    charged: dict[str, float | None] = {}
    for pid, v in entry.get("peers", {}).items():
        c = charges.get(pid)
        if entry.get("private"):
            v["epsilon_point"] = c["epsilon"] if c is not None else v.get("epsilon_spent")
            v["epsilon_checked"] = c["ledger_epsilon"] if c is not None else v.get("epsilon_spent")
            v["epsilon_checked_accountant"] = c["ledger_accountant"] if c is not None else v.get("accountant")
            charged[pid] = v["epsilon_point"]
    for pid, c in charges.items():
        charged.setdefault(pid, c["epsilon"])
    if charged:
        entry["charged"] = dict(sorted(charged.items(), key=lambda kv: int(kv[0])))
        entry["charged_runs"] = sorted({r for c in charges.values() for r in c["runs"]})


SWEEP_STATEMENT = (
    "Every sweep point trained on the same private records, so the sweep itself spent privacy: the released model's "
    "guarantee holds only for a release trained after the sweep if the sweep's spend is charged too (by composition), "
    "or if the sweep ran on public or proxy data."
)


def sweep_privacy(result: Mapping[str, Any], recommendations: Sequence[PeerRecommendation] | None,
                  lifetime: Mapping[int, float | None] | None, state: Path | None) -> dict[str, Any]:
    """What the sweep itself spent, per peer: the sum of every DP point's epsilon
    (basic composition: an upper bound), next to the recommended budget; under
    ``state`` also the lifetime ledger's own (tighter) total."""
    n = int(result["peers"])
    ran = [p for p in result["points"] if p.get("charged")]
    rec = {r.peer: r for r in recommendations or ()}
    peers: dict[str, Any] = {}
    for pid in range(n):
        vals = [p["charged"].get(str(pid)) for p in ran]
        known = [float(v) for v in vals if v is not None]
        r = rec.get(pid)
        row: dict[str, Any] = {
            "dp_points": len(known),
            "sum_epsilon": float(sum(known)),
            "recommended_epsilon": None if r is None else r.epsilon,
            "release_after_sweep_epsilon": None if r is None or r.epsilon is None else float(sum(known)) + r.epsilon,
        }
        if state is not None:
            try:
                led = _lifetime_ledger(state, pid)
            except SecureDFMLError:
                led = None
            row["lifetime_ledger_epsilon"] = None if led is None else led.spent_epsilon
            row["lifetime_budget"] = None if lifetime is None else lifetime.get(pid)
        peers[str(pid)] = row
    baseline_ran = any(not p["private"] and p["status"] == "done" for p in result["points"])
    text = SWEEP_STATEMENT + (
        f" By basic composition the sweep's {len(ran)} DP point(s) spent at most the sum of their epsilons per peer; "
        "a release trained after it is covered only with that sum added to its own budget.")
    if state is not None:
        text += (" Here every point was charged to the peers' lifetime ledgers, which compose it more tightly: "
                 "their total covers every point's model and the choice among them, and a release run with the same "
                 "--state is charged on top.")
    else:
        text += (" Here the points were charged to no lifetime ledger (research mode): nothing stops a release from "
                 "spending its full budget again.")
    if baseline_ran:
        text += (" The non-private baseline also read the same records, without DP: its accuracy (and every 'accuracy "
                 "cost') carries no privacy guarantee, and the sums cover the DP points only.")
    return {"statement": text, "charged_to": "lifetime ledgers" if state is not None else "no lifetime ledger",
            "composition": "basic (sum of epsilons, same delta per point)", "peers": peers,
            "baseline_without_dp": baseline_ran}


def _sweep_numbers_note(sp: Mapping[str, Any]) -> str:
    rows = sp["peers"]
    parts = []
    for pid, r in rows.items():
        rec = "none" if r["recommended_epsilon"] is None else _num(r["recommended_epsilon"])
        life = ""
        if r.get("lifetime_ledger_epsilon") is not None:
            life = f", lifetime ledger {r['lifetime_ledger_epsilon']:.3g}"
        parts.append(f"peer {pid} {r['sum_epsilon']:.3g} (recommended {rec}{life})")
    return "sum of spent epsilon over the sweep's DP points per peer: " + ", ".join(parts) + "."


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
    counts: dict[str, Any] = {"run": 0, "refused": 0, "refused_by_phase": {}, "refused_peers": [],
                              "lifetime_exhausted_peers": []}
    refused_peers: set[int] = set()
    lifetime: set[int] = set()
    for rec in records:
        for ph in rec.get("phases", []):
            reason = str(ph.get("reason", ""))
            if ph.get("ran"):
                counts["run"] += 1
            elif "budget exhausted" in reason:
                counts["refused"] += 1
                name = str(ph.get("phase"))
                counts["refused_by_phase"][name] = counts["refused_by_phase"].get(name, 0) + 1
                refused_peers.add(int(ph.get("peer", -1)))
                if "earlier runs" in reason:  # the lifetime ledger was spent before this run
                    lifetime.add(int(ph.get("peer", -1)))
    counts["refused_peers"] = sorted(refused_peers)
    counts["lifetime_exhausted_peers"] = sorted(lifetime)
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
        "run_id": summary.get("run_id"),
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
    upper = _upper_bounds(results)
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
        "upper": upper,
        "tpr_at_fpr_status": tpr_state,
        "empirical_epsilon_lower_bound_max": max(lbs) if lbs else None,
        "fail": bool(results.get("fail")),
        "targets": len(results.get("targets", [])),
    }


def _upper_bounds(results: Mapping[str, Any]) -> dict[str, Any]:
    """The largest upper confidence bound of the AUC, and of the TPR at each FPR
    level, over every (target, attack) of an audit -- what requirements limit,
    as certification computes them (:func:`secure_dfml.certify.audit_upper_bounds`;
    ``reason`` names the first (target, attack) that cannot measure a level)."""
    levels = dict.fromkeys(str(level) for t in results.get("targets", []) or [] for a in (t.get("attacks") or {}).values()
                           for level in ((a.get("metrics") or {}).get("tpr_at_fpr") or {}))  # in the audit's order
    first = audit_upper_bounds(results)
    tpr: dict[str, dict[str, Any]] = {}
    for level in levels:
        b = audit_upper_bounds(results, at_fpr=float(level))
        tpr[level] = {"value": None if b.tpr is None else b.tpr[0], "where": None if b.tpr is None else b.tpr[1],
                      "reason": b.unmeasured[0] if b.unmeasured else None}
    auc = {"value": None, "where": None} if first.auc is None else {"value": first.auc[0], "where": first.auc[1]}
    return {"auc": auc, "tpr_at_fpr": tpr}


# --------------------------------------------------------------------------- main entry
def tune_budgets(
    cfg: RunConfig,
    *,
    epsilons: Sequence[Any] | None = None,
    out_dir: str | Path,
    audit: bool = False,
    audit_attacks: Sequence[str] = DEFAULT_TUNE_ATTACKS,
    reference_models: int = 2,
    progress: TuneProgress | None = None,
    overwrite: bool = False,
    resume: bool = False,
    plot: bool = True,
    requirements: Requirements | str | Path | None = None,
    state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` once per budget in ``epsilons`` (plus the non-private
    baseline) and write ``tune.json``, ``tune.md`` and ``tune.png`` to ``out_dir``.

    ``epsilons``: sweep points -- floats (``math.inf`` = non-private), per-peer
    sequences (cycled over peers), ``Mapping[int, float]`` (explicit peers) or
    strings in the CLI syntax; see the module docstring.  None: the requirements'
    grid (:func:`requirement_points`) with ``requirements``, else
    :data:`DEFAULT_EPSILONS`.  ``overwrite``: replace an earlier sweep in
    ``out_dir``; ``resume``: reuse its finished points whose saved config is
    identical (anything else is rerun). ``audit``: add the leakage axis
    (final-model threat model, ``audit_attacks`` with ``reference_models``
    reference models per architecture); on whenever ``requirements`` limit
    final-model attacks.

    ``requirements``: a :class:`~secure_dfml.certify.Requirements` or the path of
    its TOML file -- check the config first, then recommend a budget per peer
    (``recommendations``).  ``state_dir``: charge every point to the peers'
    lifetime ledgers there (``DIR/peer_XXX/``), in order; without it each point
    keeps its own research ledgers and the result says the sweep was charged to
    no lifetime ledger.

    Returns the ``tune.json`` dict. Errors in the sweep definition, the
    requirements or any point's budget (e.g. delta >= 1/n) are raised before
    anything trains; a point that fails while training is recorded as failed and
    the sweep goes on.
    """
    out = Path(out_dir)
    req = _as_requirements(requirements)
    state = None if state_dir is None else Path(state_dir)
    n_peers = cfg.federation.peers
    notes: list[str] = []
    default_points = epsilons is None
    if epsilons is None:
        requested = requirement_points(n_peers, req) if req is not None else parse_epsilons(DEFAULT_EPSILONS)
    else:
        requested = [budget_point(e) for e in epsilons]
    if not requested:
        raise ConfigError(f"no sweep points given. Accepted: {EPSILONS_SYNTAX}")
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
    audit_limit = None if req is None else req.audits.limits.get(TUNE_THREAT_MODEL)
    audit_required = audit_limit is not None and (audit_limit.max_auc is not None or audit_limit.max_tpr is not None)
    if audit_required and not audit:
        notes.append(f"the requirements limit {TUNE_THREAT_MODEL} attacks: every point was audited (--audit).")
        audit = True
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
    dataset, split = load_federation_data(cfg)
    sizes = [int(len(s.train)) for s in split.peers]
    for p, pc in zip(points, point_cfgs, strict=True):
        if p.private:
            try:
                resolve_budgets(pc, sizes)
            except SecureDFMLError as exc:
                raise type(exc)(f"sweep point {p.label}: {exc}") from None
    checks: list[RequirementCheck] = []
    if req is not None:
        archs = resolve_architectures(n_peers, kind=dataset.kind, mix=cfg.models.mix, per_peer=cfg.models.per_peer)
        checks = check_config_requirements(cfg, req, num_train=sizes, archs=archs)
        notes += _requirement_notes(req)
    unmet = [c for c in checks if not c.met]
    lifetime = _lifetime_budgets(cfg, req)
    if cfg.privacy.noise_multiplier is not None or any(
        pp.noise_multiplier is not None for pp in cfg.privacy.peers.values()
    ):
        notes.append("the config's explicit noise multipliers were dropped at DP points: the planner calibrates the "
                     "noise to each point's budget.")
    if any(p.private for p in points) and not cfg.privacy.secure_mode:
        notes.append("DP points ran in research-grade mode (seeded RNG), as configured.")
    if state is not None:
        scope = (f"lifetime ledgers: every point was charged to each peer's one ledger in {state}/peer_XXX/, in the "
                 "order listed; a point's epsilon is the peer's cap on that ledger after the point, so later points "
                 "planned their noise after what earlier points spent, and a point that needs more than a peer's "
                 "lifetime budget or finds it spent is refused. Nothing lowers spent budget.")
    else:
        scope = ("research mode: budgets were not charged to any lifetime ledger -- every point started its peers' "
                 "budgets afresh in its own ledgers (points/<label>/ledgers/); pass --state DIR to charge every point "
                 "to the peers' lifetime ledgers.")
    notes.append(scope)
    static_notes = list(notes)

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
            _archive_point_ledgers(out)
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
        "default_points": default_points,
        "baseline_added": baseline_added,
        "audit": {
            "enabled": bool(audit),
            "required_by_requirements": audit_required,
            "threat_model": TUNE_THREAT_MODEL if audit else None,
            "attacks": list(attack_names),
            "reference_models": reference_models if audit else 0,
            "fpr": LEAKAGE_FPR,
        },
        "ledger_scope": {
            "mode": "lifetime" if state is not None else "research",
            "state_dir": None if state is None else str(state),
            "lifetime_budgets": None if state is None else {str(k): v for k, v in lifetime.items()},
            "text": scope,
        },
        "requirements": None if req is None else {
            "name": req.name, "source": req.source, "profile": req.to_dict(),
            "checks": [c.to_dict() for c in checks], "met": not unmet, "unmet": [c.text for c in unmet],
        },
        "recommendations": None,
        "sweep_privacy": None,
        "notes": notes,
        "config": cfg.to_dict(),
        "points": [{**p.to_dict(), "private": p.private, "status": "pending", "run_dir": f"points/{p.slug}"}
                   for p in points],
        "files": {"json": str(json_path), "md": str(md_path), "png": str(png_path)},
    }

    def save() -> None:
        _add_baseline_deltas(result["points"])
        recs = None
        if req is not None:
            recs = recommend_budgets(result["points"], n_peers, req, unmet=unmet)
            missing = [r.peer for r in recs if not r.recommended]
            result["recommendations"] = {
                "accuracy_metric": ACCURACY_METRIC, "accuracy_metric_text": ACCURACY_METRIC_TEXT,
                "qualifies": QUALIFIES_TEXT + (AUDIT_QUALIFIES_TEXT if audit_required else "") + ".",
                "all_recommended": not missing, "missing": missing,
                "peers": {str(r.peer): r.to_dict() for r in recs},
                "release": release_budgets(result["points"], recs, lifetime=state is not None),
            }
        sp = sweep_privacy(result, recs, lifetime, state)
        result["sweep_privacy"] = sp
        result["notes"] = [*static_notes, sp["statement"], _sweep_numbers_note(sp)]
        _write_json(json_path, result)
        atomic_write_bytes(md_path, render_tune_markdown(result).encode("utf-8"))

    total = len(points)
    if unmet:  # no budget can fix these: nothing trains (a sweep spends privacy of its own)
        why = "not run: the config does not meet requirements no budget can fix (" + "; ".join(c.fix for c in unmet) + ")"
        for i, p in enumerate(points):
            result["points"][i] = {**result["points"][i], "status": "skipped", "reason": why}
        logger.error("the config does not meet the requirements: %s", "; ".join(c.text for c in unmet))
        result["finished"] = utc_now()
        result["files"]["png"] = None
        save()
        return result

    save()
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
                and reused.get("ledger_mode", "research") == ("lifetime" if state is not None else "research")
            ):
                entry = dict(reused)
                entry["resumed"] = True
                logger.info("point %s: reusing the finished run in %s", label, run_dir)
                if audit_fn is not None and (entry.get("leakage") or {}).get("status") != "audited":
                    entry["leakage"] = _audit_point(audit_fn, run_dir, pc, attack_names, reference_models,
                                                    progress, i, total, label, out)
            elif state is not None and (refusal := _state_refusal(p, cfg, state, lifetime)) is not None:
                logger.warning("sweep point %s refused: %s", label, refusal)
                entry = {**result["points"][i], "status": "refused", "reason": refusal,
                         "ledger_mode": "lifetime"}
            else:
                t0 = time.perf_counter()
                records: list[dict[str, Any]] = []
                before = _ledger_counts(state, n_peers)
                try:
                    def on_round(record: dict[str, Any], _i: int = i, _label: str = label,
                                 _records: list[dict[str, Any]] = records) -> None:
                        _records.append(record)
                        if progress is not None:
                            progress(TuneEvent("round", _i, total, _label, record))

                    extra: dict[str, Any] = {} if state is None else {"state_root": state}
                    summary = run_federation_for_tune(pc, run_dir, on_round=on_round, plot=plot, **extra)
                    entry = _point_from_summary(p, pc, summary, records, run_dir, out)
                except SecureDFMLError as exc:
                    if isinstance(exc, PrivacyValidationError) and not records and any(before.values()):
                        # nothing trained: no noise fits what the lifetime ledgers have left for this point
                        logger.warning("sweep point %s refused: %s", label, exc)
                        entry = {**result["points"][i], "status": "refused",
                                 "reason": f"refused before training, nothing charged: {exc}"}
                    else:
                        logger.error("sweep point %s failed: %s", label, exc)
                        entry = {**result["points"][i], "status": "failed", "error": str(exc),
                                 "error_type": type(exc).__name__, "seconds": time.perf_counter() - t0}
                except Exception as exc:  # noqa: BLE001 - one failed point must not end the sweep
                    logger.exception("sweep point %s failed", label)
                    entry = {**result["points"][i], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                             "error_type": type(exc).__name__, "seconds": time.perf_counter() - t0}
                entry["ledger_mode"] = "lifetime" if state is not None else "research"
                if p.private and entry["status"] != "refused":
                    _attach_charges(entry, _point_ledgers(
                        run_dir, n_peers, state=state, before=before, finished=entry["status"] == "done",
                        accountant=None if req is None else req.privacy.accountant))
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


def _archive_point_ledgers(out: Path) -> None:
    """Before ``--overwrite`` removes ``out/points``: keep every point's ledgers
    in ``out/ledger-archive/<time>/`` (spent budget is never deleted)."""
    found = [d for d in sorted((out / "points").glob("*")) if ledgers_dir(d).is_dir()]
    if not found:
        return
    dest = out / "ledger-archive" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    for d in found:
        shutil.copytree(ledgers_dir(d), dest / d.name)
    logger.warning("the ledgers of the replaced sweep's points are kept in %s", dest)


def run_federation_for_tune(cfg: RunConfig, run_dir: Path, *, on_round: Callable[[dict[str, Any]], None],
                            plot: bool, state_root: Path | None = None) -> dict[str, Any]:
    """One point's run (its own run directory; an earlier one is replaced only when the new run succeeds);
    ``state_root``: charge the peers' lifetime ledgers there (``run --state``)."""
    return run_federation(cfg, run_dir, overwrite=True, on_round=on_round, plot=plot, state_root=state_root)


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
            why = p.get("error", "") if p["status"] == "failed" else ("" if compact else p.get("reason", ""))
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


def recommendation_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-peer recommendations (tune.md and the CLI); empty without requirements."""
    recs = result.get("recommendations")
    if not recs:
        return [], []
    head = ["peer", "arch", "max epsilon", "recommended epsilon", "ledger epsilon", "global %", "vs non-private",
            "why"]
    rows: list[list[str]] = []
    for pid, r in sorted(recs["peers"].items(), key=lambda kv: int(kv[0])):
        lim = "-" if r.get("max_epsilon") is None else _num(r["max_epsilon"])
        if r["recommended"]:
            cost = r.get("accuracy_cost")
            rows.append([pid, str(r.get("arch") or "?"), lim, _num(r["epsilon"]) if r.get("epsilon") is not None
                         else "-", "-" if r.get("epsilon_spent") is None else f"{r['epsilon_spent']:.3g}",
                         pct(r.get("accuracy")), "-" if cost is None else f"{-100 * cost:+.1f} pts",
                         f"point {r['point']}: {r['reason']}"])
        else:
            rows.append([pid, str(r.get("arch") or "?"), lim, "NONE", "-", "-", "-", r["reason"]])
    return head, rows


def sweep_privacy_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of what the sweep itself spent, per peer (tune.md and the CLI)."""
    sp = result.get("sweep_privacy")
    if not sp:
        return [], []
    lifetime = (result.get("ledger_scope") or {}).get("mode") == "lifetime"
    head = ["peer", "DP points", "sum of spent epsilon (basic composition)", "recommended epsilon"]
    # under --state a release after the sweep is charged to the same ledger (and refused past its budget)
    head += ["lifetime ledger now", "lifetime budget"] if lifetime else ["sum + recommended (a release after the sweep)"]
    rows: list[list[str]] = []
    for pid, r in sorted(sp["peers"].items(), key=lambda kv: int(kv[0])):
        row = [pid, str(r["dp_points"]), f"{r['sum_epsilon']:.3g}",
               "-" if r.get("recommended_epsilon") is None else _num(r["recommended_epsilon"])]
        if lifetime:
            row += ["-" if r.get("lifetime_ledger_epsilon") is None else f"{r['lifetime_ledger_epsilon']:.3g}",
                    "-" if r.get("lifetime_budget") is None else _num(r["lifetime_budget"])]
        else:
            row.append("-" if r.get("release_after_sweep_epsilon") is None else f"{r['release_after_sweep_epsilon']:.3g}")
        rows.append(row)
    return head, rows


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = (0,)) -> list[str]:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i in left else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return lines


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
    req = result.get("requirements")
    if req:
        lines += ["", f"## Requirements: {req['name']}" + (f" ({req['source']})" if req.get("source") else ""), ""]
        if not req["checks"]:
            lines.append("- the requirements set nothing that the config alone decides.")
        for c in req["checks"]:
            lines.append(f"- {c['text']}" if c["met"] else f"- **{c['text']}**")
    head, rows = recommendation_rows(result)
    if head:
        recs = result["recommendations"]
        lines += ["", "## Recommended budget per peer", "",
                  f"Accuracy metric: {recs['accuracy_metric_text']}; {recs['qualifies']} Ties go to the smaller "
                  "epsilon.", ""]
        lines += _md_table(head, rows, left=(0, 1, len(head) - 1))
        if recs.get("release"):
            lines += ["", f"Release: {recs['release']['text']}"]
    sp = result.get("sweep_privacy")
    if sp:
        lines += ["", "## What the sweep itself spent", "", sp["statement"], ""]
        lines += _md_table(*sweep_privacy_rows(result))
    scope = result.get("ledger_scope")
    if scope:
        lines += ["", f"Ledgers: {scope['text']}"]
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
