"""Build a federation from a config, run it on the engine, write the run directory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from secure_dfml._fsutil import fresh_dir, swap_into_place
from secure_dfml.config import RunConfig, dump_toml
from secure_dfml.data import ArrayDataset, FederatedSplit
from secure_dfml.errors import ConfigError, RunDirectoryError
from secure_dfml.models import build_model, resolve_architectures
from secure_dfml.privacy import DPTrainer, build_trainer
from secure_dfml.protocol._interfaces import PeerState
from secure_dfml.protocol.engine import RoundEngine, link_fails
from secure_dfml.protocol.strategies import build_strategy
from secure_dfml.transport import InMemoryTransport

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
# (peer id, x_train, y_train) -> (x_train, y_train): e.g. the canary audit inserts canaries.
PeerDataHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Federation:
    """Everything a run needs, built and validated before any training."""

    cfg: RunConfig
    engine: RoundEngine
    labels: dict[str, Any]
    dataset: ArrayDataset
    split: FederatedSplit


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1, dtype=np.uint64)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def load_federation_data(cfg: RunConfig) -> tuple[ArrayDataset, FederatedSplit]:
    """The data set and per-peer split a run with ``cfg`` uses (deterministic in the seed)."""
    from secure_dfml.data import load_dataset, split_from_config

    data_seed, split_seed = _seeds(cfg.federation.seed, 2 + cfg.federation.peers)[:2]
    dataset = load_dataset(cfg.data, rng=np.random.default_rng(data_seed))
    split = split_from_config(dataset, cfg.data, cfg.federation.peers, np.random.default_rng(split_seed))
    return dataset, split


def peer_train_sizes(cfg: RunConfig) -> list[int]:
    """Training-set size of each peer, from the same data split a run uses."""
    _dataset, split = load_federation_data(cfg)
    return [int(len(p.train)) for p in split.peers]


def build_federation(
    cfg: RunConfig, *, ledger_dir: Path | None = None, peer_data_hook: PeerDataHook | None = None
) -> Federation:
    """Load data, partition it, build peers and the engine.  Raises a clear
    error for any inconsistency before a single step of training."""
    from secure_dfml.crypto import build_channel, build_secure_averager

    f = cfg.federation
    dataset, split = load_federation_data(cfg)
    peer_seeds = _seeds(f.seed, 2 + f.peers)[2:]
    archs = resolve_architectures(f.peers, kind=dataset.kind, mix=cfg.models.mix, per_peer=cfg.models.per_peer)
    strategy = build_strategy(cfg)
    if strategy.needs_homogeneous and len(set(archs)) > 1:
        raise ConfigError(
            f"federation.algorithm = {f.algorithm!r} averages weights, so every peer needs the same architecture, "
            f"but the peers use {sorted(set(archs))}; set models.mix = [\"{archs[0]}\"] or choose "
            "algorithm dfml, def-kt or local."
        )
    x_all = torch.from_numpy(np.ascontiguousarray(dataset.x_train, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(dataset.y_train, dtype=np.int64))

    def make(peer_id: int, generator: torch.Generator) -> torch.nn.Module:
        return build_model(
            archs[peer_id],
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            kind=dataset.kind,
            generator=generator,
        )

    peers: list[PeerState] = []
    for i, (ps, seed) in enumerate(zip(split.peers, peer_seeds)):
        init_gen = torch.Generator().manual_seed(seed)
        train_idx = torch.from_numpy(np.asarray(ps.train, dtype=np.int64))
        test_idx = torch.from_numpy(np.asarray(ps.local_test, dtype=np.int64))
        x_train, y_train = x_all[train_idx], y_all[train_idx]
        if peer_data_hook is not None:
            x_train, y_train = peer_data_hook(i, x_train, y_train)
        peers.append(
            PeerState(
                peer_id=i,
                arch=archs[i],
                model=make(i, init_gen),
                x_train=x_train,
                y_train=y_train,
                x_local_test=x_all[test_idx],
                y_local_test=y_all[test_idx],
                num_classes=dataset.num_classes,
                generator=torch.Generator().manual_seed(seed ^ 0x5EED),
            )
        )
    template_gen = torch.Generator().manual_seed(0)
    # the central server starts from peer 0's initial weights (same generator seed)
    server_model = make(0, torch.Generator().manual_seed(peer_seeds[0])) if strategy.uses_server else None
    trainer = build_trainer(cfg, peers, ledger_dir=ledger_dir, generator=None)
    endpoints = f.peers + (1 if strategy.uses_server else 0)
    channel, channel_description = build_channel(cfg.crypto, federation_id=f.id, num_peers=endpoints)
    averager = build_secure_averager(cfg.crypto)
    engine = RoundEngine(
        cfg=cfg,
        peers=peers,
        x_test=torch.from_numpy(np.ascontiguousarray(dataset.x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(dataset.y_test, dtype=np.int64)),
        strategy=strategy,
        trainer=trainer,
        channel=channel,
        transport=InMemoryTransport(
            drop=lambda m: link_fails(cfg, m.round_index, m.sender, m.recipient, m.kind)
        ),
        model_factory=lambda i: make(i if i < f.peers else 0, template_gen),
        averager=averager,
        server_model=server_model,
    )
    labels: dict[str, Any] = {
        "dataset": dataset.name,
        "num_classes": dataset.num_classes,
        "train_samples_per_peer": [p.num_train for p in peers],
        "architectures": archs,
        "channel": channel.name,
        "channel_description": channel_description,
        "channel_secure": channel.secure,
        "secure_aggregation": averager.name if averager is not None else "none",
        "private": isinstance(trainer, DPTrainer),
        "privacy_label": (
            f"differentially private (DP-SGD, per-peer budgets), {trainer.rng_label}"
            if isinstance(trainer, DPTrainer)
            else "NON-PRIVATE: no differential privacy (privacy.enabled = false)"
        ),
    }
    if not channel.secure:
        labels["warning"] = "INSECURE: models travel in clear (crypto.channel = none)"
    return Federation(cfg=cfg, engine=engine, labels=labels, dataset=dataset, split=split)


def _summary(fed: Federation, records: list[dict[str, Any]], run_dir: Path, seconds: float) -> dict[str, Any]:
    last = records[-1]
    peers = {}
    for pid, entry in last["peers"].items():
        peers[pid] = {k: v for k, v in entry.items()}
    n = len(records)
    return {
        "algorithm": fed.cfg.federation.algorithm,
        "federation": fed.cfg.federation.id,
        "rounds": n,
        "run_dir": str(run_dir),
        **fed.labels,
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
        "rejected_messages": fed.engine.rejected_messages,
        "wall_seconds": seconds,
        "peers": peers,
    }


def _save_models(fed: Federation, models_dir: Path) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    for p in fed.engine.peers:
        meta = {"arch": p.arch, "peer": str(p.peer_id)}
        state = {k: v.contiguous() for k, v in p.model.state_dict().items()}
        save_file(state, str(models_dir / f"peer_{p.peer_id:03d}_final.safetensors"), metadata=meta)
        if p.peak_state is not None:
            save_file(
                {k: v.contiguous() for k, v in p.peak_state.items()},
                str(models_dir / f"peer_{p.peer_id:03d}_peak.safetensors"),
                metadata={**meta, "round": str(p.peak_round)},
            )


def _save_views(fed: Federation, views_dir: Path) -> None:
    """Models as a curious aggregator received them and as senders got them back."""
    for (view, peer), state in fed.engine.views.items():
        (views_dir / view).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(views_dir / view / f"peer_{peer:03d}.safetensors"),
            metadata={"arch": fed.engine.peers[peer].arch, "peer": str(peer), "view": view},
        )


def default_run_dir(cfg: RunConfig, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{cfg.federation.id}-{cfg.federation.algorithm}"


def run_federation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary dict.

    Results are written to ``<out>.partial`` and renamed into place only when
    the run succeeds, so a failed run never damages an earlier run directory.
    Spent budget is never lost: a failed run's partial directory stays, and a
    later run into the same ``out`` moves one that holds ledgers aside to
    ``<out>.crashed-<time in ns>`` before it starts.
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirectoryError(
            f"{run_dir} already holds results; choose another --out or pass --overwrite to replace them."
        )
    partial = run_dir.with_name(run_dir.name + ".partial")
    if any((partial / "ledgers").glob("*.json")):
        kept = run_dir.with_name(f"{run_dir.name}.crashed-{time.time_ns()}")
        partial.rename(kept)
        logger.warning("an earlier run into %s stopped before finishing; the privacy ledgers it wrote are kept in %s",
                       run_dir, kept)
    fresh_dir(partial)
    fed = build_federation(cfg, ledger_dir=partial / "ledgers")
    (partial / "config.toml").write_text(dump_toml(cfg), encoding="utf-8")
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    with open(partial / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for record in fed.engine.rounds():
            records.append(record)
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            if on_round is not None:
                on_round(record)
    summary = _summary(fed, records, run_dir, time.perf_counter() - t0)
    _save_models(fed, partial / "models")
    _save_views(fed, partial / "views")
    (partial / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if plot:
        from secure_dfml.report.plots import plot_accuracy

        plot_accuracy(records, partial / "accuracy.png", title=f"{cfg.federation.algorithm} on {summary['dataset']}")
    swap_into_place(partial, run_dir)
    return summary
