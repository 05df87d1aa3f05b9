"""Stratified sampling helpers shared by the loaders and the partitioner.

Every function takes an explicit :class:`numpy.random.Generator`; nothing here
touches global random state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_sorted_order", "stratified_subset", "subsample_positions"]


def class_sorted_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions ``0..n-1`` ordered by label, in random order within each class."""
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


def stratified_subset(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``k`` elements chosen with every class keeping its share.

    Systematic sampling over the class-sorted order: each class receives
    ``k * n_c / n`` elements rounded up or down (never off by more than one),
    and which elements are taken within a class is random.
    """
    n = int(len(labels))
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    order = class_sorted_order(labels, rng)
    start = int(rng.integers(n))
    # Exact integer arithmetic: consecutive positions differ by >= n // k >= 1,
    # and the last one is at most (k*n - 1) // k = n - 1.
    pos = (np.arange(k, dtype=np.int64) * n + start) // k
    return np.sort(order[pos]).astype(np.int64, copy=False)


def subsample_positions(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Positions of a stratified subsample of at most ``limit`` elements, or None for "all"."""
    if limit is None or limit >= len(labels):
        return None
    return stratified_subset(labels, limit, rng)
