"""Faults injected into real processes: a worker killed with SIGKILL, a worker told to stop with SIGTERM, Redis
restarted or paused (SIGSTOP) mid-answer, and WebSocket clients that stop reading. Everything is stopped by its
PID."""

import asyncio
import json
import os
import signal
import time

import pytest
import websockets
from asgiref.sync import sync_to_async

from agents_app.domain import services
from agents_app.models import Conversation, Message, Run
from tests.conftest import Stack
from tests.support import (
    TCP_ESTABLISHED,
    Process,
    free_port,
    open_stalled_websocket,
    rss_bytes,
    session_cookie,
    tcp_state,
    wait_for_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def open_socket(stack, conversation, user, after_seq=None, **connect_args):
    cookie = await sync_to_async(session_cookie)(user)
    url = stack.ws_url(conversation.id) + (f"?after_seq={after_seq}" if after_seq is not None else "")
    socket = await websockets.connect(
        url,
        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{stack.web_port}"},
        **connect_args,
    )
    assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "hello"
    return socket


async def reconnect(stack, conversation, user, after_seq, attempts=8):
    """What the page does after a drop: try again with backoff, naming the last seq it has."""
    for attempt in range(attempts):
        try:
            return await open_socket(stack, conversation, user, after_seq=after_seq)
        except (OSError, websockets.InvalidHandshake):
            await asyncio.sleep(0.25 * 2**attempt)
    raise AssertionError("could not reconnect")


async def read_to_the_end(stack, conversation, user, socket, events):
    """The page's way: read until run.finished, reconnecting with the last seq seen if the socket drops.
    Returns the events, the socket it ended on and how many reconnects it took."""
    last_seq, reconnects = max(e["seq"] for e in events), 0
    while events[-1]["type"] != "run.finished":
        try:
            event = json.loads(await asyncio.wait_for(socket.recv(), 30))
            events.append(event)
            last_seq = max(last_seq, event["seq"])
        except websockets.ConnectionClosed:
            reconnects += 1
            socket = await reconnect(stack, conversation, user, last_seq)
    return events, socket, reconnects


async def begin_long_answer(stack, conversation, user):
    """A worker and a web server, a socket, and a 150-token answer under way: (socket, events to its first token)."""
    stack.start_worker()
    stack.start_web()
    socket = await open_socket(stack, conversation, user)
    await socket.send(json.dumps({"type": "send", "content": "[[tokens:150]] [[tps:30]]"}))
    return socket, await receive_until(socket, "token")


def started_run_id(events: list[dict]) -> str:
    """The run id of the first run.started among a socket's events."""
    return next(e["run_id"] for e in events if e["type"] == "run.started")


def private_redis(port: int, process_logs, name: str = "redis") -> Process:
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    process = Process(name, args, dict(os.environ), process_logs)
    wait_for_port(port, process=process)
    return process


async def receive_until(socket, event_type, timeout=30.0):
    received = []
    while True:
        event = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        received.append(event)
        if event["type"] == event_type:
            return received


def worker_pid(run: Run) -> int:
    return int(run.worker_id.split(":")[1])


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


@pytest.fixture
def fast_recovery_env(stack_env):
    return {**stack_env, "CHORUS_RUN_STALE_SECONDS": "3", "CHORUS_HEARTBEAT_SECONDS": "0.5"}


async def test_a_killed_worker_is_recovered_by_another_and_nothing_is_lost(
    fast_recovery_env, process_logs, conversation, owner, reliability
):
    stack = Stack(fast_recovery_env, process_logs)
    try:
        first, second = stack.start_worker("worker-a"), stack.start_worker("worker-b")
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:400]] [[tps:40]]"}))
        events = await receive_until(socket, "token")
        events += [json.loads(await asyncio.wait_for(socket.recv(), 10)) for _ in range(5)]
        run = await Run.objects.aget(id=started_run_id(events))
        victim = first if worker_pid(run) == first.pid else second
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        events += await receive_until(socket, "run.finished", timeout=40)
        recovery_seconds = time.monotonic() - killed_at
        await socket.close()
    finally:
        stack.stop()

    finished = events[-1]
    assert finished["status"] == "failed" and finished["error"]["code"] == "worker_lost", stack.logs_text()
    assert recovery_seconds < 30
    streamed = "".join(e["delta"] for e in events if e["type"] == "token")
    kept = events[-2]["message"]
    assert kept["incomplete"] and kept["content"] == streamed, "what the browser saw is kept"
    assert await sync_to_async(Message.objects.filter(role="user", conversation=conversation).count)() == 1
    assert await sync_to_async(Message.objects.filter(role="assistant", conversation=conversation).count)() == 1
    reliability.add(
        "Worker killed (SIGKILL) mid-answer", "SIGKILL to the worker's PID after 6 frames",
        "another worker fails the run `worker_lost`, partial kept",
        seconds_to_recover=f"{recovery_seconds:.1f}", messages_lost=0, duplicates=0,
    )  # fmt: skip


async def test_sigterm_lets_the_running_answer_finish_then_exits_0(
    stack_env, process_logs, conversation, owner, reliability
):
    stack = Stack(stack_env, process_logs)
    try:
        worker = stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:60]] [[tps:30]]"}))
        await receive_until(socket, "token")
        worker.signal(signal.SIGTERM)
        events = await receive_until(socket, "run.finished")
        await socket.close()
        exit_code = await asyncio.to_thread(worker.popen.wait, 20)
    finally:
        stack.stop()

    assert events[-1]["status"] == "succeeded", stack.logs_text()
    assert events[-2]["message"]["content"].split() == [f"tok{i}" for i in range(1, 61)]
    assert exit_code == 0
    reliability.add(
        "Worker told to stop (SIGTERM) mid-answer", "SIGTERM to the worker's PID after the first token",
        "the answer finishes, then the worker exits 0", exit_code=exit_code, messages_lost=0,
    )  # fmt: skip


async def test_sigterm_after_the_grace_period_keeps_what_arrived(stack_env, process_logs, conversation, owner):
    stack = Stack({**stack_env, "CHORUS_WORKER_GRACE_SECONDS": "0.5"}, process_logs)
    try:
        worker = stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:400]] [[tps:40]]"}))
        events = await receive_until(socket, "token")
        worker.signal(signal.SIGTERM)
        events += await receive_until(socket, "run.finished")
        await socket.close()
        exit_code = await asyncio.to_thread(worker.popen.wait, 20)
    finally:
        stack.stop()

    assert events[-1]["error"]["code"] == "worker_shutdown"
    assert events[-2]["message"]["incomplete"]
    assert events[-2]["message"]["content"] == "".join(e["delta"] for e in events if e["type"] == "token")
    assert exit_code == 0


async def test_redis_restarted_mid_answer_the_browser_ends_with_the_complete_text(
    stack_env, process_logs, conversation, owner, reliability
):
    port = free_port()
    redis_process = private_redis(port, process_logs)
    stack = Stack({**stack_env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, process_logs)
    try:
        socket, events = await begin_long_answer(stack, conversation, owner)
        redis_process.stop()
        await asyncio.sleep(1)
        redis_process = private_redis(port, process_logs, "redis-again")
        restarted_at = time.monotonic()
        run_id = started_run_id(events)
        events, socket, _reconnects = await read_to_the_end(stack, conversation, owner, socket, events)
        seconds = time.monotonic() - restarted_at
        await socket.close()
    finally:
        stack.stop()
        redis_process.stop()

    run = await Run.objects.aget(id=run_id)
    answer = await Message.objects.aget(run=run, role="assistant")
    assert run.status == "succeeded", stack.logs_text()
    assert answer.content.split() == [f"tok{i}" for i in range(1, 151)] and not answer.incomplete
    final_view = [e for e in events if e["type"] == "message" and e["message"]["role"] == "assistant"][-1]
    assert final_view["message"]["content"] == answer.content, "the browser ends with the complete, persisted text"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "every event once, in seq order"
    reliability.add(
        "Redis restarted mid-answer", "redis-server stopped by PID, restarted 1 s later on the same port",
        "the run completes; the page gets the complete text", seconds_to_finish_after_restart=f"{seconds:.1f}",
        messages_lost=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "pause",
    [
        pytest.param(3, id="3s-within-redis-timeouts"),
        # Longer than redis-py's 5 s socket timeout and the channel layer's 10 s: the worker's publishes time
        # out and are retried, daphne's sockets close (1011) and the page resumes with ?after_seq=.
        pytest.param(12, id="12s-past-redis-timeouts"),
    ],
)
async def test_redis_paused_mid_answer_the_run_completes_and_the_browser_ends_with_the_complete_text(
    pause, stack_env, process_logs, conversation, owner, reliability
):
    """SIGSTOP freezes Redis with every connection left open (a stalled host, a long fork, a swapped-out
    server): nothing is refused, every command just waits. SIGCONT `pause` seconds later lets it answer."""
    port = free_port()
    redis_process = private_redis(port, process_logs)
    stack = Stack({**stack_env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, process_logs)
    try:
        socket, events = await begin_long_answer(stack, conversation, owner)
        run_id = started_run_id(events)
        redis_process.signal(signal.SIGSTOP)
        await asyncio.sleep(pause)
        redis_process.signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        events, socket, reconnects = await read_to_the_end(stack, conversation, owner, socket, events)
        seconds = time.monotonic() - resumed_at
        await socket.close()
    finally:
        redis_process.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
        stack.stop()
        redis_process.stop()

    run = await Run.objects.aget(id=run_id)
    answer = await Message.objects.aget(run=run, role="assistant")
    assert run.status == "succeeded" and not run.error_code, stack.logs_text()
    assert answer.content.split() == [f"tok{i}" for i in range(1, 151)] and not answer.incomplete
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "every event once, in seq order"
    streamed = "".join(e["delta"] for e in events if e["type"] == "token" and e["run_id"] == run_id)
    final_view = [e for e in events if e["type"] == "message" and e["message"]["role"] == "assistant"][-1]
    assert final_view["message"]["content"] == answer.content, "the browser ends with the complete, persisted text"
    assert answer.content.startswith(streamed), "no token repeated, none out of order"
    if pause < 5:
        # Nothing timed out: every token arrived live, on the same socket.
        assert streamed == answer.content and reconnects == 0
    assert seconds < 30
    outcome = "the run completes; the page gets every token live and the complete text"
    if reconnects:
        outcome = "the run completes; sockets close (1011), the page resumes and gets the complete text"
    reliability.add(
        f"Redis paused (SIGSTOP) {pause} s mid-answer",
        f"SIGSTOP to redis-server's PID after the first token, SIGCONT {pause} s later", outcome,
        seconds_to_finish_after_resume=f"{seconds:.1f}", reconnects=reconnects,
        tokens_live=f"{len(streamed.split())}/150", messages_lost=0, duplicates=0,
    )  # fmt: skip


STALLED_SOCKETS = 24
MiB = 1024 * 1024


def store_long_answers(conversation, count=8, size=400_000) -> None:
    """Long answers already in the conversation, as a finished run would have left them."""
    paragraph = " ".join(f"word{i}" for i in range(100))
    text = "\n\n".join([paragraph] * (size // len(paragraph)))
    for _ in range(count):
        seq = services.seq_reserve(conversation_id=conversation.id)
        Message.objects.create(
            conversation=conversation, role="assistant", source="assistant", content=text, is_final_answer=True, seq=seq
        )
        Conversation.objects.filter(id=conversation.id).update(last_seq=seq)


async def test_websocket_clients_that_stop_reading_are_dropped_and_daphne_memory_stays_bounded(
    stack_env, process_logs, conversation, owner, reliability
):
    """Clients that finish the handshake, then never read (a frozen tab, a laptop asleep on a live link, a
    hostile client). daphne never waits for a socket: once the kernel's send buffer is full (tcp_wmem's
    maximum, 4 MiB) twisted keeps every further frame in daphne's memory, without limit. What bounds it is
    daphne's keepalive: a socket that has sent nothing for --ping-interval seconds gets a ping (checked every
    2 s), and one that has not answered it --ping-timeout seconds later is aborted, its buffer freed."""
    # Each stalled socket asks for the history (?after_seq=0): eight stored 400 kB answers, about 6.5 MB it
    # never reads. Its kernel buffers are then full, so whatever the live answer sends it piles up inside daphne.
    # (Each stored answer's `message` event stays under daphne's 1 MiB --websocket-max-message-size, which
    # applies to what daphne sends too.)
    await sync_to_async(store_long_answers)(conversation)
    stack = Stack(stack_env, process_logs)
    stalled = []
    try:
        stack.start_worker()
        port = stack.start_web(extra_args=("--ping-interval", "1", "--ping-timeout", "3"))
        web = stack.processes[-1]
        normal = await open_socket(stack, conversation, owner, max_size=None)
        rss_idle = rss_bytes(web.pid)
        cookie = await sync_to_async(session_cookie)(owner)
        path = f"/ws/conversations/{conversation.id}/?after_seq=0"
        first_connected_at = time.monotonic()
        for _ in range(STALLED_SOCKETS):
            stalled.append(await asyncio.to_thread(open_stalled_websocket, port, path, cookie))
        samples: list[tuple[float, int]] = []
        dropped_at = None

        async def watch() -> None:
            nonlocal dropped_at
            while True:
                now = time.monotonic()
                samples.append((now, rss_bytes(web.pid)))
                if dropped_at is None and all(tcp_state(sock) != TCP_ESTABLISHED for sock in stalled):
                    dropped_at = now
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        await normal.send(json.dumps({"type": "send", "content": "[[tokens:40000]] [[tps:2500]]"}))
        received: list[tuple[float, int, dict]] = []
        while not received or received[-1][2]["type"] != "run.finished":
            raw = await asyncio.wait_for(normal.recv(), 60)
            received.append((time.monotonic(), len(raw.encode()), json.loads(raw)))
        await asyncio.sleep(1)  # daphne's memory after the last, largest frame (the complete message)
        while dropped_at is None and time.monotonic() < first_connected_at + 30:
            await asyncio.sleep(0.2)
        watcher.cancel()
        await normal.close()
        daphne_alive = web.popen.poll() is None
    finally:
        states = [tcp_state(sock) for sock in stalled]
        for sock in stalled:
            sock.close()
        stack.stop()

    assert daphne_alive, stack.logs_text()
    # Every stalled socket is aborted (RST: the kernel's state is CLOSE), within interval + 2 s + timeout + slack.
    assert dropped_at is not None, f"TCP states of the stalled sockets: {states}"
    seconds_to_drop = dropped_at - first_connected_at
    assert seconds_to_drop < 20
    # After the drop, the answer goes on to the reading socket, and daphne's memory no longer grows with it.
    rss_at_drop = max(rss for at, rss in samples if at <= dropped_at)
    rss_after = max([rss for at, rss in samples if at > dropped_at], default=rss_at_drop)
    growth_after_drop = rss_after - rss_at_drop
    sent_after_drop = sum(size for at, size, _event in received if at > dropped_at)
    bound = 6 * MiB
    assert STALLED_SOCKETS * sent_after_drop > 2 * bound, "enough is sent after the drop to see it piling up"
    assert growth_after_drop < bound, f"daphne grew {growth_after_drop / MiB:.1f} MiB after the drop"
    peak_growth = max(rss for _at, rss in samples) - rss_idle
    # The reading socket got the whole answer.
    events = [event for _at, _size, event in received]
    run = await Run.objects.aget(id=events[-1]["run_id"])
    answer = await Message.objects.aget(run=run, role="assistant")
    assert run.status == "succeeded" and events[-1]["status"] == "succeeded"
    assert answer.content.split() == [f"tok{i}" for i in range(1, 40001)] and not answer.incomplete
    assert "".join(e["delta"] for e in events if e["type"] == "token") == answer.content
    assert events[-2]["type"] == "message" and events[-2]["message"]["content"] == answer.content
    reliability.add(
        "WebSocket clients that stop reading",
        f"{STALLED_SOCKETS} raw sockets (4 KiB receive buffer) each ask for 6.5 MB of history and never read, "
        "while a 40000-token answer streams; daphne runs with `--ping-interval 1 --ping-timeout 3`",
        "daphne aborts the stalled sockets; the reading socket gets the whole answer",
        seconds_to_drop=f"{seconds_to_drop:.1f}", daphne_peak_growth_MiB=f"{peak_growth / MiB:.0f}",
        growth_after_drop_MiB=f"{growth_after_drop / MiB:.1f}",
        unread_bytes_after_drop_MiB=f"{STALLED_SOCKETS * sent_after_drop / MiB:.0f}",
    )  # fmt: skip
