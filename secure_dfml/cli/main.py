"""The `secure-dfml` command line."""

from __future__ import annotations

import typer

from secure_dfml.cli.run import run

app = typer.Typer(
    name="secure-dfml",
    help="Decentralized Federated Mutual Learning with per-client DP, encrypted exchange and leakage audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
