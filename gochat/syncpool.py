"""The twin of Go's ``sync.Pool``: reuse of scratch objects (read buffers) across connections.

Go's pool is per-P and cleared by the GC; under gevent every greenlet runs on one thread
and ``get``/``put`` never yield, so a plain list is already safe. ``max_idle`` bounds what
the pool keeps, so a burst of 20,000 connections does not pin 20,000 buffers forever.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Pool(Generic[T]):
    def __init__(self, new: Callable[[], T], max_idle: int = 64) -> None:
        self.new = new
        self.max_idle = max_idle
        self._idle: list[T] = []
        self.created = 0

    def get(self) -> T:
        """An idle object, or a fresh one from ``new`` (Go: ``pool.Get()``)."""
        if self._idle:
            return self._idle.pop()
        self.created += 1
        return self.new()

    def put(self, item: T) -> None:
        """Give an object back for reuse; beyond ``max_idle`` it is left to the GC (Go: ``pool.Put(x)``)."""
        if len(self._idle) < self.max_idle:
            self._idle.append(item)

    @property
    def idle(self) -> int:
        return len(self._idle)
