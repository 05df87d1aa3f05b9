"""Self-contained HTML audit report: ROC curves, results table, plain-language findings.

The report embeds its figures as base64 PNGs and has no external resources,
so it can be archived or attached to a certificate as one file. Its findings
never treat a failed attack as proof of privacy.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any, TypedDict

import numpy as np

from secure_dfml.audit._epsilon import LedgerComparison
from secure_dfml.audit._runner import AttackResult, AuditResult
from secure_dfml.audit._threat_models import ThreatModel
from secure_dfml.errors import AuditError

__all__ = ["FINDING_LEVELS", "Finding", "by_severity", "finding", "finding_line", "findings", "render_html_report",
           "render_simple_html", "roc_figure_png", "write_html_report"]

_LOG = logging.getLogger(__name__)

PeerResults = Mapping[str, AuditResult | Mapping[str, AttackResult]]

_NOT_PROOF = (
    "An attack that finds nothing does not show that a model is private: stronger attacks, more reference "
    "models or more audit samples may find leakage. Privacy guarantees come from the DP accounting (the "
    "ledger) under its stated assumptions; audits can only show leakage or the absence of a detected one."
)


def _attack_map(res: AuditResult | Mapping[str, AttackResult]) -> Mapping[str, AttackResult]:
    return res.results if isinstance(res, AuditResult) else res


def roc_figure_png(results: Mapping[str, AttackResult], *, title: str = "") -> bytes:
    """PNG bytes of ROC curves (log-log axes) for several attacks on one target."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(5.0, 4.4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1.0
    for name, res in results.items():
        fpr, tpr = res.metrics.roc.fpr, res.metrics.roc.tpr
        n_non = max(res.metrics.n_nonmembers, 1)
        floor = min(floor, 0.5 / n_non)
        auc = res.metrics.auc.value
        ax.plot(np.maximum(fpr, 0.5 / n_non), np.maximum(tpr, 0.5 / n_non), lw=1.4,
                label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    grid = np.logspace(math.log10(floor), 0, 50)
    ax.plot(grid, grid, ls="--", color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


class Finding(TypedDict):
    """One plain-language finding of an audit, as results files store it."""

    level: str  # one of FINDING_LEVELS
    text: str


#: what a finding says, most severe first; the first three print with their label
#: ("FAIL: ...") and are highlighted in reports
FINDING_LEVELS: dict[str, str] = {
    "fail": "an audited guarantee is violated (e.g. measured leakage exceeds the ledger epsilon)",
    "insecure": "the configuration gives no protection for this view (e.g. a plaintext channel)",
    "warning": "something to investigate: indicative, not a certified violation",
    "leak": "an attack detects membership better than chance",
    "quiet": "an attack found no signal beyond chance (which is not evidence of privacy)",
    "unsupported": "a metric not reported because the audit data cannot support it",
    "note": "context: scope, method, assumptions",
}
_ALERTS = ("fail", "insecure", "warning")


def finding(level: str, text: str) -> Finding:
    """A :class:`Finding`; ``level`` must be one of :data:`FINDING_LEVELS`."""
    if level not in FINDING_LEVELS:
        raise ValueError(f"unknown finding level {level!r}; use one of {', '.join(FINDING_LEVELS)}")
    return {"level": level, "text": text}


def is_alert(f: Finding) -> bool:
    """True for the levels that are highlighted: fail, insecure, warning."""
    return f["level"] in _ALERTS


def by_severity(items: Sequence[Finding]) -> list[Finding]:
    """``items`` most severe first (:data:`FINDING_LEVELS` order; stable within a level)."""
    order = list(FINDING_LEVELS)
    return sorted(items, key=lambda f: order.index(f["level"]))


def finding_line(f: Finding) -> str:
    """The finding as one line of text, labelled ("FAIL: ...") when it is an alert."""
    return f"{f['level'].upper()}: {f['text']}" if is_alert(f) else f["text"]


def _family_low(value: float | None, low: float | None, high: float | None, confidence: float, family: int) -> float | None:
    """The lower end of a two-sided interval at family-wise ``confidence`` over ``family``
    tests (Bonferroni), from a per-test interval: its half-width gives the standard error."""
    if value is None or low is None or high is None:
        return None
    if family <= 1:
        return low
    z_one = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    z_all = NormalDist().inv_cdf(1 - (1 - confidence) / (2 * family))
    return value - z_all * (high - low) / (2 * z_one)


def findings(
    peer_results: PeerResults,
    *,
    ledger_checks: Sequence[LedgerComparison] = (),
    threat_model: ThreatModel | None = None,
) -> list[Finding]:
    """Plain-language findings, most severe first."""
    severe: list[Finding] = []
    leaks: list[Finding] = []
    quiet: list[Finding] = []
    unsupported: list[Finding] = []
    notes: list[Finding] = []
    for check in ledger_checks:
        (severe if check.failed else notes).append(finding("fail" if check.failed else "note", check.message))
    # Many (target, attack) pairs are tested at once: a leak is claimed only when the AUC's
    # interval, widened for all of them together (Bonferroni, normal approximation with the
    # bootstrap's own standard error), still excludes 0.5.
    family = sum(len(_attack_map(res)) for res in peer_results.values())
    for peer, res in peer_results.items():
        for name, r in _attack_map(res).items():
            m = r.metrics
            a = m.auc
            corrected_low = _family_low(a.value, a.ci_low, a.ci_high, m.confidence, family)
            if corrected_low is not None and corrected_low > 0.5:
                lvl_txt = []
                for lvl, est in m.tpr_at_fpr.items():
                    if est.value is not None:
                        lvl_txt.append(f"at a {lvl:.1%} false-positive rate it flags {_pct(est.value)} of members")
                extra = ("; " + "; ".join(lvl_txt)) if lvl_txt else ""
                leaks.append(finding(
                    "leak",
                    f"Peer {peer}: {name} detects membership better than chance (AUC {a.value:.3f}, "
                    f"{m.confidence:.0%} CI [{a.ci_low:.3f}, {a.ci_high:.3f}]; its lower bound corrected for the "
                    f"{family} (target, attack) pairs tested, {corrected_low:.3f}, excludes 0.5){extra}.",
                ))
            else:
                quiet.append(finding(
                    "quiet",
                    f"Peer {peer}: {name} did not detect membership beyond chance (AUC {a.value:.3f}"
                    + (f", CI [{a.ci_low:.3f}, {a.ci_high:.3f}]" if a.ci_low is not None else "")
                    + (f", corrected for {family} pairs: lower bound {corrected_low:.3f}" if corrected_low is not None
                       and family > 1 else "")
                    + "). This is not evidence that the model is private.",
                ))
            for lvl, est in m.tpr_at_fpr.items():
                if est.value is None and est.reason:
                    unsupported.append(finding("unsupported", f"Peer {peer}, {name}: TPR at FPR {lvl:g} not "
                                                              f"reported: {est.reason}."))
    unique = {f["text"]: f for f in unsupported}
    out = severe + leaks + quiet + [unique[t] for t in sorted(unique)] + notes
    if threat_model is not None:
        out.append(finding(
            "note",
            f"These results hold for the '{threat_model.name}' threat model (view: {threat_model.view}) and its "
            f"assumptions: {'; '.join(threat_model.assumptions)}.",
        ))
    out.append(finding("note", _NOT_PROOF))
    return out


def _table(peer_results: PeerResults) -> str:
    levels: list[float] = []
    for res in peer_results.values():
        for r in _attack_map(res).values():
            for lvl in r.metrics.tpr_at_fpr:
                if lvl not in levels:
                    levels.append(lvl)
    levels.sort()
    head = ["peer", "attack", "reference models", "AUC [CI]"] + [f"TPR@{lvl:.1%} FPR [CI]" for lvl in levels] + [
        "balanced acc. [CI]", "advantage [CI]", "members / non-members"]
    rows = []
    for peer, res in peer_results.items():
        for name, r in _attack_map(res).items():
            m = r.metrics
            cells = [peer, name, str(r.details.get("n_reference", 0)), f"{m.auc:.3f}"]
            for lvl in levels:
                est = m.tpr_at_fpr.get(lvl)
                cells.append("—" if est is None else (f"{est:.4f}" if est.value is not None else f"n/a: {est.reason}"))
            cells += [f"{m.balanced_accuracy:.3f}", f"{m.advantage:.3f}", f"{m.n_members} / {m.n_nonmembers}"]
            rows.append(cells)
    return html_table(head, rows)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left}
th{background:#f3f3f3}.fail{color:#a00;font-weight:600}.figs{display:flex;flex-wrap:wrap;gap:1em}
.figs figure{margin:0}.caveat{background:#fff8e0;border-left:4px solid #e0b000;padding:.5em 1em}
"""


def html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, fail_col: int | None = None) -> str:
    """A plain HTML table (cells escaped); cells equal to FAIL in ``fail_col`` are highlighted."""
    out = ["<table><thead><tr>", *(f"<th>{html.escape(str(h))}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for j, c in enumerate(row):
            cls = " class='fail'" if fail_col == j and str(c) == "FAIL" else ""
            out.append(f"<td{cls}>{html.escape(str(c))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def page_head(title: str, threat_model: ThreatModel | None) -> list[str]:
    """The start of every audit page: head and style, title, date, and the threat model."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {html.escape(_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}.</p>",
    ]
    if threat_model is not None:
        tm = threat_model
        parts += [
            "<h2>Threat model</h2>",
            f"<p><b>{html.escape(tm.name)}</b>: {html.escape(tm.description)}</p>",
            f"<p>Attacker: {html.escape(tm.attacker)}. View: <code>{html.escape(tm.view)}</code>. "
            f"Targets: {html.escape(tm.targets)}.</p>",
        ]
        for label, items in (("Assumptions", tm.assumptions), ("Mitigations", tm.mitigations)):
            parts.append(f"<p>{label}:</p><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
    return parts


def findings_list(items: Sequence[Finding]) -> str:
    """The findings as an HTML list, alerts (fail, insecure, warning) highlighted."""
    rows = [("<li class='fail'>" if is_alert(f) else "<li>") + html.escape(finding_line(f)) + "</li>" for f in items]
    return "<h2>Findings</h2><ul>" + "".join(rows) + "</ul>"


def render_simple_html(title: str, tm: ThreatModel | None, body: Sequence[str], findings: Sequence[Finding]) -> str:
    """A self-contained page in the audit report's style (no figures)."""
    parts = page_head(title, tm)
    parts.append(findings_list(findings))
    parts.extend(body)
    parts.append("</body></html>")
    return "\n".join(parts)


def render_html_report(
    peer_results: PeerResults,
    *,
    title: str = "Membership-inference audit",
    threat_model: ThreatModel | None = None,
    ledger_checks: Sequence[LedgerComparison] = (),
    extra: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
    report_findings: Sequence[Finding] | None = None,
) -> str:
    """The whole report as one HTML string (figures inlined); ``sections`` (HTML)
    go before the per-attack results; ``report_findings`` replace the
    :func:`findings` of ``peer_results`` when given."""
    if not peer_results:
        raise AuditError("nothing to report: no audit results")
    parts = page_head(title, threat_model)
    if report_findings is None:
        report_findings = findings(peer_results, ledger_checks=ledger_checks, threat_model=threat_model)
    parts.append(findings_list(report_findings))
    if ledger_checks:
        parts.append("<h2>Empirical epsilon vs ledger</h2>")
        parts.append(html_table(
            ["status", "lower bound", "ledger epsilon", "detail"],
            [[c.status, f"{c.lower_bound:.3f}", f"{c.ledger_epsilon:.3f}", c.message] for c in ledger_checks],
            fail_col=0,
        ))
    parts.extend(sections)
    parts.append("<h2>Results</h2>")
    parts.append(_table(peer_results))
    parts.append("<p>Intervals are percentile-bootstrap confidence intervals. Balanced accuracy and advantage use "
                 "the best threshold on the same data, so they are optimistic for the attacker.</p>")
    parts.append("<h2>ROC curves (log-log)</h2><div class='figs'>")
    for peer, res in peer_results.items():
        png = base64.b64encode(roc_figure_png(_attack_map(res), title=f"peer {peer}")).decode("ascii")
        parts.append(f"<figure><img alt='ROC curves for peer {html.escape(peer)}' "
                     f"src='data:image/png;base64,{png}'><figcaption>peer {html.escape(peer)}</figcaption></figure>")
    parts.append("</div>")
    if extra:
        parts.append("<h2>Run details</h2><table><tbody>")
        for k, v in extra.items():
            parts.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>What this does not show</h2><p class='caveat'>{html.escape(_NOT_PROOF)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: str | Path, peer_results: PeerResults, **kwargs: Any) -> Path:
    """Write :func:`render_html_report` to ``path`` (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_html_report(peer_results, **kwargs), encoding="utf-8")
    _LOG.info("wrote audit report %s", p)
    return p
