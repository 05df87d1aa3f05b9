"""Per-peer budgets and the planner that turns them into noise multipliers.

Budget resolution (per peer ``n``, ``cfg.privacy.peers["n"]`` overrides the
federation-wide values field by field):

* ``epsilon`` -- the target; must be > 0.  ``None`` is accepted only together
  with an explicit ``noise_multiplier`` and means "no cap" (the ledger still
  records everything, the gate never refuses); a warning is logged.
* ``delta`` -- must be < 1/n_train (n_train = the peer's training-set size):
  a mechanism with delta >= 1/n may release one record in the clear and still
  be "(epsilon, delta)-DP".  When unset, the default is
  ``min(1e-5, 0.1 / n_train)`` (:func:`default_delta`): the customary 1e-5,
  lowered for large peers so delta stays an order of magnitude below 1/n.
  A configured delta above 0.1/n is accepted but logged as weak.
* ``max_grad_norm`` -- the per-sample clipping bound C > 0.

Expected schedule (what the planner calibrates for), per peer:

* participation probability ``pi`` per round: ``privacy.expected_participation``
  when set, otherwise derived from the algorithm (:data:`SCHEDULE_MODELS`); for
  DFML ``participants / peers``.
* given participation, the chance of being an aggregator ``a``: for DFML
  ``groups / participants`` (one aggregator per group).  Senders run
  ``dfml.local_epochs`` epochs of local DP-SGD; an aggregator runs
  ``dfml.ml_epochs`` epochs of joint DP-SGD -- both on the peer's own data with
  the same Poisson sample rate and steps per epoch, as Opacus' data loader:
  ``k = ceil(n_train / batch_size)`` steps per epoch, ``q = 1/k`` (= batch/n
  when the batch divides n; an epoch draws n records in expectation).
* expected DP-SGD steps over the run:
  ``T = ceil(rounds * pi * ((1 - a) * local_epochs + a * ml_epochs) * k)``.
* with ``privacy.class_prior = "dp"``, one Gaussian histogram release
  (q = 1, one step) whose noise spends ``prior_fraction`` of epsilon on its own
  is reserved first (released once per peer, then reused).

Public schedule (``privacy.plan_on = "schedule"``, the default): who takes
part, who aggregates and which phases read whose data is derived from public
values only -- the federation id, seed and round (see
:func:`secure_dfml.protocol.strategies.public_schedule`) -- so the planner
counts each peer's actual phases instead of the expected ones.  Calibrating
noise to a data-independent schedule leaks nothing, and each peer spends its
target exactly by its last phase: no phase is refused for a peer selected more
often than average and no budget is left unspent by one selected less often.
``plan_on = "expected"`` uses the expectation above (for deployments whose
schedule is not known in advance).

The planned noise multiplier is the smallest sigma whose composition with the
reserved release spends the target epsilon by the last phase of the schedule.
Whatever happens at run time, the ledger's hard gate still refuses any phase
that would exceed the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from secure_dfml.config import PeerPrivacyConfig, PrivacyConfig, RunConfig
from secure_dfml.privacy._accounting import (
    Mechanism,
    compute_epsilon,
    noise_for_budget,
    sample_rate_for,
    steps_per_epoch,
)
from secure_dfml.privacy._errors import PrivacyValidationError
from secure_dfml.protocol.strategies import public_schedule

logger = logging.getLogger(__name__)

DEFAULT_DELTA_CAP = 1e-5
DEFAULT_DELTA_FRACTION_OF_1_OVER_N = 0.1
DEFAULT_PRIOR_FRACTION = 0.1


def default_delta(num_train: int) -> float:
    """Delta used when none is configured: ``min(1e-5, 0.1 / n_train)``."""
    if num_train < 1:
        raise PrivacyValidationError("a peer with no training samples cannot run DP-SGD.")
    return min(DEFAULT_DELTA_CAP, DEFAULT_DELTA_FRACTION_OF_1_OVER_N / num_train)


@dataclass(frozen=True)
class PeerBudget:
    """A peer's resolved, validated privacy parameters."""

    peer_id: int
    num_train: int
    epsilon: float | None
    delta: float
    delta_is_default: bool
    max_grad_norm: float
    noise_multiplier: float | None

    @property
    def capped(self) -> bool:
        return self.epsilon is not None


def _field(privacy: PrivacyConfig, override: PeerPrivacyConfig | None, name: str) -> tuple[object, str]:
    if override is not None and getattr(override, name) is not None:
        return getattr(override, name), "privacy.peers.{id}." + name
    return getattr(privacy, name), "privacy." + name


def resolve_budget(privacy: PrivacyConfig, peer_id: int, num_train: int) -> PeerBudget:
    """Resolve and validate peer ``peer_id``'s budget; errors name the field and the fix."""
    override = privacy.peers.get(str(peer_id))
    eps, eps_path = _field(privacy, override, "epsilon")
    delta, delta_path = _field(privacy, override, "delta")
    clip, clip_path = _field(privacy, override, "max_grad_norm")
    sigma, sigma_path = _field(privacy, override, "noise_multiplier")
    eps_path, delta_path, clip_path, sigma_path = (
        p.format(id=peer_id) for p in (eps_path, delta_path, clip_path, sigma_path)
    )
    who = f"peer {peer_id}"
    if num_train < 1:
        raise PrivacyValidationError(f"{who} has no training samples; DP-SGD needs data (check the data split).")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0 and not math.isnan(eps)):
        raise PrivacyValidationError(
            f"{eps_path} = {eps!r} for {who} is invalid: epsilon must be > 0 "
            "(set privacy.enabled = false for a non-private run)."
        )
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise PrivacyValidationError(f"{sigma_path} = {sigma!r} for {who} is invalid: expected a number > 0.")
    if eps is None and sigma is None:
        raise PrivacyValidationError(
            f"{eps_path} is unset for {who} and no noise multiplier is given: set an epsilon budget "
            "(e.g. privacy.epsilon = 8) or an explicit privacy.noise_multiplier."
        )
    if eps is not None and math.isinf(eps):
        raise PrivacyValidationError(
            f"{eps_path} = inf for {who}: an infinite budget is not private; "
            "use privacy.enabled = false for a non-private run."
        )
    if clip is None or not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
        raise PrivacyValidationError(
            f"{clip_path} = {clip!r} for {who} is invalid: the per-sample clipping norm must be a number > 0 "
            "(1.0 is a good default)."
        )
    delta_is_default = delta is None
    if delta is None:
        delta = default_delta(num_train)
    if not (0 < delta < 1):
        raise PrivacyValidationError(f"{delta_path} = {delta!r} for {who} is invalid: expected a number in (0, 1).")
    if delta >= 1.0 / num_train:
        raise PrivacyValidationError(
            f"{delta_path} = {delta:g} for {who} is too large: it has {num_train} training samples, so delta must be "
            f"well below 1/{num_train} = {1.0 / num_train:.3g} (a mechanism with delta >= 1/n may publish a whole "
            f"record and still meet the guarantee). Use e.g. delta = {default_delta(num_train):.3g} "
            "or leave it unset for the default min(1e-5, 0.1/n)."
        )
    if delta > DEFAULT_DELTA_FRACTION_OF_1_OVER_N / num_train:
        logger.warning(
            "%s = %g for %s is above 0.1/n = %.3g; the guarantee is weak for a data set of %d records",
            delta_path,
            delta,
            who,
            0.1 / num_train,
            num_train,
        )
    if eps is None:
        logger.warning(
            "%s: no epsilon budget, fixed noise multiplier %g; the ledger records every mechanism "
            "but no hard gate applies",
            who,
            sigma,
        )
    return PeerBudget(
        peer_id=peer_id,
        num_train=int(num_train),
        epsilon=None if eps is None else float(eps),
        delta=float(delta),
        delta_is_default=delta_is_default,
        max_grad_norm=float(clip),
        noise_multiplier=None if sigma is None else float(sigma),
    )


# ---------------------------------------------------------------------------
# Expected participation per algorithm


@dataclass(frozen=True)
class Participation:
    """Per round: probability of taking part, and given that, of aggregating."""

    probability: float
    aggregator_share: float


def _dfml(cfg: RunConfig) -> Participation:
    fed = cfg.federation
    return Participation(fed.participants / fed.peers, fed.groups / fed.participants)


def _def_kt(cfg: RunConfig) -> Participation:
    # teacher -> student pairs: the student runs mutual learning on its data
    fed = cfg.federation
    return Participation(fed.participants / fed.peers, 0.5)


def _local_only(cfg: RunConfig) -> Participation:
    return Participation(1.0, 0.0)


def _senders_only(cfg: RunConfig) -> Participation:
    fed = cfg.federation
    return Participation(fed.participants / fed.peers, 0.0)


SCHEDULE_MODELS: dict[str, Callable[[RunConfig], Participation]] = {
    "dfml": _dfml,
    "def-kt": _def_kt,
    "local": _local_only,
    "gossip-avg": _senders_only,
    "fedavg-central": _senders_only,
}


def expected_participation(cfg: RunConfig) -> Participation:
    model = SCHEDULE_MODELS.get(cfg.federation.algorithm, _dfml)
    part = model(cfg)
    if cfg.privacy.expected_participation is not None:
        part = Participation(cfg.privacy.expected_participation, part.aggregator_share)
    return part


# ---------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PeerPlan:
    """What the planner decided for one peer."""

    peer_id: int
    num_train: int
    target_epsilon: float | None
    delta: float
    max_grad_norm: float
    accountant: str
    sample_rate: float
    steps_per_epoch: int
    participation: float
    aggregator_share: float
    expected_local_phases: float
    expected_mutual_phases: float
    expected_steps: int
    plan_on: str  # "schedule" (the public schedule's phases) | "expected"
    noise_multiplier: float | None
    noise_source: str  # "planned" | "explicit" | "none" | "exhausted" (earlier runs spent the budget)
    prior_noise_multiplier: float | None
    planned_epsilon: float
    epsilon_first_round: float
    epsilon_per_round: float
    rounds: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def prior_mechanism(self) -> Mechanism | None:
        if self.prior_noise_multiplier is None:
            return None
        return Mechanism(self.prior_noise_multiplier, 1.0, 1)


def prior_noise_for(budget: PeerBudget, *, fraction: float = DEFAULT_PRIOR_FRACTION) -> float:
    """Noise multiplier of the DP class-histogram release (L2 sensitivity 1),
    calibrated in closed form by the classic Gaussian mechanism for
    ``fraction * epsilon``: ``sigma = sqrt(2 ln(1.25 / delta)) / (fraction * epsilon)``
    (sigma 20 when uncapped).  This only *chooses* the noise; what the release
    costs is what the peer's accountant says when it composes it with the
    DP-SGD steps (the planner calibrates those to fill the rest of the budget).
    A search with the accountant alone is not used: RDP over Opacus' orders
    cannot certify a single release below epsilon ~0.2, which would refuse
    budgets of epsilon <= 2."""
    if budget.epsilon is None:
        return 20.0
    if not 0 < fraction < 1:
        raise PrivacyValidationError(f"prior fraction = {fraction!r}: expected a number in (0, 1).")
    return math.sqrt(2.0 * math.log(1.25 / budget.delta)) / (fraction * budget.epsilon)


@dataclass(frozen=True)
class PhaseCount:
    """Phases (and epochs) that read one peer's data over the run."""

    local_phases: float
    mutual_phases: float
    epochs: float


def expected_phases(cfg: RunConfig) -> PhaseCount:
    """The expectation over selection (the same for every peer)."""
    part = expected_participation(cfg)
    rounds = cfg.federation.rounds
    local = rounds * part.probability * (1 - part.aggregator_share) if cfg.dfml.local_epochs > 0 else 0.0
    mutual = rounds * part.probability * part.aggregator_share if cfg.dfml.ml_epochs > 0 else 0.0
    return PhaseCount(local, mutual, local * cfg.dfml.local_epochs + mutual * cfg.dfml.ml_epochs)


def scheduled_phases(cfg: RunConfig, num_peers: int) -> list[PhaseCount]:
    """Per peer, its phases on the public schedule (derived from public values only)."""
    counts = [[0, 0, 0] for _ in range(num_peers)]
    for round_phases in public_schedule(cfg, num_peers):
        for peer, phase, epochs in round_phases:
            if 0 <= peer < num_peers:
                counts[peer][0 if phase == "local" else 1] += 1
                counts[peer][2] += epochs
    return [PhaseCount(float(a), float(b), float(e)) for a, b, e in counts]


def peer_phases(cfg: RunConfig, num_peers: int) -> list[PhaseCount]:
    """What the planner calibrates each peer's noise to (``privacy.plan_on``)."""
    if cfg.privacy.plan_on == "schedule":
        return scheduled_phases(cfg, num_peers)
    return [expected_phases(cfg)] * num_peers


def plan_peer(
    cfg: RunConfig,
    budget: PeerBudget,
    *,
    phases: PhaseCount | None = None,
    prior_fraction: float = DEFAULT_PRIOR_FRACTION,
    spent: Sequence[Mechanism] = (),
) -> PeerPlan:
    """The plan for one peer; ``phases`` defaults to the expected schedule.
    ``spent``: mechanisms already charged to the peer's (lifetime) ledger by
    earlier runs -- the noise is calibrated so that they plus this run's phases
    stay within the target; when they already exhaust it nothing is planned."""
    acc = cfg.privacy.accountant
    part = expected_participation(cfg)
    q = sample_rate_for(cfg.dfml.batch_size, budget.num_train)
    k = steps_per_epoch(q)
    rounds = cfg.federation.rounds
    counted = phases if phases is not None else expected_phases(cfg)
    local_phases, mutual_phases, epochs = counted.local_phases, counted.mutual_phases, counted.epochs
    total_steps = math.ceil(epochs * k - 1e-9) if epochs > 0 else 0

    prior_sigma = (
        prior_noise_for(budget, fraction=prior_fraction)
        if cfg.privacy.class_prior == "dp" and mutual_phases > 0  # released by aggregators only
        else None
    )
    fixed = [*spent, *([Mechanism(prior_sigma, 1.0, 1)] if prior_sigma is not None else [])]
    exhausted = (
        bool(spent)
        and budget.epsilon is not None
        and compute_epsilon(fixed, delta=budget.delta, accountant=acc) >= budget.epsilon * (1 - 1e-9)
    )

    if budget.noise_multiplier is not None:
        sigma: float | None = budget.noise_multiplier
        source = "explicit"
    elif total_steps == 0:
        sigma, source = None, "none"
    elif exhausted:
        sigma, source = None, "exhausted"
    else:
        assert budget.epsilon is not None  # resolve_budget guarantees eps or sigma
        sigma = noise_for_budget(
            target_epsilon=budget.epsilon,
            delta=budget.delta,
            sample_rate=q,
            steps=total_steps,
            accountant=acc,
            fixed=fixed,
        )
        source = "planned"

    def eps_after(steps: int) -> float:
        mechs = list(fixed)
        if sigma is not None and steps > 0:
            mechs.append(Mechanism(sigma, q, steps))
        return compute_epsilon(mechs, delta=budget.delta, accountant=acc)

    planned = eps_after(total_steps)
    first = eps_after(math.ceil(total_steps / rounds - 1e-9)) if total_steps else eps_after(0)
    return PeerPlan(
        peer_id=budget.peer_id,
        num_train=budget.num_train,
        target_epsilon=budget.epsilon,
        delta=budget.delta,
        max_grad_norm=budget.max_grad_norm,
        accountant=acc,
        sample_rate=q,
        steps_per_epoch=k,
        participation=part.probability,
        aggregator_share=part.aggregator_share,
        expected_local_phases=local_phases,
        expected_mutual_phases=mutual_phases,
        expected_steps=total_steps,
        plan_on="expected" if phases is None else cfg.privacy.plan_on,
        noise_multiplier=sigma,
        noise_source=source,
        prior_noise_multiplier=prior_sigma,
        planned_epsilon=planned,
        epsilon_first_round=first,
        epsilon_per_round=planned / rounds,
        rounds=rounds,
    )


def resolve_budgets(cfg: RunConfig, num_train_per_peer: Sequence[int]) -> list[PeerBudget]:
    """Validated budgets for peers ``0..len(num_train_per_peer)-1``."""
    unknown = [k for k in cfg.privacy.peers if int(k) >= len(num_train_per_peer)]
    if unknown:
        raise PrivacyValidationError(
            f"privacy.peers has overrides for peer(s) {', '.join(unknown)} but the federation has "
            f"{len(num_train_per_peer)} peers (ids 0..{len(num_train_per_peer) - 1})."
        )
    return [resolve_budget(cfg.privacy, i, int(n)) for i, n in enumerate(num_train_per_peer)]


def plan_budgets(
    cfg: RunConfig, num_train_per_peer: Sequence[int], *, prior_fraction: float = DEFAULT_PRIOR_FRACTION
) -> list[PeerPlan]:
    """Per peer: the noise multiplier that spends its target by its last phase on
    the schedule (``privacy.plan_on``), and the epsilon per round."""
    return plan_all(cfg, resolve_budgets(cfg, num_train_per_peer), prior_fraction=prior_fraction)


def plan_all(
    cfg: RunConfig,
    budgets: Sequence[PeerBudget],
    *,
    prior_fraction: float = DEFAULT_PRIOR_FRACTION,
    num_peers: int | None = None,
    spent: Mapping[int, Sequence[Mechanism]] | None = None,
) -> list[PeerPlan]:
    """Plans for ``budgets`` (any subset of the federation's ``num_peers`` peers,
    default ``len(budgets)``: a peer node plans only its own); peers with the
    same size, budget and phases share one (costly) noise search."""
    phases = peer_phases(cfg, len(budgets) if num_peers is None else num_peers)
    plans: list[PeerPlan] = []
    cache: dict[tuple[object, ...], PeerPlan] = {}
    spent = spent or {}
    for budget in budgets:
        ph = phases[budget.peer_id]
        history = tuple(spent.get(budget.peer_id, ()))
        key = (budget.num_train, budget.epsilon, budget.delta, budget.max_grad_norm, budget.noise_multiplier, ph, history)
        hit = cache.get(key)
        if hit is not None:
            plan = dataclasses.replace(hit, peer_id=budget.peer_id)
        else:
            plan = plan_peer(cfg, budget, phases=ph, prior_fraction=prior_fraction, spent=history)
            cache[key] = plan
        plans.append(plan)
    return plans
