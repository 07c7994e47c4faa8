"""A web process's one pub/sub connection to a Redis server: the conversations that have a socket in this
process, subscribed while they do, their events handed to the fan-out as they arrive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from agents_app.ops import metrics
from agents_app.realtime import wire

logger = logging.getLogger(__name__)

_background: set[asyncio.Task] = set()


def keep(task: asyncio.Task) -> None:
    """Hold a fire-and-forget task until it is done (the loop itself keeps only a weak reference)."""
    _background.add(task)
    task.add_done_callback(_background.discard)


class EventSubscription:
    """The process's one pub/sub connection to Redis, read in bulk on the fast wire: each socket read may carry
    many events, and hiredis splits them in C. (redis-py's PubSub.get_message costs a timeout context, a retry
    wrapper and a dozen Python frames per message: most of a web server's CPU per streamed token.)

    SUBSCRIBE waits for Redis's confirmation, so a socket that reads the conversation's log afterwards cannot
    miss an event published in between. A lost connection is retried with backoff; after it is back, every
    channel is subscribed again and `on_reconnected` runs."""

    CONFIRM_TIMEOUT = 5.0
    PING_SECONDS = 10.0

    def __init__(self, url: str, on_message, on_reconnected, shard_label: str = "0") -> None:
        self.url = url
        self._reconnects = metrics.REDIS_RECONNECTS.labels(shard_label)
        self.on_message = on_message
        self.on_reconnected = on_reconnected
        self.channels: set[bytes] = set()
        self._confirmations: dict[bytes, list[asyncio.Future]] = defaultdict(list)
        self.connection: wire.Connection | None = None  # while connected
        self._task: asyncio.Task | None = None
        self._last_read = 0.0

    async def subscribe(self, channel: bytes) -> None:
        self.channels.add(channel)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        confirmed = self._expect_confirmation(channel)
        await self._send(("SUBSCRIBE", channel))
        try:
            await asyncio.wait_for(confirmed, self.CONFIRM_TIMEOUT)
        except TimeoutError:
            # Redis is away: go on; the channel is subscribed (and the log caught up) once it is back.
            logger.warning("Redis did not confirm the subscription to %s in time", channel)

    async def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        await self._send(("UNSUBSCRIBE", channel))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _send(self, command: tuple) -> None:
        connection = self.connection
        if connection is None:
            return  # not connected: the channels are (re)subscribed as the connection opens
        try:
            await connection.send([command])
        except (OSError, ConnectionError) as exc:  # the reader finds out too, and reconnects
            logger.debug("sending %s on the event subscription failed: %r", command[0], exc)

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
        connection = await wire.connect(self.url, select_db=False)  # channels are not per database
        self.connection = connection
        try:
            if self.channels:
                confirmations = [self._expect_confirmation(channel) for channel in self.channels]
                await connection.send([("SUBSCRIBE", *self.channels)])
                if reconnected:
                    self._after(confirmations, self.on_reconnected)
            pinger = asyncio.create_task(self._ping(connection))
            try:
                while True:
                    replies = await connection.replies()
                    self._last_read = time.monotonic()
                    await self._handle_replies(replies)
            finally:
                pinger.cancel()
        finally:
            self.connection = None
            await connection.close()

    def _expect_confirmation(self, channel: bytes) -> asyncio.Future:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel].append(confirmed)
        return confirmed

    def _after(self, futures: list[asyncio.Future], callback) -> None:
        async def wait_then_call() -> None:
            await asyncio.wait(futures, timeout=self.CONFIRM_TIMEOUT)
            callback()

        keep(asyncio.create_task(wait_then_call()))

    async def _ping(self, connection: wire.Connection) -> None:
        """A connection Redis no longer answers on (its host gone without a word) is closed, and reopened."""
        self._last_read = time.monotonic()
        while True:
            await asyncio.sleep(self.PING_SECONDS)
            if time.monotonic() - self._last_read > 3 * self.PING_SECONDS:
                logger.warning("Redis stopped answering on the event subscription; reconnecting")
                await connection.close()
                return
            await self._send(("PING",))

    async def _handle_replies(self, replies: list) -> None:
        for reply in replies:
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
