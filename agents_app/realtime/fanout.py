"""How a conversation's events reach its sockets, and the log a reconnecting socket resumes from.

Every event is published once, already encoded, with its seq. Two backends share one shape:

- Redis (REDIS_URL set): the publisher appends the event to a Redis Stream per conversation (the resume log,
  entry id = seq, trimmed and expiring) and PUBLISHes it on the conversation's pub/sub channel, both in one
  round trip. Each web-server process holds ONE pub/sub connection, subscribed to the channels of the
  conversations that have a socket in that process, and hands each event to those sockets directly. Unlike
  a channels-redis group (one message per socket through the layer, dropped silently at capacity), this
  costs one Redis message per event per process and never drops an event to an idle subscriber.
- Memory (no Redis, one process): the same, in process (backends.py, with the shape both share).

Sockets subscribe before they read the log, and drop any seq they already sent, so a resume has no gap and
no duplicate (see consumers.py).

Beyond one Redis host: with REDIS_URLS (several servers) each conversation lives on one of them, picked by a
stable hash of its id (CRC32, as channels-redis places its groups on its hosts), its log and its channel alike;
every web server subscribes on each server it has sockets for. `rediss://` URLs connect over TLS with the
options of their query string (ssl_cert_reqs, ssl_ca_certs, ssl_ca_path, ssl_certfile, ssl_keyfile,
ssl_check_hostname), on either wire.

The publisher's and the subscription's connections are the process's wire (agents_app/realtime/wire.py): the
fast one (hiredis on plain streams, resp.py) or redis-py's own (CHORUS_FAST_WIRE=0); reads of the log always go
through redis-py's client.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
import weakref
from functools import lru_cache
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError

from agents_app.ops import metrics
from agents_app.realtime import wire
from agents_app.realtime.backends import (  # noqa: F401 - the fan-out's public names
    LOG_MAX_EVENTS,
    LOG_TTL_SECONDS,
    Backend,
    MemoryBackend,
    Subscriber,
    channel_name,
    log_key,
)
from agents_app.realtime.subscription import EventSubscription, keep

logger = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 6  # retries over about 12 s (0.2 s doubling): a Redis restart takes less
PUBLISH_TIMEOUT_SECONDS = 10  # a Redis that takes longer to answer is taken to be gone: reconnect, retry
COMMANDS_PER_EVENT = 2  # XADD, PUBLISH (and one EXPIRE per conversation of a batch)


class RedisBackend(Backend):
    """One Redis server: the whole fan-out, or one shard of it (ShardedBackend)."""

    def __init__(self, url: str, window_ms: float | None = None, shard: int = 0) -> None:
        import redis.asyncio as aioredis

        super().__init__()
        self.url = url
        self.client = aioredis.from_url(url, health_check_interval=30)
        label = str(shard)
        self.events = EventSubscription(url, self._on_event, self._on_reconnected, shard_label=label)
        self._published = metrics.REDIS_PUBLISHED.labels(label)
        self._batches = metrics.REDIS_BATCHES.labels(label)
        self._retries = metrics.REDIS_RETRIES.labels(label)
        self._lost = metrics.REDIS_LOST.labels(label)
        self._oldest_token: float | None = None  # when the oldest token queued reached the worker
        self._pending: list[tuple[Any, int, str]] = []
        self._flusher: asyncio.Task | None = None
        self._connection: wire.Connection | None = None  # the publisher's own (see _send)
        self.window = (settings.CHORUS_PUBLISH_WINDOW_MS if window_ms is None else window_ms) / 1000
        self._next_send_at = 0.0  # loop time before which a batch waits (the window since the last one)

    async def publish(self, conversation_id, seq: int, text: str, since: float | None = None) -> None:
        """Queue the event; a flusher sends everything queued in one pipeline (one round trip). An event after
        a quiet spell goes at once; the ones that follow it within CHORUS_PUBLISH_WINDOW_MS wait (at most that
        long) and go out together, so under load each round trip carries many events, and Redis and every web
        server wake once per batch rather than once per token. Never raises: an event Redis could not take is
        lost to live sockets only. Messages and run ends are in the database, so a socket that resumes still
        ends with the complete, persisted text."""
        self._pending.append((conversation_id, seq, text))
        if since is not None and (self._oldest_token is None or since < self._oldest_token):
            self._oldest_token = since
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def flushed(self) -> None:
        """Wait until everything queued so far has been sent (or given up on)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            wait = self._next_send_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_send_at = loop.time() + self.window
            batch, self._pending = self._pending, []
            oldest_token, self._oldest_token = self._oldest_token, None
            for attempt in range(PUBLISH_ATTEMPTS):
                try:
                    _check_results(await self._send(_batch_commands(batch)), batch)
                    self._batches.inc()
                    self._published.inc(len(batch))
                    if oldest_token is not None:
                        metrics.TOKEN_DELIVERY_LAG.observe(time.monotonic() - oldest_token)
                    break
                except (OSError, RedisError) as exc:
                    self._retries.inc()
                    logger.warning("publishing %d events failed (%r), attempt %d", len(batch), exc, attempt)
                    await asyncio.sleep(0.2 * 2**attempt)
            else:
                # Live sockets miss these events; the messages and run ends among them are in the database and
                # reach every page as the complete stored text.
                self._lost.inc(len(batch))
                logger.error("gave up publishing %d events after %d attempts", len(batch), PUBLISH_ATTEMPTS)

    async def _send(self, commands: list[tuple]) -> list:
        """Send commands in one write on the publisher's own connection and read their replies (an error reply
        is returned, not raised), on the process's wire (agents_app/realtime/wire.py)."""
        if self._connection is None:
            self._connection = await wire.connect(self.url, select_db=True)
        connection = self._connection
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                return await connection.call(commands)
        except BaseException:
            # A broken or interrupted exchange leaves replies unread: never reuse that connection.
            self._connection = None
            await connection.close()
            raise

    async def close(self) -> None:
        """Stop the subscription and close the connections (tests; a process's backend lives as long as it)."""
        await self.events.stop()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await self.client.aclose()

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        entries = await self.client.xrange(log_key(conversation_id), min=f"{after_seq + 1}-0", max="+")
        return [(int(entry_id.split(b"-")[0]), fields[b"e"].decode()) for entry_id, fields in entries]

    async def last_logged_seq(self, conversation_id) -> int:
        entries = await self.client.xrevrange(log_key(conversation_id), max="+", min="-", count=1)
        return int(entries[0][0].split(b"-")[0]) if entries else 0

    async def subscribe(self, conversation_id, subscriber: Subscriber) -> None:
        first = str(conversation_id) not in self.subscribers
        await super().subscribe(conversation_id, subscriber)
        if first:
            # Returns once Redis confirmed the subscription: the socket's read of the log comes after it.
            await self.events.subscribe(channel_name(conversation_id).encode())

    async def unsubscribe(self, conversation_id, subscriber: Subscriber) -> None:
        await super().unsubscribe(conversation_id, subscriber)
        if str(conversation_id) not in self.subscribers:
            await self.events.unsubscribe(channel_name(conversation_id).encode())

    async def _on_event(self, channel: bytes, data: bytes) -> None:
        seq, _, text = data.decode().partition(" ")
        await self.dispatch(channel[_CHANNEL_PREFIX:].decode(), int(seq), text)

    def _on_reconnected(self) -> None:
        # Events published while this process was cut off from Redis never reached it: every subscriber
        # fills the gap from the log (by seq, so nothing twice).
        for subscribers in list(self.subscribers.values()):
            for subscriber in list(subscribers):
                catch_up = getattr(subscriber, "catch_up", None)
                if catch_up is not None:
                    keep(asyncio.create_task(catch_up()))


class ShardedBackend(Backend):
    """The fan-out over several Redis servers (REDIS_URLS): each conversation's log and channel live on the one
    `shard_index` picks, so every process, knowing the same list, finds them there. One RedisBackend per server,
    each with its own publisher connection and its own subscription, subscribed only while a socket of this
    process follows a conversation it holds. Changing the list moves conversations: restart every process
    with the same list (a run streaming then loses its live log; its messages are in the database)."""

    def __init__(self, urls: list[str], window_ms: float | None = None) -> None:
        super().__init__()
        self.shards = [RedisBackend(url, window_ms, shard=index) for index, url in enumerate(urls)]
        self._shard_of = lru_cache(maxsize=65536)(self._pick)

    def _pick(self, conversation_id) -> RedisBackend:
        return self.shards[shard_index(conversation_id, len(self.shards))]

    def shard(self, conversation_id) -> RedisBackend:
        return self._shard_of(conversation_id)

    async def publish(self, conversation_id, seq: int, text: str, since: float | None = None) -> None:
        await self._shard_of(conversation_id).publish(conversation_id, seq, text, since)

    async def flushed(self) -> None:
        await asyncio.gather(*(shard.flushed() for shard in self.shards))

    async def read_after(self, conversation_id, after_seq: int) -> list[tuple[int, str]]:
        return await self._shard_of(conversation_id).read_after(conversation_id, after_seq)

    async def last_logged_seq(self, conversation_id) -> int:
        return await self._shard_of(conversation_id).last_logged_seq(conversation_id)

    async def subscribe(self, conversation_id, subscriber: Subscriber) -> None:
        await self._shard_of(conversation_id).subscribe(conversation_id, subscriber)

    async def unsubscribe(self, conversation_id, subscriber: Subscriber) -> None:
        await self._shard_of(conversation_id).unsubscribe(conversation_id, subscriber)


def shard_index(conversation_id, count: int) -> int:
    """The shard of a conversation among `count`: channels-redis's consistent hash (the low 12 bits of the
    CRC32 of the id's text, spread over the servers), stable across processes, hosts and restarts."""
    if count <= 1:
        return 0
    return int((binascii.crc32(str(conversation_id).encode()) & 0xFFF) / (4096 / count))


def shard_urls() -> list[str]:
    """The Redis servers of the fan-out: REDIS_URLS, else REDIS_URL alone, else none (in memory)."""
    urls = list(getattr(settings, "REDIS_URLS", None) or [])
    if not urls and settings.REDIS_URL:
        urls = [settings.REDIS_URL]
    return urls


_CHANNEL_PREFIX = len(channel_name(""))


def _batch_commands(batch: list[tuple[Any, int, str]]) -> list[tuple]:
    """The Redis commands that publish a batch of events: XADD and PUBLISH per event, then one EXPIRE per
    conversation."""
    commands: list[tuple] = []
    for conversation_id, seq, text in batch:
        # Log first, then announce: a socket subscribes first and reads the log second, so whichever way the
        # two interleave it sees the event at least once (and drops the copy by its seq).
        key = log_key(conversation_id)
        commands.append(("XADD", key, "MAXLEN", "~", LOG_MAX_EVENTS, f"{seq}-0", "e", text))
        commands.append(("PUBLISH", channel_name(conversation_id), f"{seq} {text}"))
    for conversation_id in {str(conversation_id) for conversation_id, _seq, _text in batch}:
        commands.append(("EXPIRE", log_key(conversation_id), LOG_TTL_SECONDS))
    return commands


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
_sync_clients: dict = {}  # URL -> redis-py client, for publishes from synchronous code


def backend() -> Backend:
    """This event loop's backend (a process normally has one loop; tests make one per test)."""
    loop = asyncio.get_running_loop()
    found = _backends.get(loop)
    if found is None:
        urls = shard_urls()
        if not urls:
            found = MemoryBackend()
        elif len(urls) == 1:
            found = RedisBackend(urls[0])
        else:
            found = ShardedBackend(urls)
        _backends[loop] = found
    return found


def publish_from_sync(conversation_id, seq: int, text: str, *more: tuple[int, str]) -> None:
    """Publish from synchronous code (a service called by a view or a socket handler): one event, or several
    of one conversation (`more`: (seq, text) pairs) in one round trip."""
    items = [(seq, text), *more]
    urls = shard_urls()
    if not urls:
        from asgiref.sync import async_to_sync

        async def publish() -> None:
            for item_seq, item_text in items:
                await backend().publish(conversation_id, item_seq, item_text)

        # In the single-process mode the sockets live on the server's loop; async_to_sync from a view's
        # or handler's thread runs there.
        async_to_sync(publish)()
        return
    url = urls[shard_index(conversation_id, len(urls))]
    client = _sync_clients.get(url)
    if client is None:
        import redis

        client = _sync_clients[url] = redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)
    batch = [(conversation_id, item_seq, item_text) for item_seq, item_text in items]
    pipe = client.pipeline(transaction=False)
    for command in _batch_commands(batch):
        pipe.execute_command(*command)
    _check_results(pipe.execute(raise_on_error=False), batch)
