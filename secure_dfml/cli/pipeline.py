"""`secure-dfml pipeline`: the whole job in one command -- train with DP and encryption, audit, certify, verify.

    secure-dfml pipeline [--config FILE] [--requirements audits/factory.toml] [--out runs/pipeline] [--format json]

Exit codes: 0 certified and verified, 1 a requirement failed (or verification
failed), 2 a usage or input error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape

from secure_dfml.certify import load_requirements, requirements_profile
from secure_dfml.cli._common import OutputFormat, console, err_console, friendly_errors, print_json, setup_logging
from secure_dfml.config import default_config, load_config
from secure_dfml.orchestration.certification import AuditStep, run_pipeline
from secure_dfml.report import pct

DEFAULT_PROFILE = "factory"


@friendly_errors
def pipeline(
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="TOML config; omit for the built-in federation (DP at epsilon 8, NaCl envelopes).")] = None,
    requirements: Annotated[Optional[Path], typer.Option(
        "--requirements", "-r", help=f"Requirements TOML, or a shipped profile by name: hospital, factory, research "
                                     f"(default: {DEFAULT_PROFILE}).")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for the run (OUT/run) and the auditor key (OUT/auditor). A finished run there "
                            "is reused, not retrained.")] = Path("runs/pipeline"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the auditor's randomness.")] = 0,
    format: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Train a federation, run the audits the requirements ask for, write a signed certificate and verify it."""
    setup_logging(verbose)
    req = load_requirements(requirements if requirements is not None else requirements_profile(DEFAULT_PROFILE))
    cfg = load_config(config) if config is not None else default_config()
    show = err_console if format is OutputFormat.json else console
    total = cfg.federation.rounds

    def say(text: str) -> None:
        show.print(escape(text), highlight=False)

    def on_round(record: dict[str, Any]) -> None:
        eps = [p["epsilon_spent"] for p in record["peers"].values() if "epsilon_spent" in p]
        say(f"train: round {record['round'] + 1}/{total} global {pct(record['mean_global_acc'])}%"
            + (f" eps max {max(eps):.2f}" if eps else "") + f" ({record['seconds']:.1f} s)")

    def on_step(step: AuditStep) -> None:
        what = f"canary audit, {step.canaries_per_peer} canaries per peer" if step.kind == "canary" else step.name
        say(f"audit: {what} ({step.reason})")

    def progress(done: int, total: int, what: str) -> None:
        if total and (done == total or done % max(1, total // 5) == 0):
            say(f"  {what} {done}/{total}")

    say(f"1/4 train {cfg.federation.id} ({cfg.federation.peers} peers, {total} rounds, "
        + (f"DP epsilon {cfg.privacy.epsilon:g}" if cfg.privacy.enabled else "NON-PRIVATE")
        + f", channel {cfg.crypto.channel}) -> {out / 'run'}; then 2/4 audits, 3/4 certify against "
          f"{req.name!r}, 4/4 verify")
    result = run_pipeline(cfg, out, req, rng=np.random.default_rng(seed), on_round=on_round, on_step=on_step,
                          progress=progress)
    if format is OutputFormat.json:
        print_json(result.to_dict())
    else:
        if not result.trained:
            say(f"(reused the finished run in {result.run_dir}; remove it to train again)")
        for r in result.certificate["results"]:
            peer = "" if r["peer"] is None else f" peer {r['peer']}"
            say(f"  {r['status']}  {r['requirement']}{peer}: {r['reason']}")
        say(f"3/4 certificate: {result.certificate['verdict']} -> {result.run_dir / 'certificate.json'} (signed), "
            f"{result.run_dir / 'certificate.html'}")
        say("4/4 verify: " + ("OK, signature and every artifact check out" if result.verified.ok else
                              "FAILED: " + "; ".join(result.verified.problems)))
        say(f"check it yourself: secure-dfml verify {result.run_dir / 'certificate.json'} --public-key "
            f"{result.auditor_dir / 'auditor.pub'} --run {result.run_dir}")
    if not result.ok:
        raise typer.Exit(code=1)
