"""How a conversation's events reach its sockets, and the log a reconnecting socket resumes from.

Every event is published once, already encoded, with its seq. Two backends share one shape:

- Redis (REDIS_URL set): the publisher appends the event to a Redis Stream per conversation (the resume log,
  entry id = seq, trimmed and expiring) and PUBLISHes it on the conversation's pub/sub channel, both in one
  round trip. Each web-server process holds ONE pub/sub connection, subscribed to the channels of the
  conversations that have a socket in that process, and hands each event to those sockets directly. Unlike
  a channels-redis group (one message per socket through the layer, dropped silently at capacity), this
  costs one Redis message per event per process and never drops an event to an idle subscriber.
- Memory (no Redis, one process): the same, in process.

Sockets subscribe before they read the log, and drop any seq they already sent, so a resume has no gap and
no duplicate (see consumers.py).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict, deque
from typing import Any, Protocol

from django.conf import settings
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

LOG_MAX_EVENTS = 5000  # per conversation: one long answer's frames, with room to spare
LOG_TTL_SECONDS = 3600  # the log serves in-flight runs; finished ones replay from the database
PUBLISH_ATTEMPTS = 6  # retries over about 12 s (0.2 s doubling): a Redis restart takes less
COMMANDS_PER_EVENT = 2  # XADD, PUBLISH (and one EXPIRE per conversation of a batch)


class Subscriber(Protocol):
    async def deliver(self, seq: int, text: str) -> None: ...


def log_key(conversation_id) -> str:
    return f"chorus:log:{conversation_id}"


def channel_name(conversation_id) -> str:
    return f"chorus:conversation:{conversation_id}"


class Backend:
    """What sockets and publishers of one process (one event loop) use."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[Subscriber]] = defaultdict(set)

    async def publish(self, conversation_id, seq: int, text: str) -> None:
        raise NotImplementedError

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
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

    async def publish(self, conversation_id, seq: int, text: str) -> None:
        conversation_id = str(conversation_id)
        self.logs[conversation_id].append((seq, text))
        await self.dispatch(conversation_id, seq, text)

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        return [(seq, text) for seq, text in self.logs.get(str(conversation_id), ()) if seq > after_seq]


class RedisBackend(Backend):
    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        super().__init__()
        self.client = aioredis.from_url(url, health_check_interval=30)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task | None = None
        self._pending: list[tuple[Any, int, str]] = []
        self._flusher: asyncio.Task | None = None

    async def publish(self, conversation_id, seq: int, text: str) -> None:
        """Queue the event; a flusher sends everything queued in one pipeline (one round trip) as soon as the
        loop is free, so under load many events share a round trip. Never raises: an event Redis could not
        take is lost to live sockets only. Messages and run ends are in the database, so a socket that
        resumes still ends with the complete, persisted text."""
        self._pending.append((conversation_id, seq, text))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def flushed(self) -> None:
        """Wait until everything queued so far has been sent (or given up on)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            for attempt in range(PUBLISH_ATTEMPTS):
                try:
                    pipe = self.client.pipeline(transaction=False)
                    _log_and_announce(pipe, batch)
                    _check_results(await pipe.execute(raise_on_error=False), batch)
                    break
                except (OSError, RedisError) as exc:
                    logger.warning("publishing %d events failed (%s), attempt %d", len(batch), exc, attempt)
                    await asyncio.sleep(0.2 * 2**attempt)

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        entries = await self.client.xrange(log_key(conversation_id), min=f"{after_seq + 1}-0", max="+")
        return [(int(entry_id.split(b"-")[0]), fields[b"e"].decode()) for entry_id, fields in entries]

    async def subscribe(self, conversation_id, subscriber: Subscriber) -> None:
        first = str(conversation_id) not in self.subscribers
        await super().subscribe(conversation_id, subscriber)
        if first:
            await self.pubsub.subscribe(channel_name(conversation_id))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever())

    async def unsubscribe(self, conversation_id, subscriber: Subscriber) -> None:
        await super().unsubscribe(conversation_id, subscriber)
        if str(conversation_id) not in self.subscribers:
            try:
                await self.pubsub.unsubscribe(channel_name(conversation_id))
            except Exception:  # the reader reconnects and resubscribes to what is left
                logger.warning("unsubscribing from %s failed", conversation_id, exc_info=True)

    async def _read_forever(self) -> None:
        prefix = len("chorus:conversation:")
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                seq, _, text = message["data"].decode().partition(" ")
                await self.dispatch(message["channel"].decode()[prefix:], int(seq), text)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis restarted or unreachable: redis-py reconnects and resubscribes on the next read.
                logger.warning("reading conversation events from Redis failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)


def _log_and_announce(pipe, batch: list[tuple[Any, int, str]]) -> None:
    """Queue a batch of events on a pipeline: XADD and PUBLISH per event, then one EXPIRE per conversation."""
    for conversation_id, seq, text in batch:
        # Log first, then announce: a socket subscribes first and reads the log second, so whichever way the
        # two interleave it sees the event at least once (and drops the copy by its seq).
        pipe.xadd(log_key(conversation_id), {"e": text}, id=f"{seq}-0", maxlen=LOG_MAX_EVENTS, approximate=True)
        pipe.publish(channel_name(conversation_id), f"{seq} {text}")
    for conversation_id in {str(conversation_id) for conversation_id, _seq, _text in batch}:
        pipe.expire(log_key(conversation_id), LOG_TTL_SECONDS)


def _check_results(results, batch) -> None:
    for index, result in enumerate(results[: len(batch) * COMMANDS_PER_EVENT]):
        if isinstance(result, Exception):
            # "equal or smaller than the target stream top item": the event is in the log already (redis-py
            # resent a pipeline whose answer it lost); sockets drop the repeated announcement by its seq.
            level = logging.DEBUG if "equal or smaller" in str(result) else logging.WARNING
            conversation_id, seq, _text = batch[index // COMMANDS_PER_EVENT]
            logger.log(level, "publishing event %s of %s: %s", seq, conversation_id, result)
    for result in results[len(batch) * COMMANDS_PER_EVENT :]:
        if isinstance(result, Exception):
            logger.warning("setting the expiry of an event log: %s", result)


_backends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Backend] = weakref.WeakKeyDictionary()
_sync_client = None


def backend() -> Backend:
    """This event loop's backend (a process normally has one loop; tests make one per test)."""
    loop = asyncio.get_running_loop()
    found = _backends.get(loop)
    if found is None:
        found = RedisBackend(settings.REDIS_URL) if settings.REDIS_URL else MemoryBackend()
        _backends[loop] = found
    return found


def publish_from_sync(conversation_id, seq: int, text: str) -> None:
    """Publish from synchronous code (a service called by a view or a socket handler)."""
    global _sync_client
    if not settings.REDIS_URL:
        from asgiref.sync import async_to_sync

        async def publish() -> None:
            await backend().publish(conversation_id, seq, text)

        # In the single-process mode the sockets live on the server's loop; async_to_sync from a view's
        # or handler's thread runs there.
        async_to_sync(publish)()
        return
    if _sync_client is None:
        import redis

        _sync_client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)
    batch = [(conversation_id, seq, text)]
    pipe = _sync_client.pipeline(transaction=False)
    _log_and_announce(pipe, batch)
    _check_results(pipe.execute(raise_on_error=False), batch)
