"""Reference (shadow) models trained by the auditor.

The auditor trains ``k`` models with the target's recipe (a model factory and a
training function it is given) on data it controls:

* **offline** -- each model sees a random subset of the auditor pool only
  (disjoint from every peer's data), so every audit sample is OUT for every
  reference model;
* **online**  -- the *challenge* samples (the audit samples, and the
  population samples z for RMIA) are split into halves: each challenge sample
  is IN for exactly half of the models. Models come in complementary pairs
  (model 2j sees one half, model 2j+1 the other), so any even prefix of the
  list is balanced too. Pool samples top the training set up to
  ``train_size`` when the IN half is smaller than that.

The training function has the signature ``train_fn(model, x, y, rng) -> model``
and the factory ``model_factory(rng) -> torch.nn.Module``; both receive a
generator spawned from the caller's, so runs are reproducible without any
global seeding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_dfml.errors import AuditError

__all__ = ["ModelFactory", "ReferenceModels", "TrainFn", "membership_design", "train_reference_models"]

_LOG = logging.getLogger(__name__)

ModelFactory = Callable[[np.random.Generator], torch.nn.Module]
TrainFn = Callable[[torch.nn.Module, Any, Any, np.random.Generator], torch.nn.Module]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReferenceModels:
    """Trained reference models and which samples each one saw.

    ``challenge_masks[j, i]``: model j trained on challenge sample i (online
    only; shape ``(k, 0)`` offline). ``pool_masks[j, i]``: model j trained on
    pool sample i. ``train_seconds[j]``: wall time of model j's training.
    """

    models: tuple[torch.nn.Module, ...]
    challenge_masks: np.ndarray
    pool_masks: np.ndarray
    train_seconds: tuple[float, ...]

    @property
    def k(self) -> int:
        return len(self.models)

    @property
    def online(self) -> bool:
        return self.challenge_masks.shape[1] > 0

    def subset(self, k: int) -> ReferenceModels:
        """The first ``k`` models (balanced online when k is even)."""
        if not 1 <= k <= self.k:
            raise AuditError(f"k must lie in [1, {self.k}]; got {k}")
        return ReferenceModels(
            self.models[:k], self.challenge_masks[:k], self.pool_masks[:k], self.train_seconds[:k]
        )


def membership_design(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (k, n) IN-mask: complementary pairs of random halves.

    Rows 2j and 2j+1 are complements, so with even k every sample is IN for
    exactly k/2 models. With odd k the last row is an independent random half.
    """
    if k < 1 or n < 0:
        raise AuditError(f"need k >= 1 and n >= 0; got k={k}, n={n}")
    mask = np.zeros((k, n), dtype=bool)
    for j in range(0, k, 2):
        half = np.zeros(n, dtype=bool)
        half[rng.permutation(n)[: n // 2 + (int(rng.integers(0, 2)) if n % 2 else 0)]] = True
        mask[j] = half
        if j + 1 < k:
            mask[j + 1] = ~half
    return mask


def _n(x: Any) -> int:
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, dtype=torch.long)]
    return np.asarray(x)[idx]


def _concat(parts: list[Any]) -> Any:
    if any(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p if isinstance(p, torch.Tensor) else torch.as_tensor(p) for p in parts])
    return np.concatenate([np.asarray(p) for p in parts])


def train_reference_models(
    *,
    model_factory: ModelFactory,
    train_fn: TrainFn,
    pool_x: Any,
    pool_y: Any,
    k: int,
    rng: np.random.Generator,
    challenge_x: Any | None = None,
    challenge_y: Any | None = None,
    train_size: int | None = None,
    progress: Progress | None = None,
) -> ReferenceModels:
    """Train ``k`` reference models; online when challenge samples are given.

    ``train_size`` is each model's training-set size (use the target's); by
    default half the pool offline, and the IN half of the challenge samples
    online. ``progress(done, total)`` is called after each model.
    """
    if k < 1:
        raise AuditError(f"the number of reference models must be >= 1; got {k}")
    n_pool = _n(pool_x)
    if _n(pool_y) != n_pool:
        raise AuditError(f"pool_x has {n_pool} samples but pool_y has {_n(pool_y)}")
    online = challenge_x is not None
    n_ch = 0
    if online:
        if challenge_y is None or _n(challenge_y) != _n(challenge_x):
            raise AuditError("challenge_x and challenge_y must be given together with one length")
        n_ch = _n(challenge_x)
        if n_ch < 2:
            raise AuditError("online reference models need at least two challenge samples")
    ch_masks = membership_design(k, n_ch, rng) if online else np.zeros((k, 0), dtype=bool)
    pool_masks = np.zeros((k, n_pool), dtype=bool)
    models: list[torch.nn.Module] = []
    seconds: list[float] = []
    for j in range(k):
        model_rng, data_rng, train_rng = rng.spawn(3)
        n_in = int(ch_masks[j].sum())
        if online:
            want_pool = 0 if train_size is None else max(int(train_size) - n_in, 0)
        else:
            want_pool = n_pool // 2 if train_size is None else int(train_size)
        if want_pool > n_pool:
            raise AuditError(
                f"reference models need {want_pool} pool samples each but the auditor pool has {n_pool}"
            )
        if want_pool == 0 and n_in == 0:
            raise AuditError("a reference model would get no training data; give a pool or train_size")
        pool_idx = np.sort(data_rng.choice(n_pool, size=want_pool, replace=False)) if want_pool else np.array([], int)
        pool_masks[j, pool_idx] = True
        xs: list[Any] = []
        ys: list[Any] = []
        if n_in:
            ch_idx = np.flatnonzero(ch_masks[j])
            xs.append(_take(challenge_x, ch_idx))
            ys.append(_take(challenge_y, ch_idx))
        if want_pool:
            xs.append(_take(pool_x, pool_idx))
            ys.append(_take(pool_y, pool_idx))
        x_train, y_train = _concat(xs), _concat(ys)
        t0 = time.perf_counter()
        model = model_factory(model_rng)
        model = train_fn(model, x_train, y_train, train_rng)
        if not isinstance(model, torch.nn.Module):
            raise AuditError("train_fn must return the trained torch.nn.Module")
        seconds.append(time.perf_counter() - t0)
        models.append(model)
        _LOG.debug("reference model %d/%d trained on %d samples in %.2fs", j + 1, k, _n(y_train), seconds[-1])
        if progress is not None:
            progress(j + 1, k)
    return ReferenceModels(tuple(models), ch_masks, pool_masks, tuple(seconds))
