"""Regression tests for KNOWN-DEFECTS.md: CLI messages, data readers, models, Opacus compatibility."""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import subprocess
import sys
import tarfile
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer_module
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample import gsm_base as opacus_gsm_base
from opacus.optimizers import DPOptimizer
from rich.console import Console
from typer.testing import CliRunner

import secure_dfml.config as config_module
from secure_dfml.audit._rundir import audit_run_dir
from secure_dfml.cli import run as cli_run
from secure_dfml.cli.main import app
from secure_dfml.config import DataConfig, config_from_dict, load_config
from secure_dfml.crypto import EnvelopeError, MissingKeyError, NaClChannel, envelope_overhead, generate_keys
from secure_dfml.data import _readers, load_dataset
from secure_dfml.data._readers import ImageCollection, read_idx
from secure_dfml.errors import AuditError, ConfigError, CryptoError, DataError, ModelError
from secure_dfml.models import MODEL_REGISTRY, available_models, build_model, resolve_architectures
from secure_dfml.privacy import _dpsgd as opacus_dpsgd
from secure_dfml.privacy import _opacus_compat as opacus_compat
from secure_dfml.privacy._dpsgd import DPSGDSession

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


# ---------------------------------------------------------------------------
# 17. idx sizes with Python ints and a cap; capped streaming decompression


def _idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


def test_idx_header_with_huge_sizes_is_refused_with_a_positive_size(tmp_path: Path) -> None:
    dims = (0xFFFFFFFF, 0xFFFFFFFF, 0x7FFFFFFF)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(_idx_header(dims) + b"\0" * 64)
    with pytest.raises(DataError) as info:
        read_idx(f)
    msg = str(info.value)
    assert f"{math.prod(dims):,} bytes" in msg and "exceeds the limit" in msg and "MAX_IDX_BYTES" in msg
    assert "-" not in msg.split("announces", 1)[1].split("exceeds")[0]  # never a negative byte count


def test_idx_gzip_bomb_is_not_decompressed_whole(tmp_path: Path) -> None:
    # a 10-byte idx header followed by 64 MiB of zeros: a ~64 KB gzip file
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(f, "wb") as gz:
        gz.write(_idx_header((10,)) + b"\1" * 10)
        zeros = b"\0" * (1 << 20)
        for _ in range(64):
            gz.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"holds more than 10 bytes"):
            read_idx(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"peak {peak:,} bytes: the stream was decompressed whole"


def test_idx_still_reads_plain_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_header(arr.shape) + arr.tobytes()
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data))
    for name in ("a", "a.gz"):
        assert np.array_equal(read_idx(tmp_path / name), arr)
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(DataError, match="holds 21 bytes; the file is truncated"):
        read_idx(tmp_path / "short")


def _tarball(tmp_path: Path, mode: str, payload: int) -> Path:
    Image = pytest.importorskip("PIL.Image")
    src = tmp_path / "src"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = src / split / c
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 5), 7, np.uint8)).save(d / "0.png")
    (src / "padding.bin").write_bytes(b"\0" * payload)
    suffix = {"w:gz": ".tar.gz", "w:bz2": ".tar.bz2", "w:xz": ".tar.xz", "w": ".tar"}[mode]
    out = tmp_path / f"imgs{suffix}"
    with tarfile.open(out, mode) as tf:  # type: ignore[call-overload]
        for split in ("train", "test"):
            tf.add(src / split, arcname=split)
        tf.add(src / "padding.bin", arcname="padding.bin")
    return out


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_tarball_decompressed_size_is_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, in_memory: bool
) -> None:
    path = _tarball(tmp_path, mode, payload=3 << 20)
    if not in_memory:
        monkeypatch.setattr(_readers, "IN_MEMORY_TAR_LIMIT", 0)  # tarfile's member-by-member path
    coll = ImageCollection.from_tarball(path)  # under the default cap: read as before
    assert sorted((e.split, e.label_name) for e in coll.entries) == [
        ("test", "cat"), ("test", "dog"), ("train", "cat"), ("train", "dog")]
    assert all(coll.read(e)[:4] == b"\x89PNG" for e in coll.entries)
    monkeypatch.setattr(_readers, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    with pytest.raises(DataError, match=r"exceeds the limit of 1,048,576 bytes.*MAX_DECOMPRESSED_BYTES"):
        ImageCollection.from_tarball(path)


# ---------------------------------------------------------------------------
# 22. SECURITY.md names the refusals that are not EnvelopeErrors


def test_security_md_names_refusals_that_are_not_envelope_errors() -> None:
    text = (Path(__file__).resolve().parents[1] / "SECURITY.md").read_text(encoding="utf-8")
    start = text.index("Every refusal")
    paragraph = " ".join(text[start : text.index("\n\n", start)].split())
    assert "MissingKeyError" in paragraph and "not loaded" in paragraph
    assert "Every refusal raises a subclass of `EnvelopeError`" not in paragraph
    # and the behaviour it describes
    keyring = generate_keys(2, "fed")
    ch = NaClChannel(keyring=keyring)
    env = ch.seal(b"m", sender=0, recipient=1, round_index=0, kind="model")
    with pytest.raises(MissingKeyError) as info:
        ch.open(env, sender=0, recipient=7, round_index=0, kind="model")
    assert isinstance(info.value, CryptoError) and not isinstance(info.value, EnvelopeError)
    with pytest.raises(CryptoError) as info2:
        ch.open(env, sender=0, recipient=1, round_index=0, kind="bad kind!")
    assert not isinstance(info2.value, EnvelopeError)


# ---------------------------------------------------------------------------
# 23. Opacus: an upper bound, and the internals checked in one compatibility module


def test_opacus_internals_used_by_dp_sgd_are_present(monkeypatch: pytest.MonkeyPatch) -> None:
    assert opacus_compat.check_opacus_internals() == []
    monkeypatch.setattr(opacus_compat, "_verified", False)
    opacus_compat.require_opacus_internals()  # the installed Opacus passes


def test_opacus_bound_in_pyproject_matches_the_compat_module() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    opacus_deps = [d for d in project["project"]["dependencies"] if d.startswith("opacus")]
    assert opacus_deps == ["opacus" + opacus_compat.TESTED_OPACUS]
    lo, hi = (tuple(int(x) for x in b.lstrip("<>=").split(".")) for b in opacus_compat.TESTED_OPACUS.split(","))
    installed = tuple(int(x) for x in opacus_compat.opacus_version().split(".")[:2])
    assert lo <= installed < hi


def _without_forward_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = [a for a in opacus_gsm_base.OPACUS_PARAM_MONKEYPATCH_ATTRS if a != "_forward_counter"]
    monkeypatch.setattr(opacus_gsm_base, "OPACUS_PARAM_MONKEYPATCH_ATTRS", attrs)


def _delete_method(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """Remove ``cls.name`` for the test, from whichever class of the MRO defines it."""
    owner = next(c for c in cls.__mro__ if name in vars(c))
    monkeypatch.delattr(owner, name)
    assert not hasattr(cls, name)


_BREAKS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "_check_processed_flag": lambda mp: mp.delattr(opacus_optimizer_module, "_check_processed_flag"),
    "_mark_as_processed": lambda mp: mp.delattr(opacus_optimizer_module, "_mark_as_processed"),
    "DPOptimizer.add_noise": lambda mp: _delete_method(mp, DPOptimizer, "add_noise"),
    "GradSampleModule.capture_backprops_hook": lambda mp: _delete_method(mp, GradSampleModule, "capture_backprops_hook"),
    "_forward_counter": _without_forward_counter,
}


@pytest.mark.parametrize("missing", sorted(_BREAKS))
def test_a_missing_opacus_internal_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    _BREAKS[missing](monkeypatch)
    monkeypatch.setattr(opacus_compat, "_verified", False)
    version = re.escape(opacus_compat.opacus_version())
    pattern = rf"Opacus {version} lacks .*{re.escape(missing)}.*pip install 'opacus>=1\.5,<1\.7'"
    with pytest.raises(opacus_compat.OpacusCompatibilityError, match=pattern):
        opacus_compat.require_opacus_internals()
    # a DP-SGD phase refuses to start, before touching the model
    model = torch.nn.Linear(3, 2)
    with pytest.raises(opacus_compat.OpacusCompatibilityError, match=pattern):
        DPSGDSession(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.functional.cross_entropy,
                     batch_dim=0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, mode="bk",
                     noise_generator=torch.Generator().manual_seed(0))
    assert opacus_dpsgd.opacus_leftovers(model) == []
