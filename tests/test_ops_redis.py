"""Redis beyond one host: conversations spread over several Redis servers by channels-redis's own hash (two real
redis-servers, two daphnes, two workers: every socket still gets every event), and rediss:// with its TLS
options (a real redis-server speaking TLS, a private CA, client certificates)."""

import asyncio
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest
import pytest_asyncio
import redis
import websockets
from asgiref.sync import sync_to_async
from channels_redis.utils import _consistent_hash
from django.db import connections

from agents_app.domain import services
from agents_app.models import Message
from agents_app.ops import health
from agents_app.realtime import fanout, wire
from tests.conftest import Stack
from tests.support import Process, free_port, session_cookie, wait_for_port


@pytest_asyncio.fixture(autouse=True)
async def release_the_database_thread():
    """The async ORM's calls ran on asgiref's database thread: close its connection there, as a request's end
    does, so no session outlives the test."""
    yield
    await sync_to_async(connections.close_all)()


def test_a_conversation_lands_where_channels_redis_would_put_it():
    ids = [uuid.uuid4() for _ in range(2000)]
    for count in (1, 2, 3, 5):
        assert [fanout.shard_index(i, count) for i in ids] == [_consistent_hash(str(i), count) for i in ids]
    on_first = sum(fanout.shard_index(i, 2) == 0 for i in ids)
    assert 800 < on_first < 1200, "two servers share the conversations about evenly"
    fixed = uuid.UUID("6f1c1a64-7a2e-4a53-9a5f-0b8f2f7d2c10")
    assert fanout.shard_index(fixed, 2) == fanout.shard_index(str(fixed), 2), "the same id, as text or UUID"


def start_redis(name, logs, *args, port=None) -> tuple[Process, int]:
    port = port or free_port()
    extra = list(args) or ["--port", str(port)]
    process = Process(name, ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
                      {"PATH": "/usr/bin:/bin:/usr/local/bin"}, logs)  # fmt: skip
    wait_for_port(port, process=process)
    return process, port


async def open_socket(port, conversation_id, cookie):
    socket = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws/conversations/{conversation_id}/",
        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{port}"},
    )
    assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "hello"
    return socket


async def until_finished(socket, timeout=60.0) -> list[dict]:
    received = []
    while True:
        received.append(json.loads(await asyncio.wait_for(socket.recv(), timeout)))
        if received[-1]["type"] == "run.finished":
            return received


@pytest.mark.integration
@pytest.mark.asyncio
async def test_conversations_spread_over_two_redis_servers_and_every_socket_gets_every_event(
    stack_env, process_logs, owner, team
):
    first, first_port = start_redis("redis-a", process_logs)
    second, second_port = start_redis("redis-b", process_logs)
    urls = [f"redis://127.0.0.1:{first_port}/0", f"redis://127.0.0.1:{second_port}/0"]
    env = {**stack_env, "REDIS_URL": urls[0], "REDIS_URLS": ",".join(urls),
           "CHORUS_MAX_ACTIVE_RUNS_PER_USER": "100", "CHORUS_RATE_LIMIT_PER_MINUTE": "1000"}  # fmt: skip
    stack = Stack(env, process_logs)
    by_shard: dict[int, list] = {0: [], 1: []}
    while min(len(found) for found in by_shard.values()) < 4:
        conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
        shard = fanout.shard_index(conversation.id, 2)
        if len(by_shard[shard]) < 4:
            by_shard[shard].append(conversation)
        else:
            await conversation.adelete()
    conversations = by_shard[0] + by_shard[1]
    cookie = await sync_to_async(session_cookie)(owner)
    try:
        stack.start_worker()
        stack.start_worker("worker-2")
        ports = [stack.start_web(), stack.start_web("daphne-2")]
        pairs = [[await open_socket(port, c.id, cookie) for port in ports] for c in conversations]
        for index, (sender, _other) in enumerate(pairs):
            await sender.send(json.dumps({"type": "send", "content": f"[[tokens:{20 + index}]] [[tps:100]]"}))
        received = await asyncio.gather(*(until_finished(socket) for pair in pairs for socket in pair))

        for index in range(len(conversations)):
            on_first, on_second = received[2 * index], received[2 * index + 1]
            assert on_first == on_second, "both web servers delivered the same events"
            assert on_first[-1]["status"] == "succeeded", stack.logs_text()
            tokens = "".join(e["delta"] for e in on_first if e["type"] == "token")
            assert tokens.split() == [f"tok{n}" for n in range(1, 21 + index)]
            stored = await Message.objects.aget(id=on_first[-2]["message"]["id"])
            assert stored.content == tokens
        servers = [redis.Redis.from_url(url) for url in urls]
        for shard, found in by_shard.items():
            for conversation in found:
                key = fanout.log_key(conversation.id)
                assert servers[shard].exists(key) == 1, f"{conversation.id}'s log is on shard {shard}"
                assert servers[1 - shard].exists(key) == 0, "and only there"
                # Every event its sockets got is in it (how many frames the tokens made depends on their timing).
                delivered = received[2 * conversations.index(conversation)]
                assert servers[shard].xlen(key) >= len([event for event in delivered if "seq" in event])
        # The channel layer (the workers' doorbell) stays on REDIS_URL; the second server holds only logs.
        assert {key.decode().split(":")[1] for key in servers[1].keys("chorus:*")} == {"log"}

        # The runs may all be over before a worker's first heartbeat (CHORUS_HEARTBEAT_SECONDS after its start);
        # a report is cached for a second.
        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/readyz", timeout=15) as ok:
                servers_ = json.loads(ok.read())["checks"]["redis"]["servers"]
            if servers_[0].get("workers_alive") == 2:
                break
            await asyncio.sleep(0.2)
        assert [s["role"] for s in servers_] == ["channel layer, worker heartbeats; fan-out shard 0", "fan-out shard 1"]
        assert servers_[0]["workers_alive"] == 2 and "workers_alive" not in servers_[1]

        # The second server stops: its conversations lose their live stream, the first server's keep theirs.
        second.stop()
        await asyncio.sleep(1.1)  # past the readiness report's cache
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/readyz", timeout=15)
        report = json.loads(refused.value.read())
        assert report["failed"] == ["redis"]
        assert [s["role"] for s in report["checks"]["redis"]["servers"] if not s["ok"]] == ["fan-out shard 1"]
        sender, other = pairs[0]
        await sender.send(json.dumps({"type": "send", "content": "[[tokens:10]] [[tps:100]]"}))
        again = await asyncio.gather(until_finished(sender), until_finished(other))
        assert again[0] == again[1] and again[0][-1]["status"] == "succeeded"
        for pair in pairs:
            for socket in pair:
                await socket.close()
    finally:
        stack.stop()
        first.stop()
        second.stop()


# --- TLS ---


def make_certificates(directory) -> dict[str, str]:
    """A private CA, a server certificate for localhost and 127.0.0.1, and a client certificate, by openssl."""
    names_ = ("ca", "ca-key", "server", "server-key", "client", "client-key")
    paths = {name: str(directory / f"{name}.pem") for name in names_}
    names = directory / "san.cnf"
    names.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Chorus test CA",
            "-keyout", paths["ca-key"], "-out", paths["ca"])  # fmt: skip
    for who, subject in (("server", "/CN=localhost"), ("client", "/CN=chorus")):
        request = str(directory / f"{who}.csr")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", paths[f"{who}-key"],
                "-out", request)  # fmt: skip
        extra = ["-extfile", str(names)] if who == "server" else []
        openssl("x509", "-req", "-in", request, "-CA", paths["ca"], "-CAkey", paths["ca-key"], "-CAcreateserial",
                "-days", "2", "-out", paths[who], *extra)  # fmt: skip
    return paths


@pytest.fixture
def tls_redis(tmp_path, process_logs):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates (apt-get install openssl)")
    certs = make_certificates(tmp_path)
    port = free_port()
    process = Process("redis-tls", [
        "redis-server", "--bind", "127.0.0.1 127.0.0.2", "--save", "", "--appendonly", "no", "--port", "0",
        "--tls-port", str(port), "--tls-cert-file", certs["server"], "--tls-key-file", certs["server-key"],
        "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "yes",
    ], {"PATH": "/usr/bin:/bin:/usr/local/bin"}, process_logs)  # fmt: skip
    try:
        wait_for_port(port, timeout=10, process=process)
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    yield port, certs
    process.stop()


def tls_url(port, certs, host="localhost", client=True, **options) -> str:
    query = {"ssl_ca_certs": certs["ca"], **options}
    if client:
        query.update(ssl_certfile=certs["client"], ssl_keyfile=certs["client-key"])
    options = "&".join(f"{key}={value}" for key, value in query.items() if value is not None)
    return f"rediss://{host}:{port}/0?{options}"


@pytest.mark.asyncio
@pytest.mark.parametrize("fast_wire", [True, False], ids=["fast-wire", "stock-wire"])
async def test_the_fan_out_speaks_tls_with_the_options_of_its_url(tls_redis, settings, fast_wire):
    settings.CHORUS_FAST_PATHS, settings.CHORUS_FAST_WIRE = True, fast_wire
    # redis-py reports a refused certificate as its ConnectionError, with the SSL error's text.
    refused = ssl.SSLCertVerificationError if fast_wire else redis.ConnectionError
    port, certs = tls_redis
    url = tls_url(port, certs)
    backend = fanout.RedisBackend(url)
    received = []

    class Socket:
        async def deliver(self, seq, text):
            received.append(seq)

    conversation_id = str(uuid.uuid4())
    try:
        await backend.subscribe(conversation_id, Socket())
        for seq in (1, 2, 3):
            await backend.publish(conversation_id, seq, json.dumps({"seq": seq}))
        await backend.flushed()
        async with asyncio.timeout(10):
            while received != [1, 2, 3]:
                await asyncio.sleep(0.01)
        assert [seq for seq, _text in await backend.read_after(conversation_id, 1)] == [2, 3]  # redis-py's reads
    finally:
        await backend.close()

    # The channel layer and the workers' registry use redis-py with the same URL.
    assert redis.Redis.from_url(url).ping()
    assert (await health.redis_check(url, "test"))["ok"]

    async def opens(url) -> None:
        connection = await wire.connect(url, select_db=True)
        try:
            assert await connection.call([("PING",)]) == [b"PONG"]
        finally:
            await connection.close()

    await opens(tls_url(port, certs, host="127.0.0.1"))  # the certificate names the address too
    await opens(tls_url(port, certs, host="127.0.0.2", ssl_check_hostname="false"))
    await opens(tls_url(port, certs, ssl_ca_certs=None, ssl_cert_reqs="none"))  # trusting any certificate
    with pytest.raises(refused, match="Hostname mismatch|IP address mismatch"):
        await opens(tls_url(port, certs, host="127.0.0.2"))
    with pytest.raises(refused, match="self.signed|unable to get local issuer"):
        await opens(tls_url(port, certs, ssl_ca_certs=None))  # the system's CAs do not know this one
    with pytest.raises((ConnectionError, ssl.SSLError, OSError, redis.ConnectionError)):
        await opens(tls_url(port, certs, client=False))  # the server asks for a client certificate
    failed = await health.redis_check(tls_url(port, certs, client=False), "test")
    assert not failed["ok"] and failed["url"] == f"rediss://localhost:{port}/0"
