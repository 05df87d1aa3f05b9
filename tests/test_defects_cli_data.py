"""Regression tests for KNOWN-DEFECTS.md: CLI messages, data readers, models, Opacus compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_dfml.cli.main import app

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
