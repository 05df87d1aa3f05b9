"""`secure-dfml budget`: plan per-peer noise before a run, inspect ledgers after it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from secure_dfml import peer_train_sizes
from secure_dfml.certify import check_run
from secure_dfml.cli._common import OutputFormat, console, friendly_errors, print_json, setup_logging
from secure_dfml.config import RunConfig, load_config
from secure_dfml.errors import RunDirectoryError
from secure_dfml.privacy import PeerPlan, load_ledgers, plan_budgets
from secure_dfml.rundir import config_file, ledgers_dir

app = typer.Typer(
    name="budget",
    help="Privacy budgets: plan noise multipliers per peer, show a run's ledgers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


@app.command("plan")
@friendly_errors
def plan(
    config: Path = typer.Option(..., "--config", "-c", help="Run configuration (TOML).", exists=False),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress."),
) -> None:
    """Per peer: the noise multiplier that spends its target epsilon by its last
    phase on the public schedule (privacy.plan_on = "schedule", the default; or
    its expected participation with "expected"), and the epsilon per round."""
    setup_logging(verbose)
    cfg = load_config(config)
    sizes = peer_train_sizes(cfg)
    plans = plan_budgets(cfg, sizes)
    if format is OutputFormat.json:
        print_json(
            {
                "privacy_enabled": cfg.privacy.enabled,
                "accountant": cfg.privacy.accountant,
                "rounds": cfg.federation.rounds,
                "batch_size": cfg.dfml.batch_size,
                "class_prior": cfg.privacy.class_prior,
                "peers": [p.to_dict() for p in plans],
            }
        )
        return
    if not cfg.privacy.enabled:
        console.print(
            "[yellow]privacy.enabled = false in this config: a run would be NON-PRIVATE; "
            "the plan below is what DP would use.[/]"
        )
    console.print(_plan_table(cfg, plans))


def _plan_table(cfg: RunConfig, plans: list[PeerPlan]) -> Table:
    first = plans[0] if plans else None
    title = (
        f"Budget plan: {cfg.federation.rounds} rounds, {cfg.privacy.accountant.upper()} accountant, "
        f"batch {cfg.dfml.batch_size}"
    )
    if first is not None and first.plan_on == "expected":
        title += f", participation {first.participation:.2f}/round, aggregator share {first.aggregator_share:.2f}"
    elif first is not None:
        title += ", phases from the public schedule"
    table = Table(title=title)
    for col in (
        "peer",
        "n train",
        "target eps",
        "delta",
        "q",
        "phases local/mutual",
        "steps",
        "noise mult.",
        "eps round 1",
        "eps / round",
        "eps at end",
    ):
        table.add_column(col, justify="right")
    for p in plans:
        sigma = _fmt(p.noise_multiplier, ".4g") + ("" if p.noise_source != "explicit" else " (set)")
        table.add_row(
            str(p.peer_id),
            str(p.num_train),
            _fmt(p.target_epsilon),
            _fmt(p.delta, ".2g"),
            _fmt(p.sample_rate, ".3g"),
            f"{p.expected_local_phases:g}/{p.expected_mutual_phases:g}",
            str(p.expected_steps),
            sigma,
            _fmt(p.epsilon_first_round),
            _fmt(p.epsilon_per_round),
            _fmt(p.planned_epsilon),
        )
    return table


def _ledger_dir(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise RunDirectoryError(f"run directory {run_dir} does not exist.")
    for candidate in (ledgers_dir(run_dir), run_dir):
        if candidate.is_dir() and any(candidate.glob("peer_*.json")):
            return candidate
    raise RunDirectoryError(
        f"{run_dir} holds no privacy ledgers (expected {ledgers_dir(run_dir)}/peer_<id>.json); "
        "was the run made with privacy.enabled = true?"
    )


@app.command("show")
@friendly_errors
def show(
    run_dir: Path = typer.Argument(..., help="A run directory (or its ledgers/ folder)."),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress."),
) -> None:
    """Each peer's ledger: epsilon spent at its delta, mechanisms, steps, status.
    Every ledger is re-verified with Opacus' accountant while loading."""
    setup_logging(verbose)
    # cross-check the run first (a broken ledger would stop loading at the first one)
    findings = [f for f in check_run(run_dir) if f.severity == "error"] if config_file(run_dir).is_file() else []
    if findings:
        if format is OutputFormat.json:
            print_json({"run_dir": str(run_dir), "verified": False, "findings": [f.to_dict() for f in findings]})
        else:
            console.print(f"{run_dir} FAILS its cross-checks; no epsilon here can be trusted:", style="bold red",
                          highlight=False, markup=False)
            for f in findings:
                console.print(f"- {f.artifact}: {f.problem}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1)
    ledgers = load_ledgers(_ledger_dir(run_dir))
    summaries: list[dict[str, Any]] = [led.summary() for led in ledgers]
    if format is OutputFormat.json:
        print_json({"run_dir": str(run_dir), "verified": True, "findings": [], "peers": summaries})
        return
    accountants = sorted({s["accountant"] for s in summaries})
    table = Table(title=f"Privacy ledgers of {run_dir} ({'/'.join(a.upper() for a in accountants)}, verified)")
    for col in ("peer", "eps spent", "target", "delta", "mechanisms", "steps", "status"):
        table.add_column(col, justify="right")
    for s in summaries:
        phases = ", ".join(f"{k} {v}" for k, v in s["mechanisms_by_phase"].items())
        status = s["status"]
        style = "red" if status != "active" else "green"
        table.add_row(
            str(s["peer_id"]),
            _fmt(s["epsilon_spent"], ".4g"),
            _fmt(s["epsilon_target"]),
            _fmt(s["delta"], ".2g"),
            f"{s['mechanisms']} ({phases})" if phases else "0",
            str(s["steps"]),
            f"[{style}]{status}[/]",
        )
    console.print(table)
    run = Path(run_dir)
    for other in sorted(run.parent.glob(f"{run.name}.crashed-*")) + [p for p in [run.with_name(run.name + ".partial")] if p.is_dir()]:
        console.print(
            f"note: {other} holds an interrupted run into {run.name}; its ledgers spent budget too "
            f"(`secure-dfml budget show {other}`)", highlight=False, markup=False, soft_wrap=True,
        )
