"""Helpers shared by the run-level tests (simulation, nodes, resume, launch)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_dfml import config_from_dict
from secure_dfml.config import RunConfig


def config_with(base: Mapping[str, Any], **sections: Mapping[str, Any]) -> RunConfig:
    """``base`` (a plain config dict) with each section updated by ``sections``."""
    raw = json.loads(json.dumps(base))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def strip_seconds(record: Any) -> Any:
    """A metrics record without its timings (every key that names seconds), at any depth."""
    if isinstance(record, dict):
        return {k: strip_seconds(v) for k, v in record.items() if "seconds" not in k}
    if isinstance(record, list):
        return [strip_seconds(v) for v in record]
    return record


def timeless_metrics(run_dir: Path) -> list[Any]:
    """A run directory's metrics.jsonl without timings: what must be equal between equal runs."""
    return [strip_seconds(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: The smallest private federation the certification tests certify (digits, 4 peers, DP at epsilon 8).
TINY_PRIVATE: dict[str, Any] = {
    "data": {"name": "digits", "auditor_pool": 200},
    "federation": {"peers": 4, "participants": 3, "rounds": 2},
    "models": {"mix": ["mlp"]},
    "dfml": {"local_epochs": 1},
    "privacy": {"enabled": True, "epsilon": 8.0},
}


def copy_run(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped run directory, for a test that edits it."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst
