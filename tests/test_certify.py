"""Certification: manifest, cross-checks, requirements, signed certificates, verify, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from typer.testing import CliRunner

from _runs import TINY_PRIVATE, copy_run
from secure_dfml import config_from_dict, run_federation
from secure_dfml.certify import (
    CHECKS,
    Finding,
    RequirementsError,
    certify,
    check_run,
    load_requirements,
    read_manifest,
    requirements_from_dict,
    verify,
)
from secure_dfml.cli.main import app
from secure_dfml.privacy import compute_epsilon
from secure_dfml.privacy._ledger import LedgerEntry, entry_hash, genesis_hash

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

TINY = TINY_PRIVATE

PERMISSIVE = {
    "name": "permissive",
    "privacy": {"max_epsilon": 16.0, "delta": 1e-4},
    "exchange": {"channel_encryption_required": True, "min_group_size": 2},
}


def _cfg(**sections: Any) -> Any:
    raw = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        raw[k] = v if k == "privacy" else {**raw.get(k, {}), **v}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certify") / "run"
    run_federation(_cfg(), out, plot=False)
    return out


@pytest.fixture(scope="module")
def base_insecure(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certify-insecure") / "run"
    run_federation(_cfg(crypto={"channel": "none", "allow_insecure": True}, privacy={"enabled": False}), out, plot=False)
    return out


@pytest.fixture(scope="module")
def base_ckks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certify-ckks") / "run"
    run_federation(_cfg(crypto={"secure_aggregation": "ckks"}), out, plot=False)
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return copy_run(base_run, tmp_path)


@pytest.fixture(scope="module")
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def _req(**over: Any) -> Any:
    raw = json.loads(json.dumps(PERMISSIVE))
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return requirements_from_dict(raw)


def _rows(cert: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in cert["results"] if r["requirement"] == name]


def _checks(findings: list[Finding]) -> set[str]:
    return {f.check for f in findings if f.severity == "error"}


# ----------------------------------------------------------------------------- ledger tampering helpers
def _ledger(run: Path, pid: int) -> dict[str, Any]:
    return json.loads((run / "ledgers" / f"peer_{pid}.json").read_text())


def _rewrite(run: Path, pid: int, raw: dict[str, Any], *, recompute: bool = True) -> None:
    """Write a ledger with its chain (and epsilons) recomputed, as a careful forger would."""
    prev = genesis_hash(raw["peer_id"], raw["delta"], raw["accountant"])
    mechs = []
    entries = []
    for i, e in enumerate(raw["entries"]):
        e = dict(e, index=i, prev=prev)
        entry = LedgerEntry(**{k: v for k, v in e.items() if k != "hash"})
        if recompute:
            mechs.append(entry.mechanism)
            eps = compute_epsilon(mechs, delta=raw["delta"], accountant=raw["accountant"])
            entry = LedgerEntry(**{**entry.__dict__, "epsilon_after": eps})
        e = dict(entry.__dict__, hash=entry_hash(entry))
        prev = e["hash"]
        entries.append(e)
    raw = dict(raw, entries=entries, head_hash=prev, spent_epsilon=entries[-1]["epsilon_after"] if entries else 0.0)
    (run / "ledgers" / f"peer_{pid}.json").write_text(json.dumps(raw, indent=2))


# ----------------------------------------------------------------------------- manifest and clean runs
def test_run_writes_manifest_and_checks_clean(run: Path) -> None:
    manifest = read_manifest(run)
    assert manifest is not None
    files = manifest["files"]
    for name in ("config.toml", "metrics.jsonl", "summary.json", "models/peer_000_final.safetensors",
                 "views/received/peer_000.safetensors", "ledgers/peer_3.json"):
        assert name in files and len(files[name]["sha256"]) == 64
    assert any(p.startswith("capture/") for p in files)
    assert set(manifest["packages"]) >= {"secure-dfml", "torch", "opacus", "tenseal", "pynacl", "numpy"}
    assert len(manifest["code_fingerprint"]) == 64
    assert check_run(run) == []


def test_certify_pass_and_verify(run: Path, key: nacl.signing.SigningKey, tmp_path: Path) -> None:
    cert = certify(run, _req(), key)
    assert cert["certified"], [r for r in cert["results"] if r["status"] == "FAIL"]
    assert cert["verdict"] == "CERTIFIED"
    assert (run / "certificate.json").is_file() and (run / "certificate.html").read_text().startswith("<!DOCTYPE html>")
    peer = cert["peers"][0]
    assert set(peer["epsilon"]) == {"rdp", "prv"} and peer["epsilon"]["prv"] <= peer["epsilon"]["rdp"] * 1.01
    assert peer["claimed_epsilon"] <= 8.0
    text = " ".join(cert["assumptions"])
    for needle in ("Poisson", "clipping", "post-processing", "add/remove-one", "research-grade"):
        assert needle in text
    assert "lower-bound evidence" in cert["audit_statement"]
    assert len(cert["manifest_sha256"]) == 64 and "manifest.json" in cert["manifest"]["files"]
    pub = tmp_path / "auditor.pub"
    pub.write_text(bytes(key.verify_key).hex() + "\n")
    res = verify(run / "certificate.json", pub, run)
    assert res.ok, res.problems
    assert res.checked_files == len(cert["manifest"]["files"])


# ----------------------------------------------------------------------------- violated requirements
def test_budget_above_limit(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(privacy={"max_epsilon": 4.0}), key)
    assert not cert["certified"]
    rows = _rows(cert, "max_epsilon")
    assert rows and all(r["status"] == "FAIL" and "above the limit 4" in r["reason"] for r in rows)


def test_peer_override(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(privacy={"peers": {"2": {"max_epsilon": 1.0}}}), key)
    failed = [r for r in cert["results"] if r["status"] == "FAIL"]
    assert [(r["requirement"], r["peer"]) for r in failed] == [("max_epsilon", 2)]


def test_required_accountant_is_used(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(privacy={"accountant": "prv"}), key)
    assert cert["certified"]
    for p in cert["peers"]:
        assert p["accountant"] == "rdp" and p["claimed_accountant"] == "prv"
        assert p["claimed_epsilon"] == p["epsilon"]["prv"]


def test_group_too_small(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(exchange={"min_group_size": 3}), key)
    (row,) = _rows(cert, "min_group_size")
    assert row["status"] == "FAIL" and "2 sender model(s)" in row["reason"] and not cert["certified"]


def test_secure_mode_and_ckks_missing(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(privacy={"secure_mode_required": True}, exchange={"secure_aggregation_required": True}), key)
    (row,) = _rows(cert, "secure_mode")
    assert row["status"] == "FAIL" and "secure_mode missing" in row["reason"]
    (row,) = _rows(cert, "secure aggregation")
    assert row["status"] == "FAIL"


def test_threat_model_not_covered(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(audits={"threat_models_required": ["final-model"]}), key)
    (row,) = _rows(cert, "audit final-model")
    assert row["status"] == "FAIL" and "not covered" in row["reason"]


def _fake_audit(run: Path, *, auc_high: float, lower_bound: float) -> None:
    out = run / "audit" / "final-model"
    out.mkdir(parents=True)
    target = {"target": "0 final", "data_owner": 0, "attacks": {"loss": {
        "metrics": {"auc": {"value": auc_high - 0.05, "ci_low": 0.4, "ci_high": auc_high},
                    "tpr_at_fpr": {"0.01": {"value": None, "ci_high": None, "reason": "too few"}}},
        "epsilon_lower_bound": {"epsilon_lower_bound": lower_bound}}}}
    bind = {"run_manifest_sha256": hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()}
    (out / "results.json").write_text(json.dumps({"format": "secure-dfml-audit", "status": "audited",
                                                  "targets": [target], **bind}))


def test_audit_limits_and_lower_bound(run: Path, key: nacl.signing.SigningKey) -> None:
    _fake_audit(run, auc_high=0.55, lower_bound=0.5)
    req = _req(audits={"threat_models_required": ["final-model"], "limits": {"final-model": {"max_auc": 0.6}}})
    cert = certify(run, req, key)
    assert cert["certified"], [r for r in cert["results"] if r["status"] == "FAIL"]
    assert any(f["check"] == "manifest-added" and f["severity"] == "info" for f in cert["findings"])
    shutil.rmtree(run / "audit")
    _fake_audit(run, auc_high=0.9, lower_bound=50.0)
    cert = certify(run, req, key)
    assert _rows(cert, "audit final-model AUC")[0]["status"] == "FAIL"
    (row,) = _rows(cert, "audit final-model lower bound")
    assert row["status"] == "FAIL" and "exceeds the ledger epsilon" in row["reason"] and row["peer"] == 0


def test_insecure_channel_and_non_private(base_insecure: Path, key: nacl.signing.SigningKey, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_insecure, run)
    assert check_run(run) == []
    cert = certify(run, _req(), key)
    assert not cert["certified"]
    (row,) = _rows(cert, "channel encryption")
    assert row["status"] == "FAIL" and "'none'" in row["reason"]
    (row,) = _rows(cert, "private run")
    assert row["status"] == "FAIL" and "never certified" in row["reason"]


def test_ckks_run_passes_and_none_edited_in_is_caught(base_ckks: Path, key: nacl.signing.SigningKey, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_ckks, run)
    assert check_run(run) == []
    cert = certify(run, _req(exchange={"secure_aggregation_required": True}), key)
    assert cert["certified"], [r for r in cert["results"] if r["status"] == "FAIL"]
    cfg = (run / "config.toml").read_text()
    (run / "config.toml").write_text(cfg.replace('secure_aggregation = "ckks"', 'secure_aggregation = "none"'))
    findings = check_run(run)
    assert any(f.check == "secure-aggregation" and "secure sums" in f.problem for f in findings), findings
    (run / "config.toml").write_text(cfg)
    rc = runner.invoke(app, ["audit", str(run), "--threat-model", "curious-aggregator", "--attacks", "loss"])
    assert rc.exit_code == 0, rc.output
    req = _req(audits={"threat_models_required": ["curious-aggregator"],
                       "limits": {"curious-aggregator": {"max_auc": 0.6}}})
    cert = certify(run, req, key)
    assert cert["certified"], [r for r in cert["results"] if r["status"] == "FAIL"]
    assert _rows(cert, "audit curious-aggregator limits")[0]["status"] == "PASS"


def test_real_audit_results_are_read(run: Path, key: nacl.signing.SigningKey) -> None:
    rc = runner.invoke(app, ["audit", str(run), "--threat-model", "final-model", "--attacks", "loss"])
    assert rc.exit_code == 0, rc.output
    req = _req(audits={"threat_models_required": ["final-model"], "limits": {"final-model": {"max_auc": 0.99}}})
    cert = certify(run, req, key)
    (row,) = _rows(cert, "audit final-model AUC")
    assert row["status"] == "PASS" and "upper confidence bound" in row["reason"]
    (ev,) = cert["audit_evidence"]
    assert ev["max_auc_upper_bound"] is not None and ev["max_epsilon_lower_bound"] is not None
    assert "audit/final-model/results.json" in cert["manifest"]["files"]
    strict = certify(run, _req(audits={"limits": {"final-model": {"max_auc": 0.01}}}), key)
    assert _rows(strict, "audit final-model AUC")[0]["status"] == "FAIL"


# ----------------------------------------------------------------------------- tampering
def _assert_tamper(run: Path, key: nacl.signing.SigningKey, check: str, artifact: str) -> list[Finding]:
    findings = check_run(run)
    hits = [f for f in findings if f.check == check and f.severity == "error"]
    assert hits, findings
    assert any(artifact in f.artifact or artifact in f.problem for f in hits), hits
    cert = certify(run, _req(), key)
    assert not cert["certified"]
    (row,) = _rows(cert, "run integrity")
    assert row["status"] == "FAIL" and check in row["reason"]
    return findings


def test_sigma_times_ten_with_chain_rewritten(run: Path, key: nacl.signing.SigningKey) -> None:
    raw = _ledger(run, 0)
    for e in raw["entries"]:
        e["noise_multiplier"] *= 10
    _rewrite(run, 0, raw)
    findings = _assert_tamper(run, key, "ledger-vs-metrics", "ledgers/peer_0.json")
    assert "ledger-chain" not in _checks(findings)  # the forged chain itself is consistent
    assert "manifest-hash" in _checks(findings)


def test_ledger_cut_to_one_entry(run: Path, key: nacl.signing.SigningKey) -> None:
    raw = _ledger(run, 0)
    assert len(raw["entries"]) > 1
    raw["entries"] = raw["entries"][:1]
    _rewrite(run, 0, raw)
    _assert_tamper(run, key, "ledger-vs-metrics", "ledgers/peer_0.json")


def test_target_raised(run: Path, key: nacl.signing.SigningKey) -> None:
    raw = _ledger(run, 1)
    raw["target_epsilon"] = 100.0
    (run / "ledgers" / "peer_1.json").write_text(json.dumps(raw))
    _assert_tamper(run, key, "ledger-budget", "ledgers/peer_1.json")


def test_ledger_copied_over_another(run: Path, key: nacl.signing.SigningKey) -> None:
    shutil.copy(run / "ledgers" / "peer_1.json", run / "ledgers" / "peer_0.json")
    _assert_tamper(run, key, "ledger-peer-id", "ledgers/peer_0.json")


def test_ledger_deleted(run: Path, key: nacl.signing.SigningKey) -> None:
    (run / "ledgers" / "peer_2.json").unlink()
    findings = _assert_tamper(run, key, "ledger-missing", "ledgers/peer_2.json")
    assert "manifest-removed" in _checks(findings)


def test_ckks_edited_into_config(run: Path, key: nacl.signing.SigningKey) -> None:
    cfg = (run / "config.toml").read_text()
    assert 'secure_aggregation = "none"' in cfg
    (run / "config.toml").write_text(cfg.replace('secure_aggregation = "none"', 'secure_aggregation = "ckks"'))
    shutil.rmtree(run / "views" / "received")
    findings = _assert_tamper(run, key, "secure-aggregation", "metrics.jsonl")
    assert "manifest-hash" in _checks(findings) and "manifest-removed" in _checks(findings)


def test_model_rewritten(run: Path, key: nacl.signing.SigningKey) -> None:
    path = run / "models" / "peer_000_final.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    _assert_tamper(run, key, "manifest-hash", "models/peer_000_final.safetensors")


def test_delta_too_large_refused(run: Path, key: nacl.signing.SigningKey) -> None:
    raw = _ledger(run, 3)
    raw["delta"] = 0.9
    _rewrite(run, 3, raw)
    findings = _assert_tamper(run, key, "ledger-delta", "ledgers/peer_3.json")
    assert any(">= 1/n" in f.problem for f in findings if f.check == "ledger-delta")


def test_every_check_is_named() -> None:
    assert {"ledger-peer-id", "ledger-missing", "ledger-budget", "ledger-chain", "ledger-vs-metrics",
            "secure-aggregation", "channel", "manifest-hash", "manifest-added", "ledger-delta"} <= set(CHECKS)
    with pytest.raises(ValueError):
        Finding("x", "no-such-check", "p")


# ----------------------------------------------------------------------------- verify
def test_verify_detects_changes(run: Path, key: nacl.signing.SigningKey, tmp_path: Path) -> None:
    certify(run, _req(), key)
    pub = tmp_path / "auditor.pub"
    pub.write_text(bytes(key.verify_key).hex())
    cert_path = run / "certificate.json"
    with open(run / "ledgers" / "peer_1.json", "a") as fh:
        fh.write(" ")
    res = verify(cert_path, pub, run)
    assert not res.ok and any("ledgers/peer_1.json" in p and "changed" in p for p in res.problems)
    (run / "capture" / min(os.listdir(run / "capture"))).unlink()
    res = verify(cert_path, pub, run)
    assert any(p.startswith("capture/") and "missing" in p for p in res.problems)
    assert verify(cert_path, pub).ok  # the signature alone still holds
    text = cert_path.read_text()
    cert_path.write_text(text.replace('"PASS"', '"PASZ"', 1))
    res = verify(cert_path, pub)
    assert not res.ok and any("signature" in p for p in res.problems)
    cert_path.write_text(text[:-5])
    assert not verify(cert_path, pub).ok
    other = tmp_path / "other.pub"
    other.write_text(bytes(nacl.signing.SigningKey.generate().verify_key).hex())
    cert_path.write_text(text)
    assert not verify(cert_path, other).ok


# ----------------------------------------------------------------------------- requirements
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[privacy]\nmax_epsilon = "two"\n', "privacy.max_epsilon"),
        ("[privacy]\nmax_epsilon = -1\n", "privacy.max_epsilon"),
        ('[privacy]\naccountant = "gdp"\n', "'rdp' or 'prv'"),
        ("[exchange]\nmin_group = 3\n", "exchange.min_group; allowed fields here: channel_encryption_required"),
        ('[exchange]\nchannel_encryption_required = "yes"\n', "exchange.channel_encryption_required"),
        ('[audits]\nthreat_models_required = "final-model"\n', "audits.threat_models_required"),
        ("[audits.limits.final-model]\nmax_tpr = 0.1\n", "at_fpr"),
        ("[privacy.peers.x]\nmax_epsilon = 1\n", "privacy.peers.x"),
        ("[privacy\n", "not valid TOML"),
    ],
)
def test_malformed_requirements(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RequirementsError, match=None) as err:
        load_requirements(path)
    assert needle in str(err.value)


def test_profiles_load() -> None:
    hospital = load_requirements(ROOT / "audits" / "hospital.toml")
    assert hospital.privacy.max_epsilon == 2.0 and hospital.privacy.secure_mode_required
    assert hospital.exchange.secure_aggregation_required and hospital.exchange.min_group_size == 3
    assert set(hospital.audits.threat_models_required) == {"curious-aggregator", "curious-sender", "final-model", "eavesdropper"}
    assert hospital.audits.limits["final-model"].max_auc == 0.6
    factory = load_requirements(ROOT / "audits" / "factory.toml")
    assert factory.privacy.max_epsilon == 8.0 and factory.exchange.min_group_size == 2
    assert load_requirements(ROOT / "audits" / "research.toml").privacy.max_epsilon == 16.0


# ----------------------------------------------------------------------------- CLI
def test_cli_keys_certify_verify(run: Path, tmp_path: Path) -> None:
    keys = tmp_path / "aud"
    res = runner.invoke(app, ["keys", "init", "--auditor", "--out", str(keys)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((keys / "auditor.key").stat().st_mode) == 0o600
    assert len((keys / "auditor.pub").read_text().strip()) == 64
    assert runner.invoke(app, ["keys", "init", "--auditor", "--out", str(keys)]).exit_code == 2  # exists
    ok = tmp_path / "ok.toml"
    ok.write_text('[privacy]\nmax_epsilon = 16\n[exchange]\nchannel_encryption_required = true\n')
    res = runner.invoke(app, ["certify", str(run), "--requirements", str(ok), "--signing-key", str(keys / "auditor.key"),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verdict"] == "CERTIFIED"
    res = runner.invoke(app, ["verify", str(run / "certificate.json"), "--public-key", str(keys / "auditor.pub"),
                              "--run", str(run), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"], res.output
    strict = ROOT / "audits" / "hospital.toml"
    res = runner.invoke(app, ["certify", str(run), "-r", str(strict), "--signing-key", str(keys / "auditor.key")])
    assert res.exit_code == 1 and "NOT CERTIFIED" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[exchange]\nmin_group_size = 0\n")
    res = runner.invoke(app, ["certify", str(run), "-r", str(bad), "--signing-key", str(keys / "auditor.key")])
    assert res.exit_code == 2 and "exchange.min_group_size" in res.output
    os.chmod(keys / "auditor.key", 0o644)
    res = runner.invoke(app, ["certify", str(run), "-r", str(ok), "--signing-key", str(keys / "auditor.key")])
    assert res.exit_code == 2 and "chmod 600" in res.output
    (run / "metrics.jsonl").write_text("")
    res = runner.invoke(app, ["verify", str(run / "certificate.json"), "--public-key", str(keys / "auditor.pub"),
                              "--run", str(run)])
    assert res.exit_code == 1 and "metrics.jsonl" in res.stdout
    res = runner.invoke(app, ["verify", str(tmp_path / "nope.json"), "--public-key", str(keys / "auditor.pub")])
    assert res.exit_code == 2


def test_audit_refuses_a_run_whose_config_was_edited_to_claim_ckks(run):
    """The skeptic's edit: secure_aggregation = "ckks" in config.toml and views/received deleted used to make
    the curious-aggregator audit report that CKKS protected every exchange."""
    cfg = run / "config.toml"
    cfg.write_text(cfg.read_text().replace('secure_aggregation = "none"', 'secure_aggregation = "ckks"'))
    shutil.rmtree(run / "views" / "received", ignore_errors=True)
    res = runner.invoke(app, ["audit", str(run), "--threat-model", "curious-aggregator", "--attacks", "loss"])
    assert res.exit_code == 2 and "fails its cross-checks" in res.output and "config.toml" in res.output


def test_an_audit_of_another_run_is_not_reused(run: Path, key: nacl.signing.SigningKey) -> None:
    """An audit names the run it audited (the sha256 of its manifest): one copied in from
    another run, or from before the artifacts changed, fails and is re-run by --run-audits."""
    from secure_dfml.orchestration.certification import missing_audits

    _fake_audit(run, auc_high=0.55, lower_bound=0.5)
    req = _req(audits={"threat_models_required": ["final-model"]})
    assert missing_audits(run, req) == []
    path = run / "audit" / "final-model" / "results.json"
    data = json.loads(path.read_text())
    data["run_manifest_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    cert = certify(run, req, key, write=False)
    (row,) = [r for r in cert["results"] if r["requirement"] == "audit final-model matches run"]
    assert row["status"] == "FAIL" and "another run" in row["reason"] and not cert["certified"]
    (step,) = missing_audits(run, req)
    assert step.name == "final-model" and "another run" in step.reason
    del data["run_manifest_sha256"]
    path.write_text(json.dumps(data))
    (row,) = [r for r in certify(run, req, key, write=False)["results"] if r["requirement"] == "audit final-model matches run"]
    assert row["status"] == "FAIL" and "does not name the run" in row["reason"]
