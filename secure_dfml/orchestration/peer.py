"""One real peer: a process that holds only its own state and talks over ZeroMQ.

``run_peer`` is what ``secure-dfml peer`` runs.  The peer

* derives the federation's public facts (selection, architectures, declared
  sizes) from the config and the public partition seed, and keeps only its
  own shard of the data (user data: see the README for what is public);
* loads only its own private key from the key folder (`secure-dfml keys init`);
* binds its own address and talks to the others only in NaCl envelopes over
  :class:`~secure_dfml.transport.ZmqEndpoint`;
* writes everything it owns under its state directory::

      STATE/lock                  held while the peer runs (a second process is refused)
      STATE/peer_<id>.json        its lifetime privacy ledger (every run on its data)
      STATE/run.json              the current run's id and config fingerprint
      STATE/checkpoint.safetensors  after every round (atomic)
      STATE/reports.jsonl         its report of every completed round
      STATE/capture/              the envelopes it sent (what an eavesdropper sees)
      STATE/models/, STATE/views/ its final / peak model and what it saw as a curious peer
      STATE/done.json             written when the run finished

Started again with the same run (or no run id), it resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from secure_dfml._fsutil import exclusive
from secure_dfml._run import STATE_LOCK, FederationPlan, build_node, plan_federation
from secure_dfml.config import RunConfig, dump_toml
from secure_dfml.crypto import NaClChannel, PlainChannel, load_keys
from secure_dfml.errors import ConfigError, SecureDFMLError
from secure_dfml.privacy import atomic_write_bytes
from secure_dfml.protocol.node import PeerNode
from secure_dfml.rundir import capture_dir, models_dir, save_models, save_views, views_dir
from secure_dfml.transport import CaptureTap, ZmqEndpoint

logger = logging.getLogger(__name__)

REPORTS = "reports.jsonl"
CHECKPOINT = "checkpoint.safetensors"
DONE = "done.json"
RUN = "run.json"


PAUSE = "pause-before-round"


class PeerPaused(SecureDFMLError, RuntimeError):
    """The peer stopped at a round boundary because its state directory asked it to
    (``pause-before-round``): every peer of a paused launch stops after the same
    round, so a resumed launch reproduces the uninterrupted run."""


def _pause_requested(state_dir: Path, round_index: int) -> bool:
    path = state_dir / PAUSE
    try:
        return path.is_file() and round_index >= int(path.read_text(encoding="utf-8").strip())
    except ValueError:
        return False


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the resolved config minus where peers listen (the same federation
    may move to other ports when it resumes)."""
    return hashlib.sha256(dump_toml(cfg.replace(network={"addresses": ()})).encode("utf-8")).hexdigest()


def endpoint_count(plan: FederationPlan) -> int:
    return len(plan.directory.archs)


def peer_addresses(cfg: RunConfig, plan: FederationPlan) -> list[str]:
    n = endpoint_count(plan)
    addrs = list(cfg.network.addresses)
    if len(addrs) != n:
        raise ConfigError(
            f"network.addresses lists {len(addrs)} address(es) but the federation has {n} peer endpoint(s)"
            + (" (peers + the fedavg-central server)" if plan.directory.server_id is not None else "")
            + '; give one "tcp://HOST:PORT" per peer id, or use `secure-dfml launch`, which assigns loopback ports'
        )
    return addrs


def peer_channel(cfg: RunConfig, peer_id: int, keys_dir: Path | None, passphrase: str | None) -> tuple[Any, str]:
    crypto = cfg.crypto
    if crypto.channel == "none":
        if not crypto.allow_insecure:
            raise ConfigError('crypto.channel = "none" needs crypto.allow_insecure = true')
        return PlainChannel(allow_insecure=True, max_message_bytes=crypto.max_message_bytes), "INSECURE plaintext"
    if keys_dir is None:
        raise ConfigError(
            "a real peer needs its keys: pass --keys DIR (written by `secure-dfml keys init --peers N --out DIR`) "
            "or set crypto.keys_dir"
        )
    keyring = load_keys(keys_dir, passphrase=passphrase, peers=[peer_id], allow_exposed_keys=crypto.allow_exposed_keys)
    if keyring.federation_id != cfg.federation.id:
        raise ConfigError(
            f"keys in {keys_dir} belong to federation {keyring.federation_id!r}, but the config is federation "
            f"{cfg.federation.id!r}"
        )
    channel = NaClChannel(keyring=keyring, max_message_bytes=crypto.max_message_bytes, pad_messages=crypto.pad_messages)
    return channel, f"NaCl envelopes, own key from {keys_dir}"


def _start_run(state_dir: Path, cfg: RunConfig, run_id: str | None, fresh: bool) -> tuple[str, bool]:
    """Decide between resuming and starting (a new run never touches the ledger).
    Returns (run id, resume?)."""
    fp = config_fingerprint(cfg)
    meta_path = state_dir / RUN
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    same = (
        meta is not None
        and not fresh
        and meta.get("fingerprint") == fp
        and (run_id is None or meta.get("run_id") == run_id)
    )
    if same and not (state_dir / DONE).is_file():
        return meta["run_id"], (state_dir / CHECKPOINT).is_file()
    if same and run_id is not None:
        return meta["run_id"], True  # finished already: nothing left to run
    new_id = run_id or uuid.uuid4().hex
    for name in (CHECKPOINT, REPORTS, DONE):
        (state_dir / name).unlink(missing_ok=True)
    for folder in (capture_dir(state_dir), models_dir(state_dir), views_dir(state_dir)):
        shutil.rmtree(folder, ignore_errors=True)
    atomic_write_bytes(meta_path, json.dumps({"run_id": new_id, "fingerprint": fp}, indent=2).encode("utf-8"))
    return new_id, False


def run_peer(
    cfg: RunConfig,
    peer_id: int,
    *,
    state_dir: str | Path,
    keys_dir: str | Path | None = None,
    passphrase: str | None = None,
    run_id: str | None = None,
    fresh: bool = False,
    on_round: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run peer ``peer_id`` of ``cfg`` to the last round (resuming when its state
    directory holds an unfinished run of the same config); returns its final report."""
    state_dir = Path(state_dir)
    with exclusive(state_dir / STATE_LOCK, f"state directory {state_dir} of peer {peer_id}"):
        plan = plan_federation(cfg)
        if not 0 <= peer_id < endpoint_count(plan):
            raise ConfigError(f"--id {peer_id} is not a peer of this federation (ids 0..{endpoint_count(plan) - 1})")
        addresses = peer_addresses(cfg, plan)
        state = plan.peer_state(peer_id)
        plan = plan.own_shard_only()
        channel, channel_description = peer_channel(cfg, peer_id, None if keys_dir is None else Path(keys_dir), passphrase)
        rid, resume = _start_run(state_dir, cfg, run_id, fresh)
        endpoint = ZmqEndpoint(
            peer_id=peer_id,
            bind=addresses[peer_id],
            peers={j: a for j, a in enumerate(addresses) if j != peer_id},
            max_message_bytes=cfg.crypto.max_message_bytes,
            tap=CaptureTap(capture_dir(state_dir)),
        )
        try:
            node = build_node(plan, state, channel=channel, endpoint=endpoint, ledger_dir=state_dir, run_id=rid)
            return _run_node(node, cfg, state_dir, resume, channel_description, on_round)
        finally:
            endpoint.close()


def _run_node(
    node: PeerNode,
    cfg: RunConfig,
    state_dir: Path,
    resume: bool,
    channel_description: str,
    on_round: Callable[[Mapping[str, Any]], None] | None,
) -> dict[str, Any]:
    done_path = state_dir / DONE
    if resume and done_path.is_file():
        return json.loads(done_path.read_text(encoding="utf-8"))
    start = node.restore_checkpoint((state_dir / CHECKPOINT).read_bytes()) if resume else 0
    reports_path = state_dir / REPORTS
    kept = reports_path.read_text(encoding="utf-8").splitlines()[:start] if start else []
    atomic_write_bytes(reports_path, "".join(line + "\n" for line in kept).encode("utf-8"))
    if start:
        logger.warning("peer %d resumes after round %d of %d", node.peer_id, start, cfg.federation.rounds)
    for t in range(start, cfg.federation.rounds):
        if _pause_requested(state_dir, t):
            logger.warning("peer %d pauses before round %d (asked by %s); started again it resumes", node.peer_id, t, PAUSE)
            raise PeerPaused(f"peer {node.peer_id} paused before round {t}")
        report = node.run_round(t)
        with open(reports_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(report) + "\n")
        atomic_write_bytes(state_dir / CHECKPOINT, node.checkpoint_bytes())
        if on_round is not None:
            on_round(report)
    save_models(node.state, models_dir(state_dir))
    save_views(node.views, node.directory.archs, views_dir(state_dir))
    final = {
        "peer": node.peer_id,
        "rounds": cfg.federation.rounds,
        "rejected_messages": node.rejected_messages,
        "channel": node.channel.name,
        "channel_secure": node.channel.secure,
        "channel_description": channel_description,
        "private": bool(cfg.privacy.enabled),
        "rng_label": getattr(node.trainer, "rng_label", None),
    }
    atomic_write_bytes(done_path, json.dumps(final, indent=2).encode("utf-8"))
    return final


def read_views(state_dir: Path) -> dict[tuple[str, int], tuple[int, dict[str, Any]]]:
    """The views a peer saved in its state directory, with the round of each."""
    out: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    for path in sorted(views_dir(state_dir).glob("*/peer_*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        out[(path.parent.name, int(path.stem.removeprefix("peer_")))] = (int(meta.get("round", -1)), load_file(str(path)))
    return out


__all__ = ["PAUSE", "PeerPaused", "config_fingerprint", "peer_addresses", "peer_channel", "read_views", "run_peer"]
