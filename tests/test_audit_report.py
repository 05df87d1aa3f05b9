"""HTML report: self-contained, ROC figures inline, findings never claim privacy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_dfml.audit import (
    AttackResult,
    compare_with_ledger,
    evaluate_attack,
    findings,
    load_threat_model,
    render_html_report,
    write_html_report,
)
from secure_dfml.audit.report import FINDING_LEVELS, by_severity, finding, finding_line


def _result(name: str, strength: float, rng: np.random.Generator, n_non: int = 600) -> AttackResult:
    labels = np.concatenate([np.ones(400, bool), np.zeros(n_non, bool)])
    scores = rng.normal(size=labels.size) + strength * labels
    m = evaluate_attack(scores, labels, rng=rng, n_bootstrap=100)
    return AttackResult(name, scores, labels, m, {"n_reference": 4})


def test_report_is_self_contained(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    peers = {
        "0": {"rmia_online": _result("rmia_online", 1.5, rng), "loss": _result("loss", 0.0, rng)},
        "1": {"lira_online": _result("lira_online", 0.0, rng)},
    }
    checks = [compare_with_ledger(3.0, 1.0, what="peer 0 canary audit")]
    path = write_html_report(tmp_path / "audit" / "report.html", peers,
                             threat_model=load_threat_model("final-model"), ledger_checks=checks)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("data:image/png;base64,") == 2  # one log-log ROC figure per peer
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "FAIL" in text and "class='fail'" in text
    assert "final-model" in text
    # the unsupported level is explained, not printed as a number
    assert "not supported by 600 non-members" in text
    # findings are records with a level the CLI and the run-dir audit act on
    lines = findings(peers, ledger_checks=checks)
    levels = [f["level"] for f in lines]
    assert levels[0] == "fail" and finding_line(lines[0]).startswith("FAIL: ")
    assert levels.count("quiet") == 2  # loss and lira_online at strength 0
    assert "unsupported" in levels and levels[-1] == "note"
    assert [f["level"] for f in lines if f["text"].startswith("Peer 0: rmia")] == ["leak"]
    assert levels == sorted(levels, key=list(FINDING_LEVELS).index)  # most severe first
    # extra sections go before the results table; their HTML is kept as given
    page = render_html_report(peers, sections=["<h2>Extra</h2><p>x &amp; y</p>"])
    assert page.index("<h2>Extra</h2><p>x &amp; y</p>") < page.index("<h2>Results</h2>")


def test_findings_never_claim_privacy() -> None:
    rng = np.random.default_rng(1)
    res = {"p": {"loss": _result("loss", 0.0, rng, n_non=2000), "rmia_online": _result("rmia_online", 2.0, rng)}}
    lines = findings(res)
    joined = " ".join(f["text"] for f in lines).lower()
    assert "detects membership better than chance" in joined
    assert "not evidence that the model is private" in joined
    assert "does not show that a model is private" in joined
    for sentence in joined.replace(":", ".").split(". "):
        if "private" in sentence or "privacy" in sentence:
            assert "not" in sentence or "guarantees come from the dp accounting" in sentence, sentence
    for bad in ("proves privacy", "is safe", "no leakage"):
        assert bad not in joined
    assert "<li>" in render_html_report(res)


def test_finding_levels_are_checked() -> None:
    assert finding("warning", "x") == {"level": "warning", "text": "x"}
    assert finding_line(finding("insecure", "plain channel")) == "INSECURE: plain channel"
    assert finding_line(finding("note", "context")) == "context"
    mixed = [finding("note", "a"), finding("warning", "b"), finding("note", "c"), finding("fail", "d")]
    assert [f["text"] for f in by_severity(mixed)] == ["d", "b", "a", "c"]  # stable within a level
    with pytest.raises(ValueError, match="fail, insecure, warning"):
        finding("severe", "x")


def test_leak_findings_are_corrected_for_every_pair_tested() -> None:
    """Issue 12's example: at epsilon 1 an uncorrected interval (AUC 0.537, 95% CI [0.504, 0.573]) gave a 'leak'.
    Over the pairs tested together it no longer excludes 0.5; a clear signal still does."""
    from secure_dfml.audit.report import _family_low

    assert _family_low(0.537, 0.504, 0.573, 0.95, 1) == 0.504  # one test: the interval as it is
    assert _family_low(0.537, 0.504, 0.573, 0.95, 8) < 0.5  # eight tests: chance is no longer excluded
    assert _family_low(0.70, 0.66, 0.74, 0.95, 40) > 0.5  # a real signal survives the correction
    rng = np.random.default_rng(3)
    null = {f"p{i}": {"loss": _result("loss", 0.0, rng, n_non=2000)} for i in range(12)}  # no signal at all
    assert not any(f["level"] == "leak" for f in findings(null))  # family-wise: no false leak among 12
    strong = findings({"p": {"loss": _result("loss", 2.0, rng)}, **null})
    assert any(f["level"] == "leak" and "Peer p:" in f["text"] and "corrected for the 13" in f["text"] for f in strong)
