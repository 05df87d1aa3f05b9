"""Where the built-in data sets that need files are looked for.

Order, first match wins:

1. ``data.path`` (the data set's own folder/file, or a folder containing it);
   when set it is the only place looked at.
2. ``$SECURE_DFML_DATA/<subdir>`` (a folder containing ``fashion-mnist/``,
   ``cifar10/``, ``cardio/``).
3. ``../shared/data/<subdir>`` relative to the current directory.
4. ``../shared/data/<subdir>`` relative to the repository root (the folder
   that contains the ``secure_dfml`` package).
5. System folders, e.g. ``/usr/share/datasets/fashion-mnist`` (Debian package
   ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from secure_dfml.errors import DataError

log = logging.getLogger(__name__)

ENV_VAR = "SECURE_DFML_DATA"
# secure_dfml/data/_locate.py -> parents[2] is the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

T = TypeVar("T")


def search_locations(subdir: str) -> list[tuple[str, Path]]:
    """Candidate folders for a built-in data set (after ``data.path``), in order."""
    out: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append((f"${ENV_VAR}", Path(env).expanduser() / subdir))
    out.append(("../shared/data (from the current directory)", Path.cwd() / ".." / "shared" / "data" / subdir))
    out.append(("../shared/data (from the repository root)", REPO_ROOT / ".." / "shared" / "data" / subdir))
    out.extend(("system folder", p) for p in SYSTEM_DIRS.get(subdir, ()))
    seen: set[Path] = set()
    unique = []
    for origin, path in out:
        key = path.resolve() if path.exists() else path.absolute()
        if key not in seen:
            seen.add(key)
            unique.append((origin, path))
    return unique


def locate(
    *,
    name: str,
    subdir: str,
    cfg_path: str | None,
    probe: Callable[[Path], T | None],
    what: str,
    how_to_get: str,
) -> T:
    """Find a built-in data set's files; ``probe`` turns a candidate into a usable source or None."""
    if cfg_path is not None:
        base = Path(cfg_path).expanduser()
        if not base.exists():
            raise DataError(
                f"data.path = {cfg_path!r} does not exist (data set {name!r}). Point it at {what}, "
                f"or remove data.path to use the default locations. {how_to_get}"
            )
        for candidate in (base / subdir, base):
            found = probe(candidate)
            if found is not None:
                log.info("data set %s: using %s (data.path)", name, candidate)
                return found
        raise DataError(
            f"data.path = {cfg_path!r} does not contain {what} (data set {name!r}), neither directly nor "
            f"in a subfolder {subdir}/. {how_to_get}"
        )
    looked = []
    for origin, candidate in search_locations(subdir):
        found = probe(candidate)
        if found is not None:
            log.info("data set %s: using %s (%s)", name, candidate, origin)
            return found
        looked.append(f"{candidate} ({origin})")
    raise DataError(
        f"could not find the {name!r} data set ({what}). Looked in: {'; '.join(looked)}. {how_to_get}"
    )
