"""The eavesdropper audit reads the traffic captured on the wire (RUN_DIR/capture/).

Small runs: digits, 4 peers, 2 rounds, two architectures of different sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from secure_dfml import config_from_dict, run_federation
from secure_dfml.audit import FINDING_LEVELS, audit_run_dir
from secure_dfml.cli.audit import audit
from secure_dfml.crypto import generate_keys, write_keys
from secure_dfml.transport import read_capture

BASE: dict[str, Any] = {
    "data": {"name": "digits", "auditor_pool": 200},
    "federation": {"id": "eaves", "peers": 4, "participants": 3, "rounds": 2},
    "models": {"mix": ["mlp", "cnn-small"]},
}


def _cfg(**sections: Any) -> Any:
    raw = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _audit(run: Path, **kw: Any) -> dict[str, Any]:
    return audit_run_dir(run, threat_model="eavesdropper", rng=_rng(), **kw)


def _texts(res: dict[str, Any]) -> str:
    return "\n".join(f["text"] for f in res["findings"])


@pytest.fixture(scope="module")
def nacl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eaves") / "run"
    run_federation(_cfg(), out, plot=False)
    return out


@pytest.fixture(scope="module")
def padded_keyed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Padding on, and keys from a key folder: the run's public directory is on disk."""
    root = tmp_path_factory.mktemp("eaves-pad")
    write_keys(root / "keys", generate_keys(4, "eaves"))
    out = root / "run"
    run_federation(_cfg(crypto={"pad_messages": True, "keys_dir": str(root / "keys")}), out, plot=False)
    return out


def test_reads_the_captured_envelopes_and_opens_none(nacl_run: Path) -> None:
    res = _audit(nacl_run)
    captured = read_capture(nacl_run / "capture")
    assert res["source"] == "capture" and res["status"] == "analysed" and res["fail"] is False
    assert len(res["envelopes"]) == len(captured) == res["traffic"]["messages"] > 0
    assert (nacl_run / "audit" / "eavesdropper" / "results.json").is_file()
    levels = [f["level"] for f in res["findings"]]
    assert levels == sorted(levels, key=list(FINDING_LEVELS).index) and "warning" not in levels
    for e, c in zip(res["envelopes"], captured, strict=True):
        assert e["file"] == c.path.name and e["envelope_bytes"] == len(c.data())
        # what the eavesdropper reads in clear, as the transport routed it
        meta = e["visible_metadata"]
        assert (meta["round"], meta["sender"], meta["recipient"], meta["kind"]) == (c.round_index, c.sender,
                                                                                    c.recipient, c.kind)
        assert e["header_matches_routing"] and e["federation_tag_matches"] and meta["padded"] is False
        # every attempt with keys an eavesdropper can hold fails with a typed CryptoError
        assert len(e["attempts"]) == 2
        assert all(not a["opened"] and a["crypto_error"] for a in e["attempts"])
        assert [a["error"] for a in e["attempts"]] == ["BadSignatureError", "DecryptionError"]
        assert e["ciphertext_uniformity_p"] > 1e-6
    assert res["attempts"]["opened"] == 0 and res["attempts"]["total"] == 2 * len(captured)
    assert res["uniformity"]["tested"] == len(captured)
    assert all(p < 1e-6 for p in res["uniformity"]["plaintext_p"].values())
    text = _texts(res)
    assert "opened none of" in text and "nonces are distinct" in text
    assert "public directory was not tried" in text  # ephemeral keys: nothing on disk


def test_headers_reveal_who_talks_to_whom(nacl_run: Path) -> None:
    res = _audit(nacl_run)
    tr = res["traffic"]
    assert set(tr["by_kind"]) == {"model", "return"}
    assert sum(k["messages"] for k in tr["by_kind"].values()) == tr["messages"]
    records = [json.loads(line) for line in (nacl_run / "metrics.jsonl").read_text().splitlines()]
    assert tr["rounds_recorded"] == len(records) == 2
    assert tr["rounds_with_aggregators_as_recorded"] == 2
    for rec in records:
        seen = tr["rounds"][str(rec["round"])]
        assert seen["aggregators"] == sorted({g["aggregator"] for g in rec["groups"] if g["senders"]})
    assert "exactly as metrics.jsonl records them" in _texts(res)


def test_sizes_name_the_architecture_without_padding(nacl_run: Path) -> None:
    res = _audit(nacl_run)
    rows = res["sizes"]["captured"]
    assert {r["arch"] for r in rows} == {"mlp", "cnn-small"}
    table = res["sizes"]["architectures"]
    for r in rows:  # one size per architecture on the wire, the one the envelope format predicts
        assert r["as_predicted"] and r["observed_sizes"] == [table[r["arch"]]["envelope_bytes_unpadded"]]
        assert r["candidates"] == [r["arch"]]
    assert {e["envelope_bytes"] for e in res["envelopes"] if e["arch"] == "mlp"} != {
        e["envelope_bytes"] for e in res["envelopes"] if e["arch"] == "cnn-small"}


def test_padding_and_the_public_directory(padded_keyed_run: Path) -> None:
    res = _audit(padded_keyed_run)
    assert res["source"] == "capture" and res["fail"] is False
    table = res["sizes"]["architectures"]
    for e in res["envelopes"]:
        assert e["visible_metadata"]["padded"] is True
        # posing as the recipient with the run's real public directory: the signature verifies, decryption fails
        assert [a["error"] for a in e["attempts"]] == ["BadSignatureError", "DecryptionError", "DecryptionError"]
        assert e["signature_verified_with_public_directory"] is True
        assert e["envelope_bytes"] == table[e["arch"]]["envelope_bytes_padded"]
    for r in res["sizes"]["captured"]:
        assert r["as_predicted"]
        bucket = r["observed_sizes"][0]
        assert r["candidates"] == sorted(a for a, t in table.items() if t["envelope_bytes_padded"] == bucket)
    assert any(len(r["candidates"]) > 1 for r in res["sizes"]["captured"])  # padding merges architectures
    text = _texts(res)
    assert "posing as the recipient with the run's real public directory" in text
    assert "prove to third parties" in text and "padding on" in text


def test_plain_channel_is_read_in_clear(tmp_path: Path) -> None:
    run = tmp_path / "plain"
    run_federation(_cfg(crypto={"channel": "none", "allow_insecure": True}), run, plot=False)
    res = _audit(run)
    assert res["source"] == "capture" and res["fail"] is True
    assert res["findings"][0]["level"] == "insecure"
    models = [e for e in res["envelopes"] if e["arch"] is not None]
    assert models and all(a["opened"] and a["recovered_parameters"] for e in models for a in e["attempts"])
    # the eavesdropper's copy is the very model the aggregator received
    assert any(a.get("equals_model_as_received") for e in models for a in e["attempts"])
    assert all(a.get("equals_model_as_received", True) for e in models for a in e["attempts"])


def test_ckks_traffic(tmp_path: Path) -> None:
    run = tmp_path / "ckks"
    run_federation(_cfg(models={"mix": ["mlp"]}, crypto={"secure_aggregation": "ckks"}), run, plot=False)
    res = _audit(run)
    tr = res["traffic"]
    assert res["fail"] is False and res["attempts"]["opened"] == 0
    assert {k.rsplit("-", 1)[0] for k in tr["by_kind"] if k.startswith("ckks-")} == {
        "ckks-ctx", "ckks-ct", "ckks-sum", "ckks-avg"}
    assert "model" not in tr["by_kind"]  # no individual model travels
    # the aggregators are named from the CKKS ciphertexts they receive, exactly as recorded
    assert tr["rounds_with_aggregators_as_recorded"] == tr["rounds_recorded"] == 2
    assert "CKKS secure averaging is on" in _texts(res)


def test_peers_selects_what_they_sent(nacl_run: Path) -> None:
    res = _audit(nacl_run, peers=[1])
    assert res["envelopes"] and {e["sender"] for e in res["envelopes"]} == {1}


def test_local_runs_send_nothing(tmp_path: Path) -> None:
    run = tmp_path / "local"
    run_federation(_cfg(federation={"algorithm": "local", "rounds": 1}), run, plot=False)
    res = _audit(run)
    assert res["source"] == "capture" and res["envelopes"] == [] and res["fail"] is False
    assert "nothing on the wire" in _texts(res)


def test_older_run_without_capture_is_resealed_and_labelled(nacl_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(nacl_run, old, ignore=shutil.ignore_patterns("capture", "audit"))
    res = _audit(old)
    assert res["source"] == "resealed" and "not the traffic that was sent" in res["source_description"]
    assert res["findings"][0]["level"] == "warning" and "no capture/" in res["findings"][0]["text"]
    assert "traffic" not in res and len(res["envelopes"]) == 4 and res["fail"] is False
    for e in res["envelopes"]:
        assert all(not a["opened"] and a["crypto_error"] for a in e["attempts"])
        assert {a["error"] for a in e["attempts"]} == {"DecryptionError", "BadSignatureError"}
        assert e["same_size_for_different_models"] and e["resealed_ciphertext_differs"]
        assert e["ciphertext_uniformity_p"] > 1e-6 and e["plaintext_uniformity_p"] < 1e-6
        assert e["visible_metadata"]["sender"] == e["peer"]
    sizes = res["sizes"]["architectures"]
    assert {"mlp", "cnn-small", "cnn-wide", "resnet-gn"} <= set(sizes)
    for row in sizes.values():
        assert row["envelope_bytes_padded"] >= row["envelope_bytes_unpadded"] > row["payload_bytes"]
    # without padding every zoo architecture has its own size; padding merges some into one bucket
    assert len({r["envelope_bytes_unpadded"] for r in sizes.values()}) == len(sizes)
    assert len({r["envelope_bytes_padded"] for r in sizes.values()}) < len(sizes)
    assert "Re-sealed envelopes" in (old / "audit" / "eavesdropper" / "report.html").read_text()


def test_cli_shows_the_captured_traffic(nacl_run: Path) -> None:
    app = typer.Typer()
    app.command("audit")(audit)

    @app.command("noop")
    def noop() -> None:  # a second command keeps "audit" as a sub-command
        pass

    r = CliRunner().invoke(app, ["audit", str(nacl_run), "-t", "eavesdropper"])
    assert r.exit_code == 0, r.output
    assert "captured on the wire" in r.output and "captured messages" in r.output and "opened none" in r.output
    page = (nacl_run / "audit" / "eavesdropper" / "report.html").read_text()
    assert "What the eavesdropper reads in clear" in page and "Captured envelopes" in page
