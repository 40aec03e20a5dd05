"""Weighted round robin across clients: who gets the next unit of the shared budget (pure).

Deficit round robin with unit costs: every client with waiters has a FIFO queue and a place in
a ring; the client at the front of the ring gets up to `weight` units in a row (its turn), then
goes to the back. A client whose queue empties leaves the ring and forgets its turn (no credit
for idling); one that starts waiting joins at the back. So a client waits at most one turn of
every other waiting client — its flood costs the others at most `weight` units in a round,
however many requests it queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["FairScheduler"]

T = TypeVar("T")


class FairScheduler(Generic[T]):
    """Items queued per client, handed out in weighted round robin across clients."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}
        self._weights: dict[str, int] = {}
        # Clients with waiters; the front one is taking its turn.
        self._ring: deque[str] = deque()
        # Units left in the front client's turn (≥ 1 whenever the ring is not empty).
        self._left = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def length(self, client: str) -> int:
        """How many items `client` has queued."""
        queue = self._queues.get(client)
        return 0 if queue is None else len(queue)

    def clients(self) -> list[str]:
        """The clients with queued items, in the order their turns come."""
        return list(self._ring)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every queued item with its client (in no particular order)."""
        for client, queue in list(self._queues.items()):
            for item in list(queue):
                yield client, item

    def push(self, client: str, item: T, weight: int = 1) -> None:
        """Queue `item` behind `client`'s others; a client new to the ring joins at its back."""
        if weight < 1:
            raise ValueError(f"weight must be ≥ 1, got {weight}")
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
            self._ring.append(client)
            if len(self._ring) == 1:
                self._left = weight
        self._weights[client] = weight
        queue.append(item)
        self._size += 1

    def remove(self, client: str, item: T) -> bool:
        """Take `item` out of the queue (its caller gave up); False if it was not there."""
        queue = self._queues.get(client)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not queue:
            self._drop(client)
        return True

    def pop(self) -> tuple[str, T] | None:
        """The next item to serve and its client, or None when nothing waits."""
        if not self._ring:
            return None
        client = self._ring[0]
        queue = self._queues[client]
        item = queue.popleft()
        self._size -= 1
        self._left -= 1
        if not queue:
            self._drop(client)
        elif self._left <= 0:
            self._ring.rotate(-1)
            self._left = self._weights[self._ring[0]]
        return client, item

    def ahead(self, client: str, weight: int = 1) -> int:
        """How many items `pop` hands out before one that `client` would push now.

        Exact while nothing else arrives or leaves; arrivals of clients that are not waiting
        yet can only add to it (they join the ring behind everyone), so it is a lower bound.
        """
        ring = self._ring
        if not ring:
            return 0
        queued = self.length(client)
        weight = self._weights.get(client, weight)
        lengths = [len(self._queues[name]) for name in ring]
        weights = [self._weights[name] for name in ring]
        if ring[0] == client:
            if queued < self._left:
                return queued
            # Its turns after the current one, up to and including the one that serves it.
            turns = (queued - self._left) // weight + 1
            others = zip(lengths[1:], weights[1:], strict=True)
            return queued + sum(min(n, turns * w) for n, w in others)
        position = ring.index(client) if client in self._queues else len(ring)
        turns = queued // weight + 1
        total = queued + min(lengths[0], self._left + (turns - 1) * weights[0])
        for index in range(1, len(ring)):
            if index == position:
                continue
            served = turns if index < position else turns - 1
            total += min(lengths[index], served * weights[index])
        return total

    def _drop(self, client: str) -> None:
        del self._queues[client]
        del self._weights[client]
        if self._ring[0] == client:
            self._ring.popleft()
            self._left = self._weights[self._ring[0]] if self._ring else 0
        else:
            self._ring.remove(client)
