"""Fixed front ends and the feature cache.

A *fixed front end* is the part of a model that maps a sample to features with
no parameters, no persistent state and no dependence on data or seed (the
scattering transform of the ``scatter-*`` models).  A model with one exposes it
as ``fixed_front`` (a :class:`FixedFrontEnd`) and runs the rest of itself on
precomputed features with ``forward_from_front(features)``, so that
``model(x) == model.forward_from_front(model.fixed_front(x))``.

A :class:`FeatureCache` holds one tensor of samples (a peer's training set, its
local test set, the federation's global test set) and computes each front
end's features of it once -- batched, without gradients, in the same float32
operations as the model's own forward pass -- and keeps them.  Front ends with
equal :meth:`FixedFrontEnd.cache_key` compute the same function, so every
``scatter-*`` model of one input shape reads the same cached features:
features of a sample are computed once, not once per model, round or
evaluation.  Models without a fixed front get the raw samples.

Privacy: a fixed front end has no parameters, so DP-SGD's per-sample gradients,
their clipping and the noise are the same whether the front runs inside the
step or its output is read from the cache (tested to 1e-6); a cached feature is
a fixed function of one record, so adding or removing a record changes exactly
its own feature.  The mechanism (noise multiplier, sample rate, steps) and
hence the privacy accounting are unchanged.  Nothing here is sent: model state
dicts, schemas and checkpoints are the same with and without the cache.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from secure_dfml.errors import ModelError

#: Samples per batch when features are computed.
FEATURE_BATCH = 512


class FixedFrontEnd(nn.Module):
    """Marker base class of parameter-free, stateless, data-independent front ends.

    Subclasses implement ``forward`` and :meth:`cache_key`: two front ends with
    equal keys compute the same function of a sample (the key names every
    constant that shapes the output: filters, pooling, normalisation)."""

    def cache_key(self) -> Hashable:
        raise NotImplementedError


def fixed_front(model: nn.Module) -> FixedFrontEnd | None:
    """``model``'s fixed front end, or None when it has none (it then takes raw inputs).

    Raises :class:`ModelError` if a declared front end has parameters or
    persistent state: caching its output would then change training (its
    parameters would never be trained) or what is sent."""
    front = getattr(model, "fixed_front", None)
    if not isinstance(front, FixedFrontEnd) or not callable(getattr(model, "forward_from_front", None)):
        return None
    if any(True for _ in front.parameters()) or front.state_dict():
        raise ModelError(
            f"{type(model).__name__}.fixed_front ({type(front).__name__}) has parameters or persistent state; "
            "a fixed front end must have neither (its features are computed once and cached)"
        )
    return front


class OnFeatures(nn.Module):
    """``model`` past its fixed front end: ``forward(features) = model.forward_from_front(features)``.

    A training view, never stored or sent: its parameters are ``model``'s own
    (trained in place), its state dict is ``model``'s under the prefix ``model.``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_front(features)  # type: ignore[operator]


@torch.no_grad()
def compute_features(front: FixedFrontEnd, x: torch.Tensor, *, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """``front(x)`` in batches of ``batch_size``, without gradients (eval mode)."""
    was_training = front.training
    front.eval()
    try:
        if len(x) == 0:
            return front(x[:1].new_zeros((1, *x.shape[1:])))[:0].clone()
        return torch.cat([front(x[s : s + batch_size]) for s in range(0, len(x), batch_size)])
    finally:
        front.train(was_training)


class FeatureCache:
    """The samples ``x`` and, per fixed front end (by :meth:`FixedFrontEnd.cache_key`),
    their features, each computed on first use and kept.

    With ``enabled=False`` nothing is cached: every model gets ``x`` and runs its
    front end itself (the reference the cache is measured and tested against).
    Thread-safe (role programs of a node, and nodes of one process, share caches)."""

    def __init__(self, x: torch.Tensor, *, enabled: bool = True, batch_size: int = FEATURE_BATCH) -> None:
        self.x = x
        self.enabled = bool(enabled)
        self.batch_size = int(batch_size)
        self._features: dict[Hashable, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def cached_keys(self) -> tuple[Hashable, ...]:
        return tuple(self._features)

    def features(self, front: FixedFrontEnd) -> torch.Tensor:
        """``front``'s features of every sample of ``x`` (computed once per key)."""
        key = front.cache_key()
        with self._lock:
            feats = self._features.get(key)
            if feats is None:
                feats = self._features[key] = compute_features(front, self.x, batch_size=self.batch_size)
        return feats

    def inputs(self, model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
        """What to run and what to feed it: ``(OnFeatures(model), cached features)``
        for a model with a fixed front (cache enabled), else ``(model, x)``."""
        front = fixed_front(model) if self.enabled else None
        if front is None:
            return model, self.x
        return OnFeatures(model), self.features(front)

    def joint_inputs(self, models: Sequence[nn.Module]) -> tuple[list[nn.Module], list[int], list[torch.Tensor]]:
        """For models trained jointly on one batch (mutual learning): each model's
        module to run, the index of its input in the returned tensors, and the
        distinct input tensors (raw samples, and the features of each front end
        in use) -- every model gets what it needs, each input once."""
        members: list[nn.Module] = []
        routes: list[int] = []
        tensors: list[torch.Tensor] = []
        slot: dict[int, int] = {}
        for m in models:
            net, x = self.inputs(m)
            if id(x) not in slot:
                slot[id(x)] = len(tensors)
                tensors.append(x)
            members.append(net)
            routes.append(slot[id(x)])
        return members, routes, tensors


class RoutedJoint(nn.Module):
    """Models trained jointly on one batch that need different inputs: member ``i``
    reads input ``routes[i]``; returns the stacked logits (as ``JointModel``).

    ``members`` are the modules whose parameters are trained (per-model clip
    groups are formed from them)."""

    def __init__(self, members: Sequence[nn.Module], routes: Sequence[int]) -> None:
        super().__init__()
        if len(members) != len(routes):
            raise ValueError("one route per member")
        self.members = nn.ModuleList(members)
        self.routes = tuple(int(r) for r in routes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(inputs[r]) for m, r in zip(self.members, self.routes, strict=True)], dim=0)


_BANKS: dict[Hashable, torch.Tensor] = {}
_BANKS_LOCK = threading.Lock()


def shared_buffer(key: Hashable, make: Any) -> torch.Tensor:
    """One tensor per ``key`` for the whole process (``make()`` on first use):
    fixed filter banks shared by every model instance instead of one copy each.
    The tensor must never be modified in place."""
    with _BANKS_LOCK:
        t = _BANKS.get(key)
        if t is None:
            t = _BANKS[key] = make()
        return t
