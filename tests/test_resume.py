"""Checkpoints, resume, lifetime ledgers and locks: spent budget is never rolled back."""

from __future__ import annotations

import json

import pytest
from _runs import config_with, timeless_metrics

from secure_dfml import run_federation
from secure_dfml._fsutil import exclusive
from secure_dfml._run import peer_state_lock
from secure_dfml.errors import RunDirectoryError
from secure_dfml.privacy import _trainer

BASE = {
    "federation": {"rounds": 3, "peers": 4, "participants": 4, "groups": 2},
    "data": {"name": "digits", "auditor_pool": 100},
    "models": {"mix": ["mlp-small", "cnn-tiny"]},
    "dfml": {"ml_epochs": 1, "period": 2, "local_epochs": 1},
    "privacy": {"enabled": True, "epsilon": 4.0},
}


def cfg_with(**sections):
    return config_with(BASE, **sections)




def entries(path):
    return [(e["round"], e["phase"], e["noise_multiplier"], e["sample_rate"], e["steps"], e["epsilon_after"])
            for e in json.loads(path.read_text())["entries"]]


class Stop(Exception):
    pass


def test_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = cfg_with()
    run_federation(cfg, tmp_path / "full", plot=False)

    def stop_after_round_1(record):
        if record["round"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run_federation(cfg, tmp_path / "cut", plot=False, on_round=stop_after_round_1)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "checkpoints").is_dir()
    run_federation(cfg, tmp_path / "cut", plot=False, resume=True)
    assert timeless_metrics(tmp_path / "cut") == timeless_metrics(tmp_path / "full")
    for led in sorted((tmp_path / "full" / "ledgers").glob("peer_*.json")):
        assert entries(tmp_path / "cut" / "ledgers" / led.name) == entries(led)
    assert not (tmp_path / "cut.partial").exists()


def test_a_kill_between_a_ledger_write_and_the_checkpoint_leaves_the_budget_spent(tmp_path, monkeypatch):
    cfg = cfg_with()
    real = _trainer.run_dp_sgd
    calls = {"n": 0}

    def dies_in_round_2(*args, **kwargs):
        # the ledger has already recorded this phase when DP-SGD starts
        if kwargs.get("lr") is not None and calls["n"] >= 6:
            raise Stop
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_trainer, "run_dp_sgd", dies_in_round_2)
    with pytest.raises(Stop):
        run_federation(cfg, tmp_path / "run", plot=False)
    ledgers = tmp_path / "run.partial" / "ledgers"
    spent_at_crash = {p.name: json.loads(p.read_text())["spent_epsilon"] for p in ledgers.glob("peer_*.json")}
    entries_at_crash = {p.name: entries(p) for p in ledgers.glob("peer_*.json")}
    monkeypatch.setattr(_trainer, "run_dp_sgd", real)
    run_federation(cfg, tmp_path / "run", plot=False, resume=True)
    for name, spent in spent_at_crash.items():
        after = json.loads((tmp_path / "run" / "ledgers" / name).read_text())
        assert after["spent_epsilon"] >= spent  # never rolled back
        assert entries(tmp_path / "run" / "ledgers" / name)[: len(entries_at_crash[name])] == entries_at_crash[name]
        assert after["spent_epsilon"] <= after["target_epsilon"] * (1 + 1e-6)  # the gate still holds


def test_lifetime_ledgers_are_charged_by_every_run_and_never_reset(tmp_path):
    cfg = cfg_with(federation={"rounds": 2}, privacy={"enabled": True, "epsilon": 2.0})
    state = tmp_path / "state"
    first = run_federation(cfg, tmp_path / "a", plot=False, state_root=state)
    assert "lifetime" in first["ledger_scope"]
    spent1 = {p: first["peers"][p]["epsilon_spent"] for p in first["peers"]}
    second = run_federation(cfg, tmp_path / "b", plot=False, state_root=state)
    for p, e in spent1.items():
        assert e > 1.9  # the first run spent (almost) all of its 2.0
        assert second["peers"][p]["epsilon_spent"] >= e  # the second run starts from there
        assert second["peers"][p]["epsilon_spent"] <= 2.0 * (1 + 1e-6)
    ledger = json.loads((state / "peer_000" / "peer_0.json").read_text())
    runs = [e["run"] for e in ledger["entries"]]
    first_run = runs[0]
    sigma1 = max(e["noise_multiplier"] for e in ledger["entries"] if e["run"] == first_run and e["phase"] != "class_prior")
    later = [e for e in ledger["entries"] if e["run"] != first_run]
    # what little budget was left is spent only with far more noise; the rest is refused
    assert all(e["noise_multiplier"] > 10 * sigma1 for e in later)
    assert ledger["refusals"]


def test_research_ledgers_are_labelled_and_overwrite_archives_them(tmp_path):
    cfg = cfg_with(federation={"rounds": 1})
    s = run_federation(cfg, tmp_path / "run", plot=False)
    assert "per-run research ledgers" in s["ledger_scope"]
    before = {p.name: p.read_text() for p in (tmp_path / "run" / "ledgers").glob("*.json")}
    run_federation(cfg, tmp_path / "run", plot=False, overwrite=True)
    archived = list((tmp_path / "run.ledger-archive").glob("*/peer_*.json"))
    assert {p.name: p.read_text() for p in archived} == before


def test_a_second_process_into_the_same_run_directory_is_refused(tmp_path):
    with exclusive(tmp_path / ".run.lock", "run directory"):
        with pytest.raises(RunDirectoryError, match="in use"):
            run_federation(cfg_with(federation={"rounds": 1}), tmp_path / "run", plot=False)


def test_a_lifetime_ledger_in_use_by_another_process_is_refused(tmp_path):
    """A peer process (or another run or sweep) charging peer 1's lifetime ledger holds
    its state directory's lock: a run with the same --state waits for nobody, it is refused."""
    state = tmp_path / "state"
    with exclusive(peer_state_lock(state, 1), "state directory of peer 1"):
        with pytest.raises(RunDirectoryError, match="in use"):
            run_federation(cfg_with(federation={"rounds": 1}), tmp_path / "run", plot=False, state_root=state)
    assert not list(tmp_path.glob("run*"))  # nothing started: no partial or crashed folder left behind
    run_federation(cfg_with(federation={"rounds": 1}), tmp_path / "run", plot=False, state_root=state)  # free again


def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirectoryError, match="nothing to resume"):
        run_federation(cfg_with(), tmp_path / "none", plot=False, resume=True)


def test_a_run_that_fails_before_training_leaves_no_partial_folder(tmp_path):
    bad = cfg_with(federation={"algorithm": "gossip-avg"})  # heterogeneous models: refused before training
    with pytest.raises(Exception, match="same architecture"):
        run_federation(bad, tmp_path / "run", plot=False)
    assert not list(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == [".run.lock"]


def test_budget_show_names_an_interrupted_run_beside_the_run_directory(tmp_path):
    from typer.testing import CliRunner

    from secure_dfml.cli.main import app

    cfg = cfg_with(federation={"rounds": 2})

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        run_federation(cfg, tmp_path / "run", plot=False, on_round=stop)
    run_federation(cfg, tmp_path / "run", plot=False)  # a new run keeps the interrupted one aside
    crashed = list(tmp_path.glob("run.crashed-*"))
    assert len(crashed) == 1 and list((crashed[0] / "ledgers").glob("peer_*.json"))
    result = CliRunner().invoke(app, ["budget", "show", str(tmp_path / "run")])
    assert result.exit_code == 0 and "interrupted run" in result.output and crashed[0].name in result.output
