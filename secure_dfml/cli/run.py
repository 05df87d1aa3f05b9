"""`secure-dfml run`: train a federation and print per-peer results."""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secure_dfml import interrupted_config, run_federation
from secure_dfml.certify import write_manifest
from secure_dfml.cli._common import OutputFormat, console, friendly_errors, print_json, read_passphrase, setup_logging
from secure_dfml.config import ALGORITHMS, RunConfig, config_from_dict, default_config, load_config
from secure_dfml.errors import ConfigError
from secure_dfml.orchestration.ray_backend import run_federation_ray
from secure_dfml.report import pct
from secure_dfml.rundir import write_summary


class Backend(str, enum.Enum):
    inprocess = "inprocess"
    ray = "ray"


def print_summary(summary: dict[str, Any]) -> None:
    """The run's result table and summary lines, readable at 80 columns: no
    vertical rules, architecture names and numbers never wrapped or cut (only a
    long status wraps), text from the run printed literally (no rich markup)."""
    from rich import box
    from rich.markup import escape
    from rich.text import Text

    table = Table(
        title=escape(f"{summary['algorithm']} on {summary['dataset']}: {summary['rounds']} rounds (accuracy in %)"),
        box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
    )
    peers = summary["peers"]
    eps = {pid: f"{p.get('epsilon_spent', 0):.2f}/{p.get('epsilon_target', float('nan')):.2f}" for pid, p in peers.items()}
    has_eps = any("epsilon_spent" in p for p in peers.values())
    table.add_column("peer", justify="right", no_wrap=True)
    table.add_column("arch", no_wrap=True, min_width=max((len(p["arch"]) for p in peers.values()), default=4))
    for col in ("global", "local", "peak\nglobal", "peak\nlocal"):
        table.add_column(col, justify="right", no_wrap=True)
    if has_eps:
        table.add_column("epsilon\nspent/\ntarget", justify="right", no_wrap=True,
                         min_width=1 + max(len(e) for e in eps.values()))
        table.add_column("status")
    for pid, p in peers.items():
        row = [pid, p["arch"], pct(p["global_acc"]), pct(p["local_acc"]), pct(p.get("peak_global_acc")),
               pct(p.get("peak_local_acc"))]
        if has_eps:
            row += [eps[pid], str(p.get("status", ""))]
        table.add_row(*(Text(c) for c in row))
    table.add_section()
    mean_row = ["mean", "", pct(summary["mean_global_acc"]), pct(summary["mean_local_acc"]),
                pct(summary["mean_peak_global_acc"]), pct(summary["mean_peak_local_acc"])]
    table.add_row(*(mean_row + (["", ""] if has_eps else [])))
    console.print(table)
    if summary.get("server_global_acc") is not None:
        console.print(f"central server model global accuracy: {pct(summary['server_global_acc'])}%")
    console.print(f"privacy: {escape(str(summary['privacy_label']))}")
    if "non_private_twin" in summary:
        twin = summary["non_private_twin"]
        console.print(
            f"cost of privacy: non-private twin (same seed) reaches {pct(twin['mean_global_acc'])}% global accuracy, "
            f"{100 * summary['privacy_cost_global_acc']:+.1f} points above the DP federation "
            f"({twin['seconds_per_round']:.2f} s/round without DP)"
        )
    console.print(escape(f"channel: {summary['channel_description']}; secure aggregation: {summary['secure_aggregation']}"))
    if summary.get("warning"):
        console.print(Text(str(summary["warning"]), style="bold red"))
    console.print(
        f"{summary['seconds_per_round']:.2f} s/round ({summary['compute_seconds_per_round']:.2f} s compute, "
        f"{summary['crypto_seconds_per_round']:.3f} s crypto), {summary['bytes_per_round'] / 1e6:.2f} MB/round"
    )
    console.print(f"run directory: [bold]{escape(str(summary['run_dir']))}[/]")


def add_non_private_baseline(
    cfg: RunConfig, summary: dict[str, Any], on_round: Any, runner: Callable[..., dict[str, Any]] = run_federation
) -> dict[str, Any]:
    """Train the same federation (same seed, split and models) without DP inside the
    run directory (with ``runner``: the same backend as the run) and record the
    accuracy cost of privacy in summary.json."""
    run_dir = Path(summary["run_dir"])
    twin = runner(
        cfg.replace(privacy={"enabled": False}), run_dir / "non-private-twin", overwrite=True, on_round=on_round
    )
    summary = dict(summary)
    summary["non_private_twin"] = {
        "run_dir": twin["run_dir"],
        "mean_global_acc": twin["mean_global_acc"],
        "mean_local_acc": twin["mean_local_acc"],
        "seconds_per_round": twin["seconds_per_round"],
    }
    summary["privacy_cost_global_acc"] = twin["mean_global_acc"] - summary["mean_global_acc"]
    write_summary(run_dir, summary)
    write_manifest(run_dir)  # summary.json changed: the manifest must hash what is there now
    return summary


@friendly_errors
def run(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config; omit for the built-in default federation.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<time>-<id>-<algorithm>).")] = None,
    algorithm: Annotated[Optional[str], typer.Option(help=f"Override federation.algorithm: {', '.join(ALGORITHMS)}.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Override federation.rounds.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory (only once the new run succeeds).")] = False,
    compare_non_private: Annotated[
        Optional[bool],
        typer.Option(
            "--compare-non-private/--no-compare-non-private",
            help="With DP on, also train the same federation without DP to show the accuracy cost of privacy "
            "(default: on for the built-in federation, off with --config).",
        ),
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the interrupted run in this run directory.")
    ] = None,
    state: Annotated[
        Optional[Path],
        typer.Option("--state", help="Keep each peer's lifetime ledger in DIR/peer_XXX (default: per-run ledgers)."),
    ] = None,
    passphrase_file: Annotated[
        Optional[Path],
        typer.Option("--passphrase-file", help="File with the passphrase of sealed keys (crypto.keys_dir)."),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            "--backend",
            help="inprocess: simulate every peer in this process; ray: every peer a Ray actor, exchanging "
            "envelopes only (a local Ray started and stopped by the run, or --address).",
        ),
    ] = Backend.inprocess,
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="With --backend ray: join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto)."),
    ] = None,
    ray_cpus_per_peer: Annotated[
        Optional[float],
        typer.Option(
            "--ray-cpus-per-peer",
            help="With --backend ray: CPUs Ray reserves per peer, fractions allowed "
            "(default: 1 on a cluster; locally the CPUs shared out, at most 1).",
        ),
    ] = None,
    ray_peers_per_actor: Annotated[
        int,
        typer.Option(
            "--ray-peers-per-actor",
            help="With --backend ray: peers per actor process (each still its own node, key and data; saves memory).",
        ),
    ] = 1,
    format: Annotated[OutputFormat, typer.Option("--format", help="table or json (the summary).")] = OutputFormat.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log protocol events.")] = False,
) -> None:
    """Train a federation (DFML or a baseline) and write a run directory.
    Sealed keys: --passphrase-file FILE or $SECURE_DFML_KEY_PASSPHRASE."""
    setup_logging(verbose)
    if backend is Backend.ray:
        if resume is not None:
            raise ConfigError("--resume continues an in-process run; a --backend ray run cannot be resumed yet, start it again")
        if ray_peers_per_actor < 1:
            raise ConfigError(f"--ray-peers-per-actor must be at least 1, got {ray_peers_per_actor}")
    else:
        given = [name for name, value in (("--address", address), ("--ray-cpus-per-peer", ray_cpus_per_peer)) if value is not None]
        if ray_peers_per_actor != 1:
            given.append("--ray-peers-per-actor")
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --backend ray")
    if resume is not None:
        cfg = load_config(interrupted_config(resume))
        out = resume
    else:
        cfg = load_config(config) if config is not None else default_config()
    overrides: dict[str, Any] = {}
    if algorithm is not None:
        overrides["algorithm"] = algorithm
    if rounds is not None:
        overrides["rounds"] = rounds
    if overrides:
        raw = cfg.to_dict()
        raw["federation"].update(overrides)
        cfg = config_from_dict(raw)
    total = cfg.federation.rounds
    if not cfg.privacy.enabled and format is not OutputFormat.json:
        console.print(
            "NON-PRIVATE run: differential privacy is off in this config (add [privacy] enabled = true for DP); "
            "models still travel in envelopes, but what they learned is not protected.",
            highlight=False, markup=False,
        )
    plain = not console.is_terminal  # CI, logs, nohup: one plain line per round instead of a live bar
    with Progress(
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console, disable=format is OutputFormat.json or plain, transient=False,
    ) as progress:
        task: list[Any] = []  # created with the first finished round: nothing is shown before a config error

        def on_round(record: dict[str, Any]) -> None:
            taking_part = sum(1 + len(g.get("senders", [])) for g in record.get("groups", []))
            evaluated = record.get("evaluated", len(record["peers"]))
            if evaluated:
                status = f"global {pct(record['mean_global_acc'])}% local {pct(record['mean_local_acc'])}%"
                if evaluated < len(record["peers"]):
                    status += f" ({evaluated} peers evaluated)"
            else:
                status = "not evaluated this round"
            status = f"{taking_part} participants, {status}"
            eps = [p["epsilon_spent"] for p in record["peers"].values() if "epsilon_spent" in p]
            if eps:
                status += f" | eps spent max {max(eps):.2f}"
            if plain and format is not OutputFormat.json:
                console.print(f"round {record['round'] + 1}/{total}: {status} ({record['seconds']:.1f} s)", highlight=False)
                return
            if not task:
                task.append(progress.add_task("rounds", total=total, status=""))
                progress.update(task[0], completed=record["round"])
            progress.update(task[0], advance=1, status=status)

        if backend is Backend.ray:

            def ray_runner(cfg: RunConfig, out: Path | None, **kwargs: Any) -> dict[str, Any]:
                return run_federation_ray(
                    cfg, out, address=address, num_cpus_per_peer=ray_cpus_per_peer,
                    peers_per_actor=ray_peers_per_actor, log_to_driver=verbose, **kwargs,
                )

            runner: Callable[..., dict[str, Any]] = ray_runner
            # without --passphrase-file each actor reads $SECURE_DFML_KEY_PASSPHRASE on its own node
            summary = runner(cfg, out, overwrite=overwrite, on_round=on_round, state_root=state,
                             passphrase=read_passphrase(passphrase_file) if passphrase_file is not None else None)
        else:
            runner = run_federation
            summary = run_federation(
                cfg, out, overwrite=overwrite, on_round=on_round, resume=resume is not None, state_root=state,
                passphrase=read_passphrase(passphrase_file),
            )
        if compare_non_private is None:
            compare_non_private = config is None and resume is None
        if compare_non_private and cfg.privacy.enabled:
            if task:
                progress.update(task[0], completed=0, status="non-private twin (same seed) for the cost of privacy")
            summary = add_non_private_baseline(cfg, summary, on_round, runner)
    if format is OutputFormat.json:
        print_json(summary)
    else:
        print_summary(summary)
        if summary.get("ledger_scope"):
            console.print(f"ledgers: {summary['ledger_scope']}", highlight=False, markup=False)
        for warning in summary.get("warnings", []):
            console.print(f"WARNING: {warning}", style="bold red", highlight=False, markup=False)
