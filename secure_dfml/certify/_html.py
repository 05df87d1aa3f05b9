"""``certificate.html``: a signed certificate explained to a reader who is not a privacy expert.

Two halves:

* :func:`plot_series` -- the data behind the certificate's two figures, built
  from the run directory when the certificate is issued and stored in the
  certificate body (``cert["plots"]``), so the signature covers the curves:

  - ``epsilon_by_round``: per peer, the ledger's epsilon after each round of
    this run (``epsilon_after`` of the round's last entry; round 0 is what
    earlier runs on the peer's data had already spent), next to the peer's
    budget (the ledger's ``target_epsilon``) and the requirement's maximum;
  - ``roc``: per audited threat model (``audit/<threat-model>/results.json``),
    the ROC of the attack with the highest AUC, as the audit stored it
    (results version 3; older results carry no ROC and say so).

* :func:`render_html` -- one self-contained HTML page (figures are SVG inside
  ``data:`` URIs, no external resources): verdict banner, what the certificate
  means and does not mean, requirement table, per-peer epsilon, the two
  figures, audit evidence, assumptions, and how to verify. Every string from
  the run or the requirements is escaped. Equal certificates give equal bytes
  (SVG ids salted with a constant, no dates in the figures' metadata).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from secure_dfml.errors import SecureDFMLError
from secure_dfml.privacy import PrivacyLedger
from secure_dfml.rundir import AUDIT

__all__ = ["PLOTS_VERSION", "ROC_NOT_RECORDED", "plot_series", "render_html"]

logger = logging.getLogger(__name__)

#: version of the ``plots`` field of a certificate
PLOTS_VERSION = 1
ROC_NOT_RECORDED = "ROC not recorded in this audit (re-run the audit)"
_DIGITS = 6  # significant digits of the stored series
_SVG_RC: dict[str, Any] = {
    "svg.hashsalt": "secure-dfml-certificate",  # deterministic ids (else random per figure)
    "svg.fonttype": "path",  # glyphs as paths: the page needs no fonts
    "font.size": 9,
}
_SVG_META: dict[str, Any] = {"Date": None, "Creator": "secure-dfml"}


# ----------------------------------------------------------------------------- series (into the certificate)
def _sig(x: Any) -> float | None:
    """``x`` rounded to 6 significant digits; None when not a finite number."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(f"{float(x):.{_DIGITS}g}")


def _epsilon_series(run_dir: Path, peer: Mapping[str, Any], run_id: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peer": peer.get("peer"),
        "accountant": peer.get("accountant"),
        "budget": _sig(peer.get("target_epsilon")),
        "max_epsilon": _sig(peer.get("max_epsilon")),
        "rounds": [],
        "epsilon": [],
        "error": peer.get("error"),
    }
    if out["error"] or not peer.get("ledger"):
        out["error"] = out["error"] or "no ledger"
        return out
    try:
        entries = PrivacyLedger.load(run_dir / str(peer["ledger"])).entries
    except SecureDFMLError as exc:
        out["error"] = str(exc)
        return out
    ours = [i for i, e in enumerate(entries) if run_id and e.run == run_id] or list(range(len(entries)))
    first = ours[0] if ours else len(entries)
    start = entries[first - 1].epsilon_after if first > 0 else 0.0
    by_round: dict[int, float] = {0: float(start)}
    for e in (entries[i] for i in ours):  # chronological; epsilon_after never decreases, so the round's last entry is its total
        by_round[int(e.round) + 1] = float(e.epsilon_after)
    xs = sorted(by_round)
    out["rounds"] = xs
    out["epsilon"] = [_sig(by_round[x]) for x in xs]
    return out


def _rates(v: Any) -> list[float] | None:
    """``v`` as a list of rates in [0, 1] (6 significant digits), or None when it is not one."""
    if not isinstance(v, list) or not v:
        return None
    out: list[float] = []
    for x in v:
        r = _sig(x)
        if r is None or not 0.0 <= r <= 1.0:
            return None
        out.append(r)
    return out


def _roc_series(tm: str, results: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"threat_model": tm, "status": None, "target": None, "attack": None, "auc": None,
                           "n_nonmembers": None, "fpr": None, "tpr": None, "note": None}
    if results is None:
        out["note"] = "results.json is unreadable"
        return out
    out["status"] = results.get("status")
    if results.get("status") == "view_absent":
        out["note"] = ("nothing to attack: the adversary's view is absent from this run"
                       + (f" ({results['view_absent_reason']})" if results.get("view_absent_reason") else ""))
        return out
    best: tuple[float, Mapping[str, Any], str, Mapping[str, Any]] | None = None
    for t in results.get("targets") or []:
        if not isinstance(t, Mapping):
            continue
        for attack, res in (t.get("attacks") or {}).items():
            if not isinstance(res, Mapping):
                continue
            auc = ((res.get("metrics") or {}).get("auc") or {}).get("value")
            if isinstance(auc, (int, float)) and not isinstance(auc, bool) and math.isfinite(auc) \
                    and (best is None or auc > best[0]):
                best = (float(auc), t, str(attack), res)
    if best is None:
        out["note"] = ("no membership-inference attack in this audit (it analyses the traffic: see its report.html)"
                       if results.get("status") == "analysed" else "no attack results in this audit")
        return out
    _, t, attack, res = best
    metrics = res.get("metrics") or {}
    auc = metrics.get("auc") or {}
    out.update(target=str(t.get("target")), attack=attack,
               auc={k: _sig(auc.get(k)) for k in ("value", "ci_low", "ci_high")},
               n_nonmembers=metrics.get("n_nonmembers") if isinstance(metrics.get("n_nonmembers"), int) else None)
    roc = res.get("roc")
    if not isinstance(roc, Mapping):
        out["note"] = ROC_NOT_RECORDED
        return out
    fpr, tpr = _rates(roc.get("fpr")), _rates(roc.get("tpr"))
    if fpr is None or tpr is None or len(fpr) != len(tpr) or len(fpr) < 2:
        out["note"] = "the ROC in this audit's results is malformed (re-run the audit)"
        return out
    out["fpr"], out["tpr"] = fpr, tpr
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s is unreadable: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def plot_series(run_dir: str | Path, peers: Sequence[Mapping[str, Any]], run_id: str | None) -> dict[str, Any]:
    """The series behind the certificate's figures (the certificate's ``plots`` field).

    ``peers``: the certificate's per-peer rows (``peer``, ``ledger``, ``target_epsilon``,
    ``max_epsilon``, ``accountant``, ``error``); ``run_id``: the run whose rounds are
    plotted (a ledger spans every run on a peer's data)."""
    run_dir = Path(run_dir)
    audit_root = run_dir / AUDIT
    tms = sorted(d.name for d in audit_root.iterdir() if (d / "results.json").is_file()) if audit_root.is_dir() else []
    eps = [_epsilon_series(run_dir, p, run_id) for p in sorted(peers, key=lambda p: int(p.get("peer", 0)))]
    last = max((x for p in eps for x in p["rounds"]), default=0)
    for p in eps:  # a peer that spent nothing in a round (not selected) keeps its epsilon: one point per round
        if p["rounds"]:
            have = dict(zip(p["rounds"], p["epsilon"]))
            filled: list[float | None] = []
            for x in range(last + 1):
                filled.append(have.get(x, filled[-1] if filled else None))
            p["rounds"], p["epsilon"] = list(range(last + 1)), filled
    return {
        "version": PLOTS_VERSION,
        "epsilon_by_round": {
            "run_id": run_id,
            "x": "rounds of this run completed (0: spent before this run)",
            "peers": eps,
        },
        "roc": {
            "rule": "per threat model, the (target, attack) with the highest AUC",
            "threat_models": [_roc_series(tm, _read_json(audit_root / tm / "results.json")) for tm in tms],
        },
    }


# ----------------------------------------------------------------------------- figures
def _mpl(text: Any) -> str:
    """Text for matplotlib: '$' would start mathtext (and a hostile label could fail to parse)."""
    return str(text).replace("$", r"\$")


def _svg_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata=_SVG_META)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def epsilon_figure(series: Sequence[Mapping[str, Any]]) -> str | None:
    """``data:`` URI of an SVG: one small panel per peer (shared axes), or None without peers."""
    if not series:
        return None
    n = len(series)
    ncols = min(n, 4 if n <= 16 else 5)
    nrows = math.ceil(n / ncols)
    values = [v for p in series for v in [*(p.get("epsilon") or []), p.get("budget"), p.get("max_epsilon")]
              if isinstance(v, (int, float))]
    top = max(values, default=1.0) * 1.1 or 1.0
    with matplotlib.rc_context(_SVG_RC):
        fig = Figure(figsize=(2.5 * ncols + 0.7, 1.9 * nrows + 1.0))
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        for ax, p in zip(axes.flat, series):
            xs, ys = p.get("rounds") or [], p.get("epsilon") or []
            over = p.get("max_epsilon") is not None and any(y is not None and y > p["max_epsilon"] for y in ys)
            if xs:
                ax.plot(xs, ys, "-o", ms=3, lw=1.6, color="#b00020" if over else "#1f5fa8",
                        label="epsilon spent (ledger)")
            else:
                ax.text(0.5, 0.5, "no ledger data", ha="center", va="center", transform=ax.transAxes, color="#b00020")
            if p.get("budget") is not None:
                ax.axhline(p["budget"], ls="--", lw=1.1, color="#e08a00", label="peer's budget (ledger target)")
            if p.get("max_epsilon") is not None:
                ax.axhline(p["max_epsilon"], ls=":", lw=1.6, color="#b00020", label="required maximum")
            ax.set_title(_mpl(f"peer {p.get('peer')}" + (" (over the maximum)" if over else "")), fontsize=9,
                         color="#b00020" if over else "black")
            ax.set_ylim(0.0, top)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.supxlabel("rounds completed", fontsize=9)
        fig.supylabel("epsilon spent (lower = more private)", fontsize=9)
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / (1.9 * nrows + 1.0)))
        return _svg_uri(fig)


def roc_figure(series: Sequence[Mapping[str, Any]]) -> str | None:
    """``data:`` URI of an SVG: one log-log ROC panel per threat model with a recorded ROC, or None."""
    items = [s for s in series if s.get("fpr") and s.get("tpr")]
    if not items:
        return None
    n = len(items)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    with matplotlib.rc_context(_SVG_RC):
        fig = Figure(figsize=(3.6 * ncols + 0.3, 3.5 * nrows + 0.2))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, s in zip(axes.flat, items):
            fpr, tpr = list(s["fpr"]), list(s["tpr"])
            n_non = s.get("n_nonmembers")
            positive = [v for v in [*fpr, *tpr] if v > 0]
            floor = 0.5 / n_non if isinstance(n_non, int) and n_non > 0 else min(positive, default=1e-3) / 2
            floor = min(max(floor, 1e-6), 0.5)
            ax.plot([floor, 1.0], [floor, 1.0], ls="--", lw=0.9, color="grey", label="chance (guessing)")
            auc = s.get("auc") or {}
            text = f"{s.get('target')} / {s.get('attack')}"
            if auc.get("value") is not None:
                text += f"\nAUC {auc['value']:.3f}"
                if auc.get("ci_low") is not None and auc.get("ci_high") is not None:
                    text += f" [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]"
            ax.plot([max(v, floor) for v in fpr], [max(v, floor) for v in tpr], lw=1.6, color="#b00020",
                    label=_mpl(text))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(floor, 1.0)
            ax.set_ylim(floor, 1.0)
            ax.set_xlabel("false-positive rate (non-members flagged)", fontsize=8)
            ax.set_ylabel("true-positive rate (members found)", fontsize=8)
            ax.set_title(_mpl(s.get("threat_model")), fontsize=10)
            ax.legend(loc="lower right", fontsize=7)
            ax.grid(True, which="major", alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        return _svg_uri(fig)


# ----------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:72em;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.PASS td.s{color:#0a6b2a;font-weight:bold}tr.FAIL td.s{color:#b00020;font-weight:bold}
tr.FAIL{background:#fff3f3}.banner{padding:1em 1.4em;border-radius:.4em;color:#fff;margin:1em 0}
.banner h1{margin:0;font-size:2.2em;letter-spacing:.04em}.banner p{margin:.3em 0 0}
.ok{background:#0a6b2a}.bad{background:#b00020}.box{background:#f6f8fa;border-left:4px solid #888;padding:.6em 1em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.92em;color:#444}
code{background:#f3f3f3;padding:0 .2em}.small{font-size:.9em;color:#555}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else _e(x)
    if isinstance(x, bool):
        return "yes" if x else "no"
    return _e(x)


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _requirements_section(cert: Mapping[str, Any]) -> str:
    rows = [
        f"<tr class='{_e(r.get('status'))}'><td>{_e(r.get('requirement'))}</td><td>{_fmt(r.get('peer'))}</td>"
        f"<td class='s'>{_e(r.get('status'))}</td><td>{_e(r.get('reason'))}</td></tr>"
        for r in cert.get("results") or []]
    return ("<h2>Requirements checked</h2><p>Each row is one requirement of the deployment, checked against the run's "
            "files. Every row must PASS for the run to be certified.</p>"
            + _table(["requirement", "peer", "result", "why"], rows))


def _peer_status(p: Mapping[str, Any]) -> str:
    if p.get("error"):
        return "FAIL"
    eps, limit = p.get("claimed_epsilon"), p.get("max_epsilon")
    if limit is None:
        return "-"
    return "PASS" if isinstance(eps, (int, float)) and eps <= limit else "FAIL"


def _peers_section(cert: Mapping[str, Any]) -> str:
    peers = cert.get("peers") or []
    if not peers:
        return ("<h2>Privacy spent per peer</h2><p>No privacy ledger: this run was not trained with differential "
                "privacy, so there is no privacy guarantee to report.</p>")
    rows = []
    for p in peers:
        accs = " / ".join(f"{_e(k)}: {_fmt(v)}" for k, v in sorted((p.get("epsilon") or {}).items()))
        status = _peer_status(p)
        rows.append(
            f"<tr class='{_e(status)}'><td>{_fmt(p.get('peer'))}</td>"
            f"<td><b>{_fmt(p.get('claimed_epsilon'))}</b> ({_fmt(p.get('claimed_accountant'))})</td>"
            f"<td>{_fmt(p.get('max_epsilon'))}</td><td>{_fmt(p.get('target_epsilon'))}</td>"
            f"<td>{_fmt(p.get('delta'))}</td><td>{accs or '-'}</td><td class='s'>{_e(status)}</td>"
            f"<td>{_fmt(p.get('error'))}</td></tr>")
    return ("<h2>Privacy spent per peer</h2><p><b>Epsilon</b> measures how much the released models can reveal "
            "about any single record of a peer: lower is more private (around 1 is strong, above 10 is weak). "
            "<b>Delta</b> is the small probability with which the bound may not hold. The values are upper bounds "
            "recomputed from each peer's privacy ledger, and cross-checked with a second accountant.</p>"
            + _table(["peer", "epsilon spent (accountant)", "required maximum", "peer's budget", "delta",
                      "both accountants", "within maximum", "problem"], rows))


def _figure(uri: str | None, alt: str, caption: str, missing: str) -> str:
    if uri is None:
        return f"<p class='small'>{_e(missing)}</p>"
    return f"<figure><img src=\"{uri}\" alt=\"{_e(alt)}\"><figcaption>{caption}</figcaption></figure>"


def _plots_section(cert: Mapping[str, Any]) -> str:
    plots = cert.get("plots")
    if not isinstance(plots, Mapping):
        return ("<h2>Figures</h2><p class='small'>This certificate carries no plot data (issued by an older version); "
                "re-issue it with <code>secure-dfml certify</code> to see the figures.</p>")
    eps = (plots.get("epsilon_by_round") or {}).get("peers") or []
    roc = (plots.get("roc") or {}).get("threat_models") or []
    parts = ["<h2>Privacy spent over the rounds</h2>",
             _figure(epsilon_figure(eps), "epsilon spent per peer over the rounds",
                     "Each panel is one peer. The line is the privacy (epsilon) the peer had spent after each round; "
                     "it only goes up. The dashed orange line is the peer's own budget: training stops before "
                     "crossing it. The dotted red line is the maximum the requirements allow: a line above it "
                     "fails the certificate.",
                     "No per-peer privacy ledger to plot.")]
    parts.append("<h2>Strongest membership-inference attack per threat model</h2>")
    if not roc:
        parts.append("<p class='small'>No audit results in this run directory: no attack was run "
                     "(<code>secure-dfml audit RUN --threat-model ...</code>).</p>")
    else:
        parts.append(_figure(
            roc_figure(roc), "ROC curve of the strongest attack per threat model",
            "An attacker tries to tell which records were used in training (members) from records that were not. "
            "Each panel shows the attack that did best (highest AUC) against one kind of adversary: the fraction of "
            "members it finds (up) against the fraction of non-members it wrongly accuses (right), on log scales. "
            "The dashed diagonal is guessing. A curve near the diagonal means this attack found little, which is "
            "evidence, not proof, of privacy; a curve well above it on the left (few false accusations) is a leak. "
            "The AUC is in [0.5, 1] for attacks better than chance (0.5 = guessing), with its 95% confidence "
            "interval.",
            "No threat model's audit recorded an ROC."))
        notes = [f"<li><b>{_e(s.get('threat_model'))}</b>: {_e(s.get('note'))}"
                 + (f" (strongest: {_e(s.get('target'))} / {_e(s.get('attack'))}, AUC "
                    f"{_fmt((s.get('auc') or {}).get('value'), '.3f')})" if s.get("attack") else "") + "</li>"
                 for s in roc if s.get("note")]
        if notes:
            parts.append("<ul>" + "".join(notes) + "</ul>")
    return "\n".join(parts)


def _audit_section(cert: Mapping[str, Any]) -> str:
    rows = [f"<tr><td>{_e(ev.get('threat_model'))}</td><td>{_fmt(ev.get('status'))}</td>"
            f"<td>{_fmt(ev.get('max_auc_upper_bound'), '.3f')}</td><td>{_fmt(ev.get('max_epsilon_lower_bound'), '.3g')}</td></tr>"
            for ev in cert.get("audit_evidence") or []]
    table = _table(["threat model", "status", "largest AUC (upper confidence bound)",
                    "largest empirical epsilon (lower bound)"], rows) if rows else "<p>No audits were run.</p>"
    return f"<h2>Audit evidence</h2><p>{_e(cert.get('audit_statement', ''))}</p>{table}"


def _deployment_section(cert: Mapping[str, Any]) -> str:
    d = cert.get("deployment") or {}
    rows = [f"<tr><th>{_e(k)}</th><td>{_fmt(d.get(key))}</td></tr>" for k, key in (
        ("channel encryption", "channel"), ("secure aggregation", "secure_aggregation"),
        ("smallest aggregation group", "smallest_group"), ("privacy mode", "privacy_label"),
        ("secure randomness (secure_mode)", "secure_mode"))]
    return "<h2>Deployment</h2><table>" + "".join(rows) + "</table>"


def _findings_section(cert: Mapping[str, Any]) -> str:
    findings = cert.get("findings") or []
    if not findings:
        return ""
    items = "".join(f"<li><b>{_e(f.get('severity'))}</b> {_e(f.get('artifact'))}: {_e(f.get('problem'))} "
                    f"<span class='small'>[{_e(f.get('check'))}]</span></li>" for f in findings)
    return f"<h2>Integrity findings</h2><ul>{items}</ul>"


def _verify_section(cert: Mapping[str, Any]) -> str:
    sig = cert.get("signature") or {}
    n_files = len((cert.get("manifest") or {}).get("files") or {})
    return (
        "<h2>How to check this certificate</h2>"
        "<p>This page is a rendering of <code>certificate.json</code>; only the JSON is signed. Anyone with the "
        "auditor's public key can check that the certificate is unchanged and that the run's files are the ones it "
        "speaks about:</p>"
        "<pre><code>secure-dfml verify certificate.json --public-key auditor.pub --run RUN_DIR</code></pre>"
        f"<p class='small'>Signed with Ed25519 key <code>{_e(sig.get('public_key', '-'))}</code>; covers "
        f"{_e(sig.get('covers', '-'))}. Manifest sha256 <code>{_e(cert.get('manifest_sha256', '-'))}</code> "
        f"({n_files} files, each pinned by its sha256).</p>")


def _meaning(certified: bool, name: str) -> str:
    verdict = (
        f"The run meets every requirement of <b>{name}</b>." if certified else
        f"The run does <b>not</b> meet the requirements of <b>{name}</b>: the rows marked FAIL below say which and why."
    )
    return (
        "<h2>What this certificate means</h2><div class='box'>"
        f"<p>{verdict}</p>"
        "<p><b>It means</b> that an independent auditor re-checked the files of this federated-learning run: each "
        "peer's training was differentially private, and the privacy it spent (epsilon, below) stays within the "
        "limits required. Differential privacy bounds how much anyone who sees the released models can learn about "
        "whether a single record was used in training. The certificate pins every file it covers by a hash and is "
        "signed, so any later change is detected.</p>"
        "<p><b>It does not mean</b> that the models are accurate or fair, that the run was executed honestly (it "
        "checks that the recorded files are consistent), or that the guarantee holds if the assumptions below are "
        "broken. Attacks that found little are <i>not</i> proof of privacy: the guarantee is the accounting's "
        "upper bound, and the audits are lower-bound evidence only.</p>"
        "</div>")


def render_html(cert: Mapping[str, Any], run_dir: str | Path | None = None) -> str:
    """``certificate.html`` for ``cert`` (a certificate as :func:`~secure_dfml.certify.certify` returns it).

    The figures come from ``cert["plots"]``; a certificate without them (issued by
    an older version) gets them from ``run_dir`` when given (then they are not
    covered by its signature), else the page says they are missing."""
    if not isinstance(cert.get("plots"), Mapping) and run_dir is not None:
        cert = {**cert, "plots": plot_series(run_dir, cert.get("peers") or [], cert.get("run_id"))}
    certified = bool(cert.get("certified"))
    verdict = str(cert.get("verdict") or ("CERTIFIED" if certified else "NOT CERTIFIED"))
    req = cert.get("requirements") or {}
    name = _e(req.get("name", "the requirements"))
    results = cert.get("results") or []
    failed = [r for r in results if r.get("status") == "FAIL"]
    if certified:
        sub = f"all {len(results)} requirements of {name} pass"
    else:
        sub = (f"{len(failed)} of {len(results)} requirements of {name} fail: "
               + _e(", ".join(dict.fromkeys(str(r.get("requirement")) for r in failed))))
    desc = f"<p class='small'>Requirements: {_e(req['description'])}</p>" if req.get("description") else ""
    assumptions = "".join(f"<li>{_e(a)}</li>" for a in cert.get("assumptions") or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>secure-dfml certificate: {_e(verdict)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style>
</head><body>
<div class="banner {'ok' if certified else 'bad'}"><h1>{_e(verdict)}</h1><p>{sub}</p></div>
<p>Run <code>{_e(cert.get('run_id'))}</code> (<code>{_e(cert.get('run_dir'))}</code>) against requirements
<b>{name}</b>; issued {_e(cert.get('issued'))}.</p>{desc}
{_meaning(certified, name)}
{_requirements_section(cert)}
{_peers_section(cert)}
{_plots_section(cert)}
{_audit_section(cert)}
{_deployment_section(cert)}
<h2>Assumptions the guarantee rests on</h2><ul>{assumptions}</ul>
{_findings_section(cert)}
{_verify_section(cert)}
</body></html>
"""
