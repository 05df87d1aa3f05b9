"""Where the built-in data sets that need files are looked for.

Order, first match wins:

1. ``data.path`` (the data set's own folder/file, or a folder containing it);
   when set it is the only place looked at.  A relative ``data.path`` is, like
   any path the user types, relative to the current directory.
2. ``$SECURE_DFML_DATA/<subdir>`` (a folder containing ``fashion-mnist/``,
   ``cifar10/``, ``cardio/``).
3. ``shared/data/<subdir>`` beside the project checkout: the checkout is
   :data:`REPO_ROOT`, the parent of the ``secure_dfml`` package directory, so
   this is ``REPO_ROOT/../shared/data`` (the package directory's parent's
   parent).  It is fixed by where the package lives, never by the current
   directory, so a command finds the same data wherever it is run from; for an
   installed (non-checkout) package it simply does not exist.
4. System folders, e.g. ``/usr/share/datasets/fashion-mnist`` (Debian package
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
# secure_dfml/data/_locate.py -> parents[2] is the project checkout (the folder holding secure_dfml/).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where ``shared/data`` is looked for: beside the checkout (see the module docstring).
SHARED_DATA_ORIGIN = "shared/data beside the project checkout"
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

T = TypeVar("T")


def search_locations(subdir: str) -> list[tuple[str, Path]]:
    """Candidate folders for a built-in data set (after ``data.path``), in order:
    ``$SECURE_DFML_DATA``, ``shared/data`` beside the checkout, system folders
    (none of them depends on the current directory)."""
    out: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append((f"${ENV_VAR}", Path(env).expanduser() / subdir))
    out.append((SHARED_DATA_ORIGIN, REPO_ROOT.parent / "shared" / "data" / subdir))
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
