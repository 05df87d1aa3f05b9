"""Splitting a training set among peers (IID, Dirichlet non-IID, label shards).

:func:`partition` works on indices only:

1. carve a stratified ``auditor_pool`` out of all samples (the auditor's own
   data: never given to a peer);
2. share the remainder among the peers with the chosen scheme, every sample
   used exactly once, every peer large enough for its splits;
3. split each peer's samples into ``train`` / ``local_test`` / ``holdout``
   (stratified within the peer; ``holdout`` is the audit holdout and is never
   trained on).

All randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from secure_dfml.errors import ConfigError, DataError

from ._sampling import class_sorted_order, stratified_subset

if TYPE_CHECKING:
    from secure_dfml.config import DataConfig

    from ._dataset import ArrayDataset

__all__ = ["FederatedSplit", "PeerSplit", "Scheme", "partition", "split_from_config"]

log = logging.getLogger(__name__)

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
#: Dirichlet proportions are re-drawn this many times before small peers are topped up.
DIRICHLET_REDRAWS = 20


@dataclass(frozen=True, eq=False)
class PeerSplit:
    """One peer's private data, as int64 indices into ``dataset.x_train``."""

    train: np.ndarray
    local_test: np.ndarray
    holdout: np.ndarray  # audit holdout: never trained on

    @property
    def size(self) -> int:
        return int(len(self.train) + len(self.local_test) + len(self.holdout))


@dataclass(frozen=True, eq=False)
class FederatedSplit:
    """Peers' splits plus the auditor's pool; all index sets are pairwise disjoint."""

    peers: tuple[PeerSplit, ...]
    auditor_pool: np.ndarray

    def __post_init__(self) -> None:
        parts = [self.auditor_pool]
        for p in self.peers:
            parts.extend((p.train, p.local_test, p.holdout))
        every = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if len(np.unique(every)) != len(every):
            raise DataError("FederatedSplit: index sets overlap; every sample must belong to one split only.")

    def class_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Training-sample counts per peer and class, shape ``(peers, classes)``."""
        labels = np.asarray(labels)
        rows = [np.bincount(labels[p.train], minlength=num_classes)[:num_classes] for p in self.peers]
        if not rows:
            return np.zeros((0, num_classes), dtype=np.int64)
        return np.stack(rows).astype(np.int64)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _split_sizes(m: int, f_local: float, f_holdout: float) -> tuple[int, int, int]:
    """(train, local_test, holdout) sizes for a peer with m samples.

    The held-out total is rounded once, so the train size never decreases as m
    grows; each non-empty fraction gets at least one sample.
    """
    total = _round(m * (f_local + f_holdout))
    n_lt = max(1, _round(m * f_local)) if f_local > 0 else 0
    n_ho = max(1, total - n_lt) if f_holdout > 0 else 0
    return m - n_lt - n_ho, n_lt, n_ho


def _min_peer_size(min_train: int, f_local: float, f_holdout: float) -> int:
    m = min_train
    while _split_sizes(m, f_local, f_holdout)[0] < min_train:
        m += 1
    return m


def _validate(
    labels: np.ndarray,
    *,
    num_peers: int,
    scheme: str,
    num_classes: int,
    dirichlet_alpha: float,
    shards_per_peer: int,
    local_test_fraction: float,
    holdout_fraction: float,
    auditor_pool: int,
    min_train_per_peer: int,
    rng: object,
) -> np.ndarray:
    def bad(field: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(f"{field} = {value!r} is invalid: expected {allowed}.")

    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}.")
    if scheme not in SCHEMES:
        raise bad("data.partition", scheme, "one of " + ", ".join(repr(s) for s in SCHEMES))
    if int(num_peers) != num_peers or num_peers < 1:
        raise bad("federation.peers", num_peers, "an integer >= 1")
    if num_classes < 1:
        raise bad("num_classes", num_classes, "an integer >= 1")
    if not dirichlet_alpha > 0:
        raise bad("data.dirichlet_alpha", dirichlet_alpha, "a number > 0")
    if shards_per_peer < 1:
        raise bad("data.shards_per_peer", shards_per_peer, "an integer >= 1")
    fractions = (("data.local_test_fraction", local_test_fraction), ("data.holdout_fraction", holdout_fraction))
    for field, value in fractions:
        if not 0.0 <= value < 1.0:
            raise bad(field, value, "a fraction in [0, 1)")
    if local_test_fraction + holdout_fraction >= 1.0:
        raise bad("data.holdout_fraction", holdout_fraction, "local_test_fraction + holdout_fraction < 1")
    if auditor_pool < 0:
        raise bad("data.auditor_pool", auditor_pool, "an integer >= 0")
    if min_train_per_peer < 1:
        raise bad("min_train_per_peer", min_train_per_peer, "an integer >= 1")
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DataError(f"labels must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(
            f"labels must lie in 0..{num_classes - 1} (num_classes = {num_classes}); "
            f"found {int(arr.min())}..{int(arr.max())}."
        )
    return arr


def _assign_iid(rest: np.ndarray, num_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.asarray(a) for a in np.array_split(rng.permutation(rest), num_peers)]


def _assign_dirichlet(
    rest: np.ndarray, labels: np.ndarray, num_peers: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    rest_labels = labels[rest]
    present = np.flatnonzero(np.bincount(rest_labels))  # only classes that occur
    by_class = [rest[rest_labels == c] for c in present]
    best: list[np.ndarray] | None = None
    best_min = -1
    for attempt in range(DIRICHLET_REDRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_peers)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_peers, alpha))
            if not np.all(np.isfinite(props)):  # pragma: no cover - extreme alpha
                props = np.full(num_peers, 1.0 / num_peers)
            cuts = np.floor(np.cumsum(props)[:-1] * len(idx) + 0.5).astype(np.int64)
            for peer, chunk in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
                buckets[peer].append(chunk)
        peers = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
        smallest = min(len(p) for p in peers)
        if smallest > best_min:
            best, best_min = peers, smallest
        if smallest >= min_size:
            log.debug("dirichlet partition: accepted draw %d (smallest peer %d)", attempt + 1, smallest)
            return peers
    assert best is not None
    log.debug("dirichlet partition: topping up small peers after %d draws (smallest %d)", DIRICHLET_REDRAWS, best_min)
    return best


def _assign_shards(
    rest: np.ndarray, labels: np.ndarray, num_peers: int, shards_per_peer: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n_shards = num_peers * shards_per_peer
    if len(rest) < n_shards:
        raise DataError(
            f"shards partition needs at least one sample per shard: {len(rest)} samples for {num_peers} peers x "
            f"{shards_per_peer} shards; reduce data.shards_per_peer, federation.peers or data.auditor_pool."
        )
    ordered = rest[class_sorted_order(labels[rest], rng)]
    shards = np.array_split(ordered, n_shards)
    owner = rng.permutation(n_shards)
    return [
        np.concatenate([shards[s] for s in owner[p * shards_per_peer : (p + 1) * shards_per_peer]])
        for p in range(num_peers)
    ]


def _top_up(peers: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest peers to peers below ``min_size``."""
    peers = list(peers)
    moved = 0
    while True:
        sizes = np.array([len(p) for p in peers])
        needy = int(np.argmin(sizes))
        if sizes[needy] >= min_size:
            break
        donor = int(np.argmax(sizes))
        k = int(min(min_size - sizes[needy], sizes[donor] - min_size))
        if k <= 0:  # pragma: no cover - excluded by the size check in partition()
            raise DataError("cannot give every peer enough samples; reduce federation.peers.")
        take = rng.choice(len(peers[donor]), size=k, replace=False)
        mask = np.ones(len(peers[donor]), dtype=bool)
        mask[take] = False
        peers[needy] = np.concatenate([peers[needy], peers[donor][take]])
        peers[donor] = peers[donor][mask]
        moved += k
    if moved:
        log.debug("partition: moved %d samples to peers below %d samples", moved, min_size)
    return peers


def _split_peer(
    idx: np.ndarray, labels: np.ndarray, f_local: float, f_holdout: float, rng: np.random.Generator
) -> PeerSplit:
    idx = np.asarray(idx, dtype=np.int64)
    _, n_lt, n_ho = _split_sizes(len(idx), f_local, f_holdout)
    lt_pos = stratified_subset(labels[idx], n_lt, rng)
    remaining = np.setdiff1d(np.arange(len(idx)), lt_pos, assume_unique=True)
    ho_pos = remaining[stratified_subset(labels[idx[remaining]], n_ho, rng)]
    train_pos = np.setdiff1d(remaining, ho_pos, assume_unique=True)
    return PeerSplit(
        train=np.sort(idx[train_pos]),
        local_test=np.sort(idx[lt_pos]),
        holdout=np.sort(idx[ho_pos]),
    )


def partition(
    labels: np.ndarray,
    *,
    num_peers: int,
    scheme: Scheme,
    num_classes: int,
    rng: np.random.Generator,
    dirichlet_alpha: float = 0.5,
    shards_per_peer: int = 2,
    local_test_fraction: float = 0.15,
    holdout_fraction: float = 0.15,
    auditor_pool: int = 0,
    min_train_per_peer: int = 8,
) -> FederatedSplit:
    """Split sample indices ``0..len(labels)-1`` among peers and the auditor.

    Every index ends up in exactly one of: the auditor pool, or one peer's
    ``train`` / ``local_test`` / ``holdout``.  Each peer gets at least
    ``min_train_per_peer`` training samples and, when the fraction is > 0, at
    least one local-test and one holdout sample.

    * ``iid``: shuffle and cut into equal parts.
    * ``dirichlet``: for each class present, proportions over peers drawn from
      Dir(``dirichlet_alpha``); draws are repeated, then the smallest peers
      topped up with random samples of the largest, until each peer is big enough.
    * ``shards``: sort by label, cut into ``num_peers * shards_per_peer`` shards,
      give each peer ``shards_per_peer`` random shards.

    Raises :class:`ConfigError` for invalid parameters and :class:`DataError`
    when there are too few samples for the requested peers and splits.
    """
    y = _validate(
        labels,
        num_peers=num_peers,
        scheme=scheme,
        num_classes=num_classes,
        dirichlet_alpha=dirichlet_alpha,
        shards_per_peer=shards_per_peer,
        local_test_fraction=local_test_fraction,
        holdout_fraction=holdout_fraction,
        auditor_pool=auditor_pool,
        min_train_per_peer=min_train_per_peer,
        rng=rng,
    )
    n = len(y)
    min_size = _min_peer_size(min_train_per_peer, local_test_fraction, holdout_fraction)
    needed = num_peers * min_size
    if auditor_pool + needed > n:
        raise DataError(
            f"too few samples: {n} training samples, minus an auditor pool of {auditor_pool}, leave "
            f"{max(n - auditor_pool, 0)} for {num_peers} peers, but each peer needs at least {min_size} "
            f"({min_train_per_peer} to train on, plus local test and holdout), i.e. {needed}. "
            "Reduce federation.peers or data.auditor_pool, lower the fractions, or use more data "
            "(raise/remove data.max_train_samples)."
        )
    pool = stratified_subset(y, auditor_pool, rng)
    mask = np.ones(n, dtype=bool)
    mask[pool] = False
    rest = np.flatnonzero(mask).astype(np.int64)

    if scheme == "iid":
        assigned = _assign_iid(rest, num_peers, rng)
    elif scheme == "dirichlet":
        assigned = _assign_dirichlet(rest, y, num_peers, dirichlet_alpha, min_size, rng)
    else:
        assigned = _assign_shards(rest, y, num_peers, shards_per_peer, rng)
    assigned = _top_up(assigned, min_size, rng)

    peers = tuple(_split_peer(idx, y, local_test_fraction, holdout_fraction, rng) for idx in assigned)
    split = FederatedSplit(peers=peers, auditor_pool=np.sort(pool).astype(np.int64))
    log.info(
        "partition %s: %d peers, train sizes %d..%d, auditor pool %d",
        scheme,
        num_peers,
        min(len(p.train) for p in peers),
        max(len(p.train) for p in peers),
        len(pool),
    )
    return split


def split_from_config(
    dataset: ArrayDataset, cfg: DataConfig, num_peers: int, rng: np.random.Generator
) -> FederatedSplit:
    """:func:`partition` of ``dataset.y_train`` with the settings of a ``[data]`` config section."""
    return partition(
        dataset.y_train,
        num_peers=num_peers,
        scheme=cfg.partition,
        num_classes=dataset.num_classes,
        rng=rng,
        dirichlet_alpha=cfg.dirichlet_alpha,
        shards_per_peer=cfg.shards_per_peer,
        local_test_fraction=cfg.local_test_fraction,
        holdout_fraction=cfg.holdout_fraction,
        auditor_pool=cfg.auditor_pool,
    )
