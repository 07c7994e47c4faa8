"""The fast wire: plain connections to Redis whose commands are packed and replies split by hiredis, in C, many
per socket read (the fan-out's publisher, its pub/sub reader, the health checks and the workers' heartbeat).

Why: redis-py's asyncio connection parses one reply per call, under a timeout context and a retry wrapper, and
its pipeline costs tens of microseconds of Python per command: on the path of every streamed token that was a
good part of a worker's and a web server's CPU. Only hiredis's public API is used (`pack_command`, `Reader`);
the connection set-up (TLS from the URL's ssl_* options, AUTH, SELECT) is written here, so it is the part to
check against redis-py when either changes. redis-py's own connection (agents_app/realtime/wire.py) is the
stock path beside it (CHORUS_FAST_WIRE=0).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

import hiredis

CONNECT_TIMEOUT_SECONDS = 5


@lru_cache(maxsize=64)
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
    """A plain connection to Redis: commands packed and replies split by hiredis, in C, many per read.
    Implements agents_app.realtime.wire.Connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str, *, select_db: bool) -> RespConnection:
        params = redis_params(url)
        ssl = ssl_context(params) if params["ssl"] else None
        if params.get("path"):  # unix:///run/redis.sock
            opening = asyncio.open_unix_connection(params["path"])
        else:
            opening = asyncio.open_connection(params.get("host", "localhost"), params.get("port", 6379), ssl=ssl)
        reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT_SECONDS)
        connection = cls(reader, writer)
        setup: list[tuple] = []
        if params.get("password"):
            username = params.get("username")
            setup.append(("AUTH", username, params["password"]) if username else ("AUTH", params["password"]))
        if select_db and params.get("db"):
            setup.append(("SELECT", params["db"]))
        for reply in await connection.call(setup) if setup else ():
            if isinstance(reply, hiredis.ReplyError):
                await connection.close()
                raise ConnectionError(f"Redis refused the connection's set-up: {reply}")
        return connection

    async def send(self, commands: list[tuple]) -> None:
        self.writer.write(b"".join(map(hiredis.pack_command, commands)))

    async def replies(self) -> list:
        """The replies that have arrived, at least one (waiting for it)."""
        while True:
            found = []
            while (reply := self.parser.gets()) is not False:
                found.append(reply)
            if found:
                return found
            await self._read_more()

    async def _read_more(self) -> None:
        data = await self.reader.read(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.parser.feed(data)

    async def call(self, commands: list[tuple]) -> list:
        """Send the commands and return their replies in order (error replies as hiredis.ReplyError)."""
        await self.send(commands)
        replies: list = []
        while True:
            while len(replies) < len(commands) and (reply := self.parser.gets()) is not False:
                replies.append(reply)
            if len(replies) == len(commands):
                return replies
            await self._read_more()

    def local_address(self) -> tuple:
        return self.writer.get_extra_info("sockname")[:2]

    async def close(self) -> None:
        self.writer.close()
