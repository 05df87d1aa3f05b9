"""Real peers: every peer its own process over ZeroMQ on loopback (slow: each
process imports torch and loads its shard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zmq
from _runs import config_with, timeless_metrics

from secure_dfml import run_federation
from secure_dfml._fsutil import exclusive
from secure_dfml.crypto import generate_keys, seal_state
from secure_dfml.crypto._channel import NaClChannel
from secure_dfml.orchestration.launch import launch_federation
from secure_dfml.privacy import PrivacyLedger
from secure_dfml.protocol.strategies import build_strategy
from secure_dfml.transport import read_capture
from secure_dfml.transport._zmq import encode_header

pytestmark = pytest.mark.slow

BASE = {
    "federation": {"id": "launch-test", "rounds": 3, "peers": 4, "participants": 4, "groups": 1},
    "data": {"name": "digits", "auditor_pool": 100},
    "models": {"mix": ["mlp-small", "cnn-tiny"]},
    "dfml": {"ml_epochs": 1, "period": 2, "local_epochs": 1, "sender_timeout": 60.0, "return_timeout": 120.0},
    "privacy": {"enabled": True, "epsilon": 4.0},
}


def cfg_with(**sections):
    return config_with(BASE, **sections)




def test_peer_processes_equal_the_simulation_and_survive_a_garbage_flood(tmp_path):
    """4 peer processes (digits, 3 rounds, DP, NaCl envelopes over ZeroMQ) give
    exactly the simulation's metrics, although peer 0 is flooded with garbage
    frames and with well-formed envelopes sealed by keys outside the federation."""
    cfg = cfg_with()
    sim = run_federation(cfg, tmp_path / "sim", plot=False)
    flooded = {"done": False}
    ctx = zmq.Context()

    def flood(launcher):
        if flooded["done"]:
            return
        cfg_peers = launcher.peers_config.read_text()
        address = cfg_peers.split("addresses = [")[1].split(",")[0].strip().strip('"')
        sock = ctx.socket(zmq.PUSH)  # queued until peer 0 binds; kept open for the whole launch
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        flooded["socket"] = sock
        rng = np.random.default_rng(0)
        strangers = NaClChannel(keyring=generate_keys(4, "launch-test"))  # the right federation id, other keys
        for i in range(300):
            kind = ("model", "return")[i % 2]
            if i % 3 == 0:
                frames = [rng.bytes(int(rng.integers(1, 80)))]
            elif i % 3 == 1:
                frames = [encode_header(1 + i % 3, 0, i % 3, kind), rng.bytes(500)]
            else:
                forger = 1 + (i // 3) % 3
                env = seal_state(strangers, {"w": torch.zeros(3)}, sender=forger, recipient=0, round_index=i % 3, kind=kind)
                frames = [encode_header(forger, 0, i % 3, kind), env]
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        flooded["done"] = True

    try:
        launched = launch_federation(cfg, tmp_path / "net", state_root=tmp_path / "state", on_poll=flood, plot=False)
    finally:
        if "socket" in flooded:
            flooded["socket"].close()
        ctx.term()
    assert timeless_metrics(tmp_path / "net") == timeless_metrics(tmp_path / "sim")
    assert launched["mean_global_acc"] == sim["mean_global_acc"]
    assert launched["rejected_messages"] > 0  # the forged envelopes reached peer 0 and were refused
    for name in ("config.toml", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "net" / name).is_file()
    assert sorted(p.name for p in (tmp_path / "net" / "models").glob("*_final.safetensors")) == [
        f"peer_{i:03d}_final.safetensors" for i in range(4)
    ]
    for led in (tmp_path / "net" / "ledgers").glob("peer_*.json"):
        PrivacyLedger.load(led)  # verifies every entry with the accountant
    captured = read_capture(tmp_path / "net" / "capture")
    assert captured and {c.kind for c in captured} == {"model", "return"}
    assert not any(c.sender == c.recipient for c in captured)
    # the private keys the launcher generated stay beside the peers' state, not in the run directory
    assert not list((tmp_path / "net").rglob("*.key"))


def test_killed_sender_and_aggregator_are_restarted_and_the_run_completes(tmp_path):
    # rounds long enough (3 epochs each way) that a 0.2 s poll sees each of them start
    cfg = cfg_with(federation={"rounds": 4}, dfml={"sender_timeout": 4.0, "return_timeout": 20.0, "ml_epochs": 3,
                                                   "local_epochs": 3})
    groups = [build_strategy(cfg).select(4, t)[0] for t in range(4)]
    victims = {groups[1].senders[0]: 1, groups[2].aggregator: 2}  # peer -> kill when it starts that round
    killed: dict[int, int] = {}
    spent: dict[int, list[float]] = {}

    def faults(launcher):
        for pid, rnd in victims.items():
            # at or past the start of that round (a poll can miss a short round), still running
            alive = pid in launcher.procs and launcher.procs[pid].poll() is None
            if pid not in killed and alive and rnd <= len(launcher.reports(pid)) < launcher.cfg.federation.rounds:
                launcher.kill(pid)
                killed[pid] = rnd
        for pid in range(4):
            led = launcher.state_dir(pid) / f"peer_{pid}.json"
            if led.is_file():
                spent.setdefault(pid, []).append(json.loads(led.read_text())["spent_epsilon"])

    summary = launch_federation(cfg, tmp_path / "run", state_root=tmp_path / "state", on_poll=faults, plot=False)
    assert set(killed) == set(victims)
    assert summary["rounds"] == 4 and summary["restarts"] == {str(p): 1 for p in victims}
    for pid, series in spent.items():
        assert series == sorted(series)  # a ledger never went back
    for led in (tmp_path / "run" / "ledgers").glob("peer_*.json"):
        PrivacyLedger.load(led)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]


def test_a_second_process_into_the_same_state_directory_is_refused(tmp_path):
    cfg_path = tmp_path / "fed.toml"
    cfg_path.write_text(
        '[federation]\nid = "x"\npeers = 2\nparticipants = 2\nrounds = 1\n[data]\nname = "digits"\nauditor_pool = 100\n'
        '[network]\naddresses = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]\n'
    )
    state = tmp_path / "state"
    with exclusive(state / "lock", "state directory"):
        proc = subprocess.run(
            [sys.executable, "-m", "secure_dfml.cli.main", "peer", "--config", str(cfg_path), "--id", "0",
             "--state", str(state), "--keys", str(tmp_path / "nokeys")],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        )
    assert proc.returncode == 2
    assert "in use" in proc.stderr and str(state) in proc.stderr


def test_an_interrupted_launch_pauses_the_peers_in_step_and_resumes_to_the_same_metrics(tmp_path):
    # rounds long enough (3 epochs each way) that the pause lands before the last of 6 rounds
    cfg = cfg_with(federation={"rounds": 6}, dfml={"ml_epochs": 3, "local_epochs": 3})
    run_federation(cfg, tmp_path / "sim", plot=False)

    def interrupt(record):
        if record["round"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch_federation(cfg, tmp_path / "net", state_root=tmp_path / "state", on_round=interrupt, plot=False)
    assert not (tmp_path / "net").exists() and (tmp_path / "net.partial").is_dir()
    done = {len((tmp_path / "state" / f"peer_{i:03d}" / "reports.jsonl").read_text().splitlines()) for i in range(4)}
    assert len(done) == 1 and done.pop() < 6  # every peer stopped after the same round
    launch_federation(cfg, tmp_path / "net", resume=True, plot=False)
    assert timeless_metrics(tmp_path / "net") == timeless_metrics(tmp_path / "sim")
