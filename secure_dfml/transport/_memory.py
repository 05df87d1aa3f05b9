"""In-memory transport: the default, used by simulations and tests."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from secure_dfml.transport._base import Message

logger = logging.getLogger(__name__)


class InMemoryTransport:
    """Thread-safe in-process mailbox per recipient.

    ``drop`` decides per message whether it is lost (simulated failures).  With
    the sequential simulation engine every sender has finished before the
    aggregator receives, so a message absent at receive time is treated as one
    that missed the deadline: ``receive`` only waits while another thread could
    still deliver (``synchronous=False``).
    """

    def __init__(self, *, drop: Callable[[Message], bool] | None = None, synchronous: bool = True) -> None:
        self._boxes: dict[int, list[Message]] = defaultdict(list)
        self._cond = threading.Condition()
        self._drop = drop
        self._synchronous = synchronous
        self._bytes = 0
        self.dropped = 0

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def send(self, message: Message) -> None:
        with self._cond:
            self._bytes += len(message.data)
            if self._drop is not None and self._drop(message):
                self.dropped += 1
                logger.info("message %s %d->%d dropped (simulated failure)", message.kind, message.sender, message.recipient)
                return
            self._boxes[message.recipient].append(message)
            self._cond.notify_all()

    def receive(
        self, recipient: int, *, round_index: int, kind: str, expected: int, timeout: float
    ) -> list[Message]:
        deadline = time.monotonic() + timeout

        def matching() -> list[Message]:
            return [m for m in self._boxes[recipient] if m.round_index == round_index and m.kind == kind]

        with self._cond:
            while not self._synchronous and len(matching()) < expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            got = matching()
            self._boxes[recipient] = [m for m in self._boxes[recipient] if m not in got]
            return got

    def close(self) -> None:
        with self._cond:
            self._boxes.clear()
