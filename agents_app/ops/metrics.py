"""Prometheus metrics, every name prefixed `chorus_` (docs/operations.md lists each one and what it means).

Multi-process mode: every process of a host (every daphne, every worker) writes its values to files in
PROMETHEUS_MULTIPROC_DIR (settings sets it, by default $CHORUS_VAR_DIR/metrics), and `/metrics` on any web
server adds them all up at scrape time. Files are named by host name and pid, so web servers and workers in
separate containers may share one volume. A process that starts clears the live gauges (open sockets, runs
held) a dead process of the same name left; a scrape clears those of this host's processes that are gone.

Nothing here is on the per-token path: tokens are tallied in plain integers and added to their counters with
each heartbeat; a frame, a publish batch, a claim or a run costs one or two observations at most. Gauges that
a database or Redis knows (queued and running runs, workers alive) are read when Prometheus scrapes.

Must not import models at import time: the worker, the consumers and the fan-out import it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import socket
import sys
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def process_identity() -> str:
    """This process's name in the metrics directory: host name and pid (no `_`: the files' names split on it)."""
    return f"{_HOST}-{os.getpid()}"


def serves() -> bool:
    """Whether this process is a web server or a worker (or a test run), whose values go to the shared directory.
    A one-off command (migrate, worker_ready as a probe every few seconds, a shell) keeps its values in memory,
    or every probe would leave its files behind for every scrape to read."""
    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    if command in ("manage.py", "django-admin") and len(sys.argv) > 1:
        return sys.argv[1] in ("runworker", "runserver")
    return True


def _multiprocess() -> str | None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not serves():
        values.ValueClass = values.MutexValue  # this process's values stay in this process
        return None
    values.ValueClass = values.MultiProcessValue(process_identity)
    # A process that had this name before (a container restarted with the same pid) left live gauges behind.
    multiprocess.mark_process_dead(process_identity(), directory)
    return directory


MULTIPROC_DIR = _multiprocess()

# Buckets in seconds.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RUN = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

# Web servers.
WEBSOCKETS_OPEN = Gauge(
    "chorus_websockets_open", "Chat WebSockets open now (all web servers of the host).", multiprocess_mode="livesum"
)
WEBSOCKET_CONNECTIONS = Counter("chorus_websocket_connections", "Chat WebSockets accepted.")

# Workers.
RUNS_FINISHED = Counter(
    "chorus_runs_finished", "Runs that ended, by status and error code ('' when none).", ["status", "error_code"]
)
RUN_DURATION = Histogram(
    "chorus_run_duration_seconds", "From a run's claim to its end, by status.", ["status"], buckets=_RUN
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chorus_time_to_first_token_seconds",
    "From the person's message being stored to the run's first token leaving the worker for Redis.",
    buckets=_WAIT,
)
CLAIM_LATENCY = Histogram(
    "chorus_run_claim_latency_seconds", "From the person's message being stored to a worker claiming its run.",
    buckets=_WAIT,
)  # fmt: skip
CLAIM_DURATION = Histogram(
    "chorus_claim_duration_seconds", "One claim of queued runs (its statements), whatever it found.", buckets=_FAST
)
TOKENS = Counter("chorus_tokens", "Model tokens (text deltas) the workers published; rate() is tokens per second.")
FRAMES = Counter("chorus_token_frames", "Token frames published (tokens that came close together share one).")
TOKEN_DELIVERY_LAG = Histogram(
    "chorus_token_delivery_lag_seconds",
    "Per publish batch, the longest any token in it spent in the worker: from the worker's main loop taking it "
    "from the model's stream to Redis acknowledging the batch (coalescing window, publish window, round trip).",
    buckets=_FAST,
)
MODEL_REQUESTS = Counter("chorus_model_requests", "Requests to models, by purpose (agent, speaker_selection, routing).",
                         ["purpose"])  # fmt: skip
MODEL_ERRORS = Counter("chorus_model_errors", "Runs that failed on a model error, by Chorus's error code.", ["code"])
RUNS_RECOVERED = Counter(
    "chorus_runs_recovered", "Runs closed on behalf of a worker that died (stale) or did not carry out a Stop.",
    ["reason"],
)  # fmt: skip
WORKER_RUNS_ACTIVE = Gauge(
    "chorus_worker_runs_active", "Runs the workers hold now (claimed, not ended).", multiprocess_mode="livesum"
)
WORKER_RUNS_WAITING = Gauge(
    "chorus_worker_runs_waiting",
    "Runs claimed by a worker and waiting for one of its start slots (CHORUS_WORKER_START_CONCURRENCY).",
    multiprocess_mode="livesum",
)
WORKER_HEARTBEATS = Counter("chorus_worker_heartbeats", "Heartbeats the workers wrote (to Redis, and to their runs).")
WORKER_HEARTBEAT_FAILURES = Counter("chorus_worker_heartbeat_failures", "Heartbeats that could not be written.")
# Labelled: only workers have a value, not every process that imports this module.
WORKER_HEARTBEAT_TIME = Gauge(
    "chorus_worker_heartbeat_timestamp_seconds",
    "When each live worker last wrote its heartbeat (Unix time).",
    ["worker_id"],
    multiprocess_mode="liveall",
)

# The fan-out (web servers and workers).
REDIS_PUBLISHED = Counter("chorus_redis_published_events", "Events published to Redis, by shard.", ["shard"])
REDIS_BATCHES = Counter("chorus_redis_publish_batches", "Round trips that published events, by shard.", ["shard"])
REDIS_RETRIES = Counter("chorus_redis_publish_retries", "Publish round trips that failed and were retried.", ["shard"])
REDIS_LOST = Counter(
    "chorus_redis_publish_failures", "Events given up on after every retry (live sockets missed them).", ["shard"]
)
REDIS_RECONNECTS = Counter(
    "chorus_redis_subscription_reconnects", "Times a web server's event subscription reconnected.", ["shard"]
)


class Tally:
    """Counts kept as plain integers on the hot path, added to their counters now and then (`flush`)."""

    __slots__ = ("tokens", "frames")

    def __init__(self) -> None:
        self.tokens = 0
        self.frames = 0

    def flush(self) -> None:
        tokens, frames, self.tokens, self.frames = self.tokens, self.frames, 0, 0
        if tokens:
            TOKENS.inc(tokens)
        if frames:
            FRAMES.inc(frames)


tally = Tally()


def _since_stored(created_at) -> float:
    """Seconds from a database time (the person's message stored, on the web server's clock) to now."""
    return max(0.0, time.time() - created_at.timestamp())


def claimed(seconds: float, runs) -> None:
    CLAIM_DURATION.observe(seconds)
    for run in runs:
        CLAIM_LATENCY.observe(_since_stored(run.created_at))


def first_token(run) -> None:
    TIME_TO_FIRST_TOKEN.observe(_since_stored(run.created_at))


def run_finished(run, result, recovered: bool = False) -> None:
    """A run's end, recorded (worker._finish)."""
    status, code = str(result.status), result.error_code or ""
    RUNS_FINISHED.labels(status, code).inc()
    if run.started_at is not None and run.finished_at is not None:
        RUN_DURATION.labels(status).observe(max(0.0, (run.finished_at - run.started_at).total_seconds()))
    if recovered:
        RUNS_RECOVERED.labels(getattr(run, "takeover_reason", "") or "stale").inc()
    for purpose, part in (result.usage or {}).items():
        if part.get("requests"):
            MODEL_REQUESTS.labels(purpose).inc(part["requests"])
    if code.startswith("model_"):
        MODEL_ERRORS.labels(code).inc()


def heartbeat(ok: bool, worker_id: str = "") -> None:
    tally.flush()
    if ok:
        WORKER_HEARTBEATS.inc()
        WORKER_HEARTBEAT_TIME.labels(worker_id).set(time.time())
    else:
        WORKER_HEARTBEAT_FAILURES.inc()


# Scrape time.


class StateCollector:
    """Gauges read when Prometheus scrapes: runs queued and running (the database), workers alive (Redis).
    The readers are health's (run_counts, workers_alive), passed in: metrics are imported by the fan-out, which
    must not reach the database."""

    def __init__(self, run_counts, workers_alive) -> None:
        self.run_counts = run_counts
        self.workers_alive = workers_alive

    def collect(self):
        queued = GaugeMetricFamily("chorus_runs_queued", "Runs waiting for a worker (database, at scrape time).")
        running = GaugeMetricFamily("chorus_runs_running", "Runs a worker holds (database, at scrape time).")
        oldest = GaugeMetricFamily(
            "chorus_runs_oldest_queued_seconds", "Age of the oldest queued run; 0 when none (database)."
        )
        workers = GaugeMetricFamily(
            "chorus_workers_alive", "Workers whose heartbeat in Redis is recent (CHORUS_HEARTBEAT_SECONDS x 3)."
        )
        errors = GaugeMetricFamily(
            "chorus_scrape_error", "1 when this scrape could not read a source (database, redis).", labels=["source"]
        )
        try:
            counts = self.run_counts()
            queued.add_metric([], counts["queued"])
            running.add_metric([], counts["running"])
            oldest.add_metric([], counts["oldest_queued_seconds"])
            errors.add_metric(["database"], 0)
            yield from (queued, running, oldest)
        except Exception as exc:
            logger.warning("metrics: reading runs from the database failed: %s", exc.__class__.__name__)
            errors.add_metric(["database"], 1)
        try:
            alive = self.workers_alive()
            if alive is not None:
                workers.add_metric([], len(alive))
                yield workers
            errors.add_metric(["redis"], 0)
        except Exception as exc:
            logger.warning("metrics: reading worker heartbeats from Redis failed: %s", exc.__class__.__name__)
            errors.add_metric(["redis"], 1)
        yield errors


def _prune_dead_processes(directory: str) -> None:
    """Clear the live gauges of this host's processes that are gone (killed before they could clear them)."""
    prefix = f"{_HOST}-"
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{prefix}*.db")):
        pid = os.path.basename(path)[: -len(".db")].rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(f"{prefix}{pid}", directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exposition(run_counts, workers_alive) -> tuple[bytes, str]:
    """The text Prometheus scrapes: every process of the host (multi-process mode), then the scrape-time gauges
    (StateCollector, with health's readers)."""
    registry = CollectorRegistry()
    if MULTIPROC_DIR:
        _prune_dead_processes(MULTIPROC_DIR)
        multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    tally.flush()
    state = CollectorRegistry()
    state.register(StateCollector(run_counts, workers_alive))
    return generate_latest(registry) + generate_latest(state), CONTENT_TYPE_LATEST
