"""Build a federation from a config, run it (the simulation of every peer node), write the run directory
(its layout, writers and readers: :mod:`secure_dfml.rundir`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml._fsutil import current_generation, exclusive, fresh_dir, stamp, swap_dir_atomically, swap_into_place
from secure_dfml.certify import write_manifest
from secure_dfml.config import DataConfig, RunConfig, load_config
from secure_dfml.crypto import build_channel, build_ckks_roles, schema_of
from secure_dfml.data import ArrayDataset, FederatedSplit, load_dataset, split_from_config
from secure_dfml.errors import ConfigError, RunDirectoryError
from secure_dfml.models import FeatureCache, build_model, resolve_architectures
from secure_dfml.privacy import ADJACENCY, DPTrainer, atomic_write_bytes, build_trainer, ledger_path
from secure_dfml.protocol._interfaces import PeerState
from secure_dfml.protocol._train import PlainTrainer
from secure_dfml.protocol.node import PeerNode, PublicDirectory, merge_round, run_round_simulated
from secure_dfml.protocol.strategies import Strategy, build_strategy
from secure_dfml.report.plots import plot_accuracy
from secure_dfml.rundir import (
    CHECKPOINTS,
    RUN_META,
    append_metrics,
    capture_dir,
    config_file,
    latest_views,
    ledgers_dir,
    lock_file,
    models_dir,
    open_partial,
    partial_dir,
    plot_file,
    read_metrics,
    save_models,
    save_views,
    views_dir,
    write_config,
    write_metrics,
    write_summary,
)
from secure_dfml.transport import CaptureTap, Endpoint, InMemoryTransport

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
# (peer id, x_train, y_train) -> (x_train, y_train): e.g. the canary audit inserts canaries.
PeerDataHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Federation:
    """Everything a simulated run needs, built and validated before any training:
    one :class:`PeerNode` per peer (each holding only its own state, trainer,
    channel and endpoint) over one in-memory transport."""

    cfg: RunConfig
    nodes: tuple[PeerNode, ...]
    directory: PublicDirectory
    strategy: Strategy
    hub: InMemoryTransport
    labels: dict[str, Any]
    dataset: ArrayDataset | None  # None when built without keeping the training records (a run)
    split: FederatedSplit

    @property
    def peers(self) -> list[PeerState]:
        """The peers' states (not the virtual server's)."""
        return [n.state for n in self.nodes if n.peer_id != self.directory.server_id]

    @property
    def rejected_messages(self) -> int:
        return sum(n.rejected_messages for n in self.nodes)

    def round_record(self, t: int) -> dict[str, Any]:
        """Run round ``t`` on every node (discrete-event simulation) and merge the
        nodes' reports into one metrics record."""
        endpoints = {n.peer_id: self.hub.endpoint(n.peer_id) for n in self.nodes}
        reports, seconds, eval_seconds = run_round_simulated(self.nodes, t, endpoints)
        record = merge_round(
            reports,
            self.strategy.select(self.directory.num_peers, t),
            seconds=seconds,
            server_id=self.directory.server_id,
        )
        record["eval_seconds"] = eval_seconds
        return record

    def rounds(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """Run rounds ``start..`` to the last, yielding each round's metrics record."""
        for t in range(start, self.cfg.federation.rounds):
            yield self.round_record(t)


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1, dtype=np.uint64)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def init_seed(federation_id: str, seed: int, arch: str) -> int:
    """The seed of architecture ``arch``'s initial weights in a federation: derived
    from public values only, so every peer of one architecture starts from the same
    weights (their averages are averages of related models from round 1) with no
    coordinator and nothing private in it."""
    digest = hashlib.sha256(f"secure-dfml init|{federation_id}|{int(seed)}|{arch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def load_federation_data(cfg: RunConfig) -> tuple[ArrayDataset, FederatedSplit]:
    """The data set and per-peer split a run with ``cfg`` uses (deterministic in the seed)."""
    data_seed, split_seed = _seeds(cfg.federation.seed, 2 + cfg.federation.peers)[:2]
    dataset = load_dataset(cfg.data, rng=np.random.default_rng(data_seed))
    split = split_from_config(dataset, cfg.data, cfg.federation.peers, np.random.default_rng(split_seed))
    return dataset, split


def peer_train_sizes(cfg: RunConfig) -> list[int]:
    """Training-set size of each peer, from the same data split a run uses."""
    _dataset, split = load_federation_data(cfg)
    return [int(len(p.train)) for p in split.peers]


@dataclass(frozen=True)
class FederationPlan:
    """The public facts of a federation every peer derives from the config and
    the (public) partition: architectures, declared sizes, the strategy, the
    public test set, and how to build a model of any architecture.

    ``test_inputs`` is the feature cache of ``x_test``: fixed features of the
    global test set are computed once per federation (per process) and shared
    by every peer node built from this plan (``federation.feature_cache``)."""

    cfg: RunConfig
    dataset: ArrayDataset | None  # None once a peer kept only its own shard
    split: FederatedSplit | None
    dataset_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    kind: str
    archs: tuple[str, ...]
    strategy: Strategy
    directory: PublicDirectory
    peer_seeds: tuple[int, ...]
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_inputs: FeatureCache | None = None

    def model(self, arch: str, generator: torch.Generator) -> torch.nn.Module:
        return build_model(
            arch, input_shape=self.input_shape, num_classes=self.num_classes, kind=self.kind, generator=generator
        )

    def initial_model(self, arch: str) -> torch.nn.Module:
        """The federation's initial model of ``arch`` (:func:`init_seed`)."""
        f = self.cfg.federation
        return self.model(arch, torch.Generator().manual_seed(init_seed(f.id, f.seed, arch)))

    def _own_records(self, peer_id: int, path: str, seed: int) -> tuple[np.ndarray, ...]:
        """Peer ``peer_id``'s records from its own ``path`` (train, labels, local test,
        labels), checked against the federation's shapes and its declared size."""
        d = self.cfg.data
        own = load_dataset(
            DataConfig(name=f"peer-{peer_id}-own-data", path=path, format=d.format, label_column=d.label_column,
                       csv_delimiter=d.csv_delimiter),
            rng=np.random.default_rng(seed),
        )
        if tuple(own.input_shape) != self.input_shape or own.y_train.max(initial=0) >= self.num_classes:
            raise ConfigError(
                f"peer {peer_id}'s data at {path} has inputs {tuple(own.input_shape)} and labels up to "
                f"{int(own.y_train.max(initial=0))}; the federation's data ({self.dataset_name}) has inputs "
                f"{self.input_shape} and {self.num_classes} classes"
            )
        x = np.concatenate([own.x_train, own.x_test])
        y = np.concatenate([own.y_train, own.y_test])
        train, test, _holdout = _split_own(len(y), d, seed)
        declared = self.directory.num_train[peer_id]
        if len(train) != declared:
            raise ConfigError(
                f"peer {peer_id} has {len(train)} training records in {path} (of {len(y)}, after the local-test "
                f"and holdout fractions), but data.declared_train says {declared}; declare {len(train)}"
            )
        return x[train], y[train], x[test], y[test]

    def own_shard_only(self) -> FederationPlan:
        """This plan without the federation's training records (a peer keeps only
        its own shard, built with :meth:`peer_state` before this)."""
        return dataclasses.replace(self, dataset=None, split=None)

    def model_factory(self) -> Callable[[str], torch.nn.Module]:
        """Fresh models to load received weights into (their initial values are overwritten)."""
        gen = torch.Generator().manual_seed(0)
        return lambda arch: self.model(arch, gen)

    def peer_state(self, peer_id: int, peer_data_hook: PeerDataHook | None = None) -> PeerState:
        """Peer ``peer_id``'s own state: its shard of the data, its model and generator."""
        f = self.cfg.federation
        if self.dataset is None or self.split is None:
            raise ConfigError("this plan kept no training records (own_shard_only); plan the federation again")
        if peer_id == self.directory.server_id:  # the virtual server of fedavg-central: no data
            empty_x = torch.empty((0, *self.input_shape))
            empty_y = torch.empty((0,), dtype=torch.int64)
            return PeerState(
                peer_id=peer_id, arch=self.archs[0], model=self.initial_model(self.archs[0]),
                x_train=empty_x, y_train=empty_y, x_local_test=empty_x, y_local_test=empty_y,
                num_classes=self.num_classes, generator=torch.Generator().manual_seed(self.peer_seeds[0]),
                cache_features=f.feature_cache,
            )
        if not 0 <= peer_id < f.peers:
            raise ConfigError(f"peer id {peer_id} is not in the federation (ids 0..{f.peers - 1})")
        seed = self.peer_seeds[peer_id]
        own_path = self.cfg.data.peer_paths[peer_id] if self.cfg.data.peer_paths else ""
        if own_path:
            x_np, y_np, xt_np, yt_np = self._own_records(peer_id, own_path, seed)
        else:
            ps = self.split.peers[peer_id]
            train_idx = np.asarray(ps.train, dtype=np.int64)
            test_idx = np.asarray(ps.local_test, dtype=np.int64)
            if len(train_idx) != self.directory.num_train[peer_id]:
                raise ConfigError(
                    f"peer {peer_id}'s shard of {self.dataset_name} has {len(train_idx)} training records, but "
                    f"data.declared_train says {self.directory.num_train[peer_id]}; declare {len(train_idx)}"
                )
            x_np, y_np = self.dataset.x_train[train_idx], self.dataset.y_train[train_idx]
            xt_np, yt_np = self.dataset.x_train[test_idx], self.dataset.y_train[test_idx]
        x_train = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
        y_train = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.int64))
        if peer_data_hook is not None:
            x_train, y_train = peer_data_hook(peer_id, x_train, y_train)
        return PeerState(
            peer_id=peer_id,
            arch=self.archs[peer_id],
            model=self.initial_model(self.archs[peer_id]),
            x_train=x_train,
            y_train=y_train,
            x_local_test=torch.from_numpy(np.ascontiguousarray(xt_np, dtype=np.float32)),
            y_local_test=torch.from_numpy(np.ascontiguousarray(yt_np, dtype=np.int64)),
            num_classes=self.dataset.num_classes,
            generator=torch.Generator().manual_seed(seed ^ 0x5EED),
            cache_features=f.feature_cache,
        )


def _split_own(n: int, cfg_data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A peer's own records split into (train, local test, audit holdout) indices."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(cfg_data.local_test_fraction * n))
    n_hold = int(round(cfg_data.holdout_fraction * n))
    return order[n_test + n_hold :], order[:n_test], order[n_test : n_test + n_hold]


def plan_federation(cfg: RunConfig, *, declared_train: Sequence[int] | None = None) -> FederationPlan:
    """Load the (public) partition and derive the federation's public facts.
    Raises a clear error for any inconsistency before a single step of training."""
    f = cfg.federation
    dataset, split = load_federation_data(cfg)
    peer_seeds = tuple(_seeds(f.seed, 2 + f.peers)[2:])
    archs = tuple(resolve_architectures(f.peers, kind=dataset.kind, mix=cfg.models.mix, per_peer=cfg.models.per_peer))
    strategy = build_strategy(cfg)
    if strategy.needs_homogeneous and len(set(archs)) > 1:
        raise ConfigError(
            f"federation.algorithm = {f.algorithm!r} averages weights, so every peer needs the same architecture, "
            f"but the peers use {sorted(set(archs))}; set models.mix = [\"{archs[0]}\"] or choose "
            "algorithm dfml, def-kt or local."
        )
    if declared_train is None and cfg.data.declared_train:
        declared_train = cfg.data.declared_train
    for name, values in (("declared_train", declared_train or ()), ("peer_paths", cfg.data.peer_paths)):
        if values and len(values) != f.peers:
            raise ConfigError(f"data.{name} lists {len(values)} value(s); give one per peer ({f.peers}) or leave it unset")
    if cfg.data.peer_paths and any(cfg.data.peer_paths) and declared_train is None:
        raise ConfigError(
            "data.peer_paths gives peers data of their own: declare every peer's training-set size in "
            "data.declared_train (public: the averaging weight and the DP sample rate)"
        )
    sizes = [int(len(p.train)) for p in split.peers] if declared_train is None else [int(n) for n in declared_train]
    server_id = f.peers if strategy.uses_server else None
    all_archs = archs + ((archs[0],) if server_id is not None else ())
    x_test = torch.from_numpy(np.ascontiguousarray(dataset.x_test, dtype=np.float32))
    plan = FederationPlan(
        cfg=cfg, dataset=dataset, split=split, dataset_name=dataset.name, input_shape=tuple(dataset.input_shape),
        num_classes=dataset.num_classes, kind=dataset.kind, archs=all_archs, strategy=strategy,
        directory=PublicDirectory(federation_id=f.id, archs=all_archs, num_train=(), schemas={}),
        peer_seeds=peer_seeds,
        x_test=x_test,
        y_test=torch.from_numpy(np.ascontiguousarray(dataset.y_test, dtype=np.int64)),
        test_inputs=FeatureCache(x_test, enabled=f.feature_cache),
    )
    gen = torch.Generator().manual_seed(0)
    schemas = {i: schema_of(plan.model(a, gen).state_dict()) for i, a in enumerate(all_archs)}
    directory = PublicDirectory(
        federation_id=f.id,
        archs=all_archs,
        num_train=tuple(sizes) + ((0,) if server_id is not None else ()),
        schemas=schemas,
        server_id=server_id,
    )
    return dataclasses.replace(plan, directory=directory)


def build_node(
    plan: FederationPlan,
    state: PeerState,
    *,
    channel: Any,
    endpoint: Endpoint,
    ledger_dir: Path | None,
    run_id: str = "",
) -> PeerNode:
    """A peer node over its own state: its own trainer (and ledger), channel and endpoint."""
    cfg = plan.cfg
    if state.peer_id == plan.directory.server_id:
        trainer: Any = PlainTrainer(cfg.dfml, rounds=cfg.federation.rounds)  # the server never reads data
    else:
        trainer = build_trainer(
            cfg, [state], ledger_dir=ledger_dir, generator=None, num_peers=cfg.federation.peers, run_id=run_id
        )
    return PeerNode(
        cfg=cfg,
        state=state,
        directory=plan.directory,
        strategy=plan.strategy,
        trainer=trainer,
        channel=channel,
        endpoint=endpoint,
        model_factory=plan.model_factory(),
        x_test=plan.x_test,
        y_test=plan.y_test,
        averager=build_ckks_roles(cfg.crypto),
        test_inputs=plan.test_inputs,
    )


def federation_labels(
    cfg: RunConfig,
    plan: FederationPlan,
    *,
    channel_name: str,
    channel_secure: bool,
    channel_description: str,
    private: bool,
    rng_label: str | None,
) -> dict[str, Any]:
    """The summary's description of a federation (public facts and what protects it)."""
    labels: dict[str, Any] = {
        "dataset": plan.dataset_name,
        "num_classes": plan.num_classes,
        "train_samples_per_peer": list(plan.directory.num_train[: cfg.federation.peers]),
        "architectures": list(plan.archs[: cfg.federation.peers]),
        "channel": channel_name,
        "channel_description": channel_description,
        "channel_secure": channel_secure,
        "secure_aggregation": cfg.crypto.secure_aggregation,
        "private": private,
        "privacy_label": (
            f"differentially private (DP-SGD, per-peer budgets), {rng_label}"
            if private
            else "NON-PRIVATE: no differential privacy (privacy.enabled = false)"
        ),
    }
    if private:
        labels["privacy_adjacency"] = ADJACENCY
    if not channel_secure:
        labels["warning"] = "INSECURE: models travel in clear (crypto.channel = none)"
    return labels


def federation_labels_from_config(cfg: RunConfig, plan: FederationPlan, peer_done: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`federation_labels` from what a peer process reported when it finished."""
    return federation_labels(
        cfg,
        plan,
        channel_name=str(peer_done["channel"]),
        channel_secure=bool(peer_done["channel_secure"]),
        channel_description=str(peer_done["channel_description"]),
        private=bool(peer_done["private"]),
        rng_label=peer_done.get("rng_label"),
    )


def build_federation(
    cfg: RunConfig,
    *,
    ledger_dir: Path | None = None,
    peer_data_hook: PeerDataHook | None = None,
    run_id: str = "",
    state_root: str | Path | None = None,
    capture_dir: Path | None = None,
    passphrase: str | None = None,
    keep_training_records: bool = True,
) -> Federation:
    """Load data, partition it, and build one node per peer over an in-memory
    transport.  Raises a clear error for any inconsistency before a single
    step of training.  Ledgers go to ``ledger_dir`` (``peer_<id>.json``), or with
    ``state_root`` to each peer's lifetime ledger ``state_root/peer_XXX/peer_<id>.json``.
    Nodes never hold the federation's training records, only their own shard;
    ``keep_training_records=False`` also drops them from the returned
    :class:`Federation` (a run needs only the shards: an idle peer then costs
    its model and its data, not a second copy of it)."""
    plan = plan_federation(cfg)
    assert plan.dataset is not None and plan.split is not None
    dataset, split = plan.dataset, plan.split
    f = cfg.federation
    endpoints = len(plan.directory.archs)
    channel, channel_description = build_channel(cfg.crypto, federation_id=f.id, num_peers=endpoints, passphrase=passphrase)
    hub = InMemoryTransport(tap=None if capture_dir is None else CaptureTap(capture_dir))
    states = [plan.peer_state(i, peer_data_hook if i < f.peers else None) for i in range(endpoints)]
    if peer_data_hook is not None:  # the hook may change a peer's size: declare what it trains on
        sizes = tuple(s.num_train for s in states)
        plan = dataclasses.replace(plan, directory=dataclasses.replace(plan.directory, num_train=sizes))
    node_plan = plan.own_shard_only()  # the nodes hold their shards, never the federation's records
    nodes = tuple(
        build_node(
            node_plan,
            state,
            channel=channel.for_peer(state.peer_id),
            endpoint=hub.endpoint(state.peer_id),
            ledger_dir=ledger_dir if state_root is None else peer_state_dir(state_root, state.peer_id),
            run_id=run_id,
        )
        for state in states
    )
    trainer = nodes[0].trainer
    private = isinstance(trainer, DPTrainer)
    labels = federation_labels(
        cfg,
        plan,
        channel_name=channel.name,
        channel_secure=channel.secure,
        channel_description=channel_description,
        private=private,
        rng_label=trainer.rng_label if private else None,
    )
    return Federation(
        cfg=cfg, nodes=nodes, directory=plan.directory, strategy=plan.strategy, hub=hub,
        labels=labels, dataset=dataset if keep_training_records else None, split=split,
    )


def run_summary(
    cfg: RunConfig, labels: Mapping[str, Any], records: Sequence[Mapping[str, Any]], run_dir: Path, seconds: float,
    rejected_messages: int,
) -> dict[str, Any]:
    """``summary.json`` of a run (simulated or launched) from its metrics records."""
    last = records[-1]
    n = len(records)
    return {
        "algorithm": cfg.federation.algorithm,
        "federation": cfg.federation.id,
        "rounds": n,
        "run_dir": str(run_dir),
        **labels,
        "mean_global_acc": last["mean_global_acc"],
        "mean_local_acc": last["mean_local_acc"],
        "mean_peak_global_acc": last["mean_peak_global_acc"],
        "mean_peak_local_acc": last["mean_peak_local_acc"],
        "server_global_acc": last["server_global_acc"],
        "best_mean_global_acc": max((r["mean_global_acc"] for r in records if r["mean_global_acc"] is not None), default=None),
        "seconds_per_round": sum(r["seconds"] for r in records) / n,
        "compute_seconds_per_round": sum(r["compute_seconds"] for r in records) / n,
        "crypto_seconds_per_round": sum(r["crypto_seconds"] for r in records) / n,
        "bytes_per_round": sum(r["bytes"] for r in records) / n,
        "rejected_messages": rejected_messages,
        "wall_seconds": seconds,
        "peers": {pid: dict(entry) for pid, entry in last["peers"].items()},
        "warnings": training_warnings(last, int(labels.get("num_classes") or 0)),
    }


def training_warnings(last: Mapping[str, Any], num_classes: int) -> list[str]:
    """Peers whose model diverged (non-finite weights) or ends no better than chance
    on the global test set: a model that did not train should never pass silently."""
    out = []
    chance = 1.0 / num_classes if num_classes else 0.0
    for pid, entry in last["peers"].items():
        if entry.get("diverged"):
            out.append(f"peer {pid} ({entry.get('arch')}): its weights became non-finite (training diverged); "
                       "lower dfml.lr or raise dfml.batch_size")
        elif chance and entry.get("global_acc") is not None and entry["global_acc"] <= 1.2 * chance:
            out.append(f"peer {pid} ({entry.get('arch')}): global accuracy {100 * entry['global_acc']:.1f}% is at chance "
                       f"({100 * chance:.1f}%); the model did not learn (check dfml.lr, the rounds, or the budget)")
    for w in out:
        logger.warning(w)
    return out


STATE_LOCK = "lock"


def peer_state_dir(state_root: str | Path, peer_id: int) -> Path:
    """Peer ``peer_id``'s state directory under ``state_root`` (its lifetime ledger,
    checkpoints and reports)."""
    return Path(state_root) / f"peer_{peer_id:03d}"


def peer_state_lock(state_root: str | Path, peer_id: int) -> Path:
    """The lock held by whoever charges peer ``peer_id``'s lifetime ledger (a
    `peer` process, or a run or sweep with ``state_root``)."""
    return peer_state_dir(state_root, peer_id) / STATE_LOCK


def hold_lifetime_ledgers(held: contextlib.ExitStack, state_root: str | Path, peer_ids: Iterable[int]) -> None:
    """Take these peers' state-directory locks into ``held``: one writer per lifetime
    ledger (a second run, sweep, audit or peer process on them is refused)."""
    for pid in peer_ids:
        held.enter_context(exclusive(peer_state_lock(state_root, pid),
                                     f"state directory {peer_state_dir(state_root, pid)} of peer {pid}"))


def copy_lifetime_ledgers(state_root: str | Path, peer_ids: Sequence[int], dest: Path) -> None:
    """Copy the peers' lifetime ledgers into ``dest`` (a run's or audit's ``ledgers/``)."""
    for pid in peer_ids:
        src = ledger_path(peer_state_dir(state_root, pid), pid)
        if src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, ledger_path(dest, pid))


def default_run_dir(cfg: RunConfig, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{cfg.federation.id}-{cfg.federation.algorithm}"


RESEARCH_LEDGERS = (
    "per-run research ledgers: each run of the simulation starts its peers' budgets afresh (earlier runs' ledgers "
    "are kept, never deleted); a deployment's lifetime budget lives in each peer's state directory "
    "(`secure-dfml peer`, `launch`, or `run --state DIR`)"
)
LIFETIME_LEDGERS = "lifetime ledgers: every run on a peer's data is charged to its one ledger in {}"


def _checkpoint_all(fed: Federation, checkpoints: Path) -> None:
    """Every node's checkpoint as one generation (a crash leaves the previous one)."""
    tmp = checkpoints.with_name(checkpoints.name + ".tmp")
    fresh_dir(tmp)
    for node in fed.nodes:
        atomic_write_bytes(tmp / f"peer_{node.peer_id:03d}.safetensors", node.checkpoint_bytes())
    swap_dir_atomically(tmp, checkpoints)


def _restore_all(fed: Federation, checkpoints: Path) -> int:
    """Restore every node from the last complete generation; returns the rounds done."""
    found = current_generation(checkpoints)
    if found is None:
        return 0
    done = {node.restore_checkpoint((found / f"peer_{node.peer_id:03d}.safetensors").read_bytes()) for node in fed.nodes}
    if len(done) != 1:
        raise RunDirectoryError(f"the checkpoints in {found} are from different rounds {sorted(done)}; cannot resume")
    return done.pop()


def _spent_anything(ledgers: Path) -> bool:
    """Whether any ledger in ``ledgers`` holds a charged mechanism."""
    for path in ledgers.glob("*.json"):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("entries"):
                return True
        except (OSError, ValueError):
            return True  # unreadable: keep it
    return False


def _archive_ledgers(ledgers: Path, archive_root: Path, why: str) -> None:
    """Move a run's ledgers into ``archive_root`` (spent budget is never deleted)."""
    if not any(ledgers.glob("*.json")):
        return
    dest = archive_root / f"{stamp()}-{why}"
    n = 1
    while dest.exists():
        n += 1
        dest = archive_root / f"{stamp()}-{why}-{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ledgers, dest)
    logger.warning("the privacy ledgers of the %s run are kept in %s", why, dest)


def archive_replaced_ledgers(run_dir: Path) -> None:
    """Before a run replaces ``run_dir`` (``--overwrite``): keep its ledgers in
    ``<run_dir>.ledger-archive/`` (spent budget is never deleted)."""
    _archive_ledgers(ledgers_dir(run_dir), run_dir.with_name(run_dir.name + ".ledger-archive"), "overwritten")


def interrupted_config(run_dir: str | Path) -> Path:
    """The config an interrupted run (or launch) into ``run_dir`` started with."""
    path = config_file(partial_dir(run_dir))
    if not path.is_file():
        raise RunDirectoryError(
            f"nothing to resume in {run_dir}: no interrupted run ({path.parent} holds no config.toml); "
            "a finished run needs no resume, and a new one is started with --out"
        )
    return path


def run_federation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    plot: bool = True,
    resume: bool = False,
    state_root: str | Path | None = None,
    passphrase: str | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` (the in-process simulation of every peer node) and write its
    run directory; returns the summary dict.

    Results are written to ``<out>.partial`` and renamed into place only when
    the run succeeds, so a failed run never damages an earlier run directory.
    After every round each node writes a checkpoint there; ``resume=True``
    continues an interrupted run from its last completed round (with the
    config it started with) and gives the uninterrupted run's metrics.

    Ledgers: per-run research ledgers in the run directory by default (labelled
    so); with ``state_root`` each peer's lifetime ledger in
    ``state_root/peer_XXX/peer_<id>.json``, charged by every run.  Spent budget is
    never deleted: an interrupted run's folder stays for ``resume`` (or is kept
    as ``<out>.crashed-<time>`` when a new run starts there), and ``overwrite``
    archives the replaced run's ledgers in ``<out>.ledger-archive/``.
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    partial = partial_dir(run_dir)
    with exclusive(lock_file(run_dir), f"run directory {run_dir}"), contextlib.ExitStack() as held:
        if state_root is not None and not resume:
            hold_lifetime_ledgers(held, state_root, range(cfg.federation.peers))
        run_meta = open_partial(run_dir, resume=resume, overwrite=overwrite, meta_name=RUN_META, what="run")
        if run_meta is not None:
            cfg = load_config(config_file(partial))
            state_root = run_meta.get("state_root")
            if state_root is not None:
                hold_lifetime_ledgers(held, state_root, range(cfg.federation.peers))
        else:
            run_meta = {"run_id": uuid.uuid4().hex, "state_root": None if state_root is None else str(state_root)}
            write_config(partial, cfg)
            atomic_write_bytes(partial / RUN_META, json.dumps(run_meta, indent=2).encode("utf-8"))
        run_id = run_meta["run_id"]
        try:
            fed = build_federation(
                cfg, ledger_dir=ledgers_dir(partial), run_id=run_id, state_root=state_root,
                capture_dir=capture_dir(partial), passphrase=passphrase, keep_training_records=False,
            )
        except BaseException:
            if not resume and not _spent_anything(ledgers_dir(partial)):
                shutil.rmtree(partial, ignore_errors=True)  # nothing ran: leave no empty partial folder behind
            raise
        fed.labels["ledger_scope"] = RESEARCH_LEDGERS if state_root is None else LIFETIME_LEDGERS.format(state_root)
        fed.labels["run_id"] = run_id
        fed.labels["state_root"] = None if state_root is None else str(state_root)
        start = _restore_all(fed, partial / CHECKPOINTS) if resume else 0
        records: list[dict[str, Any]] = []
        if start:
            records = read_metrics(partial, limit=start)
            logger.warning("resuming %s after round %d of %d", run_dir, start, cfg.federation.rounds)
        t0 = time.perf_counter()
        write_metrics(partial, records)
        for record in fed.rounds(start):
            records.append(record)
            append_metrics(partial, record)
            _checkpoint_all(fed, partial / CHECKPOINTS)
            if on_round is not None:
                on_round(record)
        summary = run_summary(cfg, fed.labels, records, run_dir, time.perf_counter() - t0, fed.rejected_messages)
        for peer in fed.peers:
            save_models(peer, models_dir(partial))
        save_views(latest_views([n.views for n in fed.nodes]), fed.directory.archs, views_dir(partial))
        if state_root is not None:  # the run directory carries a copy of the lifetime ledgers
            copy_lifetime_ledgers(state_root, [node.peer_id for node in fed.nodes], ledgers_dir(partial))
        write_summary(partial, summary)
        if plot:
            plot_accuracy(records, plot_file(partial), title=f"{cfg.federation.algorithm} on {summary['dataset']}")
        shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
        (partial / RUN_META).unlink()
        if run_dir.exists() and state_root is None:
            archive_replaced_ledgers(run_dir)
        write_manifest(partial)
        swap_into_place(partial, run_dir)
    return summary
