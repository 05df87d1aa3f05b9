"""Run a set of registered attacks against one target model.

Engine-independent: the caller hands over the target model, its members and
non-members, an auditor pool disjoint from all peers' data, and the recipe
(model factory, training function) the auditor uses for reference models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from secure_dfml.audit._attacks import ATTACKS, AttackInputs, get_attack
from secure_dfml.audit._metrics import DEFAULT_FPR_LEVELS, AttackMetrics, evaluate_attack
from secure_dfml.audit._reference import (
    ModelFactory,
    Progress,
    ReferenceModels,
    TrainFn,
    _concat,
    _n,
    _take,
    train_reference_models,
)
from secure_dfml.audit._signals import Signals, compute_signals
from secure_dfml.errors import AuditError

__all__ = ["DEFAULT_ATTACKS", "AttackResult", "AuditResult", "audit_model", "run_attacks"]

_LOG = logging.getLogger(__name__)

DEFAULT_ATTACKS: tuple[str, ...] = ("loss", "population", "lira_online", "rmia_online")
_MAX_TUNING_SAMPLES = 2000


@dataclass(frozen=True)
class AttackResult:
    attack: str
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    metrics: AttackMetrics
    details: Mapping[str, Any]
    seconds: float = 0.0
    groups: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self, *, include_scores: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attack": self.attack,
            "metrics": self.metrics.to_dict(),
            "roc": self.metrics.roc.compact(),  # results version 3
            "details": dict(self.details),
            "seconds": self.seconds,
        }
        if include_scores:
            out["scores"] = self.scores.tolist()
            out["labels"] = self.labels.astype(int).tolist()
        return out


@dataclass(frozen=True)
class AuditResult:
    results: Mapping[str, AttackResult]
    n_reference: int
    reference_online: bool
    reference_train_seconds: float
    n_members: int
    n_nonmembers: int
    n_population: int

    def to_dict(self, *, include_scores: bool = False) -> dict[str, Any]:
        return {
            "n_reference": self.n_reference,
            "reference_online": self.reference_online,
            "reference_train_seconds": self.reference_train_seconds,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "n_population": self.n_population,
            "attacks": {k: v.to_dict(include_scores=include_scores) for k, v in self.results.items()},
        }


def run_attacks(
    inputs: AttackInputs,
    labels: Any,
    *,
    attacks: Sequence[str],
    rng: np.random.Generator,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Any | None = None,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> dict[str, AttackResult]:
    """Run registered attacks on precomputed signals and evaluate each one."""
    y = np.asarray(labels).astype(bool)
    if y.shape != (len(inputs.target),):
        raise AuditError(f"labels must have one entry per audit sample ({len(inputs.target)}); got {y.shape}")
    out: dict[str, AttackResult] = {}
    for name in attacks:
        spec = get_attack(name)
        t0 = time.perf_counter()
        res = spec.run(inputs, (params or {}).get(name, {}))
        secs = time.perf_counter() - t0
        metrics = evaluate_attack(
            res.scores, y, groups=groups, fpr_levels=fpr_levels, n_bootstrap=n_bootstrap,
            confidence=confidence, rng=rng,
        )
        out[name] = AttackResult(name, np.asarray(res.scores), y, metrics, dict(res.details), secs,
                                 None if groups is None else np.asarray(groups))
    return out


def _signals_of(models: Sequence[torch.nn.Module], x: Any, y: Any, batch_size: int) -> list[Signals]:
    return [compute_signals(m, x, y, batch_size=batch_size) for m in models]


def audit_model(
    model: torch.nn.Module,
    *,
    x_members: Any,
    y_members: Any,
    x_nonmembers: Any,
    y_nonmembers: Any,
    pool_x: Any,
    pool_y: Any,
    rng: np.random.Generator,
    model_factory: ModelFactory | None = None,
    train_fn: TrainFn | None = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    n_reference: int = 4,
    n_population: int | None = None,
    ref_train_size: int | None = None,
    reference: ReferenceModels | None = None,
    population: tuple[Any, Any] | None = None,
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> AuditResult:
    """Audit one target model with the named attacks.

    * ``pool_x, pool_y``: the auditor pool, disjoint from all peers' data. A
      population set z (``n_population`` samples, default a third of the pool,
      at most 2000) is split off and never used to train offline reference
      models; the rest trains reference models.
    * Reference models are trained with ``model_factory`` / ``train_fn`` when
      any attack needs them: online (audit samples and z in random halves)
      when any requested attack is online, else offline. Each trains on
      ``ref_train_size`` samples (default: as many as the target's members).
    * ``reference`` / ``population``: reuse models trained earlier (then
      ``population`` must be the z samples they were trained around; for
      online models, their challenge samples must be members, non-members and
      z in that order).
    """
    specs = [get_attack(a) for a in attacks]
    if not specs:
        raise AuditError(f"no attacks requested; available: {', '.join(sorted(ATTACKS))}")
    need_ref = any(s.reference != "none" for s in specs)
    need_online = any(s.online for s in specs)
    need_pop = any(s.needs_population for s in specs)
    n_mem, n_non = _n(y_members), _n(y_nonmembers)
    if _n(x_members) != n_mem or _n(x_nonmembers) != n_non:
        raise AuditError("x and y of members / non-members must have matching lengths")
    if n_mem == 0 or n_non == 0:
        raise AuditError("need at least one member and one non-member")
    k_min = max((s.min_reference for s in specs), default=0)
    if need_ref and reference is None and n_reference < k_min:
        raise AuditError(f"attacks {', '.join(attacks)} need at least {k_min} reference models; got {n_reference}")

    n_pool = _n(pool_y)
    if population is not None:
        pop_x, pop_y = population
        train_pool_x, train_pool_y = pool_x, pool_y
    else:
        if reference is not None:
            raise AuditError("pass the population samples the reference models were trained around")
        n_pop = min(n_pool // 3, 2000) if n_population is None else int(n_population)
        if need_pop and n_pop < 1:
            raise AuditError(f"attacks need population samples but the auditor pool has only {n_pool}")
        if n_pop > n_pool:
            raise AuditError(f"n_population={n_pop} exceeds the auditor pool ({n_pool})")
        perm = rng.permutation(n_pool)
        pop_idx, rest = np.sort(perm[:n_pop]), np.sort(perm[n_pop:])
        pop_x, pop_y = _take(pool_x, pop_idx), _take(pool_y, pop_idx)
        train_pool_x, train_pool_y = _take(pool_x, rest), _take(pool_y, rest)
    n_pop = _n(pop_y)

    audit_x = _concat([x_members, x_nonmembers])
    audit_y = _concat([y_members, y_nonmembers])
    labels = np.concatenate([np.ones(n_mem, dtype=bool), np.zeros(n_non, dtype=bool)])

    if need_ref and reference is None:
        if model_factory is None or train_fn is None:
            raise AuditError("attacks with reference models need model_factory and train_fn")
        size = n_mem if ref_train_size is None else int(ref_train_size)
        if need_online:
            reference = train_reference_models(
                model_factory=model_factory, train_fn=train_fn, pool_x=train_pool_x, pool_y=train_pool_y,
                k=n_reference, rng=rng, challenge_x=_concat([audit_x, pop_x]),
                challenge_y=_concat([audit_y, pop_y]), train_size=size, progress=progress,
            )
        else:
            reference = train_reference_models(
                model_factory=model_factory, train_fn=train_fn, pool_x=train_pool_x, pool_y=train_pool_y,
                k=n_reference, rng=rng, train_size=min(size, _n(train_pool_y)), progress=progress,
            )
    if reference is not None and need_online and not reference.online:
        raise AuditError("online attacks need online reference models (challenge samples in random halves)")

    target = compute_signals(model, audit_x, audit_y, batch_size=batch_size)
    target_pop = compute_signals(model, pop_x, pop_y, batch_size=batch_size) if n_pop else None
    kwargs: dict[str, Any] = {}
    if reference is not None and need_ref:
        n_audit = n_mem + n_non
        if reference.online:
            if reference.challenge_masks.shape[1] != n_audit + n_pop:
                raise AuditError(
                    f"reference models were trained around {reference.challenge_masks.shape[1]} challenge "
                    f"samples, but this audit has {n_audit} audit + {n_pop} population samples"
                )
            mx = reference.challenge_masks[:, :n_audit]
            mz = reference.challenge_masks[:, n_audit:]
            tuning = _signals_of(reference.models, _concat([audit_x, pop_x]), _concat([audit_y, pop_y]), batch_size)
            tuning_mask = reference.challenge_masks
            ref_x = [Signals(s.logits[:n_audit], s.labels[:n_audit]) for s in tuning]
            ref_z = [Signals(s.logits[n_audit:], s.labels[n_audit:]) for s in tuning]
        else:
            mx = np.zeros((reference.k, n_audit), dtype=bool)
            mz = np.zeros((reference.k, n_pop), dtype=bool)
            ref_x = _signals_of(reference.models, audit_x, audit_y, batch_size)
            ref_z = _signals_of(reference.models, pop_x, pop_y, batch_size) if n_pop else []
            tuning, tuning_mask = [], None
            if any(s.name == "rmia_offline" for s in specs) and reference.k >= 2:
                n_tp = reference.pool_masks.shape[1]
                if n_tp != _n(train_pool_y):
                    _LOG.info("reference pool differs from this audit's pool; RMIA's a is not tuned")
                else:
                    sel = np.sort(rng.permutation(n_tp)[:_MAX_TUNING_SAMPLES])
                    tuning = _signals_of(reference.models, _take(train_pool_x, sel), _take(train_pool_y, sel),
                                         batch_size)
                    tuning_mask = reference.pool_masks[:, sel]
        kwargs = dict(
            ref_targets=ref_x, ref_population=ref_z, in_mask_targets=mx, in_mask_population=mz,
            ref_tuning=tuning, tuning_mask=tuning_mask,
        )
    inputs = AttackInputs(target=target, population=target_pop, **kwargs)
    results = run_attacks(
        inputs, labels, attacks=attacks, rng=rng, params=attack_params, fpr_levels=fpr_levels,
        n_bootstrap=n_bootstrap, confidence=confidence,
    )
    return AuditResult(
        results=results,
        n_reference=0 if reference is None or not need_ref else reference.k,
        reference_online=bool(reference is not None and need_ref and reference.online),
        reference_train_seconds=float(sum(reference.train_seconds)) if reference is not None and need_ref else 0.0,
        n_members=n_mem,
        n_nonmembers=n_non,
        n_population=n_pop,
    )
