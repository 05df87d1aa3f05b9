"""`secure-dfml audit`: membership-inference audits of a run, and one-run canary audits.

Forms::

    secure-dfml audit RUN_DIR --threat-model curious-aggregator [--attacks loss,population,lira,rmia]
                              [--reference-models 4] [--peers 0,1] [--online] [--format table|json] [--seed N]
    secure-dfml audit canary --config FILE [--canaries 50] [--confidence 0.95] [--out DIR] [--format table|json]
    secure-dfml audit --list-threat-models

Attack names: ``loss``, ``population``, ``lira_offline``, ``lira_online``,
``rmia_offline``, ``rmia_online``, and the aliases ``lira`` / ``rmia``: the
offline variants by default (one set of reference models per architecture,
shared by every peer), the online variants with ``--online`` (stronger, but
one set of reference models per attacked peer).

Exit status: 0 when the audit ran and nothing was flagged, 1 when an empirical
epsilon lower bound exceeds a ledger epsilon (FAIL) or an eavesdropper could
read envelopes, 2 on errors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secure_dfml.audit import (
    CANARY_KINDS,
    DEFAULT_CANARY_KIND,
    Finding,
    audit_run_dir,
    finding_line,
    list_threat_models,
    load_threat_model,
)
from secure_dfml.certify import check_run
from secure_dfml.cli._common import OutputFormat, console, friendly_errors, print_json, setup_logging
from secure_dfml.config import load_config
from secure_dfml.errors import AuditError
from secure_dfml.orchestration.canary import DEFAULT_CANARIES, canary_dir, run_canary_audit, run_state_root
from secure_dfml.rundir import check_run_dir, read_config

__all__ = ["audit"]

_ATTACKS_HELP = (
    "Comma-separated attacks: loss, population, lira, rmia (aliases: offline variants, or online with --online), "
    "lira_offline, lira_online, rmia_offline, rmia_online. Default: loss,population,lira,rmia."
)


def _parse_peers(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise AuditError(f"--peers: {part!r} is not a peer range like 0-3")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise AuditError(f"--peers: {part!r} is not a peer id (use e.g. --peers 0,1 or --peers 0-3)")
    return sorted(set(out))


def _parse_attacks(text: str | None) -> list[str] | None:
    """``--attacks`` as a list of names; None (the defaults) only when the option is absent."""
    if text is None:
        return None
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise AuditError(f"--attacks {text!r} names no attack; list some, e.g. --attacks loss,population, "
                         "or omit --attacks for the defaults (loss,population,lira,rmia)")
    return names


def _progress(fmt: OutputFormat) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
        console=console, disable=fmt is OutputFormat.json, transient=True,
    )


def _est(e: dict[str, Any] | None, pct: bool = False) -> str:
    if e is None:
        return "-"
    v = e.get("value")
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:.2f}% [{100 * e['ci_low']:.2f}, {100 * e['ci_high']:.2f}]" if e.get("ci_low") is not None \
            else f"{100 * v:.2f}%"
    return f"{v:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]" if e.get("ci_low") is not None else f"{v:.3f}"


def _status_style(status: str) -> str:
    return {"FAIL": "[bold red]FAIL[/]", "CONSISTENT": "[green]CONSISTENT[/]"}.get(status, status)


def _print_findings(findings: list[Finding]) -> None:
    quiet = [f for f in findings if f["level"] == "quiet"]
    console.print("[bold]Findings[/]")
    for f in findings:
        if f["level"] != "quiet":
            style = {"fail": "bold red", "insecure": "bold red", "warning": "yellow"}.get(f["level"])
            console.print(f"- {escape(finding_line(f))}", style=style, highlight=False, soft_wrap=True)
    if quiet:
        console.print(f"- {len(quiet)} (target, attack) pair(s) found no membership signal beyond chance. That is not "
                      "evidence that the models are private.", highlight=False, soft_wrap=True)


def _print_mia(res: dict[str, Any]) -> None:
    tm = res["threat_model"]["name"]
    if res["status"] == "view_absent":
        console.print(f"[bold green]{escape(tm)}: nothing to attack.[/] {escape(res['view_absent_reason'])}",
                      highlight=False, soft_wrap=True)
        _print_findings(res["findings"][1:])
        console.print(f"results: [bold]{res['output_dir']}[/]")
        return
    levels = []
    for t in res["targets"]:
        for a in t["attacks"].values():
            for lvl in a["metrics"]["tpr_at_fpr"]:
                if lvl not in levels:
                    levels.append(lvl)
    levels.sort(key=float)
    table = Table(title=f"{tm}: membership inference ({res['reference_models']} reference models)")
    for col in ["target", "attack", "AUC [CI]", *[f"TPR@{float(lv):.1%} FPR" for lv in levels], "advantage",
                "eps lower bound"]:
        table.add_column(col)
    for t in res["targets"]:
        first = True
        for name, a in t["attacks"].items():
            m = a["metrics"]
            lb = a.get("epsilon_lower_bound", {})
            table.add_row(
                f"{t['target']} ({t['n_members']}/{t['n_nonmembers']})" if first else "", name, _est(m["auc"]),
                *[_est(m["tpr_at_fpr"].get(lv), pct=True) for lv in levels], _est(m["advantage"]),
                f"{lb.get('epsilon_lower_bound', 0.0):.3f}",
            )
            first = False
        table.add_section()
    console.print(table)
    ptab = Table(title="empirical epsilon vs ledger, per peer whose data is attacked")
    for col in ("peer", "eps lower bound", "ledger eps", "status"):
        ptab.add_column(col)
    for pid, p in res["peers"].items():
        led = "inf (non-private)" if p["status"] == "NON-PRIVATE" else (
            "unknown" if p.get("ledger_epsilon") is None else f"{p['ledger_epsilon']:.3f}")
        ptab.add_row(pid, f"{p['empirical_epsilon_lower_bound']:.3f}", led, _status_style(p["status"]))
    console.print(ptab)
    _print_findings(res["findings"])
    console.print(f"results: [bold]{res['output_dir']}[/] (results.json, report.html)")


def _print_eavesdropper(res: dict[str, Any]) -> None:
    console.print(f"[bold]source:[/] {escape(str(res.get('source_description', '')))}", highlight=False,
                  soft_wrap=True)
    traffic = res.get("traffic")
    if traffic is not None:
        kinds = Table(title=f"eavesdropper: {traffic['messages']} captured messages, {traffic['bytes']} bytes")
        for col in ("kind", "messages", "bytes", "envelope sizes", "carries"):
            kinds.add_column(col)
        for kind, k in traffic["by_kind"].items():
            sizes = ", ".join(map(str, k["sizes"][:4])) + (" ..." if len(k["sizes"]) > 4 else "")
            kinds.add_row(kind, str(k["messages"]), str(k["bytes"]), sizes, k["carries"])
        console.print(kinds)
    table = Table(title="eavesdropper: envelope sizes per architecture")
    for col in ("architecture", "parameters", "payload bytes", "envelope (no padding)", "envelope (padding)", "in run"):
        table.add_column(col)
    for arch, r in res["sizes"]["architectures"].items():
        table.add_row(arch, str(r["parameters"]), str(r["payload_bytes"]), str(r["envelope_bytes_unpadded"]),
                      "-" if r["envelope_bytes_padded"] is None else str(r["envelope_bytes_padded"]),
                      "yes" if r["in_run"] else "")
    console.print(table)
    _print_findings(res["findings"])
    console.print(f"results: [bold]{res['output_dir']}[/] (results.json, report.html)")


def _print_canary(res: dict[str, Any]) -> None:
    table = Table(title=f"one-run canary audit: {res['canaries_per_peer']} canaries per peer, "
                        f"{res['confidence']:.0%} confidence")
    for col in ("peer", "arch", "included", "guesses", "correct", "eps lower bound", "attainable", "ledger eps",
                "status"):
        table.add_column(col)
    rows = [*res["peers"].items(), *([("pooled", res["pooled"])] if res.get("pooled") else [])]
    for pid, e in rows:
        led = "inf (non-private)" if e.get("ledger_epsilon") is None else f"{e['ledger_epsilon']:.3f}"
        table.add_row(pid, e.get("arch", "all"), f"{e['canaries_included']}/{e['canaries']}", str(e["r"]), str(e["v"]),
                      f"{e['epsilon_lower_bound']:.3f}", f"{e['attainable_epsilon']:.3f}", led,
                      _status_style(e["status"]))
    console.print(table)
    _print_findings(res["findings"])
    console.print(f"results: [bold]{res['output_dir']}[/] (canary.json, canary.md, canary.html)")


def _list_threat_models(fmt: OutputFormat) -> None:
    tms = [load_threat_model(n) for n in list_threat_models()]
    if fmt is OutputFormat.json:
        print_json([t.to_dict() for t in tms])
        return
    table = Table(title="threat models")
    for col in ("name", "view", "attacks", "attacker"):
        table.add_column(col)
    for t in tms:
        table.add_row(t.name, t.view, ", ".join(t.attacks), t.attacker)
    console.print(table)


@friendly_errors
def audit(
    target: Annotated[Optional[str], typer.Argument(
        help="A run directory to audit, or the word 'canary' for a one-run canary audit of --config.",
        metavar="RUN_DIR|canary", show_default=False)] = None,
    threat_model: Annotated[Optional[str], typer.Option(
        "--threat-model", "-t", help="Threat model name (see --list-threat-models), a threat-model TOML path, or 'all'.")] = None,
    attacks: Annotated[Optional[str], typer.Option("--attacks", "-a", help=_ATTACKS_HELP)] = None,
    reference_models: Annotated[int, typer.Option(
        "--reference-models", "-k", help="Reference models per architecture (offline) or per attacked peer (online).")] = 4,
    peers: Annotated[Optional[str], typer.Option(
        "--peers", help="Audit only these peers' data, e.g. 0,1 or 0-3 (curious sender: these aggregators' data).")] = None,
    online: Annotated[bool, typer.Option(
        "--online", help="Make the lira / rmia aliases the online variants (reference models trained per peer).")] = False,
    reference_epochs: Annotated[Optional[int], typer.Option(
        "--reference-epochs", help="Training epochs of each reference model (default: from the run's schedule, 3-30).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the auditor's randomness.")] = 0,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Canary audit: the federation's TOML config.")] = None,
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="Canary audit of a run: train its config.toml with canaries; results in RUN/audit/canary/.")] = None,
    state: Annotated[Optional[Path], typer.Option(
        "--state", help="Canary audit: charge the peers' lifetime ledgers in DIR (default with --run: the run's own "
                        "--state, if it had one).")] = None,
    canaries: Annotated[int, typer.Option("--canaries", help="Canary audit: canaries per peer.")] = DEFAULT_CANARIES,
    canary_kind: Annotated[str, typer.Option(
        "--canary-kind", help=f"Canary audit: {' or '.join(CANARY_KINDS)} (synthetic out-of-distribution records with "
                              "random labels, or auditor-pool records with a wrong label).")] = DEFAULT_CANARY_KIND,
    confidence: Annotated[float, typer.Option("--confidence", help="Confidence of the epsilon lower bounds.")] = 0.95,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Canary audit: output folder (default RUN/audit/canary with --run, else "
                            "runs/canary/<time>-<federation>).")] = None,
    list_models: Annotated[bool, typer.Option("--list-threat-models", help="List the threat models and exit.")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Audit leakage: membership inference against a run as a threat model's adversary sees it, or a one-run
    canary audit that bounds each peer's epsilon from below. Lower bounds above a ledger epsilon are flagged FAIL;
    an attack that finds nothing is never taken as proof of privacy."""
    setup_logging(verbose)
    if list_models:
        _list_threat_models(format)
        return
    if target is None:
        raise AuditError("give a run directory (secure-dfml audit RUN_DIR --threat-model NAME), 'canary' with --config, "
                         "or --list-threat-models")
    rng = np.random.default_rng(seed)
    if target == "canary":
        _canary(config=config, run=run, state=state, canaries=canaries, kind=canary_kind, confidence=confidence, out=out,
                rng=rng, fmt=format,
                stray={"--threat-model": threat_model, "--attacks": attacks, "--peers": peers})
        return
    if run is not None or state is not None:
        raise AuditError("--run and --state belong to the canary audit (secure-dfml audit canary --run RUN_DIR); to attack a "
                         "run's models pass the run directory itself: secure-dfml audit RUN_DIR --threat-model NAME")
    if config is not None:
        raise AuditError("--config belongs to the canary audit (secure-dfml audit canary --config FILE); a run "
                         "directory carries its own config.toml")
    if threat_model is None:
        raise AuditError(
            f"choose a threat model with --threat-model; available: {', '.join(list_threat_models())} (or 'all')"
        )
    names = list_threat_models() if threat_model == "all" else [threat_model]
    for name in names:
        load_threat_model(name)  # unknown names fail here, before any work
    run_path = Path(target)
    if run_path.is_file():
        raise AuditError(f"{run_path} is a file, not a run directory; pass the folder written by `secure-dfml run` "
                         "(the one holding config.toml), or 'canary' for a canary audit")
    if not run_path.is_dir():
        raise AuditError(f"run directory {run_path} does not exist; pass a folder written by `secure-dfml run` "
                         "(or 'canary' for a canary audit)")
    attack_list = _parse_attacks(attacks)
    peer_list = _parse_peers(peers)
    _refuse_tampered(run_path)
    results = []
    with _progress(format) as prog:
        for name in names:
            task = prog.add_task(f"{name}: preparing", total=None)

            def report(done: int, total: int, what: str, task: Any = task, name: str = name) -> None:
                prog.update(task, completed=done, total=total, description=f"{name}: {what}")

            res = audit_run_dir(
                target, threat_model=name, attacks=attack_list, reference_models=reference_models, rng=rng,
                progress=report, peers=peer_list, online=online, reference_epochs=reference_epochs,
                confidence=confidence,
            )
            prog.update(task, description=f"{name}: done", total=1, completed=1)
            results.append(res)
    if format is OutputFormat.json:
        print_json(results[0] if len(results) == 1 else results)
    else:
        for res in results:
            if res["threat_model"]["view"] == "envelopes":
                _print_eavesdropper(res)
            else:
                _print_mia(res)
    if any(r.get("fail") for r in results):
        raise typer.Exit(code=1)


def _refuse_tampered(run_path: Path) -> None:
    tampered = [f for f in check_run(run_path) if f.severity == "error"]
    if tampered:  # auditing edited evidence would report on a run that never happened
        raise AuditError(
            f"{run_path} fails its cross-checks, so it is not audited: "
            + "; ".join(f"{f.artifact}: {f.problem}" for f in tampered)
        )


def _canary(*, config: Path | None, run: Path | None, state: Path | None, canaries: int, kind: str, confidence: float,
            out: Path | None,
            rng: np.random.Generator, fmt: OutputFormat, stray: dict[str, Any]) -> None:
    given = [k for k, v in stray.items() if v is not None]
    if given:
        raise AuditError(f"{', '.join(given)} do not apply to the canary audit (it trains its own run)")
    if (config is None) == (run is None):
        raise AuditError("the canary audit trains a federation: pass its config with --config FILE, or a finished "
                         "run with --run RUN_DIR (its config.toml; results in RUN_DIR/audit/canary), not both")
    if run is not None:
        run_dir = check_run_dir(run)
        _refuse_tampered(run_dir)
        cfg = read_config(run_dir)
        out = out if out is not None else canary_dir(run_dir)
        if state is None:
            state = run_state_root(run_dir)
    else:
        assert config is not None
        cfg = load_config(config)
    if out is None:
        out = Path("runs") / "canary" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.federation.id}"
    with _progress(fmt) as prog:
        task = prog.add_task("building federation with canaries", total=cfg.federation.rounds)

        def report(done: int, total: int, what: str) -> None:
            prog.update(task, completed=done, total=total, description=what)

        res = run_canary_audit(cfg, canaries_per_peer=canaries, confidence=confidence, rng=rng, out_dir=out,
                               progress=report, kind=kind, state_root=state)
    if fmt is OutputFormat.json:
        print_json(res)
    else:
        _print_canary(res)
    if res.get("fail"):
        raise typer.Exit(code=1)
