"""/healthz, /readyz and who may read /metrics: answered before Django (any Host, no HTTPS redirect), readiness
naming what failed without a secret; and the operations settings refusing what they cannot use."""

import asyncio
import ipaddress
import json
import subprocess
import urllib.error
import urllib.request

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder

from agents_app.ops import health
from chatproject import opsenv
from tests.conftest import Stack
from tests.support import ROOT, free_port, python_args


async def not_django(scope, receive, send):
    raise AssertionError(f"{scope['path']} reached Django")


async def get(path, client=("127.0.0.1", 50000), headers=(), method="GET", app=None):
    communicator = HttpCommunicator(app or health.OpsEndpoints(not_django), method, path, headers=list(headers))
    communicator.scope["client"] = client
    response = await communicator.get_response(timeout=15)
    return response["status"], dict(response["headers"]), response["body"]


@pytest.fixture
def fresh_readiness(monkeypatch):
    monkeypatch.setattr(health, "readiness", health.Readiness())
    monkeypatch.setattr(health, "_migrations_applied", False)


@pytest.mark.asyncio
async def test_healthz_answers_any_host_without_django(settings):
    settings.SECURE_SSL_REDIRECT = True  # a redirect to HTTPS would break every probe
    status, headers, body = await get("/healthz", headers=[(b"host", b"10.1.2.3:8000")])
    assert (status, body) == (200, b"ok")
    assert headers[b"cache-control"] == b"no-store"
    status, _headers, body = await get("/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    status, _headers, body = await get("/healthz", method="POST")
    assert status == 405 and json.loads(body)["error"] == "method_not_allowed"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_readyz_checks_the_database_its_migrations_and_every_redis(settings, redis_url, fresh_readiness):
    settings.REDIS_URL = redis_url
    settings.REDIS_URLS = [redis_url, redis_url.rsplit("/", 1)[0] + "/13"]
    status, headers, body = await get("/readyz", headers=[(b"host", b"pod-ip")])
    report = json.loads(body)
    assert status == 200, report
    assert headers[b"content-type"] == b"application/json"
    assert report["status"] == "ready" and report["failed"] == []
    assert report["checks"]["database"]["ok"] and report["checks"]["migrations"]["ok"]
    servers = report["checks"]["redis"]["servers"]
    assert [server["role"] for server in servers] == ["channel layer, worker heartbeats; fan-out shard 0",
                                                      "fan-out shard 1"]  # fmt: skip
    assert all(server["ok"] for server in servers)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_readyz_names_the_redis_that_failed_without_its_password(settings, redis_url, fresh_readiness):
    closed = free_port()
    settings.REDIS_URL = redis_url
    settings.REDIS_URLS = [redis_url, f"redis://chorus:hunter2-secret@127.0.0.1:{closed}/0"]
    status, _headers, body = await get("/readyz")
    assert status == 503
    assert b"hunter2" not in body
    report = json.loads(body)
    assert report["status"] == "not ready" and report["failed"] == ["redis"]
    down = [server for server in report["checks"]["redis"]["servers"] if not server["ok"]]
    assert [server["url"] for server in down] == [f"redis://127.0.0.1:{closed}/0"]
    assert "ConnectionRefused" in down[0]["error"] or "Connect call failed" in down[0]["error"], down
    assert report["checks"]["database"]["ok"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_readyz_says_which_migrations_are_not_applied(settings, fresh_readiness):
    settings.REDIS_URL, settings.REDIS_URLS = "", []
    recorder = MigrationRecorder(connection)
    app, name = max(key for key in await sync_to_async(recorder.applied_migrations)() if key[0] == "agents_app")
    await sync_to_async(recorder.record_unapplied)(app, name)
    try:
        status, _headers, body = await get("/readyz")
    finally:
        await sync_to_async(recorder.record_applied)(app, name)
    report = json.loads(body)
    assert status == 503 and report["failed"] == ["migrations"]
    assert f"{app}.{name}" in report["checks"]["migrations"]["error"]
    assert "manage.py migrate" in report["checks"]["migrations"]["error"]
    assert report["checks"]["redis"]["skipped"].startswith("no REDIS_URL")

    health.readiness._at = 0  # past the cache: applied again, ready again
    status, _headers, body = await get("/readyz")
    assert status == 200, body


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_readiness_is_shared_by_the_requests_of_one_second(settings, redis_url, fresh_readiness, monkeypatch):
    settings.REDIS_URL, settings.REDIS_URLS = redis_url, []
    calls = []
    check = health.database_check
    monkeypatch.setattr(health, "database_check", lambda: calls.append(1) or check())
    results = await asyncio.gather(*(get("/readyz") for _ in range(20)))
    assert {status for status, _h, _b in results} == {200}
    assert len(calls) == 1, "twenty probes at once cost the database one check"


@pytest.mark.asyncio
async def test_metrics_answer_loopback_and_the_listed_networks_only(settings, monkeypatch):
    monkeypatch.setattr(health.scrapes, "run", _fake_scrape)
    settings.CHORUS_METRICS_ALLOWED_NETWORKS = [ipaddress.ip_network("10.0.0.0/8")]
    assert (await get("/metrics", client=("127.0.0.1", 1)))[0] == 200
    assert (await get("/metrics", client=("::1", 1)))[0] == 200
    assert (await get("/metrics", client=("10.20.30.40", 1)))[0] == 200
    assert (await get("/metrics", client=("::ffff:10.20.30.40", 1)))[0] == 200
    status, _headers, body = await get("/metrics", client=("192.168.1.9", 1))
    assert status == 403 and b"CHORUS_METRICS_ALLOWED_NETWORKS" in body
    assert (await get("/metrics", client=("2001:db8::1", 1)))[0] == 403
    assert (await get("/metrics", client=("::ffff:192.168.1.9", 1)))[0] == 403
    settings.CHORUS_METRICS_ALLOWED_NETWORKS = []
    assert (await get("/metrics", client=("10.20.30.40", 1)))[0] == 403


async def _fake_scrape():
    return 200, b"# scraped\n", "text/plain"


def test_operations_settings_refuse_what_they_cannot_use(monkeypatch, tmp_path):
    def redis_urls(value):
        monkeypatch.setenv("REDIS_URLS", value)
        return opsenv.redis_urls("REDIS_URLS", [])

    assert redis_urls("redis://a:6379/0, rediss://b:6380/1") == ["redis://a:6379/0", "rediss://b:6380/1"]
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert redis_urls(f"rediss://b:6380/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    refusals = {
        "http://a:6379/0": "redis://, rediss:// (TLS) or unix://",
        "redis://:pw-secret@a:6379/0?ssl_cert_reqs=none": "ssl_cert_reqs is a TLS option; use rediss://",
        "rediss://:pw-secret@a:6379/0?ssl_cert_reqs=maybe": "ssl_cert_reqs must be one of none, optional, required",
        "rediss://a/0?ssl_ca_certs=/nonexistent/ca.pem": "is not a readable file",
        "rediss://a/0?ssl_verify=1": "unknown Redis URL option 'ssl_verify'",
        "redis://:pw-secret@a:port/0": "not a Redis URL",
        "redis:///0": "without a host",
        "redis://a/0,redis://a/0": "the same Redis twice",
    }
    for value, message in refusals.items():
        with pytest.raises(ImproperlyConfigured) as refused:
            redis_urls(value)
        assert message in str(refused.value) and "REDIS_URLS" in str(refused.value)
        assert "pw-secret" not in str(refused.value)

    monkeypatch.setenv("CHORUS_METRICS_ALLOWED_NETWORKS", "10.0.0.0/8, 192.168.1.7")
    assert [str(n) for n in opsenv.networks("CHORUS_METRICS_ALLOWED_NETWORKS", [])] == ["10.0.0.0/8",
                                                                                       "192.168.1.7/32"]  # fmt: skip
    monkeypatch.setenv("CHORUS_METRICS_ALLOWED_NETWORKS", "intranet")
    with pytest.raises(ImproperlyConfigured, match="CHORUS_METRICS_ALLOWED_NETWORKS must list IP networks"):
        opsenv.networks("CHORUS_METRICS_ALLOWED_NETWORKS", [])

    monkeypatch.delenv("CHORUS_LOG_FORMAT", raising=False)
    assert opsenv.log_format("CHORUS_LOG_FORMAT", debug=False) == "json"
    assert opsenv.log_format("CHORUS_LOG_FORMAT", debug=True) == "text"  # make run: a person at a terminal
    monkeypatch.setenv("CHORUS_LOG_FORMAT", "xml")
    with pytest.raises(ImproperlyConfigured, match="CHORUS_LOG_FORMAT must be json or text"):
        opsenv.log_format("CHORUS_LOG_FORMAT", debug=False)


def test_a_process_refuses_to_start_with_a_bad_redis_url():
    env = {"PATH": "/usr/bin:/bin", "DEBUG": "1", "REDIS_URLS": "redis://:pw-secret@127.0.0.1:6379/0?tls=yes"}
    run = subprocess.run(python_args("manage.py", "check"), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert "REDIS_URLS: unknown Redis URL option 'tls'" in run.stderr
    assert "pw-secret" not in run.stderr


@pytest.mark.integration
def test_a_web_server_without_its_database_is_alive_but_not_ready(stack_env, process_logs):
    stack = Stack({**stack_env, "DATABASE_URL": f"postgres://chorus:hunter2@127.0.0.1:{free_port()}/chorus",
                   "CHORUS_EMBEDDED_WORKER": "0"}, process_logs)  # fmt: skip
    try:
        port = stack.start_web()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.read() == b"ok"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=15)
        body = refused.value.read()
        report = json.loads(body)
        assert refused.value.code == 503
        assert report["failed"] == ["database", "migrations"], report
        assert report["checks"]["database"]["error"].startswith("OperationalError")
        assert report["checks"]["redis"]["ok"]
        assert b"hunter2" not in body
    finally:
        stack.stop()
