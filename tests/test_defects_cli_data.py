"""Regression tests for KNOWN-DEFECTS.md: CLI messages, data readers, models, Opacus compatibility."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import secure_dfml.config as config_module
from secure_dfml.audit._rundir import audit_run_dir
from secure_dfml.cli import run as cli_run
from secure_dfml.cli.main import app
from secure_dfml.config import DataConfig, config_from_dict, load_config
from secure_dfml.crypto import NaClChannel, envelope_overhead, generate_keys
from secure_dfml.data import load_dataset
from secure_dfml.errors import AuditError, ConfigError, CryptoError, ModelError
from secure_dfml.models import MODEL_REGISTRY, available_models, build_model, resolve_architectures

runner = CliRunner()


# ---------------------------------------------------------------------------
# 1. the CLI prints the library's message literally (no rich markup)


def test_cli_error_keeps_bracketed_section_names(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[data]\nname = "digits"\ndirichlet_alpah = 0.3\n')
    result = runner.invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "unknown key(s) 'dirichlet_alpah' in [data]; allowed keys:" in result.output


def test_cli_error_keeps_nested_section_names_and_examples(tmp_path: Path) -> None:
    cfg = tmp_path / "peers.toml"
    cfg.write_text('[data]\nname = "digits"\n[privacy.peers.x]\nepsilon = 2.0\n')
    result = runner.invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "e.g. [privacy.peers.3]" in result.output


# ---------------------------------------------------------------------------
# 3. a directory given as a config, a file given as a run directory


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    result = runner.invoke(app, ["run", "--config", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a directory" in result.output and "does not exist" not in result.output


def test_audit_given_a_file_says_it_is_not_a_run_directory(tmp_path: Path) -> None:
    f = tmp_path / "summary.json"
    f.write_text("{}")
    result = runner.invoke(app, ["audit", str(f), "-t", "final-model"])
    assert result.exit_code == 2
    assert "is a file, not a run directory" in result.output and "does not exist" not in result.output
    with pytest.raises(AuditError, match="is a file, not a run directory"):
        audit_run_dir(f, threat_model="final-model", rng=np.random.default_rng(0))


# ---------------------------------------------------------------------------
# 7. --attacks '' is an error, not the default attacks


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_audit_empty_attack_list_is_an_error(tmp_path: Path, value: str) -> None:
    (tmp_path / "run").mkdir()
    result = runner.invoke(app, ["audit", str(tmp_path / "run"), "-t", "final-model", "--attacks", value])
    assert result.exit_code == 2
    assert "names no attack" in result.output and "--attacks loss,population" in result.output


# ---------------------------------------------------------------------------
# 4. data.path with a bundled built-in name is an error, not silently ignored


@pytest.mark.parametrize("name", ["fashion-mnist-mini", "digits", "breast-cancer"])
def test_data_path_with_a_bundled_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name=name, path=str(tmp_path)))
    msg = str(info.value)
    assert f"data.name = {name!r}" in msg and "data.path" in msg and "a name of your own" in msg
    assert "remove data.path" in msg
    assert "bundled with scikit-learn" not in msg


def test_data_path_with_the_default_name_is_refused(tmp_path: Path) -> None:
    # only data.path set: the default name fashion-mnist-mini must not silently win
    with pytest.raises(ConfigError, match=r"fashion-mnist-mini.*shipped with secure_dfml.*my-data"):
        load_dataset(DataConfig(path=str(tmp_path)))


# ---------------------------------------------------------------------------
# 9. max_message_bytes too small: the message names the key and the minimum


def test_channel_max_message_bytes_error_names_key_and_minimum() -> None:
    minimum = envelope_overhead() + 1024
    keyring = generate_keys(2, "fed")
    with pytest.raises(CryptoError) as info:
        NaClChannel(keyring=keyring, max_message_bytes=1024)
    msg = str(info.value)
    assert "crypto.max_message_bytes" in msg and "= 1024" in msg and f"minimum is {minimum} bytes" in msg
    NaClChannel(keyring=keyring, max_message_bytes=minimum)  # the minimum itself is accepted


def test_config_max_message_bytes_minimum_matches_the_channel() -> None:
    minimum = config_module.MIN_MESSAGE_BYTES
    assert minimum == envelope_overhead() + 1024
    expected = rf"crypto\.max_message_bytes = 1024 is invalid: expected an integer >= {minimum}"
    with pytest.raises(ConfigError, match=expected):
        config_from_dict({"crypto": {"max_message_bytes": 1024}})
    assert config_from_dict({"crypto": {"max_message_bytes": minimum}}).crypto.max_message_bytes == 1200


# ---------------------------------------------------------------------------
# 10. an invalid data kind names the valid kinds and lists the architectures


def test_build_model_with_an_invalid_kind_names_the_kinds_and_architectures() -> None:
    with pytest.raises(ModelError) as info:
        build_model("cnn-tiny", input_shape=(1, 8, 8), num_classes=10, kind="images",
                    generator=torch.Generator().manual_seed(0))
    msg = str(info.value)
    assert "kind = 'images'" in msg and "'image', 'tabular'" in msg
    assert "choose one of: ." not in msg
    for name in MODEL_REGISTRY:
        assert name in msg
    with pytest.raises(ModelError, match="'image', 'tabular'"):
        resolve_architectures(3, kind="images")
    with pytest.raises(ModelError, match="'image', 'tabular'"):
        available_models("images")


# ---------------------------------------------------------------------------
# 12. readable at 80 columns: run --help and the result table


def test_run_help_is_readable_at_80_columns() -> None:
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    env.pop("FORCE_COLOR", None)
    out = subprocess.run(
        [sys.executable, "-m", "secure_dfml.cli.main", "run", "--help"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "--compare-non-private" in out and "--no-compare-non-private" in out
    assert "federation.algorithm" in out and "federation.rounds" in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def _summary(*, dp: bool) -> dict[str, Any]:
    archs = ["scatter-linear", "scatter-cnn", "scatter-mlp", "mlp-small", "tab-mlp-small", "resnet-gn"]
    peers: dict[str, Any] = {}
    for i in range(10):
        p: dict[str, Any] = {"arch": archs[i % len(archs)], "global_acc": 0.8123, "local_acc": 0.9,
                             "peak_global_acc": 0.83, "peak_local_acc": 1.0}
        if dp:
            p.update(epsilon_spent=7.99, epsilon_target=8.0, status="exhausted at round 17" if i % 2 else "active")
        peers[str(i)] = p
    return {"algorithm": "dfml", "dataset": "fashion-mnist-mini", "rounds": 20, "peers": peers,
            "mean_global_acc": 0.8, "mean_local_acc": 0.9, "mean_peak_global_acc": 0.81, "mean_peak_local_acc": 0.92,
            "privacy_label": "DP-SGD", "channel_description": "NaCl envelopes", "secure_aggregation": "none",
            "seconds_per_round": 1.0, "compute_seconds_per_round": 0.5, "crypto_seconds_per_round": 0.01,
            "bytes_per_round": 1e6, "run_dir": "runs/x", "warning": "check [data] section"}


@pytest.mark.parametrize("dp", [True, False])
def test_result_table_is_readable_at_80_columns(monkeypatch: pytest.MonkeyPatch, dp: bool) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(cli_run, "console", Console(file=buf, width=80, force_terminal=False, color_system=None))
    summary = _summary(dp=dp)
    cli_run.print_summary(summary)
    out = buf.getvalue()
    assert "…" not in out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()}
    assert len(rows) == 10
    for pid, p in summary["peers"].items():
        assert f" {p['arch']} " in rows[pid]  # whole name, on the peer's own line
        if dp:
            assert "7.99/8.00" in rows[pid] and p["status"] in rows[pid]
    assert "check [data] section" in out  # printed literally
