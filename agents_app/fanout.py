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

Beyond one Redis host: with REDIS_URLS (several servers) each conversation lives on one of them, picked by a
stable hash of its id (CRC32, as channels-redis places its groups on its hosts), its log and its channel alike;
every web server subscribes on each server it has sockets for. `rediss://` URLs connect over TLS with the
options of their query string (ssl_cert_reqs, ssl_ca_certs, ssl_ca_path, ssl_certfile, ssl_keyfile,
ssl_check_hostname), for the hand-written connections here as for redis-py's.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
import weakref
from collections import defaultdict, deque
from functools import lru_cache
from typing import Any, Protocol

import hiredis
from django.conf import settings
from redis.exceptions import RedisError

from agents_app import metrics

logger = logging.getLogger(__name__)

LOG_MAX_EVENTS = 5000  # per conversation: one long answer's frames, with room to spare
LOG_TTL_SECONDS = 3600  # the log serves in-flight runs; finished ones replay from the database
PUBLISH_ATTEMPTS = 6  # retries over about 12 s (0.2 s doubling): a Redis restart takes less
PUBLISH_TIMEOUT_SECONDS = 10  # a Redis that takes longer to answer is taken to be gone: reconnect, retry
COMMANDS_PER_EVENT = 2  # XADD, PUBLISH (and one EXPIRE per conversation of a batch)


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


class RedisBackend(Backend):
    """One Redis server: the whole fan-out, or one shard of it (ShardedBackend)."""

    def __init__(self, url: str, window_ms: float | None = None, shard: int = 0) -> None:
        import redis.asyncio as aioredis

        super().__init__()
        self.client = aioredis.from_url(url, health_check_interval=30)
        self.params = redis_params(url)
        label = str(shard)
        self.events = EventSubscription(self.params, self._on_event, self._on_reconnected, shard_label=label)
        self._published = metrics.REDIS_PUBLISHED.labels(label)
        self._batches = metrics.REDIS_BATCHES.labels(label)
        self._retries = metrics.REDIS_RETRIES.labels(label)
        self._lost = metrics.REDIS_LOST.labels(label)
        self._oldest_token: float | None = None  # when the oldest token queued reached the worker
        self._pending: list[tuple[Any, int, str]] = []
        self._flusher: asyncio.Task | None = None
        self._connection: RespConnection | None = None  # the publisher's own (see _send)
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
        is returned, not raised). redis-py's pipeline costs tens of microseconds of Python per command, which
        per token was a good part of a worker's CPU; here hiredis packs the commands and splits the replies."""
        if self._connection is None:
            self._connection = await RespConnection.open(self.params, select_db=True)
        connection = self._connection
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                return await connection.call(commands)
        except BaseException:
            # A broken or interrupted exchange leaves replies unread: never reuse that connection.
            self._connection = None
            connection.close()
            raise

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
            self.events.unsubscribe(channel_name(conversation_id).encode())

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
                    _keep(asyncio.create_task(catch_up()))


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
_background: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> None:
    """Hold a fire-and-forget task until it is done (the loop itself keeps only a weak reference)."""
    _background.add(task)
    task.add_done_callback(_background.discard)


class EventSubscription:
    """The process's one pub/sub connection to Redis, read in bulk: each socket read may carry many events, and
    hiredis splits them in C. (redis-py's PubSub.get_message costs a timeout context, a retry wrapper and a
    dozen Python frames per message: most of a web server's CPU per streamed token.)

    SUBSCRIBE waits for Redis's confirmation, so a socket that reads the conversation's log afterwards cannot
    miss an event published in between. A lost connection is retried with backoff; after it is back, every
    channel is subscribed again and `on_reconnected` runs."""

    CONFIRM_TIMEOUT = 5.0
    PING_SECONDS = 10.0

    def __init__(self, params: dict, on_message, on_reconnected, shard_label: str = "0") -> None:
        self.params = params
        self._reconnects = metrics.REDIS_RECONNECTS.labels(shard_label)
        self.on_message = on_message
        self.on_reconnected = on_reconnected
        self.channels: set[bytes] = set()
        self._confirmations: dict[bytes, list[asyncio.Future]] = defaultdict(list)
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._last_read = 0.0

    async def subscribe(self, channel: bytes) -> None:
        self.channels.add(channel)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        confirmed = self._expect_confirmation(channel)
        if self._writer is not None:
            self._writer.write(hiredis.pack_command(("SUBSCRIBE", channel)))
        try:
            await asyncio.wait_for(confirmed, self.CONFIRM_TIMEOUT)
        except TimeoutError:
            # Redis is away: go on; the channel is subscribed (and the log caught up) once it is back.
            logger.warning("Redis did not confirm the subscription to %s in time", channel)

    def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        if self._writer is not None:
            self._writer.write(hiredis.pack_command(("UNSUBSCRIBE", channel)))

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._connect_and_read(reconnected=failures > 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._reconnects.inc()
                logger.warning("reading conversation events from Redis failed (%s); reconnecting", exc)
            await asyncio.sleep(min(0.1 * 2**failures, 2.0))

    async def _connect_and_read(self, reconnected: bool) -> None:
        connection = await RespConnection.open(self.params, select_db=False)  # channels are not per database
        self._writer = connection.writer
        try:
            if self.channels:
                confirmations = [self._expect_confirmation(channel) for channel in self.channels]
                connection.send([("SUBSCRIBE", *self.channels)])
                if reconnected:
                    self._after(confirmations, self.on_reconnected)
            pinger = asyncio.create_task(self._ping(connection.writer))
            try:
                while True:
                    await connection.read_more()
                    self._last_read = time.monotonic()
                    await self._handle_replies(connection.parser)
            finally:
                pinger.cancel()
        finally:
            self._writer = None
            connection.close()

    def _expect_confirmation(self, channel: bytes) -> asyncio.Future:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel].append(confirmed)
        return confirmed

    def _after(self, futures: list[asyncio.Future], callback) -> None:
        async def wait_then_call() -> None:
            await asyncio.wait(futures, timeout=self.CONFIRM_TIMEOUT)
            callback()

        _keep(asyncio.create_task(wait_then_call()))

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        """A connection Redis no longer answers on (its host gone without a word) is closed, and reopened."""
        self._last_read = time.monotonic()
        while True:
            await asyncio.sleep(self.PING_SECONDS)
            if time.monotonic() - self._last_read > 3 * self.PING_SECONDS:
                logger.warning("Redis stopped answering on the event subscription; reconnecting")
                writer.close()
                return
            writer.write(hiredis.pack_command(("PING",)))

    async def _handle_replies(self, parser) -> None:
        while (reply := parser.gets()) is not False:
            if not isinstance(reply, list) or len(reply) != 3:
                continue  # PING's ["pong", ""]
            kind, channel, payload = reply
            if kind == b"message":
                try:
                    await self.on_message(channel, payload)
                except Exception:
                    logger.exception("dispatching an event of %s failed", channel)
            elif kind == b"subscribe":
                for confirmed in self._confirmations.pop(channel, ()):
                    if not confirmed.done():
                        confirmed.set_result(None)


def redis_params(url: str) -> dict:
    """Host, port, credentials, database and TLS of a Redis URL, as redis-py reads them (its query string's
    ssl_* options included)."""
    from redis.asyncio.connection import parse_url

    params = parse_url(url)
    params["ssl"] = "SSL" in getattr(params.get("connection_class"), "__name__", "")
    return params


def ssl_context(params: dict):
    """The TLS context of a rediss:// URL, from its ssl_* options, with redis-py's meanings: ssl_cert_reqs
    (required by default; optional; none), ssl_ca_certs / ssl_ca_path (else the system's CAs), ssl_certfile and
    ssl_keyfile (a client certificate, for servers with tls-auth-clients), ssl_check_hostname (default true
    when certificates are required). TLS 1.2 at least, as Python's defaults."""
    import ssl

    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"), capath=params.get("ssl_ca_path"))
    required = str(params.get("ssl_cert_reqs") or "required").lower()
    check_hostname = params.get("ssl_check_hostname", True)
    if isinstance(check_hostname, str):
        check_hostname = check_hostname.lower() in ("1", "true", "yes", "on")
    if required == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif required == "optional":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.check_hostname = bool(check_hostname)
    if params.get("ssl_certfile"):
        context.load_cert_chain(params["ssl_certfile"], params.get("ssl_keyfile"))
    return context


class RespConnection:
    """A plain connection to Redis: commands packed and replies split by hiredis, in C, many per read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, params: dict, *, select_db: bool) -> RespConnection:
        ssl = ssl_context(params) if params["ssl"] else None
        if params.get("path"):  # unix:///run/redis.sock
            opening = asyncio.open_unix_connection(params["path"])
        else:
            opening = asyncio.open_connection(params.get("host", "localhost"), params.get("port", 6379), ssl=ssl)
        reader, writer = await asyncio.wait_for(opening, 5)
        connection = cls(reader, writer)
        setup: list[tuple] = []
        if params.get("password"):
            username = params.get("username")
            setup.append(("AUTH", username, params["password"]) if username else ("AUTH", params["password"]))
        if select_db and params.get("db"):
            setup.append(("SELECT", params["db"]))
        for reply in await connection.call(setup) if setup else ():
            if isinstance(reply, hiredis.ReplyError):
                connection.close()
                raise ConnectionError(f"Redis refused the connection's set-up: {reply}")
        return connection

    def send(self, commands: list[tuple]) -> None:
        self.writer.write(b"".join(map(hiredis.pack_command, commands)))

    async def read_more(self) -> None:
        data = await self.reader.read(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.parser.feed(data)

    async def call(self, commands: list[tuple]) -> list:
        """Send the commands and return their replies in order (error replies as hiredis.ReplyError)."""
        self.send(commands)
        replies: list = []
        while True:
            while len(replies) < len(commands) and (reply := self.parser.gets()) is not False:
                replies.append(reply)
            if len(replies) == len(commands):
                return replies
            await self.read_more()

    def close(self) -> None:
        self.writer.close()


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


def publish_from_sync(conversation_id, seq: int, text: str) -> None:
    """Publish from synchronous code (a service called by a view or a socket handler)."""
    urls = shard_urls()
    if not urls:
        from asgiref.sync import async_to_sync

        async def publish() -> None:
            await backend().publish(conversation_id, seq, text)

        # In the single-process mode the sockets live on the server's loop; async_to_sync from a view's
        # or handler's thread runs there.
        async_to_sync(publish)()
        return
    url = urls[shard_index(conversation_id, len(urls))]
    client = _sync_clients.get(url)
    if client is None:
        import redis

        client = _sync_clients[url] = redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)
    batch = [(conversation_id, seq, text)]
    pipe = client.pipeline(transaction=False)
    for command in _batch_commands(batch):
        pipe.execute_command(*command)
    _check_results(pipe.execute(raise_on_error=False), batch)
