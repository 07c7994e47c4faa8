"""Health, readiness and metrics endpoints, and the workers' heartbeat in Redis.

- `GET /healthz`: the process answers (no dependency is checked): `200 ok`.
- `GET /readyz`: the database answers, every migration is applied, every Redis server (the channel layer's and
  each fan-out shard) answers: `200` with a JSON report, or `503` with the same report naming what failed. A
  report is shared by every request for READY_CACHE_SECONDS, so probes cost the database and Redis at most one
  check a second per process, however many ask.
- `GET /metrics`: Prometheus's text format (agents_app/ops/metrics.py), answered only to loopback and
  CHORUS_METRICS_ALLOWED_NETWORKS.

They are answered before Django (OpsEndpoints wraps the HTTP application in chatproject/asgi.py): no host check
(Kubernetes probes an IP address, not a host name), no HTTPS redirect, no session, no database for /healthz.

Workers write a heartbeat to Redis every CHORUS_HEARTBEAT_SECONDS (`Beacon`): a hash per worker and a sorted set
of workers by the time of their last heartbeat. `manage.py worker_ready` reads it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings

from agents_app.ops import metrics
from agents_app.realtime import fanout, wire
from chatproject.opsenv import redacted

logger = logging.getLogger(__name__)

READY_CACHE_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 3.0
WORKERS_KEY = "chorus:workers"  # sorted set: worker id -> Unix time of its last heartbeat
WORKER_KEY_PREFIX = "chorus:worker:"  # hash per worker, expiring
FORGET_WORKERS_AFTER_SECONDS = 3600  # a worker silent this long leaves the sorted set


def worker_key(worker_id: str) -> str:
    return f"{WORKER_KEY_PREFIX}{worker_id}"


def heartbeat_max_age() -> float:
    """A heartbeat older than this is not recent: three heartbeats missed."""
    return 3 * settings.CHORUS_HEARTBEAT_SECONDS


def redis_servers() -> list[tuple[str, str]]:
    """(URL, role) of every Redis server this deployment uses, each once."""
    servers: dict[str, list[str]] = {}
    if settings.REDIS_URL:
        servers.setdefault(settings.REDIS_URL, []).append("channel layer, worker heartbeats")
    for index, url in enumerate(fanout.shard_urls()):
        servers.setdefault(url, []).append(f"fan-out shard {index}")
    return [(url, "; ".join(roles)) for url, roles in servers.items()]


# --- The database (run in a thread of its own) ---

_migrations_applied = False


def database_check() -> dict:
    """Reachable, and every migration applied (checked until it is true once: migrations are not undone). A
    connection of its own, closed after each check: at most one a second per process, and none held between."""
    from django.db import connection

    try:
        return _database_check(connection)
    finally:
        connection.close()


def _database_check(connection) -> dict:
    global _migrations_applied
    started = time.monotonic()
    report: dict = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        report["database"] = {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}
    except Exception as exc:
        report["database"] = {"ok": False, "error": _describe(exc)}
        report["migrations"] = {"ok": False, "error": "not checked: the database did not answer"}
        return report
    if not _migrations_applied:
        try:
            from django.db.migrations.executor import MigrationExecutor

            executor = MigrationExecutor(connection)
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
            if plan:
                names = [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                report["migrations"] = {
                    "ok": False,
                    "error": f"{len(names)} not applied: {shown} (run manage.py migrate)",
                }
                return report
            _migrations_applied = True
        except Exception as exc:
            report["migrations"] = {"ok": False, "error": _describe(exc)}
            return report
    report["migrations"] = {"ok": True}
    return report


def run_counts() -> dict:
    """Runs queued and running now, and the age of the oldest queued one (for the metrics)."""
    from django.db import close_old_connections
    from django.db.models import Count, Min

    from agents_app.models import Run

    close_old_connections()
    rows = list(
        Run.objects.filter(status__in=[Run.Status.QUEUED, Run.Status.RUNNING])
        .values("status")
        .annotate(count=Count("id"), oldest=Min("created_at"))
        .order_by()
    )
    close_old_connections()  # CONN_MAX_AGE's rule, as after a request
    counts = {"queued": 0, "running": 0, "oldest_queued_seconds": 0.0}
    for row in rows:
        counts[row["status"]] = row["count"]
        if row["status"] == Run.Status.QUEUED and row["oldest"] is not None:
            counts["oldest_queued_seconds"] = max(0.0, time.time() - row["oldest"].timestamp())
    return counts


def workers_alive(client=None) -> list[str] | None:
    """The ids of workers whose heartbeat is recent (None without Redis: the worker is inside the web server)."""
    if not settings.REDIS_URL:
        return None
    client = client or _sync_client()
    members = client.zrangebyscore(WORKERS_KEY, time.time() - heartbeat_max_age(), "+inf")
    return [member.decode() for member in members]


_redis = None


def _sync_client():
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT_SECONDS,
                                      socket_connect_timeout=CHECK_TIMEOUT_SECONDS)  # fmt: skip
    return _redis


def _describe(exc: BaseException) -> str:
    """An exception as a readiness report shows it: its kind and first line, never a URL with a password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for url, _role in redis_servers():
        text = text.replace(url, redacted(url))
    database_url = getattr(settings, "DATABASE_URL", "")
    if database_url:
        text = text.replace(database_url, "DATABASE_URL")
    password = settings.DATABASES["default"].get("PASSWORD")
    if password:
        text = text.replace(password, "***")
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


# --- Redis (on the event loop) ---


async def redis_check(url: str, role: str) -> dict:
    started = time.monotonic()
    entry: dict = {"url": redacted(url), "role": role}
    connection = None
    try:
        commands: list[tuple] = [("PING",)]
        if url == settings.REDIS_URL:  # the workers' registry is there: how many are alive, for the reader
            commands.append(("ZCOUNT", WORKERS_KEY, time.time() - heartbeat_max_age(), "+inf"))
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            connection = await wire.connect(url, select_db=True)
            replies = await connection.call(commands)
        if isinstance(replies[0], Exception):
            raise ConnectionError(str(replies[0]))
        entry.update(ok=True, ms=round((time.monotonic() - started) * 1000, 1))
        if len(replies) > 1 and isinstance(replies[1], int):
            entry["workers_alive"] = replies[1]  # information only: a web server is ready without workers
    except TimeoutError:
        entry.update(ok=False, error=f"no answer within {CHECK_TIMEOUT_SECONDS:g} s")
    except Exception as exc:
        entry.update(ok=False, error=_describe(exc))
    finally:
        if connection is not None:
            await connection.close()
    return entry


class Readiness:
    """One report at a time per process, shared by the requests of READY_CACHE_SECONDS."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._database: Future | None = None
        self._database_started = 0.0
        self._report: dict | None = None
        self._at = 0.0
        self._running: asyncio.Task | None = None

    async def report(self) -> dict:
        now = time.monotonic()
        if self._report is not None and now - self._at < READY_CACHE_SECONDS:
            return self._report
        if self._running is None or self._running.done() or self._running.get_loop() is not asyncio.get_running_loop():
            self._running = asyncio.create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> dict:
        database, servers = await asyncio.gather(
            self._database_report(), asyncio.gather(*(redis_check(url, role) for url, role in redis_servers()))
        )
        checks = dict(database)
        if servers:
            checks["redis"] = {"ok": all(server["ok"] for server in servers), "servers": servers}
        else:
            checks["redis"] = {"ok": True, "skipped": "no REDIS_URL: one process with an in-memory channel layer"}
        failed = [name for name, check in checks.items() if not check["ok"]]
        report = {"status": "not ready" if failed else "ready", "failed": failed, "checks": checks}
        self._report, self._at = report, time.monotonic()
        return report

    async def _database_report(self) -> dict:
        """The database check in a thread of its own, so that a database that hangs blocks neither the event
        loop nor Django's threads; while a check hangs, no second one starts."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chorus-readiness")
        if self._database is None or self._database.done():
            self._database = self._executor.submit(database_check)
            self._database_started = time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._database), CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            waited = time.monotonic() - self._database_started
            return {
                "database": {"ok": False, "error": f"no answer for {waited:.0f} s"},
                "migrations": {"ok": False, "error": "not checked: the database did not answer"},
            }
        except Exception as exc:
            return {"database": {"ok": False, "error": _describe(exc)}}


readiness = Readiness()


# --- The endpoints, before Django ---


def metrics_allowed(client: tuple | list | None) -> bool:
    """Loopback and CHORUS_METRICS_ALLOWED_NETWORKS; a client whose address is unknown (a Unix socket) is not
    a network client: allowed."""
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return True
    networks = settings.CHORUS_METRICS_ALLOWED_NETWORKS
    return any(address in network for network in networks if network.version == address.version)


class _Scrapes:
    """Scrapes run in a thread of their own (they read files and the database); one at a time."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future | None = None

    async def run(self) -> tuple[int, bytes, str]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chorus-metrics")
        if self._running is not None and not self._running.done():
            body = b"a previous scrape is still running (is the database or Redis not answering?)\n"
            return 503, body, "text/plain; charset=utf-8"
        self._running = self._executor.submit(metrics.exposition, run_counts, workers_alive)
        body, content_type = await asyncio.wrap_future(self._running)
        return 200, body, content_type


scrapes = _Scrapes()


async def _respond(send, status: int, body: bytes, content_type: str, head: bool = False) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def _json(data: dict) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


class OpsEndpoints:
    """Answers /healthz, /readyz and /metrics itself; everything else goes to `app`."""

    PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            body = _json({"error": "method_not_allowed", "detail": f"{path} answers GET and HEAD only."})
            return await _respond(send, 405, body, "application/json", head)
        if path == "/healthz":
            return await _respond(send, 200, b"ok", "text/plain; charset=utf-8", head)
        if path == "/readyz":
            report = await readiness.report()
            status = 200 if not report["failed"] else 503
            return await _respond(send, status, _json(report), "application/json", head)
        if not metrics_allowed(scope.get("client")):
            detail = "/metrics answers loopback and CHORUS_METRICS_ALLOWED_NETWORKS only."
            return await _respond(send, 403, _json({"error": "forbidden", "detail": detail}), "application/json", head)
        try:
            status, body, content_type = await scrapes.run()
        except Exception:
            logger.exception("metrics: the scrape failed")
            status, body, content_type = 500, b"the scrape failed; see the web server's log\n", "text/plain"
        return await _respond(send, status, body, content_type, head)


# --- The workers' heartbeat ---


class Beacon:
    """A worker's heartbeat in Redis (REDIS_URL): `chorus:worker:<id>` (a hash, expiring) and its score in
    `chorus:workers`. Written on the worker's own connection, one round trip per heartbeat; never raises."""

    def __init__(self, worker_id: str, url: str) -> None:
        self.worker_id = worker_id
        self.url = url
        self.started_at = time.time()
        self._connection: wire.Connection | None = None
        self._failures = 0

    def fields(self, worker, poll_ok_at: float) -> dict:
        return {
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "at": round(time.time(), 3),
            "poll_ok_at": round(poll_ok_at, 3),
            "active": len(worker.active),
            "max_runs": worker.max_runs,
            "draining": int(worker.draining),
        }

    async def beat(self, worker, poll_ok_at: float) -> bool:
        fields = self.fields(worker, poll_ok_at)
        key, now = worker_key(self.worker_id), fields["at"]
        ttl = max(int(heartbeat_max_age() * 2), 10)
        flat = [item for pair in fields.items() for item in pair]
        commands = [
            ("HSET", key, *flat),
            ("EXPIRE", key, ttl),
            ("ZADD", WORKERS_KEY, now, self.worker_id),
            ("ZREMRANGEBYSCORE", WORKERS_KEY, "-inf", now - FORGET_WORKERS_AFTER_SECONDS),
        ]
        ok = await self._call(commands)
        metrics.heartbeat(ok, self.worker_id)
        return ok

    async def gone(self) -> None:
        """The worker stops: it leaves the registry at once (worker_ready then says so)."""
        await self._call([("ZREM", WORKERS_KEY, self.worker_id), ("DEL", worker_key(self.worker_id))])
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _call(self, commands: list[tuple]) -> bool:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                if self._connection is None:
                    self._connection = await wire.connect(self.url, select_db=True)
                replies = await self._connection.call(commands)
            errors = [reply for reply in replies if isinstance(reply, Exception)]
            if errors:
                raise ConnectionError(str(errors[0]))
        except Exception as exc:
            if self._connection is not None:
                await self._connection.close()
                self._connection = None
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                logger.warning("writing the worker heartbeat to Redis failed %d times: %s", self._failures,
                               _describe(exc))  # fmt: skip
            return False
        self._failures = 0
        return True


def worker_status(record: dict, max_age: float, now: float | None = None) -> list[str]:
    """What is wrong with a worker, by its heartbeat record (nothing: ready)."""
    now = time.time() if now is None else now
    problems = []
    age = now - float(record.get("at", 0))
    if age > max_age:
        problems.append(f"last heartbeat {age:.0f} s ago (more than {max_age:g} s)")
    poll_age = now - float(record.get("poll_ok_at", 0) or 0)
    if poll_age > max_age:
        problems.append(f"its last successful poll of the database was {poll_age:.0f} s ago")
    if str(record.get("draining", "0")) == "1":
        problems.append("draining (stopping after SIGTERM)")
    return problems
