"""`secure-dfml peer` (one real peer process) and `secure-dfml launch` (all of them, locally)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer

from secure_dfml import interrupted_config
from secure_dfml.cli._common import OutputFormat, console, friendly_errors, print_json, read_passphrase, setup_logging
from secure_dfml.cli.run import print_summary
from secure_dfml.config import default_config, load_config
from secure_dfml.crypto import PASSPHRASE_ENV
from secure_dfml.orchestration.launch import PAUSED_EXIT, launch_federation
from secure_dfml.orchestration.peer import PeerPaused, run_peer
from secure_dfml.report import pct


def _stop_on_sigterm() -> None:
    """SIGTERM stops a peer like Ctrl-C: its last checkpoint stays, it resumes when started again."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@friendly_errors
def peer(
    config: Annotated[Path, typer.Option("--config", "-c", help="The federation file (TOML).")],
    peer_id: Annotated[int, typer.Option("--id", help="This peer's id.")],
    state: Annotated[Path, typer.Option("--state", help="This peer's state directory (ledger, checkpoints).")],
    keys: Annotated[Optional[Path], typer.Option("--keys", help="Key folder from `keys init` (default: crypto.keys_dir).")] = None,
    passphrase_file: Annotated[
        Optional[Path], typer.Option("--passphrase-file", help=f"File holding the key passphrase (or ${PASSPHRASE_ENV}).")
    ] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Run id shared by the peers (set by launch).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start a new run even if an unfinished one is checkpointed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-round lines.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log protocol events.")] = False,
) -> None:
    """Run one peer: its own data, its own key, its own port; resumes when started again."""
    setup_logging(verbose)
    _stop_on_sigterm()
    cfg = load_config(config)
    keys_dir = keys if keys is not None else (Path(cfg.crypto.keys_dir) if cfg.crypto.keys_dir else None)

    def on_round(report: Any) -> None:
        if not quiet:
            entry = report["entry"]
            console.print(
                f"peer {peer_id} round {report['round'] + 1}/{cfg.federation.rounds}: "
                f"global {pct(entry.get('global_acc'))}% local {pct(entry.get('local_acc'))}%", highlight=False,
            )

    try:
        run_peer(
            cfg, peer_id, state_dir=state, keys_dir=keys_dir, passphrase=read_passphrase(passphrase_file),
            run_id=run_id, fresh=fresh, on_round=on_round,
        )
    except PeerPaused as exc:
        console.print(f"{exc}; its checkpoint is in {state} (start it again to resume)", highlight=False)
        raise typer.Exit(code=PAUSED_EXIT) from None
    except KeyboardInterrupt:
        console.print(f"peer {peer_id} stopped; its last checkpoint is in {state} (start it again to resume)")
        raise typer.Exit(code=130) from None


@friendly_errors
def launch(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config; omit for the built-in federation.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<time>-<id>-<algorithm>).")] = None,
    state: Annotated[Optional[Path], typer.Option("--state", help="Root of the peers' state directories (default runs/state/<id>).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the interrupted launch into this run directory.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Override federation.rounds.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", help="table or json (the summary).")] = OutputFormat.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log launcher events.")] = False,
) -> None:
    """Start every peer as a local process on loopback and gather a run directory."""
    setup_logging(verbose)
    _stop_on_sigterm()
    if resume is not None:
        cfg = load_config(interrupted_config(resume))
    else:
        cfg = load_config(config) if config is not None else default_config()
    if rounds is not None:
        cfg = cfg.replace(federation={"rounds": rounds})
    total = cfg.federation.rounds
    plain = not sys.stdout.isatty()

    def on_round(record: Any) -> None:
        if format is OutputFormat.json:
            return
        eps = [p["epsilon_spent"] for p in record["peers"].values() if "epsilon_spent" in p]
        line = (
            f"round {record['round'] + 1}/{total}: global {pct(record['mean_global_acc'])}% "
            f"local {pct(record['mean_local_acc'])}% ({record['seconds']:.1f} s)"
            + (f" | eps spent max {max(eps):.2f}" if eps else "")
        )
        console.print(line, highlight=False, soft_wrap=plain)

    try:
        summary = launch_federation(
            cfg, resume if resume is not None else out, state_root=state, overwrite=overwrite,
            resume=resume is not None, on_round=on_round,
        )
    except KeyboardInterrupt:
        where = resume if resume is not None else out
        console.print(f"launch stopped; continue it with `secure-dfml launch --resume {where}`")
        raise typer.Exit(code=130) from None
    if format is OutputFormat.json:
        print_json(summary)
    else:
        print_summary(summary)
