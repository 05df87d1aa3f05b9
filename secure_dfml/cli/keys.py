"""`secure-dfml keys`: create and inspect peer keys.

    secure-dfml keys init --peers 10 --out keys/ [--federation ID] [--passphrase-file FILE]
    secure-dfml keys show keys/ [--format table|json]
    secure-dfml keys init --auditor --out auditor/   (auditor.key, 0600, and auditor.pub: hex Ed25519 keys)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from secure_dfml.certify import write_auditor_key
from secure_dfml.cli._common import OutputFormat, console, err_console, friendly_errors, print_json
from secure_dfml.crypto import (
    DIRECTORY_FILE,
    KeyFileError,
    generate_keys,
    load_directory,
    private_key_path,
    write_keys,
)

app = typer.Typer(
    name="keys",
    help="Create and inspect per-peer Ed25519 signing and X25519 box keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_MAX_PASSPHRASE_FILE = 64 * 1024


def _read_passphrase(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_PASSPHRASE_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_PASSPHRASE_FILE:
        raise KeyFileError(f"passphrase file {path} is larger than {_MAX_PASSPHRASE_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"passphrase file {path} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text:
        raise KeyFileError(f"passphrase file {path} is empty")
    return text


@app.command("init")
@friendly_errors
def init(
    peers: int | None = typer.Option(None, "--peers", min=1, help="Number of peers (ids 0..N-1); required unless --auditor."),
    out: Path = typer.Option(..., "--out", help="Folder to write directory.json and peer-<id>.key files to."),
    federation: str = typer.Option("secure-dfml-demo", "--federation", help="Federation id (must match the run's federation.id)."),
    passphrase_file: Path | None = typer.Option(
        None, "--passphrase-file", help="Seal private keys with the passphrase in this file (argon2id + SecretBox)."
    ),
    kdf: str = typer.Option(
        "moderate", "--kdf", help="argon2id strength for --passphrase-file: interactive, moderate or sensitive."
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing key files."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output format."),
    auditor: bool = typer.Option(
        False, "--auditor", help="Create an auditor signing key for certificates instead: auditor.key (0600) and auditor.pub."
    ),
) -> None:
    """Create per-peer keys and the public peer directory (or, with --auditor, an auditor key)."""
    if auditor:
        if peers is not None:
            raise KeyFileError("--auditor creates one auditor key; drop --peers")
        key_path, pub_path = write_auditor_key(out, overwrite=force)
        if fmt is OutputFormat.json:
            print_json({"auditor_key": str(key_path), "auditor_public_key": str(pub_path),
                        "public_key": pub_path.read_text(encoding="ascii").strip()})
            return
        console.print(
            f"wrote {key_path} (private, mode 0600: keep it with the auditor only) and {pub_path} "
            "(public: give it to whoever verifies certificates). Both hold a 32-byte Ed25519 key as 64 hex digits."
        )
        return
    if peers is None:
        raise KeyFileError("--peers N is required (or pass --auditor for an auditor key)")
    if kdf not in ("interactive", "moderate", "sensitive"):
        raise KeyFileError(f"--kdf {kdf!r}: expected interactive, moderate or sensitive")
    passphrase = _read_passphrase(passphrase_file) if passphrase_file is not None else None
    keyring = generate_keys(peers, federation)
    written = write_keys(out, keyring, passphrase=passphrase, overwrite=force, kdf=kdf)  # type: ignore[arg-type]
    summary = {
        "federation_id": federation,
        "directory": str(out / DIRECTORY_FILE),
        "peers": {str(pid): keyring.directory.peers[pid].fingerprint for pid in keyring.directory.peer_ids},
        "private_key_files": [str(p) for p in written[1:]],
        "passphrase_sealed": passphrase is not None,
    }
    if fmt is OutputFormat.json:
        print_json(summary)
        return
    _print_table(federation, _rows(out, keyring.directory))
    sealed = "sealed with the passphrase (argon2id)" if passphrase else "NOT passphrase-sealed"
    console.print(
        f"wrote {out / DIRECTORY_FILE} (public: share it with every peer) and {len(written) - 1} private key "
        f"file(s), mode 0600, {sealed}. Give each peer only its own peer-<id>.key."
    )


@app.command("show")
@friendly_errors
def show(
    directory: Path = typer.Argument(..., help="Key folder (or its directory.json)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output format."),
) -> None:
    """List the peers of a key folder with their fingerprints."""
    pubdir = load_directory(directory)
    folder = directory if directory.is_dir() else directory.parent
    rows = _rows(folder, pubdir)
    if fmt is OutputFormat.json:
        print_json({"federation_id": pubdir.federation_id, "peers": rows})
        return
    _print_table(pubdir.federation_id, rows)
    bad = [r for r in rows if r["private_key"] == "too open"]
    if bad:
        err_console.print(
            f"[bold yellow]warning:[/] {len(bad)} private key file(s) readable by other users; run chmod 600 on them"
        )


def _rows(folder: Path, pubdir: Any) -> list[dict[str, Any]]:
    rows = []
    for pid in pubdir.peer_ids:
        pub = pubdir.peers[pid]
        path = private_key_path(folder, pid)
        if not path.is_file():
            status = "absent"
        elif os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            status = "too open"
        else:
            status = "present"
        rows.append(
            {
                "peer": pid,
                "fingerprint": pub.fingerprint,
                "verify_key": bytes(pub.verify_key).hex(),
                "box_public_key": bytes(pub.box_public_key).hex(),
                "private_key": status,
            }
        )
    return rows


def _print_table(federation_id: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"federation {federation_id!r}: {len(rows)} peer(s)")
    table.add_column("peer", justify="right")
    table.add_column("fingerprint", no_wrap=True)
    table.add_column("private key", no_wrap=True)
    for r in rows:
        colour = {"present": "green", "absent": "dim", "too open": "bold red"}[r["private_key"]]
        table.add_row(str(r["peer"]), r["fingerprint"], f"[{colour}]{r['private_key']}[/]")
    console.print(table)
    console.print(
        "fingerprint = BLAKE2b-160 of the peer's Ed25519 verify key and X25519 box key; compare it out of band. "
        "Full keys: --format json."
    )
