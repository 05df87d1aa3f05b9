"""Coordinator-free selection: every peer derives the same participants,
groups and aggregators from hash(federation id, seed, round)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Group:
    aggregator: int
    senders: tuple[int, ...]

    @property
    def members(self) -> tuple[int, ...]:
        return (self.aggregator, *self.senders)


def round_generator(federation_id: str, seed: int, round_index: int, purpose: str = "selection") -> np.random.Generator:
    """A generator every peer can reconstruct from public values alone."""
    digest = hashlib.sha256(f"{federation_id}\x00{seed}\x00{round_index}\x00{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


# Selections are pure functions of public values: computed once per process and
# round, however many simulated nodes ask (each real peer computes its own).
@functools.lru_cache(maxsize=4096)
def select_groups(
    *, federation_id: str, seed: int, round_index: int, num_peers: int, participants: int, groups: int
) -> tuple[Group, ...]:
    """Participants P_t, split into ``groups`` disjoint groups, each with an aggregator a_t."""
    rng = round_generator(federation_id, seed, round_index)
    chosen = rng.permutation(num_peers)[:participants]
    out = []
    for g in range(groups):
        members = [int(p) for p in chosen[g::groups]]
        out.append(Group(aggregator=members[0], senders=tuple(members[1:])))
    return tuple(out)


def select_key_holder(
    *, federation_id: str, seed: int, round_index: int, num_peers: int, exclude: Collection[int]
) -> int | None:
    """A peer outside ``exclude`` chosen from public values, or None if none is left."""
    candidates = [p for p in range(num_peers) if p not in set(exclude)]
    if not candidates:
        return None
    rng = round_generator(federation_id, seed, round_index, purpose="key-holder")
    return int(candidates[int(rng.integers(len(candidates)))])


@functools.lru_cache(maxsize=4096)
def evaluation_sample(*, federation_id: str, seed: int, round_index: int, num_peers: int, size: int) -> frozenset[int]:
    """The peers evaluated on the global test set in round ``round_index`` when only a
    sample is (``size`` of them; every peer when ``size`` is 0 or covers them all),
    from public values alone, so every peer knows whether it is in it."""
    if size <= 0 or size >= num_peers:
        return frozenset(range(num_peers))
    rng = round_generator(federation_id, seed, round_index, purpose="evaluation")
    return frozenset(int(p) for p in rng.choice(num_peers, size=size, replace=False))
