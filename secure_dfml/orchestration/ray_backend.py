"""``secure-dfml run --backend ray``: every peer in a Ray actor, exchanging envelopes only.

Each :class:`PeerHost` actor hosts one peer (or a few, ``peers_per_actor``),
each a :class:`~secure_dfml.protocol.node.PeerNode` built exactly as a
``secure-dfml peer`` process builds it (:func:`~secure_dfml._run.build_node`):
the actor derives the federation's public facts from the config itself,
keeps only its own peers' shards of the data, holds only their private keys
(generated inside the actor and never sent anywhere, or loaded from
``crypto.keys_dir`` on its node), and runs :meth:`PeerNode.run_round` -- the
blocking driver of real peers, with bounded receives -- over a
:class:`~secure_dfml.transport.RayEndpoint`.  Between actors only bytes travel:
``deliver(header, envelope)`` on the recipient's actor.

The driver (:func:`run_federation_ray`) holds no private data and no private
key.  It plans the federation (public facts only) to check the config,
starts the actors, relays the peers' *public* keys into the public directory,
asks every actor to run round ``t`` (all concurrently), merges the peers'
round reports with :func:`~secure_dfml.protocol.node.merge_round` and, at
the end, gathers what each peer publishes (its models, what it saw as a
curious peer, the envelopes it sent, its ledger) into a run directory with
``secure-dfml run``'s layout.  With the same config and seed the metrics are
the in-process simulation's (timings aside).

Ray: with no ``address`` the driver starts a local Ray and shuts it down
afterwards; with one it joins that cluster and only disconnects at the end
(the cluster keeps running); when the caller already called ``ray.init`` that
session is used and left as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from nacl.public import PublicKey
from nacl.signing import VerifyKey

from secure_dfml._fsutil import exclusive, swap_into_place
from secure_dfml._run import (
    LIFETIME_LEDGERS,
    RESEARCH_LEDGERS,
    archive_replaced_ledgers,
    hold_lifetime_ledgers,
    build_node,
    default_run_dir,
    federation_labels_from_config,
    merge_round,
    peer_state_dir,
    plan_federation,
    run_summary,
)
from secure_dfml.certify import write_manifest
from secure_dfml.config import RunConfig, config_from_dict
from secure_dfml.crypto import PASSPHRASE_ENV, KeyRing, NaClChannel, PeerDirectory, PeerIdentity, PeerPublicKeys
from secure_dfml.errors import ConfigError, SecureDFMLError, TransportError
from secure_dfml.orchestration.peer import peer_channel, read_views
from secure_dfml.privacy import atomic_write_bytes, ledger_path
from secure_dfml.protocol.node import PeerNode
from secure_dfml.report.plots import plot_accuracy
from secure_dfml.rundir import (
    append_metrics,
    capture_dir,
    latest_views,
    ledger_file,
    ledgers_dir,
    lock_file,
    models_dir,
    open_partial,
    partial_dir,
    plot_file,
    save_models,
    save_views,
    views_dir,
    write_config,
    write_metrics,
    write_summary,
)
from secure_dfml.transport import CaptureTap, RayEndpoint
from secure_dfml.transport._zmq import decode_header

logger = logging.getLogger(__name__)

RAY_META = "ray.json"  # only while a Ray run is in progress
READY_TIMEOUT = 600.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,200}")

__all__ = ["PeerHost", "RAY_META", "ray_session", "run_federation_ray"]


# ----------------------------------------------------------------------------- in the actor


def _settle(pending: list[Any], timeout: float, at_least: int) -> tuple[list[Any], list[str]]:
    """:data:`~secure_dfml.transport._ray.Settle` over Ray object refs."""
    if not pending:
        return [], []
    # at_least 0: whatever has finished within timeout (ray.wait returns early only once num_returns are done)
    want = len(pending) if at_least <= 0 else min(at_least, len(pending))
    done, rest = ray.wait(pending, num_returns=want, timeout=timeout, fetch_local=False)
    errors = []
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return list(rest), errors


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


class PeerHost:
    """A Ray actor hosting peers ``peer_ids`` of a federation: each its own
    :class:`PeerNode` (own data shard, own key, own ledger, own endpoint).

    Everything another actor (or the driver) can hand it is bytes or public:
    ``deliver(header, envelope)``, the public directory, the round number."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        peer_ids: Sequence[int],
        *,
        run_id: str,
        state_root: str | None = None,
        passphrase: str | None = None,
        threads: int = 1,
        max_in_flight: int = 1000,
    ) -> None:
        self._held = contextlib.ExitStack()
        self._work: Path | None = None
        self._endpoints: dict[int, RayEndpoint] = {}
        self._nodes: dict[int, PeerNode] = {}
        self._descriptions: dict[int, str] = {}
        self._identities: dict[int, PeerIdentity] = {}
        # an error here is kept and raised by the first call: Ray reports a method's
        # exception as itself (a config error stays one), a constructor's only as text
        self._init_error: SecureDFMLError | None = None
        try:
            self._setup(cfg, peer_ids, run_id=run_id, state_root=state_root, passphrase=passphrase,
                        threads=threads, max_in_flight=max_in_flight)
        except SecureDFMLError as exc:
            self.close()
            self._init_error = exc

    def _setup(
        self, cfg: Mapping[str, Any], peer_ids: Sequence[int], *, run_id: str, state_root: str | None,
        passphrase: str | None, threads: int, max_in_flight: int,
    ) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.cfg: RunConfig = config_from_dict(cfg)
        plan = plan_federation(self.cfg)
        n = len(plan.directory.archs)
        self.peer_ids = sorted(int(p) for p in peer_ids)
        if not self.peer_ids or any(not 0 <= p < n for p in self.peer_ids):
            raise ConfigError(f"peer ids {self.peer_ids} are not peers of this federation (ids 0..{n - 1})")
        self._states = {pid: plan.peer_state(pid) for pid in self.peer_ids}
        self._plan = plan.own_shard_only()  # the federation's other records are dropped here
        self._run_id = run_id
        self._passphrase = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
        self._max_in_flight = max_in_flight
        self._work = Path(tempfile.mkdtemp(prefix="secure-dfml-ray-peers-"))
        self._ledger_dirs: dict[int, Path] = {}
        if state_root is not None:  # the peers' lifetime state, one writer at a time
            hold_lifetime_ledgers(self._held, state_root, self.peer_ids)
        for pid in self.peer_ids:
            if state_root is not None:
                self._ledger_dirs[pid] = peer_state_dir(state_root, pid)
            else:
                self._ledger_dirs[pid] = self._work / f"peer_{pid:03d}" / "ledger"
        crypto = self.cfg.crypto
        self._ephemeral = crypto.channel == "nacl" and not crypto.keys_dir
        # private keys generated here never leave this actor: only their public halves are published
        self._identities = {pid: PeerIdentity.generate(pid) for pid in self.peer_ids} if self._ephemeral else {}

    def _peer_dir(self, pid: int) -> Path:
        assert self._work is not None
        return self._work / f"peer_{pid:03d}"

    def public_keys(self) -> dict[int, dict[str, str]]:
        """This actor's peers' public keys (empty unless keys are generated here);
        the first call, so it raises what went wrong when the actor started."""
        if self._init_error is not None:
            raise self._init_error
        return {pid: ident.public().to_json() for pid, ident in self._identities.items()}

    def _directory(self, directory_json: str | None) -> PeerDirectory | None:
        """The relayed public directory, parsed once for all of this actor's peers (it is public)."""
        if not self._ephemeral:
            return None
        if directory_json is None:
            raise ConfigError("the Ray peers generate their own keys: connect() needs the public directory")
        directory = PeerDirectory.from_json(directory_json, source="public directory relayed by the Ray driver")
        if directory.federation_id != self.cfg.federation.id:
            raise ConfigError(f"the public directory is of federation {directory.federation_id!r}")
        return directory

    def _channel(self, pid: int, directory: PeerDirectory | None) -> tuple[Any, str]:
        if directory is None:
            keys = Path(self.cfg.crypto.keys_dir) if self.cfg.crypto.keys_dir else None
            return peer_channel(self.cfg, pid, keys, self._passphrase)
        crypto = self.cfg.crypto
        keyring = KeyRing(directory=directory, identities={pid: self._identities[pid]})
        channel = NaClChannel(keyring=keyring, max_message_bytes=crypto.max_message_bytes, pad_messages=crypto.pad_messages)
        pad = ", payloads padded to power-of-two size buckets" if crypto.pad_messages else ""
        return channel, (
            "NaCl envelopes (X25519 crypto_box + Ed25519 signatures), ephemeral keys generated inside each peer's "
            f"Ray actor (private keys never leave it; not persisted){pad}"
        )

    def connect(self, handles: Mapping[int, Any], directory_json: str | None = None) -> list[int]:
        """Build this actor's nodes, each with an endpoint to the actors hosting the others."""
        if self._init_error is not None:
            raise self._init_error
        n = len(self._plan.directory.archs)
        if sorted(handles) != list(range(n)):
            raise ConfigError(f"connect() needs the actor of every peer 0..{n - 1}, got {sorted(handles)}")
        directory = self._directory(directory_json)
        for pid in self.peer_ids:
            channel, self._descriptions[pid] = self._channel(pid, directory)
            endpoint = RayEndpoint(
                peer_id=pid,
                peers={j: handles[j] for j in range(n) if j != pid},
                max_message_bytes=self.cfg.crypto.max_message_bytes,
                max_in_flight=self._max_in_flight,
                settle=_settle,
                tap=CaptureTap(capture_dir(self._peer_dir(pid))),
            )
            self._endpoints[pid] = endpoint
            self._nodes[pid] = build_node(
                self._plan, self._states[pid], channel=channel, endpoint=endpoint,
                ledger_dir=self._ledger_dirs[pid], run_id=self._run_id,
            )
        return self.peer_ids

    def deliver(self, header: bytes, data: bytes) -> bool:
        """The mailbox: one envelope for one of this actor's peers (bytes only)."""
        if not self._endpoints:
            return False
        endpoint = None
        if len(self._endpoints) > 1:
            fields = decode_header(header) if isinstance(header, bytes) else None
            endpoint = self._endpoints.get(fields[1]) if fields is not None else None
        if endpoint is None:  # one peer here, or not routable: that peer's mailbox checks (and counts) it
            endpoint = self._endpoints[self.peer_ids[0]]
        return endpoint.deliver(header, data)

    def _ledger(self, pid: int) -> bytes | None:
        path = ledger_path(self._ledger_dirs[pid], pid)
        return path.read_bytes() if path.is_file() else None

    def run_round(self, t: int) -> dict[str, Any]:
        """Round ``t`` of every peer here (concurrently): their round reports and ledgers."""
        nodes = [self._nodes[pid] for pid in self.peer_ids]
        if len(nodes) == 1:
            reports = [nodes[0].run_round(t)]
        else:
            out: dict[int, dict[str, Any]] = {}
            errors: list[BaseException] = []

            def one(node: PeerNode) -> None:
                try:
                    out[node.peer_id] = node.run_round(t)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(node,), daemon=True) for node in nodes]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
            reports = [out[pid] for pid in self.peer_ids]
        return {"reports": reports, "ledgers": {pid: self._ledger(pid) for pid in self.peer_ids}}

    def describe(self) -> dict[int, dict[str, Any]]:
        """Public facts about each peer here (what a `peer` process reports when done)."""
        return {
            pid: {
                "peer": pid,
                "rejected_messages": node.rejected_messages,
                "channel": node.channel.name,
                "channel_secure": node.channel.secure,
                "channel_description": self._descriptions[pid],
                "private": bool(self.cfg.privacy.enabled),
                "rng_label": getattr(node.trainer, "rng_label", None),
                "rejected_deliveries": self._endpoints[pid].rejected,
                "stale_deliveries": self._endpoints[pid].stale,
            }
            for pid, node in self._nodes.items()
        }

    def outputs(self) -> dict[int, dict[str, Any]]:
        """What each peer here publishes at the end of the run, as file bytes: its
        final / peak model, its views, the envelopes it sent, its ledger."""
        out: dict[int, dict[str, Any]] = {}
        for pid, node in self._nodes.items():
            folder = self._peer_dir(pid)
            if pid != node.directory.server_id:
                save_models(node.state, models_dir(folder))
            save_views(node.views, node.directory.archs, views_dir(folder))
            out[pid] = {
                "models": _files(models_dir(folder), "*.safetensors"),
                "views": _files(views_dir(folder), "*/*.safetensors"),
                "capture": _files(capture_dir(folder), "*.env"),
                "ledger": self._ledger(pid),
            }
        return out

    def close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._held.close()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


PeerActor = ray.remote(PeerHost)


# ----------------------------------------------------------------------------- the driver


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, init_options: Mapping[str, Any] | None = None, log_to_driver: bool = False
) -> Iterator[str]:
    """A Ray session for one run; yields how it was had: ``"caller"`` (``ray.init``
    was already called: used and left as it was), ``"local"`` (a new local Ray,
    shut down at the end) or ``"cluster"`` (joined ``address``; at the end this
    driver disconnects, the cluster keeps running)."""
    if ray.is_initialized():
        yield "caller"
        return
    opts: dict[str, Any] = {"log_to_driver": log_to_driver, "logging_level": logging.WARNING}
    if address:
        how = "cluster"
        ray.init(address=address, **{**opts, **(init_options or {})})
    else:
        how = "local"
        ray.init(address="local", **{**opts, "include_dashboard": False, **(init_options or {})})
    try:
        yield how
    finally:
        ray.shutdown()


def _cpus_per_peer(requested: float | None, endpoints: int, how: str) -> float:
    total = float(ray.cluster_resources().get("CPU", 0.0))
    per = requested
    if per is None:
        per = 1.0 if how == "cluster" or total <= 0 else min(1.0, total / endpoints)
        per = math.floor(per * 1e4) / 1e4
    if not per > 0:
        raise ConfigError(f"--ray-cpus-per-peer must be > 0, got {per}")
    demand = per * endpoints
    if demand > total + 1e-9:
        msg = (
            f"the federation's {endpoints} peer actors ask for {demand:g} CPUs ({per:g} per peer) but the Ray "
            f"cluster has {total:g}"
        )
        if how == "local":
            raise ConfigError(
                f"{msg}: Ray would queue the peers that do not fit and the round could never start; give "
                f"--ray-cpus-per-peer at most {math.floor(1e4 * total / endpoints) / 1e4:g} (fractions are fine)"
            )
        logger.warning("%s; peers wait for resources (an autoscaling cluster may add nodes)", msg)
    return per


def _get(refs: Sequence[Any], timeout: float, what: str) -> list[Any]:
    """``ray.get`` bounded by ``timeout``, with errors raised inside an actor
    surfaced as what they are (a config error stays a config error)."""
    try:
        return list(ray.get(list(refs), timeout=timeout))
    except ray.exceptions.GetTimeoutError:
        raise TransportError(f"{what} did not finish within {timeout:.0f} s; stopping the run") from None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SecureDFMLError):
            raise cause from None
        raise TransportError(f"{what} failed in a peer actor: {exc}") from None
    except ray.exceptions.RayActorError as exc:
        cause = getattr(exc, "cause", None)
        inner = getattr(cause, "cause", None) if cause is not None else None
        if isinstance(inner, SecureDFMLError):
            raise inner from None
        raise TransportError(f"{what}: a peer actor died ({str(exc).strip()[:2000]})") from None


def _public_directory(federation_id: str, keys: Mapping[int, Mapping[str, str]]) -> str:
    peers = {
        int(pid): PeerPublicKeys(
            peer_id=int(pid),
            verify_key=VerifyKey(bytes.fromhex(k["verify_key"])),
            box_public_key=PublicKey(bytes.fromhex(k["box_public_key"])),
        )
        for pid, k in keys.items()
    }
    for pid, k in keys.items():
        if peers[int(pid)].fingerprint != k.get("fingerprint"):
            raise TransportError(f"peer {pid}'s published fingerprint does not match its public keys")
    return PeerDirectory(federation_id=federation_id, peers=peers).to_json()


def _safe(name: str) -> str:
    parts = name.split("/")
    if not parts or any(not _SAFE_NAME.fullmatch(p) or p in (".", "..") for p in parts):
        raise TransportError(f"a peer actor published a file with an unexpected name {name!r}")
    return name


def _gather(
    partial: Path, archs: Sequence[str], outputs: Mapping[int, Mapping[str, Any]]
) -> None:
    """Write what the peers published into the run directory's layout."""
    scratch = partial / ".ray-peers"
    capture_dir(partial).mkdir(parents=True, exist_ok=True)
    views = []
    for pid in sorted(outputs):
        published = outputs[pid]
        for name, data in published["models"].items():
            atomic_write_bytes(models_dir(partial) / _safe(name), data)
        for name, data in published["capture"].items():
            path = capture_dir(partial) / _safe(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if published["ledger"] is not None:
            atomic_write_bytes(ledger_file(partial, pid), published["ledger"])
        own = scratch / f"peer_{pid:03d}"
        for name, data in published["views"].items():
            atomic_write_bytes(views_dir(own) / _safe(name), data)
        views.append(read_views(own))
    save_views(latest_views(views), archs, views_dir(partial))
    shutil.rmtree(scratch, ignore_errors=True)


def run_federation_ray(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    address: str | None = None,
    num_cpus_per_peer: float | None = None,
    peers_per_actor: int = 1,
    actor_options: Mapping[str, Any] | None = None,
    init_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    plot: bool = True,
    state_root: str | Path | None = None,
    passphrase: str | None = None,
    stall_seconds: float | None = None,
    ready_timeout: float = READY_TIMEOUT,
    log_to_driver: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` with every peer in a Ray actor and write its run directory
    (``secure-dfml run``'s layout); returns the summary.

    ``address``: join that Ray cluster (``"auto"``: one started on this machine
    with ``ray start``); ``None``: start a local Ray and shut it down after (a
    session the caller opened with ``ray.init`` is used as it is).
    ``num_cpus_per_peer``: the CPUs Ray reserves per peer (fractions allowed;
    default: 1 on a cluster, the local CPUs shared out, at most 1, locally);
    ``peers_per_actor``: peers hosted by one actor process (each still its own
    node, key, data shard and endpoint; saves one torch process per peer);
    ``actor_options``: further Ray options for every actor (``memory``,
    ``resources``, ``runtime_env``, ``scheduling_strategy``...).
    ``state_root``: each peer's lifetime ledger in ``state_root/peer_XXX`` on
    the node its actor runs on (a path every node sees the same, e.g. a shared
    filesystem); default: per-run research ledgers, copied into the run
    directory after every round.  A round that does not finish within
    ``stall_seconds`` (default: the config's timeouts plus a margin), or actors
    that do not start within ``ready_timeout``, stop the run (bounded)."""
    if peers_per_actor < 1:
        raise ConfigError(f"peers_per_actor must be >= 1, got {peers_per_actor}")
    plan = plan_federation(cfg)  # public facts: a config error is reported before Ray starts
    n = len(plan.directory.archs)
    groups = [list(range(i, min(i + peers_per_actor, n))) for i in range(0, n, peers_per_actor)]
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    partial = partial_dir(run_dir)
    root = None if state_root is None else Path(state_root).resolve()
    stall = stall_seconds if stall_seconds is not None else (
        cfg.dfml.return_timeout + 3 * cfg.dfml.sender_timeout + 120.0
    )
    threads = int(os.environ.get("SECURE_DFML_THREADS", "1"))
    with exclusive(lock_file(run_dir), f"run directory {run_dir}"):
        open_partial(run_dir, resume=False, overwrite=overwrite, meta_name=RAY_META, what="run")
        run_id = uuid.uuid4().hex
        meta = {"run_id": run_id, "state_root": None if root is None else str(root), "backend": "ray"}
        write_config(partial, cfg)
        atomic_write_bytes(partial / RAY_META, json.dumps(meta, indent=2).encode("utf-8"))
        records: list[dict[str, Any]] = []
        try:
            with ray_session(address, init_options=init_options, log_to_driver=log_to_driver) as how:
                per = _cpus_per_peer(num_cpus_per_peer, n, how)
                actors = []
                try:
                    for group in groups:
                        options = {"num_cpus": round(per * len(group), 4), "max_concurrency": 8 + len(group),
                                   **(actor_options or {})}
                        actors.append(PeerActor.options(**options).remote(
                            cfg.to_dict(), group, run_id=run_id, state_root=None if root is None else str(root),
                            passphrase=passphrase, threads=threads,
                        ))
                    keys: dict[int, dict[str, str]] = {}
                    for found in _get([a.public_keys.remote() for a in actors], ready_timeout,
                                      f"starting {len(actors)} peer actors"):
                        keys.update(found)
                    directory = _public_directory(cfg.federation.id, keys) if keys else None
                    handles = {pid: actor for actor, group in zip(actors, groups) for pid in group}
                    _get([a.connect.remote(handles, directory) for a in actors], ready_timeout, "connecting the peers")
                    t0 = time.perf_counter()
                    write_metrics(partial, records)
                    for t in range(cfg.federation.rounds):
                        results = _get([a.run_round.remote(t) for a in actors], stall, f"round {t}")
                        reports = sorted((r for res in results for r in res["reports"]), key=lambda r: int(r["peer"]))
                        for res in results:
                            for pid, data in res["ledgers"].items():
                                if data is not None:
                                    atomic_write_bytes(ledger_file(partial, int(pid)), data)
                        record = merge_round(
                            reports,
                            plan.strategy.select(plan.directory.num_peers, t),
                            seconds=max(float(r["seconds"]) for r in reports),
                            server_id=plan.directory.server_id,
                        )
                        records.append(record)
                        append_metrics(partial, record)
                        if on_round is not None:
                            on_round(record)
                    seconds = time.perf_counter() - t0
                    described: dict[int, dict[str, Any]] = {}
                    for d in _get([a.describe.remote() for a in actors], ready_timeout, "reading the peers' reports"):
                        described.update({int(k): v for k, v in d.items()})
                    outputs: dict[int, dict[str, Any]] = {}
                    for o in _get([a.outputs.remote() for a in actors], ready_timeout, "gathering the peers' outputs"):
                        outputs.update({int(k): v for k, v in o.items()})
                    with contextlib.suppress(Exception):
                        ray.get([a.close.remote() for a in actors], timeout=30)
                finally:
                    for a in actors:
                        with contextlib.suppress(Exception):
                            ray.kill(a)
        except BaseException:
            if not records and not any(ledgers_dir(partial).glob("*.json")):
                shutil.rmtree(partial, ignore_errors=True)  # nothing ran: leave no empty partial folder behind
            raise
        _gather(partial, plan.directory.archs, outputs)
        labels = federation_labels_from_config(cfg, plan, described[0])
        labels["ledger_scope"] = RESEARCH_LEDGERS if root is None else LIFETIME_LEDGERS.format(root)
        labels["run_id"] = run_id
        labels["state_root"] = None if root is None else str(root)
        where = {"local": "a local Ray", "cluster": f"the Ray cluster at {address}", "caller": "the caller's Ray session"}[how]
        labels["transport"] = (
            f"Ray actors on {where}: {len(actors)} actor(s), {peers_per_actor} peer(s) per actor, {per:g} CPU per "
            "peer; envelopes only"
        )
        summary = run_summary(cfg, labels, records, run_dir, seconds, sum(int(d["rejected_messages"]) for d in described.values()))
        write_summary(partial, summary)
        if plot:
            plot_accuracy(records, plot_file(partial), title=f"{cfg.federation.algorithm} on {summary['dataset']} (Ray)")
        (partial / RAY_META).unlink()
        if run_dir.exists() and root is None:
            archive_replaced_ledgers(run_dir)
        write_manifest(partial)
        swap_into_place(partial, run_dir)
    return summary
