"""Result folders that are written aside and swapped into place.

A run or an audit writes into a temporary sibling of its final folder and
swaps it in only once everything is written, so a failure never damages the
results of an earlier run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from secure_dfml.errors import RunDirectoryError


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


def staging_dir(final_dir: Path) -> Path:
    """A fresh, empty temporary sibling of ``final_dir`` (see :func:`write_output_dir`)."""
    final_dir = Path(final_dir)
    return fresh_dir(final_dir.with_name(f".{final_dir.name}.partial-{os.getpid()}"))


def write_output_dir(final_dir: Path, files: Mapping[str, str | bytes], *, staging: Path | None = None) -> Path:
    """Write ``files`` into a temporary sibling folder, then swap it in.

    An existing ``final_dir`` is replaced only once every file is written; on
    any failure the earlier results stay untouched. ``staging``: an already
    prepared temporary folder (e.g. holding ledgers) to complete and swap in.
    """
    final_dir = Path(final_dir)
    tmp = staging if staging is not None else staging_dir(final_dir)
    try:
        for name, content in files.items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content, encoding="utf-8")
        swap_into_place(tmp, final_dir)
    except BaseException:
        if staging is None:  # a caller's staging folder is the caller's to clean up
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed) for the block;
    a second process asking for the same lock is refused at once with a clear
    message (the lock is released when the holder exits, even by a crash)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise RunDirectoryError(
            f"cannot use {lock_path.parent} for {what}: {exc.strerror or exc}; choose a folder you can write to"
        ) from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunDirectoryError(
                f"{what} is in use by {holder} (lock {lock_path}); wait for it to finish or choose another directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def stamp() -> str:
    """A readable UTC time stamp for folder names (e.g. 20261201-213000)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def swap_dir_atomically(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` so that, after a crash at any point,
    one complete generation exists: ``final``, or ``final`` + ``.old`` while
    the swap was in flight (see :func:`current_generation`)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def current_generation(final: Path) -> Path | None:
    """The complete folder :func:`swap_dir_atomically` left behind, if any."""
    if final.is_dir():
        return final
    old = final.with_name(final.name + ".old")
    return old if old.is_dir() else None
