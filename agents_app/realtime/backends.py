"""The fan-out's shape, and its in-memory backend (one process, no Redis): what sockets subscribe to, what a
publisher calls, the resume log's key and the conversation's channel name. The Redis backends are in fanout.py."""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from functools import lru_cache
from typing import Protocol

from agents_app.ops import metrics

logger = logging.getLogger(__name__)

LOG_MAX_EVENTS = 5000  # per conversation: one long answer's frames, with room to spare
LOG_TTL_SECONDS = 3600  # the log serves in-flight runs; finished ones replay from the database


class Subscriber(Protocol):
    async def deliver(self, seq: int, text: str) -> None: ...


@lru_cache(maxsize=4096)
def log_key(conversation_id) -> str:
    return f"chorus:log:{conversation_id}"


@lru_cache(maxsize=4096)
def channel_name(conversation_id) -> str:
    return f"chorus:conversation:{conversation_id}"


class Backend:
    """What sockets and publishers of one process (one event loop) use."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[Subscriber]] = defaultdict(set)

    async def publish(self, conversation_id, seq: int, text: str, since: float | None = None) -> None:
        """`since`: when the oldest token in the event reached the worker (time.monotonic()), for
        chorus_token_delivery_lag_seconds; None for other events."""
        raise NotImplementedError

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        raise NotImplementedError

    async def last_logged_seq(self, conversation_id) -> int:
        """The highest seq in the conversation's log (0 when it has none): tokens of a message still being
        written included, which the database does not know yet."""
        raise NotImplementedError

    async def flushed(self) -> None:
        """Wait until everything published so far has left this process."""

    async def subscribe(self, conversation_id, subscriber: Subscriber) -> None:
        self.subscribers[str(conversation_id)].add(subscriber)

    async def unsubscribe(self, conversation_id, subscriber: Subscriber) -> None:
        subscribers = self.subscribers.get(str(conversation_id))
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self.subscribers[str(conversation_id)]

    async def dispatch(self, conversation_id: str, seq: int, text: str) -> None:
        for subscriber in list(self.subscribers.get(conversation_id, ())):
            try:
                await subscriber.deliver(seq, text)
            except Exception:  # one broken socket must not starve the others
                logger.exception("delivering event %s of %s failed", seq, conversation_id)


class MemoryBackend(Backend):
    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, deque[tuple[int, str]]] = defaultdict(lambda: deque(maxlen=LOG_MAX_EVENTS))

    async def publish(self, conversation_id, seq: int, text: str, since: float | None = None) -> None:
        conversation_id = str(conversation_id)
        self.logs[conversation_id].append((seq, text))
        await self.dispatch(conversation_id, seq, text)
        if since is not None:
            metrics.TOKEN_DELIVERY_LAG.observe(time.monotonic() - since)

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        return [(seq, text) for seq, text in self.logs.get(str(conversation_id), ()) if seq > after_seq]

    async def last_logged_seq(self, conversation_id) -> int:
        log = self.logs.get(str(conversation_id))
        return log[-1][0] if log else 0
