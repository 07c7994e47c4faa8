"""The Redis fan-out on its own, against a real Redis: events reach subscribers in order, and a web process that
loses its subscription connection catches its sockets up from the log, missing nothing and repeating nothing."""

import asyncio
import json
import uuid

import pytest
import pytest_asyncio
import redis

from agents_app.realtime import fanout, resp, wire

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True, params=["fast", "stock"])
def wire_kind(request, settings):
    """Every test here runs on both wires: the fast one and redis-py's (CHORUS_FAST_WIRE=0)."""
    settings.CHORUS_FAST_PATHS, settings.CHORUS_FAST_WIRE = True, request.param == "fast"
    return request.param


class Socket:
    """What a ChatConsumer does with the fan-out, in a few lines: each seq once, in order; catch up by seq."""

    def __init__(self, backend, conversation_id):
        self.backend = backend
        self.conversation_id = conversation_id
        self.seen: list[int] = []
        self.caught_up = asyncio.Event()

    async def deliver(self, seq, text):
        if not self.seen or seq > self.seen[-1]:
            assert json.loads(text)["seq"] == seq
            self.seen.append(seq)

    async def catch_up(self):
        for seq, text in await self.backend.read_after(self.conversation_id, self.seen[-1] if self.seen else 0):
            await self.deliver(seq, text)
        self.caught_up.set()


async def publish(backend, conversation_id, *seqs):
    for seq in seqs:
        await backend.publish(conversation_id, seq, json.dumps({"type": "token", "seq": seq, "delta": f"t{seq} "}))
    await backend.flushed()


async def until(condition, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def backend(redis_url):
    backend = fanout.RedisBackend(redis_url)
    yield backend
    await backend.close()


async def test_the_wire_is_the_one_the_settings_pick(redis_url, wire_kind):
    connection = await wire.connect(redis_url)
    try:
        expected = resp.RespConnection if wire_kind == "fast" else wire.RedisPyConnection
        assert isinstance(connection, expected)
        replies = await connection.call([("PING",), ("XADD", "chorus:wire-test", "1-0", "e", "x"), ("PING",)])
        replies += await connection.call([("XADD", "chorus:wire-test", "1-0", "e", "x")])  # an error reply...
        assert replies[0] == replies[2] == b"PONG" and isinstance(replies[3], Exception)
        assert "equal or smaller" in str(replies[3])
        assert await connection.call([("PING",)]) == [b"PONG"]  # ...leaves the connection in step
    finally:
        await connection.call([("DEL", "chorus:wire-test")])
        await connection.close()


async def test_events_reach_every_subscriber_in_order_and_the_log_keeps_them(backend):
    conversation_id = uuid.uuid4()
    sockets = [Socket(backend, conversation_id) for _ in range(2)]
    for socket in sockets:
        await backend.subscribe(conversation_id, socket)
    await publish(backend, conversation_id, *range(1, 51))
    await until(lambda: all(len(socket.seen) == 50 for socket in sockets))
    assert all(socket.seen == list(range(1, 51)) for socket in sockets)
    assert [seq for seq, _text in await backend.read_after(conversation_id, 45)] == [46, 47, 48, 49, 50]


async def test_a_lost_subscription_is_reopened_and_its_sockets_catch_up_from_the_log(backend, redis_url):
    conversation_id = uuid.uuid4()
    socket = Socket(backend, conversation_id)
    await backend.subscribe(conversation_id, socket)
    await publish(backend, conversation_id, 1, 2)
    await until(lambda: socket.seen == [1, 2])

    # Redis drops the web process's subscription (a restart, a network cut, `CLIENT KILL`)...
    host, port = backend.events.connection.local_address()
    address = f"{host}:{port}"
    redis.Redis.from_url(redis_url).client_kill(address)
    # ...and events keep being published while it is away.
    await publish(backend, conversation_id, 3, 4, 5)

    await asyncio.wait_for(socket.caught_up.wait(), 10)
    await publish(backend, conversation_id, 6)
    await until(lambda: socket.seen[-1:] == [6])
    assert socket.seen == [1, 2, 3, 4, 5, 6], "nothing missed, nothing twice, in order"


async def test_an_event_after_a_quiet_spell_goes_at_once_and_a_burst_shares_one_round_trip(redis_url):
    """CHORUS_PUBLISH_WINDOW_MS: the first event is not held back; the ones right behind it wait for the window
    and go to Redis together (here a 300 ms window, so the test does not depend on the machine's speed)."""
    backend = fanout.RedisBackend(redis_url, window_ms=300)
    loop = asyncio.get_running_loop()
    sends: list[tuple[float, int]] = []  # (when, commands) for each round trip
    send = backend._send

    async def recorded_send(commands):
        sends.append((loop.time(), len(commands)))
        return await send(commands)

    backend._send = recorded_send
    conversation_id = str(uuid.uuid4())
    socket = Socket(backend, conversation_id)
    await backend.subscribe(conversation_id, socket)
    try:
        published_at = loop.time()
        await publish(backend, conversation_id, 1)
        await publish(backend, conversation_id, 2, 3, 4, 5)
        await until(lambda: socket.seen == [1, 2, 3, 4, 5])
    finally:
        await backend.close()

    assert len(sends) == 2, sends
    (first_at, first_commands), (second_at, second_commands) = sends
    assert first_at - published_at < 0.15, "the first event waited for the window"
    assert second_at - first_at >= 0.29, "the burst went out before the window had passed"
    assert second_commands == 4 * fanout.COMMANDS_PER_EVENT + 1  # four events and the log's one EXPIRE
    assert first_commands == fanout.COMMANDS_PER_EVENT + 1
