"""`secure-dfml tune`: sweep privacy budgets; accuracy, spent epsilon, time overhead (and leakage) per budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from secure_dfml.certify import load_requirements
from secure_dfml.cli._common import OutputFormat, console, err_console, friendly_errors, print_json, setup_logging
from secure_dfml.config import config_from_dict, default_config, load_config
from secure_dfml.orchestration.tune import (
    DEFAULT_EPSILONS,
    TuneEvent,
    parse_epsilons,
    point_rows,
    recommendation_rows,
    sweep_privacy_rows,
    tune_budgets,
)
from secure_dfml.report import pct

EPSILONS_HELP = (
    "Comma-separated sweep points. Each: a number (one budget for all peers), 'inf' (non-private), "
    "a per-peer list cycled over peers by id ('2/4/8': peer 0 -> 2, 1 -> 4, 2 -> 8, 3 -> 2, ...), or explicit "
    "peers ('0=1/3=8'; others keep their configured budget). The non-private baseline always runs. "
    f"Default: {DEFAULT_EPSILONS}; with --requirements 0.5, 1, 2, 4, 8 capped at each peer's max_epsilon, plus the "
    "limit itself."
)
REQUIREMENTS_HELP = (
    "Requirement profile (TOML, e.g. audits/hospital.toml): check the config against what no budget can change "
    "before training, audit each point when the profile limits final-model attacks, and recommend per peer the "
    "budget that meets the requirements at the least accuracy cost. Exit 0 when every peer has one, 1 when some "
    "peer has none."
)
STATE_HELP = (
    "Charge every point to each peer's lifetime ledger in DIR/peer_XXX/ (as run --state): points run in order "
    "against one ledger per peer, later points plan their noise after what earlier ones spent, a point beyond a "
    "peer's lifetime budget is refused, and the non-private point is not run. Default: per-point research ledgers."
)


def print_tune_table(result: dict[str, Any]) -> None:
    head, rows = point_rows(result, compact=True)
    table = Table(title=f"Budget sweep: {result['algorithm']} on {result['dataset']}, {result['peers']} peers, "
                        f"{result['rounds']} rounds")
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"[dim]- {note}[/]", highlight=False)
    for p in result["points"]:
        if p["status"] == "failed":
            console.print(f"[bold red]point {p['label']} failed:[/] {p.get('error')}", highlight=False)
        lk = p.get("leakage") or {}
        if lk.get("fail"):
            console.print(f"[bold red]FAIL[/]: the audit of point {p['label']} found an empirical epsilon above the "
                          f"ledger's; see {lk.get('results')}", highlight=False)
    for p in result["points"]:
        if p["status"] in ("refused", "skipped"):
            console.print(Text.assemble((f"point {p['label']} {p['status']}:", "yellow"), " ", str(p.get("reason"))))
    req = result.get("requirements")
    if req:
        console.print(f"requirements [bold]{req['name']}[/]" + (f" ({req['source']})" if req.get("source") else ""),
                      highlight=False)
        for c in req["checks"]:
            console.print(Text("  " + c["text"], style="green" if c["met"] else "bold red"))
    head, rows = recommendation_rows(result)
    if head:
        recs = result["recommendations"]
        table = Table(title=f"Recommended budget per peer ({recs['accuracy_metric']}: final model, global test set)",
                      caption=recs["qualifies"])
        for i, col in enumerate(head):
            table.add_column(col, justify="left" if i in (0, 1, len(head) - 1) else "right")
        for r in rows:
            table.add_row(*(Text(c) for c in r), style="red" if r[3] == "NONE" else None)
        console.print(table)
        if recs.get("release"):
            console.print(Text("release: " + recs["release"]["text"]))
    head, rows = sweep_privacy_rows(result)
    sp = result.get("sweep_privacy")
    if head and sp and sp["peers"] and any(r["dp_points"] for r in sp["peers"].values()):
        table = Table(title="What the sweep itself spent (it read the same private records at every point)")
        for i, col in enumerate(head):
            table.add_column(col, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*(Text(c) for c in r))
        console.print(table)
    files = result["files"]
    console.print(f"results: [bold]{files['json']}[/], {files['md']}" + (f", {files['png']}" if files.get("png") else ""))


@friendly_errors
def tune(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config; omit for the built-in default federation.")] = None,
    epsilons: Annotated[Optional[str], typer.Option("--epsilons", "-e", help=EPSILONS_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: tune.json, tune.md, tune.png and points/<eps>/ run directories.")] = Path("runs/tune"),
    rounds: Annotated[Optional[int], typer.Option(help="Override federation.rounds for every point.")] = None,
    audit: Annotated[bool, typer.Option("--audit", help="Add the leakage axis: membership-inference AUC and TPR@0.1%FPR on the final models (final-model threat model).")] = False,
    attacks: Annotated[str, typer.Option(help="Attacks for --audit (offline variants share reference models).")] = "loss,lira,rmia",
    reference_models: Annotated[int, typer.Option(help="Reference models per architecture for --audit.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier sweep in --out.")] = False,
    resume: Annotated[bool, typer.Option(help="Reuse the finished points of an earlier sweep in --out (same config), run the rest.")] = False,
    requirements: Annotated[Optional[Path], typer.Option("--requirements", "-r", help=REQUIREMENTS_HELP)] = None,
    state: Annotated[Optional[Path], typer.Option("--state", help=STATE_HELP)] = None,
    format: Annotated[OutputFormat, typer.Option("--format", help="table or json (the tune.json contents).")] = OutputFormat.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log protocol events.")] = False,
) -> None:
    """Sweep privacy budgets: the same federation (same seed) at each epsilon, against the non-private run.

    Writes a table and a plot of global and per-peer accuracy vs epsilon, spent vs target epsilon, and the time
    overhead vs non-private; with --audit also attack AUC / TPR@0.1%FPR and a Pareto plot. With --requirements,
    the recommended budget per peer and what the sweep itself spent; with --state, every point is charged to the
    peers' lifetime ledgers.
    """
    setup_logging(verbose)
    # bad syntax or a bad requirements file fails before the config is even read
    points = parse_epsilons(epsilons) if epsilons is not None else None
    req = load_requirements(requirements) if requirements is not None else None
    cfg = load_config(config) if config is not None else default_config()
    if rounds is not None:
        raw = cfg.to_dict()
        raw["federation"]["rounds"] = rounds
        cfg = config_from_dict(raw)
    attack_list = [a.strip() for a in attacks.split(",") if a.strip()]
    rounds_total = cfg.federation.rounds
    with Progress(
        TextColumn("[bold]eps {task.fields[label]:>8}"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=err_console if format is OutputFormat.json else console,
        disable=format is OutputFormat.json, transient=False,
    ) as progress:
        task = progress.add_task("sweep", total=None, label="", status="checking budgets")

        def on_event(ev: TuneEvent) -> None:
            if ev.kind == "point_start":
                progress.update(task, total=ev.total, completed=ev.index, label=ev.label,
                                status=f"point {ev.index + 1}/{ev.total}: training")
            elif ev.kind == "round":
                r = ev.detail
                status = f"round {r['round'] + 1}/{rounds_total} global {pct(r.get('mean_global_acc'))}%"
                eps = [p["epsilon_spent"] for p in r.get("peers", {}).values() if "epsilon_spent" in p]
                if eps:
                    status += f" eps max {max(eps):.2f}"
                progress.update(task, status=status)
            elif ev.kind == "audit":
                d = ev.detail
                progress.update(task, status=f"audit: {d['what']} {d['done']}/{d['total']}")
            elif ev.kind == "point_end":
                p = ev.detail
                status = (str(p.get("status")).upper() if p.get("status") in ("failed", "refused")
                          else f"done: global {pct(p.get('mean_global_acc'))}%")
                progress.update(task, completed=ev.index + 1, status=status)

        result = tune_budgets(
            cfg, epsilons=points, out_dir=out, audit=audit, audit_attacks=attack_list,
            reference_models=reference_models, progress=on_event, overwrite=overwrite, resume=resume,
            requirements=req, state_dir=state,
        )
    if format is OutputFormat.json:
        print_json(result)
    else:
        print_tune_table(result)
    recs = result.get("recommendations")
    if any(p["status"] == "failed" for p in result["points"]) or (recs is not None and not recs["all_recommended"]):
        raise typer.Exit(code=1)
