"""`manage.py worker_ready`: is this host's agent worker (or the one with `--pid`) ready? For systemd and
Kubernetes probes. Exit status 0 when ready, 1 when not, 2 when it cannot tell (no Redis); one JSON line on
stdout says why.

A worker writes its heartbeat to Redis every CHORUS_HEARTBEAT_SECONDS (agents_app/ops/health.py, Beacon). It is
ready when that heartbeat is recent (--max-age, default three heartbeats), its last poll of the database
succeeded as recently, and it is not draining after SIGTERM.
"""

import json
import socket
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agents_app.ops import health


class Command(BaseCommand):
    help = "Exit 0 if this host's agent worker (or the one with --pid) has a recent heartbeat; 1 if not."
    requires_system_checks = []  # a probe: as little start-up as can be

    def add_arguments(self, parser):
        parser.add_argument("--pid", type=int, help="the worker's process id (systemd: $MAINPID); default: any")
        parser.add_argument("--host", help="the host name the worker runs on (default: this one's); '*' for any host")
        parser.add_argument(
            "--max-age", type=float, help="seconds a heartbeat stays recent (default: 3 x CHORUS_HEARTBEAT_SECONDS)"
        )

    def handle(self, *args, pid=None, host=None, max_age=None, **options):
        if not settings.REDIS_URL:
            self.stdout.write(json.dumps({
                "ready": False,
                "error": "REDIS_URL is not set: the agent worker runs inside the web server; probe its /readyz",
            }))  # fmt: skip
            raise SystemExit(2)
        if max_age is not None and max_age <= 0:
            raise CommandError("--max-age must be a positive number of seconds")
        max_age = max_age or health.heartbeat_max_age()
        host = host or socket.gethostname()
        report = self.inspect(pid, host, max_age)
        self.stdout.write(json.dumps(report))
        if not report["ready"]:
            raise SystemExit(1)

    def inspect(self, pid, host, max_age) -> dict:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=health.CHECK_TIMEOUT_SECONDS,
                                      socket_connect_timeout=health.CHECK_TIMEOUT_SECONDS)  # fmt: skip
        wanted = f"{host}:" if host != "*" else ""
        if pid is not None and host != "*":
            wanted = f"{host}:{pid}:"
        try:
            scored = client.zrange(health.WORKERS_KEY, 0, -1, withscores=True)
            candidates = [
                (member.decode(), score)
                for member, score in scored
                if member.decode().startswith(wanted) and (pid is None or member.decode().split(":")[-2] == str(pid))
            ]
            records = []
            pipe = client.pipeline(transaction=False)
            for worker_id, _score in candidates:
                pipe.hgetall(health.worker_key(worker_id))
            for (worker_id, score), fields in zip(candidates, pipe.execute(), strict=True):
                record = {key.decode(): value.decode() for key, value in fields.items()} or {"at": score}
                record.setdefault("worker_id", worker_id)
                records.append(record)
        except redis.RedisError as exc:
            return {"ready": False, "error": f"Redis did not answer: {exc.__class__.__name__}"}
        finally:
            client.close()
        now = time.time()
        workers = []
        for record in records:
            problems = health.worker_status(record, max_age, now)
            workers.append({
                "worker_id": record["worker_id"],
                "ready": not problems,
                "problems": problems,
                "heartbeat_age_seconds": round(now - float(record.get("at", 0)), 1),
                "active_runs": int(record.get("active", 0) or 0),
            })  # fmt: skip
        # Workers long gone (no recent heartbeat and not the one asked for) say nothing about this host now.
        recent = [w for w in workers if w["heartbeat_age_seconds"] <= max_age or pid is not None]
        who = f"pid {pid}" if pid is not None else "any worker"
        where = "any host" if host == "*" else f"host {host}"
        if not recent:
            return {"ready": False, "error": f"no heartbeat from {who} on {where} in the last {max_age:g} s",
                    "workers": workers}  # fmt: skip
        ready = all(worker["ready"] for worker in recent)
        return {"ready": ready, "workers": recent}
