"""``secure-dfml launch``: every peer its own local process on loopback.

The launcher starts one ``secure-dfml peer`` process per peer (each loads only
its own data shard and private key, binds its own port and talks to the others
only in envelopes over ZeroMQ), restarts a peer that dies (it resumes from its
checkpoint), shows progress from the peers' round reports, and gathers what
the peers wrote into a run directory with the same layout as ``secure-dfml
run`` -- so ``audit``, ``budget show`` and the rest work on it unchanged.

The launcher itself holds no private data and no private key: it reads the
public config, assigns ports, and reads the peers' reports and outputs when
they are done.  Peer state (lifetime ledgers, checkpoints, keys it generated)
lives under ``state_root`` (default ``runs/state/<federation id>``), so a
rerun of the same federation is charged to the same ledgers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from secure_dfml._fsutil import exclusive, fresh_dir, swap_into_place
from secure_dfml._run import (
    default_run_dir,
    federation_labels_from_config,
    merge_round,
    peer_state_dir,
    plan_federation,
    run_summary,
)
from secure_dfml.certify import write_manifest
from secure_dfml.config import RunConfig, dump_toml
from secure_dfml.crypto import generate_keys, write_keys
from secure_dfml.errors import TransportError
from secure_dfml.orchestration.peer import DONE, PAUSE, REPORTS, read_views
from secure_dfml.privacy import atomic_write_bytes, ledger_path
from secure_dfml.report.plots import plot_accuracy
from secure_dfml.rundir import (
    capture_dir,
    latest_views,
    ledger_file,
    ledgers_dir,
    lock_file,
    metrics_file,
    models_dir,
    open_partial,
    partial_dir,
    plot_file,
    read_config,
    save_views,
    views_dir,
    write_config,
    write_summary,
)
from secure_dfml.transport import free_tcp_addresses

logger = logging.getLogger(__name__)

LAUNCH = "launch.json"
PAUSED_EXIT = 3  # a peer's exit code when it paused at a round boundary (not a failure)


def default_state_root(cfg: RunConfig) -> Path:
    return Path("runs") / "state" / cfg.federation.id


def _read_reports(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line]  # complete lines only


class Launcher:
    """The peer processes of one launched run (see :func:`launch_federation`)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        peers_config: Path,
        keys_dir: Path | None,
        state_root: Path,
        run_id: str,
        endpoints: int,
        max_restarts: int = 3,
        python: str = sys.executable,
    ) -> None:
        self.cfg = cfg
        self.peers_config = peers_config
        self.keys_dir = keys_dir
        self.state_root = state_root
        self.run_id = run_id
        self.endpoints = endpoints
        self.max_restarts = max_restarts
        self.python = python
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, int] = dict.fromkeys(range(endpoints), 0)
        self.finished: set[int] = set()

    def state_dir(self, peer_id: int) -> Path:
        return peer_state_dir(self.state_root, peer_id)

    def start(self, peer_id: int) -> None:
        sd = self.state_dir(peer_id)
        sd.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python, "-m", "secure_dfml.cli.main", "peer",
            "--config", str(self.peers_config), "--id", str(peer_id),
            "--state", str(sd), "--run-id", self.run_id, "--quiet",
        ]
        if self.keys_dir is not None:
            cmd += ["--keys", str(self.keys_dir)]
        env = {**os.environ, "SECURE_DFML_THREADS": os.environ.get("SECURE_DFML_THREADS", "1")}
        (sd / PAUSE).unlink(missing_ok=True)
        with open(sd / "peer.log", "ab") as log:
            # its own session: a Ctrl-C at the terminal reaches the launcher, which pauses the peers in step
            self.procs[peer_id] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def kill(self, peer_id: int) -> None:
        """Kill a peer process at once (SIGKILL): for fault drills."""
        proc = self.procs.get(peer_id)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def reports(self, peer_id: int) -> list[dict[str, Any]]:
        return _read_reports(self.state_dir(peer_id) / REPORTS)

    def check(self) -> None:
        """Note finished peers; restart one that died before finishing."""
        for pid, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or pid in self.finished:
                continue
            if code == 0 and (self.state_dir(pid) / DONE).is_file():
                self.finished.add(pid)
                continue
            if code == PAUSED_EXIT:
                raise TransportError(f"peer {pid} paused ({self.state_dir(pid) / PAUSE}); resume the launch to continue")
            if code == 2 or self.restarts[pid] >= self.max_restarts:  # 2: a usage or config error
                log = self.state_dir(pid) / "peer.log"
                tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.is_file() else ""
                raise TransportError(
                    f"peer {pid} stopped (exit code {code}, restarted {self.restarts[pid]} time(s)); giving up. "
                    f"Its log ({log}) ends with:\n{tail}"
                )
            self.restarts[pid] += 1
            logger.warning("peer %d stopped (exit code %s); restarting it from its checkpoint (restart %d of %d)",
                           pid, code, self.restarts[pid], self.max_restarts)
            self.start(pid)

    def pause_all(self, timeout: float) -> int:
        """Ask every peer to stop before the same round and wait (bounded) until
        they have: a launch resumed from there reproduces the uninterrupted run.
        Returns the round they pause before."""
        target = -1
        while True:  # a peer that started a round before it saw the request moves the boundary on
            done = max(len(self.reports(pid)) for pid in range(self.endpoints))
            if done + 1 <= target:
                break
            target = done + 1
            for pid in range(self.endpoints):
                atomic_write_bytes(self.state_dir(pid) / PAUSE, str(target).encode())
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        logger.warning("peers paused before round %d", target)
        return target

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def launch_federation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    state_root: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_round: Callable[[Mapping[str, Any]], None] | None = None,
    on_poll: Callable[[Launcher], None] | None = None,
    max_restarts: int = 3,
    stall_seconds: float | None = None,
    poll_seconds: float = 0.2,
    plot: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` with every peer as a local process on loopback and gather a
    run directory (``secure-dfml run``'s layout); returns the summary.

    ``resume=True`` continues an interrupted launch into ``out_dir`` (the peers
    resume from their checkpoints).  A peer that dies is restarted up to
    ``max_restarts`` times.  When no peer reports a round for ``stall_seconds``
    (default: the config's timeouts plus a margin) the launch stops, bounded.
    ``on_poll`` sees the :class:`Launcher` at every poll (fault drills kill
    peers through it)."""
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    partial = partial_dir(run_dir)
    with exclusive(lock_file(run_dir), f"run directory {run_dir}"):
        meta = open_partial(run_dir, resume=resume, overwrite=overwrite, meta_name=LAUNCH, what="launch")
        if meta is not None:
            cfg = read_config(partial)
        else:
            root = Path(state_root) if state_root is not None else default_state_root(cfg)
            meta = {"run_id": os.urandom(16).hex(), "state_root": str(root.resolve())}
        root = Path(meta["state_root"])
        plan = plan_federation(cfg)
        n = len(plan.directory.archs)
        keys_dir = _ensure_keys(cfg, root, n)
        if keys_dir is not None:
            cfg = cfg.replace(crypto={"keys_dir": str(keys_dir)})
        if not resume:
            write_config(partial, cfg)
            atomic_write_bytes(partial / LAUNCH, json.dumps(meta, indent=2).encode("utf-8"))
        addresses = list(cfg.network.addresses) or free_tcp_addresses(n)
        peers_config = partial / "peers.toml"
        peers_config.write_text(dump_toml(cfg.replace(network={"addresses": tuple(addresses)})), encoding="utf-8")
        launcher = Launcher(
            cfg, peers_config=peers_config, keys_dir=keys_dir, state_root=root, run_id=meta["run_id"],
            endpoints=n, max_restarts=max_restarts,
        )
        stall = stall_seconds if stall_seconds is not None else (
            cfg.dfml.return_timeout + 3 * cfg.dfml.sender_timeout + 120.0
        )
        t0 = time.perf_counter()
        records = _drive(launcher, plan, metrics_file(partial), stall, poll_seconds, on_round, on_poll)
        summary = _gather(cfg, plan, launcher, partial, run_dir, records, time.perf_counter() - t0, plot)
        write_manifest(partial)
        swap_into_place(partial, run_dir)
    return summary


def _ensure_keys(cfg: RunConfig, root: Path, n: int) -> Path | None:
    """The key folder the peers load their own key from: the config's, or one
    generated once under the state root (private files 0600; reused later)."""
    if cfg.crypto.channel != "nacl":
        return None
    if cfg.crypto.keys_dir:
        return Path(cfg.crypto.keys_dir)
    keys = root / "keys"
    if not (keys / "directory.json").is_file():
        write_keys(keys, generate_keys(n, cfg.federation.id), overwrite=True)
    return keys.resolve()


def _drive(
    launcher: Launcher,
    plan: Any,
    metrics_path: Path,
    stall: float,
    poll: float,
    on_round: Callable[[Mapping[str, Any]], None] | None,
    on_poll: Callable[[Launcher], None] | None,
) -> list[dict[str, Any]]:
    cfg = launcher.cfg
    rounds = cfg.federation.rounds
    n = launcher.endpoints
    records: list[dict[str, Any]] = []
    for pid in range(n):
        launcher.start(pid)
    last_progress = time.monotonic()
    seen = 0
    try:
        with open(metrics_path, "w", encoding="utf-8") as fh:
            while len(records) < rounds or len(launcher.finished) < n:
                time.sleep(poll)
                if on_poll is not None:
                    on_poll(launcher)
                launcher.check()
                reports = {pid: launcher.reports(pid) for pid in range(n)}
                total = sum(len(r) for r in reports.values())
                if total != seen:
                    seen, last_progress = total, time.monotonic()
                while len(records) < rounds and all(len(r) > len(records) for r in reports.values()):
                    t = len(records)
                    per_peer = [reports[pid][t] for pid in range(n)]
                    record = merge_round(
                        per_peer,
                        plan.strategy.select(plan.directory.num_peers, t),
                        seconds=max(float(r["seconds"]) for r in per_peer),
                        server_id=plan.directory.server_id,
                    )
                    records.append(record)
                    fh.write(json.dumps(record) + "\n")
                    fh.flush()
                    if on_round is not None:
                        on_round(record)
                if time.monotonic() - last_progress > stall:
                    raise TransportError(
                        f"no peer reported a round for {stall:.0f} s (reports so far: "
                        f"{ {pid: len(r) for pid, r in reports.items()} }); stopping the launch"
                    )
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: every peer stops after the same round, for --resume
        launcher.pause_all(timeout=stall)
        raise
    finally:
        launcher.stop_all()
    return records


def _gather(
    cfg: RunConfig, plan: Any, launcher: Launcher, partial: Path, run_dir: Path,
    records: list[dict[str, Any]], seconds: float, plot: bool,
) -> dict[str, Any]:
    """Collect what the peers wrote into the run directory's layout."""
    n = launcher.endpoints
    dones = [json.loads((launcher.state_dir(pid) / DONE).read_text(encoding="utf-8")) for pid in range(n)]
    for sub in (models_dir(partial), ledgers_dir(partial), capture_dir(partial)):
        fresh_dir(sub)
    for pid in range(n):
        sd = launcher.state_dir(pid)
        if pid != plan.directory.server_id:
            for f in models_dir(sd).glob("*.safetensors"):
                shutil.copyfile(f, models_dir(partial) / f.name)
        led = ledger_path(sd, pid)
        if led.is_file():
            shutil.copyfile(led, ledger_file(partial, pid))
        for f in capture_dir(sd).glob("*.env"):
            shutil.copyfile(f, capture_dir(partial) / f.name)
    if not any(ledgers_dir(partial).iterdir()):
        ledgers_dir(partial).rmdir()
    save_views(latest_views([read_views(launcher.state_dir(pid)) for pid in range(n)]), plan.directory.archs, views_dir(partial))
    labels = federation_labels_from_config(cfg, plan, dones[0])
    labels["ledger_scope"] = f"lifetime ledgers: every run on a peer's data is charged to its one ledger in {launcher.state_root}"
    labels["run_id"] = launcher.run_id
    labels["state_root"] = str(launcher.state_root)
    labels["transport"] = f"ZeroMQ over TCP, {n} peer processes"
    labels["restarts"] = {str(k): v for k, v in launcher.restarts.items() if v}
    summary = run_summary(cfg, labels, records, run_dir, seconds, sum(int(d["rejected_messages"]) for d in dones))
    write_summary(partial, summary)
    (partial / LAUNCH).unlink(missing_ok=True)
    (partial / "peers.toml").unlink(missing_ok=True)
    if plot:
        plot_accuracy(records, plot_file(partial), title=f"{cfg.federation.algorithm} on {summary['dataset']} (launched)")
    return summary
