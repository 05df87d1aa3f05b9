"""Per-sample signals of a model on audit samples, computed once.

A :class:`Signals` object holds the logits of one model on one set of samples
and derives everything the attacks need from them:

* ``true_prob``  -- p = softmax(z)_y, the probability of the true class;
* ``phi``        -- the logit-scaled confidence log(p) - log(1 - p), computed
  stably as ``z_y - logsumexp_{k != y} z_k`` (never through ``p``, which
  saturates at 1.0 in float for confident models);
* ``loss``       -- cross-entropy ``-log p``.

Binary models that output a single logit (shape ``(n,)`` or ``(n, 1)``) are
treated as the two-class model with logits ``[0, z]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_dfml.errors import AuditError

__all__ = ["Signals", "compute_signals", "stack_signals", "stable_phi", "true_class_log_prob"]

_LOG = logging.getLogger(__name__)


def _as_2d_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        raise AuditError(f"logits must have shape (n,) or (n, classes); got {z.shape}")
    if z.shape[1] == 1:  # single-logit binary model: p(class 1) = sigmoid(z)
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    return z


def _check_labels(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise AuditError(f"labels must have shape ({z.shape[0]},); got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise AuditError("labels must be integer class indices")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise AuditError(f"labels must lie in [0, {z.shape[1] - 1}] for {z.shape[1]}-class logits")
    return y.astype(np.int64)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def true_class_log_prob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p(y | x) = z_y - logsumexp(z), computed stably."""
    z = _as_2d_logits(logits)
    y = _check_labels(z, labels)
    return z[np.arange(z.shape[0]), y] - _logsumexp(z, axis=1)


def stable_phi(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p - log(1 - p) = z_y - logsumexp_{k != y}(z_k), without forming p.

    Finite for any finite logits, even when p rounds to 1.0 in float64.
    """
    z = _as_2d_logits(logits)
    y = _check_labels(z, labels)
    rows = np.arange(z.shape[0])
    zy = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return zy - _logsumexp(others, axis=1)


@dataclass(frozen=True)
class Signals:
    """Logits of one model on ``n`` samples, plus the labels (read-only arrays)."""

    logits: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        z = _as_2d_logits(self.logits)
        y = _check_labels(z, self.labels)
        if not np.all(np.isfinite(z)):
            raise AuditError("logits contain non-finite values")
        z.setflags(write=False)
        y.setflags(write=False)
        object.__setattr__(self, "logits", z)
        object.__setattr__(self, "labels", y)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def log_prob(self) -> np.ndarray:
        return true_class_log_prob(self.logits, self.labels)

    @property
    def true_prob(self) -> np.ndarray:
        return np.exp(self.log_prob)

    @property
    def probs(self) -> np.ndarray:
        z = self.logits
        return np.exp(z - _logsumexp(z, axis=1)[:, None])

    @property
    def phi(self) -> np.ndarray:
        return stable_phi(self.logits, self.labels)

    @property
    def loss(self) -> np.ndarray:
        return -self.log_prob

    @property
    def correct(self) -> np.ndarray:
        return np.argmax(self.logits, axis=1) == self.labels


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def compute_signals(
    model: torch.nn.Module,
    x: Any,
    y: Any,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> Signals:
    """Run ``model`` once over ``x`` (eval mode, no grad) and keep its logits.

    ``x`` and ``y`` may be numpy arrays or tensors. The model's train/eval mode
    is restored afterwards.
    """
    if batch_size < 1:
        raise AuditError(f"batch_size must be >= 1; got {batch_size}")
    xt = _to_tensor(x)
    yt = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)
    if xt.shape[0] != yt.shape[0]:
        raise AuditError(f"x has {xt.shape[0]} samples but y has {yt.shape[0]}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    was_training = model.training
    model.eval()
    outs: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in range(0, xt.shape[0], batch_size):
                batch = xt[start : start + batch_size].to(device)
                out = model(batch)
                outs.append(out.detach().to("cpu", torch.float64).numpy())
    finally:
        model.train(was_training)
    logits = np.concatenate(outs, axis=0) if outs else np.zeros((0, 1))
    return Signals(logits=logits, labels=yt)


def stack_signals(signals: Sequence[Signals], kind: str) -> np.ndarray:
    """Stack one derived signal (``"phi"``, ``"true_prob"``, ``"loss"``,
    ``"log_prob"``) of several models into an array of shape ``(k, n)``."""
    if kind not in {"phi", "true_prob", "loss", "log_prob"}:
        raise AuditError(f"unknown signal kind {kind!r}; allowed: phi, true_prob, loss, log_prob")
    if not signals:
        return np.zeros((0, 0))
    return np.stack([getattr(s, kind) for s in signals], axis=0)
