"""Operations on the real processes: a daphne's /metrics adds up every process of the host (multi-process mode)
and parses with prometheus_client's own parser; every log line is one JSON object naming its run, conversation
and person; `manage.py worker_ready` follows a worker from start to SIGTERM and SIGKILL."""

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import pytest_asyncio
import websockets
from asgiref.sync import sync_to_async
from django.db import connections
from prometheus_client.parser import text_string_to_metric_families

from agents_app.domain import services
from agents_app.models import Run
from tests.conftest import Stack
from tests.support import ROOT, python_args, session_cookie

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture(autouse=True)
async def release_the_database_thread():
    """The async ORM's calls ran on asgiref's database thread: close its connection there, as a request's end
    does, so no session outlives the test."""
    yield
    await sync_to_async(connections.close_all)()


def scrape(port: int) -> dict[str, list]:
    """Every sample of /metrics by metric family name: [(sample name, labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        family.name: [(sample.name, sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def value(metrics: dict, name: str, sample: str | None = None, **labels) -> float:
    """The sum of a family's samples named `sample` (default: the family's own name) with these labels."""
    found = [
        number
        for sample_name, sample_labels, number in metrics.get(name, [])
        if sample_name == (sample or name) and all(sample_labels.get(k) == v for k, v in labels.items())
    ]
    assert found, f"no sample {sample or name} {labels} in {name}: {metrics.get(name)}"
    return sum(found)


async def wait_for(predicate, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(predicate)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.3)


async def scrape_until(port: int, condition, what: str) -> dict:
    """Scrape until `condition(metrics)` holds (values some processes add now and then, as they heartbeat)."""
    found: dict = {}

    def ready():
        found.update(scrape(port))
        return condition(found)

    await wait_for(ready, what=what)
    return found


async def open_socket(port, conversation, user):
    cookie = await sync_to_async(session_cookie)(user)
    socket = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws/conversations/{conversation.id}/",
        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{port}"},
    )
    assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "hello"
    return socket


async def until_finished(socket, timeout=30.0) -> list[dict]:
    received = []
    while True:
        received.append(json.loads(await asyncio.wait_for(socket.recv(), timeout)))
        if received[-1]["type"] == "run.finished":
            return received


def worker_ready(env, *args) -> tuple[int, dict]:
    run = subprocess.run(python_args("manage.py", "worker_ready", *args), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.stdout.strip(), run.stderr
    return run.returncode, json.loads(run.stdout.strip().splitlines()[-1])


def polled(env, pid: int) -> bool:
    """The worker's heartbeat in Redis says it has polled the database (read directly: no process started)."""
    import redis

    from agents_app.ops import health

    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        for member in client.zrange(health.WORKERS_KEY, 0, -1):
            if member.decode().split(":")[1] == str(pid):
                return float(client.hget(health.worker_key(member.decode()), "poll_ok_at") or 0) > 0
        return False
    finally:
        client.close()


@pytest.fixture
def ops_env(stack_env, tmp_path):
    metrics_dir = tmp_path / "metrics"
    return {**stack_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "CHORUS_LOG_FORMAT": "json"}


async def test_metrics_of_every_process_scraped_and_parsed(ops_env, process_logs, owner, team):
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    failing = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    stack = Stack(ops_env, process_logs)
    try:
        worker = stack.start_worker()
        port = stack.start_web()
        other_port = stack.start_web("daphne-2")
        socket = await open_socket(port, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:30]] [[tps:100]]"}))
        events = await until_finished(socket)
        assert events[-1]["status"] == "succeeded", stack.logs_text()
        tokens = sum(1 for e in events if e["type"] == "token")
        bad = await open_socket(other_port, failing, owner)
        await bad.send(json.dumps({"type": "send", "content": "[[fault:401]]"}))
        assert (await until_finished(bad))[-1]["error"]["code"] == "model_auth_failed"
        await bad.close()

        # Tokens are tallied in the worker and added to the counters with each heartbeat (1 s here).
        metrics = await scrape_until(other_port, lambda m: value(m, "chorus_tokens", "chorus_tokens_total") >= 30,
                                     "the tokens counted")  # fmt: skip
        # Scraped from the second web server: the first one's socket and the worker's runs are there too.
        assert value(metrics, "chorus_websockets_open") == 1
        assert value(metrics, "chorus_websocket_connections", "chorus_websocket_connections_total") == 2
        assert value(metrics, "chorus_runs_finished", "chorus_runs_finished_total", status="succeeded") == 1
        assert value(metrics, "chorus_runs_finished", "chorus_runs_finished_total", status="failed",
                     error_code="model_auth_failed") == 1  # fmt: skip
        assert value(metrics, "chorus_model_errors", "chorus_model_errors_total", code="model_auth_failed") == 1
        assert value(metrics, "chorus_model_requests", "chorus_model_requests_total", purpose="agent") >= 1
        assert value(metrics, "chorus_tokens", "chorus_tokens_total") == 30
        frames = value(metrics, "chorus_token_frames", "chorus_token_frames_total")
        assert frames == tokens, "one frame per token event the socket got"
        observed = {  # the failed run streamed no token
            "chorus_time_to_first_token_seconds": 1,
            "chorus_run_claim_latency_seconds": 2,
            "chorus_run_duration_seconds": 2,
        }
        for histogram, count in observed.items():
            assert value(metrics, histogram, f"{histogram}_count") == count, histogram
            assert value(metrics, histogram, f"{histogram}_bucket", le="+Inf") == count, histogram
        assert value(metrics, "chorus_claim_duration_seconds", "chorus_claim_duration_seconds_count") >= 2
        lag_batches = value(metrics, "chorus_token_delivery_lag_seconds", "chorus_token_delivery_lag_seconds_count")
        assert 1 <= lag_batches <= frames
        assert value(metrics, "chorus_redis_published_events", "chorus_redis_published_events_total",
                     shard="0") >= frames + 4  # fmt: skip
        assert value(metrics, "chorus_redis_publish_retries", "chorus_redis_publish_retries_total", shard="0") == 0
        assert value(metrics, "chorus_worker_heartbeats", "chorus_worker_heartbeats_total") >= 1
        assert value(metrics, "chorus_workers_alive") == 1
        assert value(metrics, "chorus_runs_queued") == 0 and value(metrics, "chorus_runs_running") == 0
        assert value(metrics, "chorus_worker_runs_active") == 0
        assert value(metrics, "chorus_scrape_error", source="database") == 0
        (heartbeat,) = metrics["chorus_worker_heartbeat_timestamp_seconds"]  # the worker's only
        assert heartbeat[1]["pid"].rpartition("-")[2] == str(worker.pid)
        assert heartbeat[1]["worker_id"] == (await Run.objects.filter(status="succeeded").afirst()).worker_id
        assert time.time() - 10 < heartbeat[2] <= time.time()

        # A long answer while the worker is killed: its live gauges go with it at the next scrape.
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:400]] [[tps:20]]"}))
        while json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] != "token":
            pass
        assert value(scrape(port), "chorus_worker_runs_active") == 1
        worker.signal(signal.SIGKILL)
        worker.popen.wait(10)
        await socket.close()
        metrics = await scrape_until(port, lambda m: value(m, "chorus_websockets_open") == 0,
                                     "the closed socket uncounted")  # fmt: skip
        assert value(metrics, "chorus_worker_runs_active") == 0
        assert "chorus_worker_heartbeat_timestamp_seconds" not in metrics or not metrics[
            "chorus_worker_heartbeat_timestamp_seconds"]  # fmt: skip
        assert value(metrics, "chorus_runs_running") == 1, "the database still says running until recovered"
    finally:
        stack.stop()
    files = os.listdir(ops_env["PROMETHEUS_MULTIPROC_DIR"])
    assert any(name.startswith("counter_") for name in files), files


async def test_every_log_line_is_json_and_names_its_run_conversation_and_person(ops_env, process_logs, owner, team):
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    stack = Stack(ops_env, process_logs)
    try:
        worker = stack.start_worker()
        port = stack.start_web()
        socket = await open_socket(port, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:5]]"}))
        finished = (await until_finished(socket))[-1]
        await socket.close()
    finally:
        stack.stop()
    lines = worker.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    assert records, "the worker logged"
    assert all({"time", "level", "logger", "message", "pid"} <= record.keys() for record in records)
    assert all(record["pid"] == worker.pid for record in records)
    ended = [r for r in records if r["message"].startswith(f"run {finished['run_id']} succeeded")]
    assert len(ended) == 1, records
    assert ended[0]["run_id"] == finished["run_id"]
    assert ended[0]["conversation_id"] == str(conversation.id)
    assert ended[0]["user_id"] == str(owner.pk)
    assert ended[0]["worker_id"] == (await Run.objects.aget(id=finished["run_id"])).worker_id
    assert ended[0]["time"].endswith("Z") and ended[0]["level"] == "INFO"
    started = [r for r in records if r["message"].startswith("agent worker ")]
    assert started and "run_id" not in started[0], "a line about no run names none"


async def test_worker_ready_follows_a_worker_from_start_to_its_end(ops_env, process_logs):
    env = {**ops_env, "CHORUS_HEARTBEAT_SECONDS": "0.5"}
    stack = Stack(env, process_logs)
    try:
        code, report = worker_ready(env, "--pid", "999999")
        assert code == 1 and "no heartbeat from pid 999999" in report["error"]

        first = stack.start_worker()
        second = stack.start_worker("worker-2")
        await wait_for(lambda: polled(env, first.pid) and polled(env, second.pid), what="both workers polled")
        code, report = worker_ready(env)
        assert code == 0 and sorted(w["worker_id"].split(":")[1] for w in report["workers"]) == sorted(
            [str(first.pid), str(second.pid)])  # fmt: skip
        assert all(w["ready"] and w["heartbeat_age_seconds"] < 5 for w in report["workers"])

        first.signal(signal.SIGTERM)  # drains, then leaves the registry
        assert first.popen.wait(30) == 0
        code, report = worker_ready(env, "--pid", str(first.pid))
        assert code == 1 and "no heartbeat" in report["error"]

        second.signal(signal.SIGKILL)  # leaves nothing: its heartbeat just grows old
        second.popen.wait(10)
        await asyncio.sleep(2)
        code, report = worker_ready(env, "--pid", str(second.pid), "--max-age", "1")
        assert code == 1, report
        assert "last heartbeat" in report["workers"][0]["problems"][0]
        code, report = worker_ready(env, "--max-age", "1")  # nobody on this host now
        assert code == 1 and "no heartbeat from any worker" in report["error"]
    finally:
        stack.stop()

    no_redis = {key: value for key, value in env.items() if key not in ("REDIS_URL", "REDIS_URLS")}
    code, report = worker_ready(no_redis)
    assert code == 2 and "runs inside the web server" in report["error"]

    # A probe is a process of its own every few seconds: it must leave no metrics files behind.
    files = set(os.listdir(env["PROMETHEUS_MULTIPROC_DIR"]))
    assert any(name.endswith(f"-{second.pid}.db") for name in files), "the workers wrote theirs"
    worker_ready(env)
    assert set(os.listdir(env["PROMETHEUS_MULTIPROC_DIR"])) == files
