"""How the fan-out, the health checks and the workers' heartbeat talk to Redis: one small interface
(`Connection`), two implementations, and `connect`, which picks one.

- The fast wire (agents_app/realtime/resp.py): hiredis on plain asyncio streams, many replies per read.
- The stock wire (`RedisPyConnection`, here): one redis-py asyncio connection (with its hiredis parser), made
  from the URL by redis-py itself, so every option redis-py reads from a URL applies (rediss:// with
  ssl_cert_reqs, ssl_ca_certs, ssl_certfile..., unix sockets, credentials, the database).

Both carry the same exchanges, so the fan-out behaves the same on either: its batching, XADD and PUBLISH per
event, retries and shards (agents_app/realtime/fanout.py) and its subscription's confirmations, pings and
reconnects (agents_app/realtime/subscription.py) are written once, above this interface. Neither speaks to Redis
Sentinel or Redis Cluster: several Redis servers are REDIS_URLS shards (docs/operations.md).
"""

from __future__ import annotations

import math
from typing import Protocol

from agents_app.ops import fastpaths


class Connection(Protocol):
    async def call(self, commands: list[tuple]) -> list:
        """Send the commands in one write and return their replies in order; an error reply is returned as an
        exception object, not raised (the connection stays usable)."""
        ...

    async def send(self, commands: list[tuple]) -> None:
        """Send without waiting for replies (SUBSCRIBE, PING on a subscription)."""
        ...

    async def replies(self) -> list:
        """The next replies to arrive, at least one, waiting as long as it takes (a subscription's reader)."""
        ...

    def local_address(self) -> tuple: ...

    async def close(self) -> None:
        """Close at once (whatever is unread is dropped)."""
        ...


async def connect(url: str, *, select_db: bool = True) -> Connection:
    """A new connection to the Redis server of `url`, on the wire this process uses. `select_db`: whether
    the URL's database is selected (pub/sub channels are not per database)."""
    if fastpaths.enabled("wire"):
        from agents_app.realtime.resp import RespConnection

        return await RespConnection.open(url, select_db=select_db)
    return await RedisPyConnection.open(url, select_db=select_db)


class RedisPyConnection:
    """The stock wire: a redis-py asyncio connection, used through its public methods (pack, send, read)."""

    def __init__(self, connection) -> None:
        self.connection = connection

    @classmethod
    async def open(cls, url: str, *, select_db: bool) -> RedisPyConnection:
        from redis.asyncio import ConnectionPool

        # socket_timeout=None: a subscription waits for events indefinitely (callers put their own timeouts on
        # exchanges); RESP2, whose pub/sub messages are plain replies, as on the fast wire. redis-py selects the
        # URL's database whatever `select_db` says, which a subscription does not mind.
        pool = ConnectionPool.from_url(url, socket_timeout=None, socket_connect_timeout=5, protocol=2)
        connection = pool.make_connection()
        await connection.connect()
        return cls(connection)

    async def call(self, commands: list[tuple]) -> list:
        from redis.exceptions import ResponseError

        await self.send(commands)
        replies: list = []
        for _command in commands:
            try:
                replies.append(await self.connection.read_response(disable_decoding=True))
            except ResponseError as exc:  # read whole before it is raised: the next reply is still in step
                replies.append(exc)
        return replies

    async def send(self, commands: list[tuple]) -> None:
        # No health check: it would read a reply of its own, in the middle of a subscription's replies.
        await self.connection.send_packed_command(self.connection.pack_commands(commands), check_health=False)

    async def replies(self) -> list:
        return [await self.connection.read_response(disable_decoding=True, timeout=math.inf)]

    def local_address(self) -> tuple:
        writer = getattr(self.connection, "_writer", None)  # redis-py has no public accessor for it
        return writer.get_extra_info("sockname")[:2] if writer is not None else ("", 0)

    async def close(self) -> None:
        await self.connection.disconnect(nowait=True)
