"""Traffic capture: a transport tap that keeps every envelope as it crossed the wire.

The eavesdropper audit reads what was actually sent -- not models sealed again
after the run.  Each sent message becomes one file
``r<round>_<sender>_<recipient>_<kind>_<n>.env`` holding exactly the bytes
that travelled (the routing fields in the name are what a network observer
sees in the clear anyway)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from secure_dfml.transport._base import Message

_NAME = re.compile(r"r(\d+)_(\d+)_(\d+)_([A-Za-z0-9._:-]+)_(\d+)\.env")


class CaptureTap:
    """``tap(direction, message)`` for an endpoint: writes every *sent* message to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = sum(1 for _ in self.root.glob("*.env"))  # a resumed run never overwrites what was captured
        self._lock = threading.Lock()

    def __call__(self, direction: str, m: Message) -> None:
        if direction != "sent":
            return
        with self._lock:
            self._n += 1
            n = self._n
        (self.root / f"r{m.round_index:05d}_{m.sender:03d}_{m.recipient:03d}_{m.kind}_{n:06d}.env").write_bytes(m.data)


@dataclass(frozen=True)
class CapturedMessage:
    round_index: int
    sender: int
    recipient: int
    kind: str
    path: Path

    def data(self) -> bytes:
        return self.path.read_bytes()


def read_capture(root: Path) -> list[CapturedMessage]:
    """The captured messages under ``root``, in (round, sender, recipient, kind) order."""
    out = []
    for path in sorted(Path(root).glob("*.env")):
        m = _NAME.fullmatch(path.name)
        if m is None:
            continue
        out.append(CapturedMessage(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), path))
    return sorted(out, key=lambda c: (c.round_index, c.sender, c.recipient, c.kind, c.path.name))
