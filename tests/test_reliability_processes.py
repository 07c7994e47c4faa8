"""Faults injected into real processes: a worker killed with SIGKILL, a worker told to stop with SIGTERM, and
Redis restarted mid-answer. Everything is stopped by its PID."""

import asyncio
import json
import os
import signal
import time

import pytest
import websockets
from asgiref.sync import sync_to_async

from agents_app import services
from agents_app.models import Message, Run
from tests.conftest import Stack
from tests.support import Process, free_port, session_cookie, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def open_socket(stack, conversation, user, after_seq=None):
    cookie = await sync_to_async(session_cookie)(user)
    url = stack.ws_url(conversation.id) + (f"?after_seq={after_seq}" if after_seq is not None else "")
    socket = await websockets.connect(
        url, additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{stack.web_port}"}
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
        run = await Run.objects.aget(id=events[1]["run_id"])
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
    redis_args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    redis_process = Process("redis", redis_args, dict(os.environ), process_logs)
    wait_for_port(port, process=redis_process)
    stack = Stack({**stack_env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:150]] [[tps:30]]"}))
        events = await receive_until(socket, "token")
        redis_process.stop()
        await asyncio.sleep(1)
        redis_process = Process("redis-again", redis_args, dict(os.environ), process_logs)
        wait_for_port(port, process=redis_process)
        restarted_at = time.monotonic()
        run_id = events[1]["run_id"]
        # The page's way: read until the end, reconnecting with its last seq if the socket dropped.
        last_seq = max(e["seq"] for e in events)
        while events[-1]["type"] != "run.finished":
            try:
                event = json.loads(await asyncio.wait_for(socket.recv(), 30))
                events.append(event)
                last_seq = max(last_seq, event["seq"])
            except websockets.ConnectionClosed:
                socket = await reconnect(stack, conversation, owner, last_seq)
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
    reliability.add(
        "Redis restarted mid-answer", "redis-server stopped by PID, restarted 1 s later on the same port",
        "the run completes; the page gets the complete text", seconds_to_finish_after_restart=f"{seconds:.1f}",
        messages_lost=0,
    )  # fmt: skip
