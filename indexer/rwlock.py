"""A readers-writer lock: searches run side by side, a write runs alone.

Writer-preferring: once a writer waits, new readers queue behind it, so a
steady stream of searches cannot starve the applier; except while a long
reader (a snapshot copy) holds it, when the writer could not run anyway.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._long_readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0

    @contextlib.contextmanager
    def read(self, long: bool = False) -> Iterator[None]:
        """Shared access. `long` (a snapshot copy): while it is held, a waiting writer
        cannot run anyway, so it does not hold up other readers either."""
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or (self._writers_waiting and not self._long_readers):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
            self._long_readers += long
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._long_readers -= long
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self, after_waiting_readers: bool = False) -> Iterator[None]:
        """Exclusive access. `after_waiting_readers`: first let in the readers already
        queued (for a writer working in many short steps, so searches get in between
        steps instead of waiting behind all of them)."""
        with self._cond:
            while after_waiting_readers and self._readers_waiting:
                self._cond.wait()
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
