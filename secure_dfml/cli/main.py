"""The `secure-dfml` command line."""

from __future__ import annotations

import os

import typer

from secure_dfml.cli import budget, keys
from secure_dfml.cli.audit import audit
from secure_dfml.cli.certify import certify, verify
from secure_dfml.cli.peer import launch, peer
from secure_dfml.cli.pipeline import pipeline
from secure_dfml.cli.run import run
from secure_dfml.cli.tune import tune

app = typer.Typer(
    name="secure-dfml",
    help="Decentralized Federated Mutual Learning with per-client DP, encrypted exchange and leakage audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help layout: rich's option table shares 80 columns among five
    # columns and cuts option names and words (--compare-non-pri..., federation.algori...);
    # click keeps every option name and word whole and wraps only the help text.
    rich_markup_mode=None,
)
app.command("run")(run)
app.command("audit")(audit)
app.command("tune")(tune)
app.command("peer")(peer)
app.command("launch")(launch)
app.command("certify")(certify)
app.command("verify")(verify)
app.command("pipeline")(pipeline)
app.add_typer(keys.app, name="keys", help="Create and inspect per-peer signing and box keys.")
app.add_typer(budget.app, name="budget", help="Plan privacy budgets and inspect ledgers.")


def main() -> None:
    # Many small models on few cores: one intra-op thread per process is far faster
    # than oversubscribed thread pools.  SECURE_DFML_THREADS overrides.
    import torch

    torch.set_num_threads(int(os.environ.get("SECURE_DFML_THREADS", "1")))
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
