"""Cyclic alpha schedule and peak-round detection (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Callable

from secure_dfml.config import DFMLConfig


def _phase(t: int, period: int) -> float:
    """Position within the cycle, 0 at its first round and 1 at its last."""
    return 1.0 if period == 1 else (t % period) / (period - 1)


_SHAPES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2,
    "linear": lambda p: p,
    "constant": lambda p: 1.0,
}


def alpha_at(t: int, cfg: DFMLConfig) -> float:
    """alpha_t: rises from alpha_min to alpha_max over each period of rounds, then restarts."""
    return cfg.alpha_min + (cfg.alpha_max - cfg.alpha_min) * _SHAPES[cfg.schedule](_phase(t, cfg.period))


def is_peak(t: int, cfg: DFMLConfig) -> bool:
    """Peak rounds are the rounds where alpha_t reaches alpha_max (the last round of each cycle)."""
    return t % cfg.period == cfg.period - 1


_LR_SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
}


def lr_at(t: int, rounds: int, cfg: DFMLConfig) -> float:
    """Learning rate of round ``t`` of ``rounds``: ``lr`` throughout ("constant"), or
    decayed from ``lr`` at the first round to ``lr_floor * lr`` at the last ("cosine").

    Decay matters most under DP: clipped per-sample gradients do not shrink as
    the loss falls, so a constant step keeps the models swinging late in a run."""
    p = 0.0 if rounds <= 1 else min(max(t, 0), rounds - 1) / (rounds - 1)
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * _LR_SHAPES[cfg.lr_schedule](p))
