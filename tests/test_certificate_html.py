"""certificate.html for non-experts: verdict, plots carried by the signed certificate, escaping,
determinism; the compact ROC that audit results store for it."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest

from _runs import TINY_PRIVATE, copy_run
from secure_dfml import config_from_dict, run_federation
from secure_dfml.audit import audit_run_dir
from secure_dfml.audit._federation import RESULTS_VERSION
from secure_dfml.audit._metrics import ROC_MAX_POINTS, compact_roc, roc_curve, tpr_at_fpr
from secure_dfml.certify import certify, render_html, requirements_from_dict, verify
from secure_dfml.certify._html import ROC_NOT_RECORDED, epsilon_figure, roc_figure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = TINY_PRIVATE
HOSTILE = "<script>alert('x')</script> & co"
URI = re.compile(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"')


def _req(name: str = "permissive", max_epsilon: float = 16.0) -> Any:
    return requirements_from_dict({"name": name, "description": f"desc {HOSTILE}",
                                   "privacy": {"max_epsilon": max_epsilon, "delta": 1e-4},
                                   "audits": {"threat_models_required": ["final-model"]}})


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in URI.findall(page)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cert-html") / "run"
    run_federation(config_from_dict(TINY), out, plot=False)
    audit_run_dir(out, threat_model="final-model", attacks=["loss", "population"], rng=np.random.default_rng(0),
                  n_bootstrap=50)
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return copy_run(base_run, tmp_path)


@pytest.fixture(scope="module")
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


# ----------------------------------------------------------------------------- certificate page
def test_page_has_verdict_plots_and_escapes(run: Path, key: nacl.signing.SigningKey, tmp_path: Path) -> None:
    cert = certify(run, _req(name=HOSTILE), key)
    assert cert["certified"], [r for r in cert["results"] if r["status"] == "FAIL"]
    page = (run / "certificate.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert "class=\"banner ok\"><h1>CERTIFIED</h1>" in page
    for section in ("What this certificate means", "It does not mean", "Requirements checked", "Privacy spent per peer",
                    "Privacy spent over the rounds", "Strongest membership-inference attack", "Assumptions",
                    "How to check this certificate", "secure-dfml verify certificate.json"):
        assert section in page, section
    # every string from the run or the requirements is escaped
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    # both figures inline, as SVG
    images = _images(page)
    assert len(images) == 2 and all(b"<svg" in img and b"http://www.w3.org/2000/svg" in img for img in images)
    # the plot series are in the signed body
    plots = cert["plots"]
    series = plots["epsilon_by_round"]["peers"]
    assert [p["peer"] for p in series] == [0, 1, 2, 3]
    for p, row in zip(series, cert["peers"]):
        assert p["rounds"] == [0, 1, 2] and p["epsilon"][0] == 0.0
        assert p["epsilon"] == sorted(p["epsilon"]) and p["epsilon"][-1] == pytest.approx(row["recorded_epsilon"], rel=1e-5)
        assert p["budget"] == 8.0 and p["max_epsilon"] == 16.0
    (roc,) = plots["roc"]["threat_models"]
    assert roc["threat_model"] == "final-model" and roc["note"] is None
    assert roc["attack"] in ("loss", "population") and roc["target"].startswith(("0 ", "1 ", "2 ", "3 "))
    results = json.loads((run / "audit" / "final-model" / "results.json").read_text())
    aucs = [a["metrics"]["auc"]["value"] for t in results["targets"] for a in t["attacks"].values()]
    assert roc["auc"]["value"] == pytest.approx(max(aucs), rel=1e-5)
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and len(roc["fpr"]) == len(roc["tpr"])
    pub = tmp_path / "auditor.pub"
    pub.write_text(bytes(key.verify_key).hex() + "\n")
    assert verify(run / "certificate.json", pub, run).ok
    body = json.loads((run / "certificate.json").read_text())
    body["plots"]["roc"]["threat_models"][0]["tpr"][1] = 0.999  # the curves are covered by the signature
    (run / "certificate.json").write_text(json.dumps(body))
    assert not verify(run / "certificate.json", pub).ok


def test_equal_inputs_give_equal_plots(run: Path, key: nacl.signing.SigningKey) -> None:
    a = certify(run, _req(), key, write=False)
    b = certify(run, _req(), key, write=False)
    assert a["plots"] == b["plots"]
    ia, ib = _images(render_html(a)), _images(render_html(b))
    assert len(ia) == 2 and ia == ib
    same = ("issued", "signature", "manifest", "manifest_sha256")  # time-dependent: not the page's concern
    assert render_html({**b, **{k: a[k] for k in same}}) == render_html(a)


def test_not_certified_banner(run: Path, key: nacl.signing.SigningKey) -> None:
    cert = certify(run, _req(max_epsilon=1.0), key)
    assert not cert["certified"]
    page = (run / "certificate.html").read_text(encoding="utf-8")
    assert "class=\"banner bad\"><h1>NOT CERTIFIED</h1>" in page and "requirements of permissive fail" in page
    assert "max_epsilon" in page.split("</div>")[0]  # the banner names what failed
    assert all(p["max_epsilon"] == 1.0 for p in cert["plots"]["epsilon_by_round"]["peers"])


def test_old_results_without_roc_and_old_certificates(run: Path, key: nacl.signing.SigningKey) -> None:
    path = run / "audit" / "final-model" / "results.json"
    results = json.loads(path.read_text())
    results["version"] = 2
    for t in results["targets"]:
        for a in t["attacks"].values():
            del a["roc"]
    path.write_text(json.dumps(results))
    cert = certify(run, _req(), key)
    assert cert["certified"]
    (roc,) = cert["plots"]["roc"]["threat_models"]
    assert roc["note"] == ROC_NOT_RECORDED and roc["fpr"] is None and roc["auc"]["value"] is not None
    page = (run / "certificate.html").read_text(encoding="utf-8")
    assert ROC_NOT_RECORDED in page and len(_images(page)) == 1  # the epsilon figure only
    # a certificate issued before the plots existed: said so, or drawn from the run directory
    old = {k: v for k, v in cert.items() if k != "plots"}
    assert "carries no plot data" in render_html(old) and not _images(render_html(old))
    assert len(_images(render_html(old, run))) == 1


def test_many_peers_and_hostile_labels() -> None:
    peers = [{"peer": i, "accountant": "rdp", "budget": 8.0, "max_epsilon": 6.0 if i == 5 else 16.0,
              "rounds": [0, 1, 2, 3], "epsilon": [0.0, 2.0 + i / 10, 5.0, 7.5], "error": None} for i in range(14)]
    peers[7] = {**peers[7], "rounds": [], "epsilon": [], "error": "ledger chain broken"}
    assert epsilon_figure(peers) is not None
    roc = [{"threat_model": "a$b", "target": "0 $final$", "attack": "loss", "auc": {"value": 0.6, "ci_low": 0.5,
            "ci_high": 0.7}, "n_nonmembers": 40, "fpr": [0.0, 0.025, 1.0], "tpr": [0.0, 0.3, 1.0]}]
    assert roc_figure(roc) is not None  # '$' does not start mathtext
    cert = {"verdict": "CERTIFIED", "certified": True, "requirements": {"name": "r"}, "results": [],
            "peers": [], "plots": {"epsilon_by_round": {"peers": peers}, "roc": {"threat_models": roc}}}
    assert len(_images(render_html(cert))) == 2


# ----------------------------------------------------------------------------- compact ROC in audit results
def test_compact_roc_bounds_and_shape() -> None:
    rng = np.random.default_rng(3)
    y = np.concatenate([np.ones(4000, bool), np.zeros(6000, bool)])
    s = rng.normal(size=y.size) + 0.4 * y
    full = roc_curve(s, y)
    c = compact_roc(full)
    assert c["points"] == full.fpr.size > ROC_MAX_POINTS
    fpr, tpr = np.asarray(c["fpr"]), np.asarray(c["tpr"])
    assert 50 < fpr.size <= ROC_MAX_POINTS and fpr.size == tpr.size
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr <= 0.01).sum() >= 40  # the low-FPR region is kept
    assert all(v == float(f"{v:.6g}") for v in [*c["fpr"], *c["tpr"]])
    for level in (0.001, 0.01, 0.1):  # never above the full curve, and close to it
        got = float(tpr[fpr <= level].max())
        assert got <= tpr_at_fpr(full, level) + 1e-6 and got >= tpr_at_fpr(full, level * 0.9) - 1e-6
    assert compact_roc(full) == c and json.loads(json.dumps(c)) == c
    small = roc_curve([0.1, 0.9, 0.4, 0.8], [0, 1, 0, 1])
    cs = compact_roc(small)
    assert cs["fpr"] == small.fpr.tolist() and cs["tpr"] == small.tpr.tolist()


def test_audit_results_carry_roc(base_run: Path) -> None:
    results = json.loads((base_run / "audit" / "final-model" / "results.json").read_text())
    assert results["version"] == RESULTS_VERSION == 3
    for t in results["targets"]:
        for a in t["attacks"].values():
            roc = a["roc"]
            assert 2 <= len(roc["fpr"]) == len(roc["tpr"]) <= ROC_MAX_POINTS
            assert roc["fpr"][0] == roc["tpr"][0] == 0.0 and roc["fpr"][-1] == roc["tpr"][-1] == 1.0
            assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])
