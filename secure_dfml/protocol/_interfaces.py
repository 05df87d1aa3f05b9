"""The plug points of the round engine.

The engine owns the round loop.  Everything that changes *how* a step is done
plugs in through one of these interfaces instead of forking the loop:

* :class:`Trainer` -- every step that reads a peer's private data (plain SGD,
  or DP-SGD with a per-peer ledger and hard budget gate).
* :class:`Channel` -- how a serialized model is wrapped for the wire
  (plaintext for research, NaCl envelopes by default).
* CKKS roles (:class:`secure_dfml.crypto.CKKSRoles`) -- how same-architecture
  models are averaged when no single peer may see an individual model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from secure_dfml.models import FeatureCache

T = TypeVar("T")


@dataclass
class PeerState:
    """A peer as the engine sees it.  Data tensors never leave the peer.

    ``inputs("train")`` / ``inputs("local_test")`` are the peer's fixed-feature
    caches of ``x_train`` / ``x_local_test`` (:class:`~secure_dfml.models.FeatureCache`):
    the features of the ``scatter-*`` front end are computed once per peer and
    reused by every model trained or evaluated on its data
    (``cache_features=False``: every model runs its front end itself)."""

    peer_id: int
    arch: str
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_local_test: torch.Tensor
    y_local_test: torch.Tensor
    num_classes: int
    generator: torch.Generator
    peak_state: dict[str, torch.Tensor] | None = None
    peak_round: int | None = None
    peak_metrics: tuple[float, float] | None = None  # (global, local) accuracy of the peak model
    cache_features: bool = True
    _caches: dict[str, FeatureCache] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    def inputs(self, which: Literal["train", "local_test"]) -> FeatureCache:
        """The feature cache of ``x_train`` or ``x_local_test`` (made on first use,
        and again if the tensor was replaced)."""
        if which not in ("train", "local_test"):
            raise ValueError(f"which = {which!r}: expected 'train' or 'local_test'")
        x = self.x_train if which == "train" else self.x_local_test
        cache = self._caches.get(which)
        if cache is None or cache.x is not x or cache.enabled != self.cache_features:
            cache = self._caches[which] = FeatureCache(x, enabled=self.cache_features)
        return cache


@dataclass(frozen=True)
class PhaseReport:
    """What one training phase did; ``ran=False`` means it was skipped (e.g.
    the privacy budget gate refused it) and ``reason`` says why."""

    ran: bool
    steps: int = 0
    compute_seconds: float = 0.0
    reason: str | None = None
    extra: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Every step that touches private data goes through a Trainer."""

    def local_train(self, peer: PeerState, *, epochs: int, round_index: int) -> PhaseReport: ...

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
        """Train ``models`` jointly on the aggregator's data with the DFML loss.
        ``class_prior`` None means plain cross-entropy (no WSM re-weighting)."""
        ...

    def class_prior(self, peer: PeerState, *, round_index: int) -> torch.Tensor:
        """The class proportions beta used by WSM on ``peer``'s data."""
        ...

    def peer_status(self, peer_id: int) -> Mapping[str, object]:
        """Per-peer figures for metrics (e.g. spent epsilon); empty if none."""
        ...


@runtime_checkable
class Channel(Protocol):
    """Wraps payload bytes for the wire; ``open`` rejects anything not sealed
    by ``sender`` for ``recipient`` in this federation, round and kind."""

    name: str
    secure: bool

    def seal(self, payload: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes: ...

    def open(self, envelope: bytes, *, sender: int, recipient: int, round_index: int, kind: str) -> bytes: ...

    def open_with(
        self,
        envelope: bytes,
        accept: Callable[[bytes], T] | None,
        *,
        sender: int,
        recipient: int,
        round_index: int,
        kind: str,
    ) -> T:
        """``open`` then ``accept(payload)`` (e.g. the codec's schema check); the
        message counts as received (replay cache) only if both succeed."""
        ...
