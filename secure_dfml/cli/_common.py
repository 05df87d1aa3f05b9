"""Shared CLI helpers: output format, error reporting, logging."""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from secure_dfml.crypto import PASSPHRASE_ENV
from secure_dfml.errors import ConfigError, SecureDFMLError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # Opacus configures the root logger when imported
    )


def error_text(message: str) -> Text:
    """``error: <message>`` with the message as plain text (no rich markup)."""
    return Text.assemble(("error:", "bold red"), " ", message)


def friendly_errors(fn: F) -> F:
    """Turn SecureDFMLError into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SecureDFMLError as exc:
            # The library's message is printed literally: it names config sections
            # such as [data] that rich would otherwise read as markup and drop.
            err_console.print(error_text(str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def read_passphrase(path: Path | None) -> str | None:
    """The key passphrase from ``--passphrase-file`` (one line), else from
    ``$SECURE_DFML_KEY_PASSPHRASE``, else None."""
    if path is None:
        return os.environ.get(PASSPHRASE_ENV) or None
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except OSError as exc:
        raise ConfigError(f"--passphrase-file {path} cannot be read: {exc.strerror or exc}") from None
