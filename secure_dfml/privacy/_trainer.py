"""The differentially private :class:`~secure_dfml.protocol._interfaces.Trainer`.

Per phase, for the peer whose data is read (the sender in local training, the
aggregator in mutual learning):

1. the phase's mechanism is fixed in advance -- noise multiplier sigma (from the
   planner, or explicit), Poisson sample rate ``q = 1/ceil(n/batch)`` (batch/n
   when the batch divides n), and ``epochs * ceil(n/batch)`` steps;
2. the ledger checks what the peer would have spent with it; if that exceeds
   its (epsilon, delta) the phase does not run (``PhaseReport(ran=False,
   reason="budget exhausted ...")``, logged, and the peer's status becomes
   "exhausted at round r"); the peer keeps its current model;
3. otherwise the mechanism is recorded and persisted *first*, then trained.

Mutual learning trains ``JointModel(models)`` as one module: each step clips
the joint per-sample gradient of all models and adds noise once, so one step
is one subsampled Gaussian mechanism on the aggregator's data, charged to the
aggregator only.  With ``privacy.clipping = "per-model"`` (default) each of the
m models' share of a per-sample gradient is clipped to C/sqrt(m), so the joint
gradient's norm is still at most C (same sensitivity, same mechanism) but no
model's signal is crowded out by another's larger gradient; ``"joint"`` clips
the joint norm to C (measured: the smallest model then kept ~9% of the norm).

Class prior for WSM (``privacy.class_prior``):

* ``"uniform"`` -- the public uniform prior (WSM reduces to cross-entropy); free,
  but under non-IID data the aggregator's missing classes are then trained
  against and forgotten.
* ``"dp"`` (default) -- the aggregator's class histogram released once with the
  Gaussian mechanism: under add/remove-one adjacency a record changes one
  count by 1 (L2 sensitivity 1), so adding N(0, sigma_h^2) per count is a
  subsampled Gaussian mechanism with q = 1 and one step.  It is recorded in
  the ledger as phase ``class_prior`` (sigma_h, 1.0, 1) and composed with the
  DP-SGD steps by the same accountant (RDP or PRV).  sigma_h is planned so the
  release alone would cost ``prior_fraction`` (10%) of the peer's epsilon.  The
  noisy counts are floored at 1 and normalised (post-processing) and reused in
  later rounds at no further cost.  Laplace noise is not offered: it does not
  compose inside Opacus' accountants.

Fixed features: models with a fixed front end (the ``scatter-*`` models) train
on features cached per peer (:class:`~secure_dfml.models.FeatureCache`, computed
once) instead of running the front in every step.  The front has no
parameters, so the per-sample gradients, their clipping and the noise are
exactly those of the full model on raw samples (tested), and the privacy
accounting is unchanged: same mechanism, same ledger entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from secure_dfml.config import RunConfig
from secure_dfml.privacy._accounting import Mechanism
from secure_dfml.privacy._dpsgd import Randomness, resolve_grad_sample_mode, run_dp_sgd
from secure_dfml.privacy._errors import BudgetExceededError, PrivacyValidationError
from secure_dfml.privacy._ledger import PrivacyLedger, ledger_path
from secure_dfml.privacy._planner import DEFAULT_PRIOR_FRACTION, PeerBudget, PeerPlan, plan_all, resolve_budget
from secure_dfml.privacy._validate import validate_model
from secure_dfml.protocol._interfaces import PeerState, PhaseReport, Trainer
from secure_dfml.protocol._train import PlainTrainer, training_module
from secure_dfml.protocol.losses import mutual_learning_loss
from secure_dfml.protocol.schedule import lr_at

logger = logging.getLogger(__name__)

RESEARCH_GRADE_LABEL = "research-grade (seeded RNG: reproducible, NOT for deployment)"
SECURE_LABEL = (
    "secure mode (DP noise and sampling from the OS CSPRNG; the seed fixes only the public split, selection and "
    "initialisation)"
)


_warned: list[bool] = []


def _warn_research_grade_once() -> None:
    """One warning per process, however many peer nodes (each with its trainer) it runs."""
    if not _warned:
        _warned.append(True)
        logger.warning("differential privacy runs in %s mode", RESEARCH_GRADE_LABEL)


class DPTrainer:
    """DP-SGD in every phase that reads private data, with a per-peer ledger and hard budget gate."""

    private = True

    def __init__(
        self,
        cfg: RunConfig,
        peers: Sequence[PeerState],
        *,
        ledger_dir: Path | None = None,
        generator: torch.Generator | None = None,
        prior_fraction: float = DEFAULT_PRIOR_FRACTION,
        num_peers: int | None = None,
        run_id: str = "",
    ) -> None:
        """``peers``: the peers whose data this trainer reads -- a peer node passes
        only its own -- out of a federation of ``num_peers`` (default ``len(peers)``).

        A ledger found in ``ledger_dir`` is resumed, never reset: what runs other
        than ``run_id`` charged to it counts against the budget, and this run's
        noise is planned for what is left."""
        privacy = cfg.privacy
        num_peers = len(peers) if num_peers is None else num_peers
        self.cfg = cfg
        self.secure_mode = bool(privacy.secure_mode)
        if self.secure_mode and generator is not None:
            raise PrivacyValidationError(
                "privacy.secure_mode = true refuses seeds: noise and sampling come from the OS CSPRNG. "
                "Pass generator=None, or set secure_mode = false for reproducible (research-grade) runs."
            )
        ids = [p.peer_id for p in peers]
        if len(set(ids)) != len(ids):
            raise PrivacyValidationError(f"peer ids must be unique, got {ids}.")
        unknown = sorted(set(privacy.peers) - {str(i) for i in range(num_peers)})
        if unknown:
            raise PrivacyValidationError(
                f"privacy.peers has overrides for unknown peer id(s) {', '.join(unknown)}; "
                f"the federation's peers are {', '.join(map(str, range(num_peers)))}."
            )
        resolve_grad_sample_mode(privacy.grad_sample_mode, nn.Identity())  # validates the name
        # 1. budgets and models, before anything trains
        self._budgets: dict[int, PeerBudget] = {
            p.peer_id: resolve_budget(privacy, p.peer_id, p.num_train) for p in peers
        }
        for p in peers:
            validate_model(p.model, name=f"peer {p.peer_id} model ({p.arch})")
        if not set(ids) <= set(range(num_peers)):
            raise PrivacyValidationError(f"peer ids must be in 0..{num_peers - 1}, got {sorted(ids)}.")
        # 2. ledgers (resumed if present: spent budget is never reset)
        self._ledgers: dict[int, PrivacyLedger] = {}
        for pid, b in self._budgets.items():
            if ledger_dir is None:
                led = PrivacyLedger(
                    peer_id=pid, target_epsilon=b.epsilon, delta=b.delta, accountant=privacy.accountant
                )
            else:
                led = PrivacyLedger.open(
                    ledger_path(Path(ledger_dir), pid),
                    peer_id=pid,
                    target_epsilon=b.epsilon,
                    delta=b.delta,
                    accountant=privacy.accountant,
                )
                led.save()
            led.run_id = run_id
            self._ledgers[pid] = led
        # 3. noise multipliers (calibrated to the public schedule or its expectation, after earlier runs' spending)
        self._plans: dict[int, PeerPlan] = {
            plan.peer_id: plan
            for plan in plan_all(
                cfg,
                [self._budgets[i] for i in sorted(ids)],
                prior_fraction=prior_fraction,
                num_peers=num_peers,
                spent={pid: led.mechanisms_before(run_id) for pid, led in self._ledgers.items()},
            )
        }
        # 4. randomness
        self._rng: dict[int, Randomness] = {}
        for p in sorted(peers, key=lambda s: s.peer_id):
            if self.secure_mode:
                self._rng[p.peer_id] = Randomness(sampling=None, noise=None, secure=True)
            else:
                if generator is not None:
                    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                    noise = torch.Generator().manual_seed(seed)
                else:
                    noise = p.generator
                self._rng[p.peer_id] = Randomness(sampling=p.generator, noise=noise, secure=False)
        self._priors: dict[int, torch.Tensor] = {}
        self._last_mode: dict[int, str] = {}
        if not self.secure_mode:
            _warn_research_grade_once()
        for pid, plan in self._plans.items():
            logger.info(
                "peer %d: target epsilon %s at delta %.3g, noise multiplier %s (%s), q = %.4g",
                pid,
                plan.target_epsilon,
                plan.delta,
                None if plan.noise_multiplier is None else f"{plan.noise_multiplier:.4g}",
                plan.noise_source,
                plan.sample_rate,
            )

    # -- labels and read-only views ---------------------------------------

    @property
    def research_grade(self) -> bool:
        """True when randomness is seeded: reproducible, not deployment-grade."""
        return not self.secure_mode

    @property
    def rng_label(self) -> str:
        return SECURE_LABEL if self.secure_mode else RESEARCH_GRADE_LABEL

    @property
    def plans(self) -> Mapping[int, PeerPlan]:
        return MappingProxyType(self._plans)

    @property
    def budgets(self) -> Mapping[int, PeerBudget]:
        return MappingProxyType(self._budgets)

    @property
    def ledgers(self) -> Mapping[int, PrivacyLedger]:
        return MappingProxyType(self._ledgers)

    # -- gate --------------------------------------------------------------

    def _admit(self, peer_id: int, *, round_index: int, phase: str, mechanism: Mechanism) -> str | None:
        """Record ``mechanism`` for ``peer_id`` or return why it was refused."""
        ledger = self._ledgers[peer_id]
        try:
            ledger.record(round_index=round_index, phase=phase, mechanism=mechanism)
        except BudgetExceededError as exc:
            would = float(getattr(exc, "would_spend", float("nan")))
            ledger.refuse(round_index=round_index, phase=phase, would_spend=would)
            reason = (
                f"budget exhausted: peer {peer_id} has spent epsilon {ledger.spent_epsilon:.4g} of "
                f"{ledger.target_epsilon:g} (delta {ledger.delta:.3g}); its {phase} phase "
                f"({mechanism.steps} steps, sigma {mechanism.noise_multiplier:.4g}, q {mechanism.sample_rate:.4g}) "
                f"would bring it to {would:.4g}"
            )
            logger.warning("round %d: %s; the phase is skipped and the peer keeps its model", round_index, reason)
            return reason
        return None

    def _extra(self, peer_id: int) -> dict[str, float]:
        led = self._ledgers[peer_id]
        out = {"epsilon_spent": float(led.spent_epsilon), "delta": led.delta}
        if led.target_epsilon is not None:
            out["epsilon_target"] = led.target_epsilon
        return out

    def _mechanism(self, peer: PeerState, epochs: int) -> Mechanism | None:
        """The planned mechanism of ``epochs`` epochs on ``peer``'s data (q and steps
        per epoch as the planner fixed them for its training-set size)."""
        plan = self._plans[peer.peer_id]
        if plan.noise_multiplier is None:
            return None
        return Mechanism(plan.noise_multiplier, plan.sample_rate, epochs * plan.steps_per_epoch)

    # -- Trainer protocol --------------------------------------------------

    def _phase(
        self,
        peer: PeerState,
        models: nn.Module | Sequence[nn.Module],
        *,
        phase: str,
        epochs: int,
        round_index: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch_dim: int,
        extra: Mapping[str, float] | None = None,
        per_model_clipping: bool = False,
    ) -> PhaseReport:
        """One DP-SGD phase of ``models`` (one, or a group trained jointly) on
        ``peer``'s data: plan the mechanism, pass the budget gate (recorded in
        the ledger before training), then train.  The Opacus wrapper and the
        optimizer live for this phase only."""
        mech = self._mechanism(peer, epochs)
        if mech is None:
            plan = self._plans[peer.peer_id]
            if plan.noise_source == "exhausted":
                reason = (
                    f"budget exhausted: earlier runs on peer {peer.peer_id}'s data already spent its lifetime budget "
                    f"(epsilon {self._ledgers[peer.peer_id].spent_epsilon:.4g} of {plan.target_epsilon:g})"
                )
                self._ledgers[peer.peer_id].refuse(round_index=round_index, phase=phase, would_spend=float("nan"))
                return PhaseReport(ran=False, reason=reason, extra=self._extra(peer.peer_id))
            return PhaseReport(ran=False, reason="no noise multiplier planned (the planned schedule has no steps for this peer)")
        refused = self._admit(peer.peer_id, round_index=round_index, phase=phase, mechanism=mech)
        if refused is not None:
            return PhaseReport(ran=False, reason=refused, extra=self._extra(peer.peer_id))
        # all models of a group as ONE module: the joint per-sample gradient is clipped
        # and noised once per step (one subsampled Gaussian mechanism on the aggregator's data)
        module, xs = training_module(peer.inputs("train"), models)
        clip_groups = [list(m.parameters()) for m in module.members] if per_model_clipping else None  # type: ignore[union-attr]
        result = run_dp_sgd(
            module,
            x=xs if len(xs) > 1 else xs[0],
            y=peer.y_train,
            loss_fn=loss_fn,
            batch_dim=batch_dim,
            sample_rate=mech.sample_rate,
            steps=mech.steps,
            noise_multiplier=mech.noise_multiplier,
            max_grad_norm=self._budgets[peer.peer_id].max_grad_norm,
            optim_cfg=self.cfg.dfml,
            lr=lr_at(round_index, self.cfg.federation.rounds, self.cfg.dfml),
            mode=self.cfg.privacy.grad_sample_mode,
            randomness=self._rng[peer.peer_id],
            clip_groups=clip_groups,
        )
        self._last_mode[peer.peer_id] = result.mode
        report_extra = {
            **self._extra(peer.peer_id),
            "noise_multiplier": mech.noise_multiplier,
            "mean_batch": result.mean_batch,
            **(extra or {}),
        }
        return PhaseReport(ran=True, steps=result.steps, compute_seconds=result.compute_seconds, extra=report_extra)

    def local_train(self, peer: PeerState, *, epochs: int, round_index: int) -> PhaseReport:
        if epochs <= 0:
            return PhaseReport(ran=False, reason="no local epochs configured")
        return self._phase(
            peer, peer.model, phase="local", epochs=epochs, round_index=round_index,
            loss_fn=F.cross_entropy, batch_dim=0,
        )

    def mutual_train(
        self,
        aggregator: PeerState,
        models: Sequence[nn.Module],
        *,
        alpha: float,
        temperature: float,
        epochs: int,
        class_prior: torch.Tensor | None,
        round_index: int,
    ) -> PhaseReport:
        if epochs <= 0:
            return PhaseReport(ran=False, reason="no mutual-learning epochs configured")
        if not models:
            return PhaseReport(ran=False, reason="no models to train")
        for i, m in enumerate(models):
            validate_model(m, name=f"mutual-learning model {i} at aggregator {aggregator.peer_id}")

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return mutual_learning_loss(
                list(out.unbind(0)), y, alpha=alpha, temperature=temperature, class_prior=class_prior
            )

        per_model = self.cfg.privacy.clipping == "per-model" and len(models) > 1
        return self._phase(
            aggregator, list(models), phase="mutual", epochs=epochs, round_index=round_index,
            loss_fn=loss_fn, batch_dim=1, extra={"models": float(len(models))},
            per_model_clipping=per_model,
        )

    def class_prior(self, peer: PeerState, *, round_index: int) -> torch.Tensor:
        k = peer.num_classes
        uniform = torch.full((k,), 1.0 / k)
        if self.cfg.privacy.class_prior == "uniform":
            return uniform
        cached = self._priors.get(peer.peer_id)
        if cached is not None:
            return cached.clone()
        sigma = self._plans[peer.peer_id].prior_noise_multiplier
        if sigma is None:  # the plan has no mutual phase for this peer, so no release was budgeted
            logger.warning("peer %d: no class-prior release was planned; using the uniform prior", peer.peer_id)
            return uniform
        mech = Mechanism(sigma, 1.0, 1)
        refused = self._admit(peer.peer_id, round_index=round_index, phase="class_prior", mechanism=mech)
        if refused is not None:
            logger.warning("peer %d: using the uniform (public) class prior instead", peer.peer_id)
            return uniform
        counts = torch.bincount(peer.y_train, minlength=k).to(torch.float64)
        noisy = counts + self._rng[peer.peer_id].gaussian(sigma, counts)
        prior = noisy.clamp_min(1.0)
        prior = (prior / prior.sum()).to(torch.float32)
        self._priors[peer.peer_id] = prior
        return prior.clone()

    def export_state(self, peer_id: int) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep: the released (DP) class prior, so a
        resumed peer never releases it again."""
        prior = self._priors.get(peer_id)
        return {} if prior is None else {"class_prior": prior.clone()}

    def restore_state(self, peer_id: int, state: Mapping[str, torch.Tensor]) -> None:
        if "class_prior" in state:
            self._priors[peer_id] = state["class_prior"].clone()

    def peer_status(self, peer_id: int) -> Mapping[str, object]:
        led = self._ledgers.get(peer_id)
        if led is None:
            return {}
        plan = self._plans[peer_id]
        status: dict[str, object] = {
            "epsilon_spent": float(led.spent_epsilon),
            "epsilon_target": led.target_epsilon,
            "delta": led.delta,
            "status": led.status,
            "noise_multiplier": plan.noise_multiplier,
            "mechanisms": len(led.entries),
            "steps": led.total_steps,
            "accountant": led.accountant,
        }
        if peer_id in self._last_mode:
            status["grad_sample_mode"] = self._last_mode[peer_id]
        return status


def build_trainer(
    cfg: RunConfig,
    peers: Sequence[PeerState],
    *,
    ledger_dir: Path | None,
    generator: torch.Generator | None,
    num_peers: int | None = None,
    run_id: str = "",
) -> Trainer:
    """``PlainTrainer`` when ``cfg.privacy.enabled`` is false, else a :class:`DPTrainer`
    (validated, planned and with ledgers under ``ledger_dir``) -- all before training.
    ``peers`` are the peers whose data the trainer reads (a node: only its own)."""
    if not cfg.privacy.enabled:
        return PlainTrainer(cfg.dfml, rounds=cfg.federation.rounds)
    return DPTrainer(cfg, peers, ledger_dir=ledger_dir, generator=generator, num_peers=num_peers, run_id=run_id)
