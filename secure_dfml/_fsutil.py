"""Result folders that are written aside and swapped into place.

A run or an audit writes into a temporary sibling of its final folder and
swaps it in only once everything is written, so a failure never damages the
results of an earlier run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fresh_dir(path: Path) -> Path:
    """``path`` as a new, empty folder (an earlier one there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def swap_into_place(tmp: Path, final: Path) -> Path:
    """Rename the finished folder ``tmp`` to ``final``.  An earlier ``final`` is
    moved to a backup sibling first and removed only once ``tmp`` has taken its
    place."""
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        final.rename(backup)
        tmp.rename(final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(final)
    return final
