"""`secure-dfml certify` and `secure-dfml verify`.

    secure-dfml keys init --auditor --out auditor/
    secure-dfml certify RUN_DIR --requirements audits/hospital.toml --signing-key auditor/auditor.key [--format json]
    secure-dfml verify RUN_DIR/certificate.json --public-key auditor/auditor.pub [--run RUN_DIR] [--format json]

certify exits 0 when the run is certified, 1 when a requirement fails, 2 on a
usage or input error; verify exits 0 when the signature (and, with --run, every
artifact) checks out, 1 when it does not, 2 on an input error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from secure_dfml.certify import (
    CERTIFICATE,
    CERTIFICATE_HTML,
    failed,
    load_requirements,
    load_signing_key,
)
from secure_dfml.certify import (
    certify as certify_run,
)
from secure_dfml.certify import (
    verify as verify_certificate,
)
from secure_dfml.cli._common import OutputFormat, console, err_console, friendly_errors, print_json
from secure_dfml.orchestration.certification import AuditStep, certify_with_audits


@friendly_errors
def certify(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `secure-dfml run` or `launch`.")],
    requirements: Annotated[Path, typer.Option("--requirements", "-r", help="Requirements TOML (profiles: audits/hospital.toml, factory.toml, research.toml).")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="Auditor's private key (from `secure-dfml keys init --auditor`).")],
    run_audits: Annotated[bool, typer.Option(
        "--run-audits", help="First run the audits the requirements need that the run lacks (threat models, and a "
                             "canary audit strong enough for [audits] min_strength); reuse those present.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the auditor's randomness for --run-audits.")] = 0,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
) -> None:
    """Check a run against deployment requirements and write a signed certificate.json / certificate.html."""
    req = load_requirements(requirements)
    key = load_signing_key(signing_key)
    if run_audits:
        out = err_console if fmt is OutputFormat.json else console

        def on_step(step: AuditStep) -> None:
            what = f"canary audit, {step.canaries_per_peer} canaries per peer" if step.kind == "canary" else step.name
            out.print(escape(f"running audit: {what} ({step.reason})"))

        def progress(done: int, total: int, what: str) -> None:
            if total and (done == total or done % max(1, total // 10) == 0):
                out.print(escape(f"  {what} {done}/{total}"), highlight=False)

        cert, _steps = certify_with_audits(run_dir, req, key, rng=np.random.default_rng(seed), on_step=on_step,
                                           progress=progress)
    else:
        cert = certify_run(run_dir, req, key)
    if fmt is OutputFormat.json:
        print_json({k: v for k, v in cert.items() if k != "manifest"} | {"certificate": str(run_dir / CERTIFICATE)})
    else:
        table = Table(title=f"{cert['verdict']}: {run_dir} against {req.name!r}")
        table.add_column("requirement")
        table.add_column("peer", justify="right")
        table.add_column("status")
        table.add_column("reason", overflow="fold")
        for r in cert["results"]:
            colour = "green" if r["status"] == "PASS" else "bold red"
            table.add_row(escape(r["requirement"]), "" if r["peer"] is None else str(r["peer"]),
                          f"[{colour}]{r['status']}[/]", escape(r["reason"]))
        console.print(table)
        console.print(escape(cert["audit_statement"]))
        console.print(escape(f"wrote {run_dir / CERTIFICATE} (signed) and {run_dir / CERTIFICATE_HTML}"))
    if not cert["certified"]:
        raise typer.Exit(code=1)


@friendly_errors
def verify(
    certificate: Annotated[Path, typer.Argument(help="certificate.json written by `secure-dfml certify`.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Auditor's public key (auditor.pub).")],
    run: Annotated[Path | None, typer.Option("--run", help="Also re-hash every artifact of this run directory.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
) -> None:
    """Check a certificate's signature and, with --run, that no artifact it covers changed."""
    result = verify_certificate(certificate, public_key, run)
    if fmt is OutputFormat.json:
        data = result.to_dict()
        data["failed_requirements"] = failed(result.certificate.get("results", [])) if result.certificate else []
        print_json(data)
    elif result.ok:
        what = f"; {result.checked_files} artifact(s) of {run} unchanged" if run is not None else " (artifacts not checked: pass --run)"
        console.print(escape(f"OK: signature valid{what}. The certificate says: {result.verdict}"))
    else:
        console.print("[bold red]VERIFICATION FAILED[/]")
        for p in result.problems:
            console.print(escape(f"  - {p}"))
    if not result.ok:
        raise typer.Exit(code=1)
