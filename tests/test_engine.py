"""The round engine end to end on small real data (scikit-learn digits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secure_dfml import config_from_dict
from secure_dfml._run import run_federation
from secure_dfml.errors import ConfigError, RunDirectoryError

BASE = {
    "federation": {"rounds": 3, "peers": 6, "participants": 4},
    "data": {"name": "digits", "dirichlet_alpha": 0.3, "auditor_pool": 100},
    "models": {"mix": ["mlp", "cnn-small"]},
    "dfml": {"ml_epochs": 1, "period": 3},
}


def cfg_with(**sections):
    raw = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def strip_times(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if "seconds" not in k}
        r["phases"] = [{k: v for k, v in p.items() if "seconds" not in k} for p in r["phases"]]
        out.append(r)
    return out


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    cfg = cfg_with()
    run_federation(cfg, tmp_path / "a", plot=False)
    torch.manual_seed(999)  # global RNG state must not matter
    run_federation(cfg, tmp_path / "b", plot=False)
    assert strip_times(read_metrics(tmp_path / "a")) == strip_times(read_metrics(tmp_path / "b"))
    other = cfg_with(federation={"seed": 7})
    run_federation(other, tmp_path / "c", plot=False)
    assert strip_times(read_metrics(tmp_path / "a")) != strip_times(read_metrics(tmp_path / "c"))


def test_run_directory_contents(tmp_path):
    summary = run_federation(cfg_with(), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert len(records) == 3
    r = records[-1]
    assert r["peak"] and r["bytes"] > 0 and r["seconds"] >= r["compute_seconds"] > 0
    assert set(r["peers"]) == {str(i) for i in range(6)}
    for p in r["peers"].values():
        assert {"global_acc", "local_acc", "peak_global_acc", "peak_local_acc", "arch"} <= set(p)
    g = r["groups"][0]
    assert g["aggregator"] not in g["senders"] and len(g["senders"]) == 3
    finals = sorted((run / "models").glob("*_final.safetensors"))
    peaks = sorted((run / "models").glob("*_peak.safetensors"))
    assert len(finals) == len(peaks) == 6
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    state = load_file(str(finals[0]))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert json.loads((run / "summary.json").read_text())["mean_global_acc"] == summary["mean_global_acc"]
    assert summary["channel"] == "nacl" and summary["channel_secure"]


def test_missing_senders_never_block_a_round(tmp_path):
    cfg = cfg_with(dfml={"drop_probability": 0.5, "sender_timeout": 0.5}, federation={"rounds": 4})
    run_federation(cfg, tmp_path / "run", plot=False)
    groups = [g for r in read_metrics(tmp_path / "run") for g in r["groups"]]
    assert any(g["missing"] for g in groups)  # some senders were lost ...
    assert len(groups) == 4  # ... and every round still completed


@pytest.mark.parametrize("algorithm", ["gossip-avg", "fedavg-central"])
def test_averaging_baselines_refuse_heterogeneous_models(tmp_path, algorithm):
    with pytest.raises(ConfigError, match="same architecture"):
        run_federation(cfg_with(federation={"algorithm": algorithm}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("algorithm", ["gossip-avg", "fedavg-central", "def-kt", "local"])
def test_baselines_run_on_the_same_engine(tmp_path, algorithm):
    cfg = cfg_with(federation={"algorithm": algorithm}, models={"mix": ["cnn-small"]})
    s = run_federation(cfg, tmp_path / "run", plot=False)
    assert s["algorithm"] == algorithm and 0 <= s["mean_global_acc"] <= 1
    if algorithm == "fedavg-central":
        assert s["server_global_acc"] is not None
    if algorithm in ("gossip-avg", "fedavg-central"):
        # averaged groups return one model to every member
        last = read_metrics(tmp_path / "run")[-1]
        g = last["groups"][0]
        states = [load_file(str(tmp_path / "run" / "models" / f"peer_{p:03d}_final.safetensors")) for p in g["returned"]]
        assert all(torch.equal(states[0][k], s2[k]) for s2 in states[1:] for k in states[0])


def test_existing_results_are_never_overwritten_by_accident(tmp_path):
    cfg = cfg_with(federation={"rounds": 1})
    run_federation(cfg, tmp_path / "run", plot=False)
    marker = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(RunDirectoryError, match="--overwrite"):
        run_federation(cfg, tmp_path / "run", plot=False)
    bad = cfg_with(federation={"algorithm": "gossip-avg", "rounds": 1})
    with pytest.raises(ConfigError):
        run_federation(bad, tmp_path / "run", overwrite=True, plot=False)
    assert (tmp_path / "run" / "summary.json").read_text() == marker  # a failed run leaves earlier results intact


def test_crash_mid_run_keeps_earlier_results_and_the_spent_budget(tmp_path):
    cfg = cfg_with(federation={"rounds": 2}, dfml={"local_epochs": 1}, privacy={"enabled": True, "epsilon": 4.0})
    run_federation(cfg, tmp_path / "run", plot=False)
    marker = (tmp_path / "run" / "summary.json").read_text()

    def crash(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, tmp_path / "run", overwrite=True, plot=False, on_round=crash)
    assert (tmp_path / "run" / "summary.json").read_text() == marker
    ledgers = [json.loads(p.read_text()) for p in sorted((tmp_path / "run.partial" / "ledgers").glob("peer_*.json"))]
    assert ledgers and any(led["entries"] for led in ledgers)  # round 1's mechanisms stay recorded
    run_federation(cfg, tmp_path / "run", overwrite=True, plot=False)  # a rerun replaces the results...
    assert not (tmp_path / "run.partial").exists()
    assert not list(tmp_path.glob(".run.old-*"))
    (kept,) = tmp_path.glob("run.crashed-*")  # ...and moves the crashed run's ledgers aside, never deletes them
    assert [json.loads(p.read_text()) for p in sorted((kept / "ledgers").glob("peer_*.json"))] == ledgers


@pytest.mark.slow
def test_dfml_beats_local_only_on_global_accuracy(tmp_path):
    """Heterogeneous models, non-IID digits: DFML transfers knowledge, local-only cannot."""
    common = dict(
        federation={"rounds": 12, "peers": 6, "participants": 6},
        dfml={"ml_epochs": 2, "period": 10},
    )
    dfml = run_federation(cfg_with(**common), tmp_path / "dfml", plot=False)
    local = run_federation(
        cfg_with(federation={**common["federation"], "algorithm": "local"}, dfml=common["dfml"]),
        tmp_path / "local",
        plot=False,
    )
    assert dfml["mean_global_acc"] >= local["mean_global_acc"] + 0.15, (dfml["mean_global_acc"], local["mean_global_acc"])


def test_ckks_secure_averaging_matches_plaintext_averaging(tmp_path):
    """gossip-avg with CKKS: the aggregator never sees a sender's model, and the
    models everyone ends with equal those of plaintext averaging."""
    common = dict(federation={"algorithm": "gossip-avg", "rounds": 2, "participants": 5}, models={"mix": ["cnn-small"]})
    plain = run_federation(cfg_with(**common), tmp_path / "plain", plot=False)
    secure = run_federation(cfg_with(**common, crypto={"secure_aggregation": "ckks"}), tmp_path / "ckks", plot=False)
    assert secure["secure_aggregation"] == "ckks" and plain["secure_aggregation"] == "none"
    groups = [g for r in read_metrics(tmp_path / "ckks") for g in r["groups"]]
    assert all(g["secure_sums"] and not g["received"] for g in groups)  # no individual model travelled
    assert not (tmp_path / "ckks" / "views" / "received").exists()
    for f in sorted((tmp_path / "plain" / "models").glob("*_final.safetensors")):
        a, b = load_file(str(f)), load_file(str(tmp_path / "ckks" / "models" / f.name))
        for k in a:
            # CKKS is approximate (about 1e-6 per average); round 2's training amplifies round 1's error
            assert torch.linalg.norm(a[k] - b[k]) <= 1e-3 * max(1.0, float(torch.linalg.norm(a[k]))), (f.name, k)


def test_a_model_that_does_not_train_is_flagged(tmp_path):
    """lr far too large: the mlp diverges or stays at chance, and the run says so (never silently)."""
    cfg = cfg_with(federation={"rounds": 2, "peers": 3, "participants": 3}, models={"mix": ["mlp"]},
                   dfml={"lr": 1e4, "local_epochs": 1, "ml_epochs": 1})
    s = run_federation(cfg, tmp_path / "run", plot=False)
    assert s["warnings"] and any("diverged" in w or "at chance" in w for w in s["warnings"])
    fine = run_federation(cfg_with(federation={"rounds": 3}), tmp_path / "ok", plot=False)
    assert not any("diverged" in w for w in fine["warnings"])
