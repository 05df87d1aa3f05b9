"""The `secure-dfml` command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from secure_dfml.cli.main import app

runner = CliRunner()

SMALL = """
[federation]
peers = 4
participants = 3
rounds = 2
[data]
name = "digits"
auditor_pool = 100
[models]
mix = ["mlp", "cnn-small"]
[dfml]
ml_epochs = 1
period = 2
"""


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "keys", "budget", "audit", "tune"):
        assert cmd in result.output
    assert runner.invoke(app, ["run", "--help"]).exit_code == 0


def test_run_json_summary(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rounds"] == 2 and summary["run_dir"] == str(out)
    assert set(summary["peers"]) == {"0", "1", "2", "3"}
    assert (out / "summary.json").is_file()


def test_run_table_output(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "run directory" in result.output and "cnn-small" in result.output


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    result = runner.invoke(app, ["run", "--config", str(cfg), "--algorithm", "gossip-avg", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "same architecture" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[dfml]\nalpha_max = 7\n")
    result = runner.invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "dfml.alpha_max" in result.output
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_built_in_run_is_private_and_reports_the_cost_of_privacy(tmp_path):
    # the README's first command, shortened to 3 rounds: no config, DP on, non-private twin
    out = tmp_path / "builtin"
    result = runner.invoke(app, ["run", "--rounds", "3", "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["dataset"] == "fashion-mnist-mini"
    peers = summary["peers"].values()
    assert all(0 < p["epsilon_spent"] <= p["epsilon_target"] == 8.0 for p in peers if p.get("epsilon_spent"))
    assert any(p.get("epsilon_spent") for p in peers)
    twin = summary["non_private_twin"]
    assert 0.0 < summary["mean_global_acc"] <= 1.0 and 0.0 < twin["mean_global_acc"] <= 1.0
    assert (out / "ledgers").is_dir()


@pytest.mark.parametrize("where", ["file", "uncreatable"])
def test_bad_out_is_one_line_and_exit_2(tmp_path, where):
    """--out at an existing file, or where nothing can be created: a one-line error, no traceback."""
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "a-file" if where == "file" else tmp_path / "a-file" / "below" / "run"
    (tmp_path / "a-file").write_text("not a folder")
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert ("is a file, not a directory" if where == "file" else "cannot use") in result.output


def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_a_non_private_run_says_so_before_it_starts(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "run"), "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.index("NON-PRIVATE run") < result.output.index("round 1/1")
    assert "participants" in result.output  # progress: rounds, participants, time per round


def test_run_reads_sealed_keys_with_a_passphrase_file(tmp_path):
    keys = tmp_path / "keys"
    pw = tmp_path / "pw.txt"
    pw.write_text("correct horse battery staple\n")
    init = runner.invoke(app, ["keys", "init", "--peers", "4", "--out", str(keys), "--federation", "sealed",
                               "--passphrase-file", str(pw), "--kdf", "interactive"])
    assert init.exit_code == 0, init.output
    cfg = tmp_path / "sealed.toml"
    cfg.write_text(SMALL.replace("[federation]\n", '[federation]\nid = "sealed"\n') + f'[crypto]\nkeys_dir = "{keys}"\n')
    missing = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "a"), "--rounds", "1"])
    assert missing.exit_code == 2
    assert "--passphrase-file" in missing.output and "SECURE_DFML_KEY_PASSPHRASE" in missing.output
    ok = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "b"), "--rounds", "1",
                             "--passphrase-file", str(pw)])
    assert ok.exit_code == 0, ok.output


def test_no_progress_line_before_a_config_error(tmp_path):
    """Defect 11: 'round 0/30 building federation' was printed before the error, with the default round count."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(SMALL + "\n[dfml2]\nx = 1\n")  # an unknown section: refused before any training
    result = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "unknown key" in result.output
    assert "round" not in result.output.split("error:")[0]
