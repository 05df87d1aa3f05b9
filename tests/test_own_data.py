"""Peers with data of their own (data.peer_paths) and declared, public sizes."""

from __future__ import annotations

import json

import pytest
from sklearn.datasets import load_breast_cancer

from secure_dfml import config_from_dict, run_federation
from secure_dfml._run import peer_train_sizes, plan_federation
from secure_dfml.errors import ConfigError


def _csv(path, rows):
    d = load_breast_cancer()
    with open(path, "w") as fh:
        fh.write(",".join([f"f{i}" for i in range(30)] + ["label"]) + "\n")
        for x, y in zip(d.data[rows], d.target[rows]):
            fh.write(",".join(repr(float(v)) for v in x) + f",{y}\n")


def _cfg(own, declared):
    return config_from_dict({
        "federation": {"peers": 3, "participants": 3, "rounds": 2},
        "data": {"name": "breast-cancer", "auditor_pool": 50, "peer_paths": ["", str(own), ""],
                 "declared_train": declared, "label_column": "label"},
        "models": {"mix": ["tab-mlp-small"]},
        "dfml": {"ml_epochs": 1},
    })


def test_a_peer_trains_on_its_own_records_with_public_declared_sizes(tmp_path):
    own = tmp_path / "hospital-b.csv"
    _csv(own, slice(0, 200))
    shards = peer_train_sizes(_cfg(own, [1, 1, 1]).replace(data={"peer_paths": (), "declared_train": ()}))
    with pytest.raises(ConfigError, match=r"declare 140"):
        run_federation(_cfg(own, [shards[0], 1, shards[2]]), tmp_path / "bad", plot=False)
    with pytest.raises(ConfigError, match=rf"declare {shards[0]}"):
        run_federation(_cfg(own, [shards[0] + 1, 140, shards[2]]), tmp_path / "bad2", plot=False)
    summary = run_federation(_cfg(own, [shards[0], 140, shards[2]]), tmp_path / "run", plot=False)
    assert summary["train_samples_per_peer"] == [shards[0], 140, shards[2]]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 2


def test_own_paths_need_declared_sizes(tmp_path):
    own = tmp_path / "own.csv"
    _csv(own, slice(0, 50))
    with pytest.raises(ConfigError, match="declared_train"):
        plan_federation(_cfg(own, []))
