"""``manifest.json``: the sha256 of every artifact a run wrote, with the code and
package versions that wrote it.

Artifacts (paths relative to the run directory, ``/``-separated)::

    config.toml, metrics.jsonl, summary.json, models/*, views/**, ledgers/*,
    capture/*, audit/<threat model>/results.json

Files are hashed byte for byte (timing fields stay inside them: the hash covers
exactly what is on disk).  Hidden files (temporary files of atomic writers) are
not artifacts.  Audit results written after the run are not in the run's
manifest; a certificate hashes them when it is issued.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from secure_dfml.errors import RunDirectoryError
from secure_dfml.privacy import atomic_write_bytes
from secure_dfml.rundir import (
    AUDIT,
    CANARY,
    CANARY_RESULTS,
    CAPTURE,
    CONFIG,
    LEDGERS,
    MANIFEST,
    METRICS,
    MODELS,
    SUMMARY,
    VIEWS,
)

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "ManifestDiff",
    "artifact_paths",
    "build_manifest",
    "canonical_json",
    "code_fingerprint",
    "compare_files",
    "hash_file",
    "manifest_file",
    "package_versions",
    "read_manifest",
    "sha256_hex",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "secure-dfml-manifest"
MANIFEST_VERSION = 1
RESULTS = "results.json"
PACKAGES = ("secure-dfml", "torch", "opacus", "tenseal", "pynacl", "numpy")
_CHUNK = 1 << 20


def manifest_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST


def canonical_json(obj: Any) -> bytes:
    """The bytes a hash or a signature covers: sorted keys, no whitespace, UTF-8,
    no NaN or infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root: Path, base: Path, *, recursive: bool) -> Iterator[str]:
    if not root.is_dir():
        return
    for p in sorted(root.rglob("*") if recursive else root.iterdir()):
        rel = p.relative_to(base)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield rel.as_posix()


def artifact_paths(run_dir: str | Path) -> list[str]:
    """The artifact files present in ``run_dir`` (relative, sorted)."""
    base = Path(run_dir)
    paths = [name for name in (CONFIG, METRICS, SUMMARY) if (base / name).is_file()]
    paths += _files_under(base / MODELS, base, recursive=False)
    paths += _files_under(base / VIEWS, base, recursive=True)
    paths += _files_under(base / LEDGERS, base, recursive=False)
    paths += _files_under(base / CAPTURE, base, recursive=False)
    audit_root = base / AUDIT
    if audit_root.is_dir():
        paths += [f"{AUDIT}/{d.name}/{RESULTS}" for d in sorted(audit_root.iterdir()) if (d / RESULTS).is_file()]
    canary = audit_root / CANARY
    if (canary / CANARY_RESULTS).is_file():  # the canary audit and the budget its own run spent
        paths.append(f"{AUDIT}/{CANARY}/{CANARY_RESULTS}")
        paths += _files_under(canary / LEDGERS, base, recursive=False)
    return sorted(paths)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_fingerprint() -> str:
    """sha256 over the installed secure_dfml package's .py files (sorted by path;
    each contributes its relative path and its sha256)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        h.update(f"{p.relative_to(root).as_posix()}\0{hash_file(p)}\n".encode())
    return h.hexdigest()


def build_manifest(run_dir: str | Path, *, include_manifest: bool = False) -> dict[str, Any]:
    """The manifest of ``run_dir`` as it is now.  ``include_manifest`` also hashes
    the run's own ``manifest.json`` (what a certificate covers)."""
    base = Path(run_dir)
    paths = artifact_paths(base)
    if include_manifest and manifest_file(base).is_file():
        paths = sorted([*paths, MANIFEST])
    files = {rel: {"sha256": hash_file(base / rel), "bytes": (base / rel).stat().st_size} for rel in paths}
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "hash": "sha256",
        "files": files,
        "packages": package_versions(),
        "code_fingerprint": code_fingerprint(),
    }


def write_manifest(run_dir: str | Path) -> Path:
    """Hash every artifact of ``run_dir`` into ``run_dir/manifest.json`` (atomically)."""
    path = manifest_file(run_dir)
    manifest = build_manifest(run_dir)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    logger.info("manifest: %d artifact(s) of %s hashed into %s", len(manifest["files"]), run_dir, path)
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """``manifest.json`` of ``run_dir``, or None when the run wrote none."""
    path = manifest_file(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable: {exc}") from exc
    _check_manifest(data, str(path))
    return dict(data)


def _check_manifest(data: Any, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise RunDirectoryError(f"{where} is not a secure-dfml manifest (format = {MANIFEST_FORMAT!r} missing)")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise RunDirectoryError(f"{where}: 'files' must map each path to {{\"sha256\": ..., \"bytes\": ...}}")


@dataclass(frozen=True)
class ManifestDiff:
    changed: tuple[str, ...]
    missing: tuple[str, ...]
    added: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not (self.changed or self.missing or self.added)


def compare_files(run_dir: str | Path, files: Mapping[str, Mapping[str, Any]], *, scope: list[str] | None = None) -> ManifestDiff:
    """Re-hash the files listed in ``files`` (path -> {"sha256": ...}) under
    ``run_dir``; ``added`` = artifacts present now (``scope``, default
    :func:`artifact_paths`) that ``files`` does not list."""
    base = Path(run_dir)
    changed: list[str] = []
    missing: list[str] = []
    for rel, entry in sorted(files.items()):
        p = base / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not p.is_file():
            missing.append(rel)
        elif hash_file(p) != entry.get("sha256"):
            changed.append(rel)
    present = artifact_paths(base) if scope is None else scope
    added = [rel for rel in present if rel not in files]
    return ManifestDiff(tuple(changed), tuple(missing), tuple(sorted(added)))
