"""Non-private training: the reference Trainer (research mode, labelled non-private).

Models with a fixed front end (the ``scatter-*`` models) train on the features
cached in the peer's :class:`~secure_dfml.models.FeatureCache` (computed once per
peer), the others on raw samples; mutual learning feeds each model of the group
what it needs (:func:`training_module`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from secure_dfml.config import DFMLConfig
from secure_dfml.models import FeatureCache, RoutedJoint
from secure_dfml.protocol._interfaces import PeerState, PhaseReport
from secure_dfml.protocol.losses import JointModel, mutual_learning_loss
from secure_dfml.protocol.schedule import lr_at


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one epoch in a random order drawn from ``generator``."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def make_optimizer(
    params: Sequence[nn.Parameter] | Iterator[nn.Parameter], cfg: DFMLConfig, *, lr: float | None = None
) -> torch.optim.Optimizer:
    """SGD with ``cfg``'s momentum and weight decay at ``lr`` (default ``cfg.lr``)."""
    return torch.optim.SGD(
        list(params), lr=cfg.lr if lr is None else lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def empirical_class_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    return counts / counts.sum().clamp_min(1)


def training_module(
    cache: FeatureCache, models: Sequence[nn.Module] | nn.Module
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The module to train and its inputs (one tensor each, indexed by sample).

    One model: itself on raw samples, or :class:`~secure_dfml.models.OnFeatures`
    on its cached features.  A sequence: all of them as one module returning the
    stacked logits (``JointModel`` when they share one input, else
    :class:`~secure_dfml.models.RoutedJoint` with one input per kind).  The
    trained parameters are the models' own in every case."""
    if isinstance(models, nn.Module):
        net, x = cache.inputs(models)
        return net, (x,)
    members, routes, tensors = cache.joint_inputs(models)
    if len(tensors) <= 1:
        return JointModel(members), (tensors[0] if tensors else cache.x,)
    return RoutedJoint(members, routes), tuple(tensors)


class PlainTrainer:
    """SGD without differential privacy.  Every result it produces is non-private."""

    private = False

    def __init__(self, cfg: DFMLConfig, *, rounds: int = 1, use_wsm: bool = True) -> None:
        self.cfg = cfg
        self.rounds = rounds
        self.use_wsm = use_wsm

    def _sgd(
        self,
        models: Sequence[nn.Module] | nn.Module,
        peer: PeerState,
        epochs: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        round_index: int,
    ) -> PhaseReport:
        """``epochs`` of shuffled mini-batch SGD of ``models`` (one, or a group
        trained jointly) on ``peer``'s training data.  The optimizer lives for
        this phase only."""
        module, xs = training_module(peer.inputs("train"), models)
        module.train()
        opt = make_optimizer(module.parameters(), self.cfg, lr=lr_at(round_index, self.rounds, self.cfg))
        steps, compute = 0, 0.0
        for _ in range(epochs):
            for idx in shuffled_batches(peer.num_train, self.cfg.batch_size, peer.generator):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(module(*(x[idx] for x in xs)), peer.y_train[idx]).backward()
                opt.step()
                compute += time.perf_counter() - t0
                steps += 1
        return PhaseReport(ran=True, steps=steps, compute_seconds=compute)

    def local_train(self, peer: PeerState, *, epochs: int, round_index: int) -> PhaseReport:
        if epochs <= 0:
            return PhaseReport(ran=False, reason="no local epochs configured")
        return self._sgd(peer.model, peer, epochs, F.cross_entropy, round_index)

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

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return mutual_learning_loss(
                list(logits.unbind(0)), y, alpha=alpha, temperature=temperature, class_prior=class_prior
            )

        return self._sgd(list(models), aggregator, epochs, loss_fn, round_index)

    def class_prior(self, peer: PeerState, *, round_index: int) -> torch.Tensor:
        if not self.use_wsm:
            return torch.full((peer.num_classes,), 1.0 / peer.num_classes)
        return empirical_class_prior(peer.y_train, peer.num_classes)

    def export_state(self, peer_id: int) -> dict[str, torch.Tensor]:
        return {}

    def restore_state(self, peer_id: int, state: Mapping[str, torch.Tensor]) -> None:
        pass

    def peer_status(self, peer_id: int) -> Mapping[str, object]:
        return {}
