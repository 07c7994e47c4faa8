"""The whole path as real processes: Redis, daphne, `manage.py runworker agent-runs` and the offline model
server, driven by a real WebSocket client over loopback."""

import asyncio
import json
import time

import pytest
import websockets
from asgiref.sync import sync_to_async

from agents_app.domain import services
from agents_app.models import Message, Run
from fakellm import parse_stamp
from tests.conftest import Stack
from tests.support import session_cookie

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def open_socket(stack, conversation, user, port=None):
    cookie = await sync_to_async(session_cookie)(user)
    socket = await websockets.connect(
        stack.ws_url(conversation.id, port),
        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{port or stack.web_port}"},
    )
    hello = json.loads(await asyncio.wait_for(socket.recv(), 10))
    assert hello["type"] == "hello"
    return socket


async def until_finished(socket, timeout=30.0):
    """Every event up to run.finished, each with the time it arrived."""
    received = []
    while True:
        event = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        received.append((time.time_ns(), event))
        if event["type"] == "run.finished":
            return received


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


async def test_tokens_reach_the_browser_while_the_model_is_still_writing(stack, conversation, owner):
    socket = await open_socket(stack, conversation, owner)
    await socket.send(json.dumps({"type": "send", "content": "[[stamp]] [[tokens:40]] [[tps:20]]"}))
    received = await until_finished(socket)
    await socket.close()

    events = [event for _, event in received]
    # A new conversation's first message names it: its conversation.updated follows the echo.
    assert [e["type"] for e in events][:3] == ["message", "conversation.updated", "run.started"]
    assert events[-1]["status"] == "succeeded", stack.logs_text()
    # Each token was stamped by the model server when it wrote it; compare with when it reached us.
    arrivals = [
        (seq, written, at) for at, e in received if e["type"] == "token" for seq, written in parse_stamp(e["delta"])
    ]
    assert [seq for seq, _, _ in arrivals] == list(range(1, 41)), "no token lost, duplicated or reordered"
    generation_s = (arrivals[-1][1] - arrivals[0][1]) / 1e9
    delays_ms = sorted((at - written) / 1e6 for _, written, at in arrivals)
    assert generation_s > 1.5
    assert delays_ms[len(delays_ms) // 2] < 500, f"tokens waited for the answer to finish: {delays_ms}"
    assert arrivals[0][2] < arrivals[-1][1], "the first token arrived before the model wrote the last one"
    frames = [at for at, e in received if e["type"] == "token"]
    assert (frames[-1] - frames[0]) / 1e9 > 1.0, "tokens arrived spread over time, not in one burst"

    answer = events[-2]["message"]
    stored = await Message.objects.aget(id=answer["id"])
    assert stored.content == answer["content"] == "".join(e["delta"] for e in events if e["type"] == "token")
    run = await Run.objects.aget(id=events[-1]["run_id"])
    worker_pid = int(run.worker_id.split(":")[1])
    assert run.status == "succeeded" and worker_pid == stack.processes[0].pid, "the separate worker ran it"
    # Both run on uvloop (CHORUS_UVLOOP's default): the loop every benchmark number was measured on.
    assert "daphne on the uvloop event loop" in stack.logs_text()
    assert "uvloop event loop)" in stack.processes[0].log_tail(400)


async def test_a_message_wakes_an_idle_worker_at_once(stack_env, process_logs, conversation, owner):
    """The doorbell: with the periodic poll a minute away, a sent message still starts at once."""
    stack = Stack({**stack_env, "CHORUS_WORKER_POLL_SECONDS": "60"}, process_logs)
    try:
        worker = stack.start_worker()
        stack.start_web()
        deadline = time.monotonic() + 30
        while "agent worker" not in worker.log_tail(400) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # past the worker's first poll, which it makes as it starts
        socket = await open_socket(stack, conversation, owner)
        sent = time.monotonic()
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:3]]"}))
        while json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] != "run.started":
            pass
        started_after = time.monotonic() - sent
        await until_finished(socket)
        await socket.close()
    finally:
        stack.stop()
    assert started_after < 15, f"the run waited {started_after:.1f} s: for the poll, not the doorbell"


async def test_memory_follows_the_conversation_to_another_worker_after_an_idle_pause(stack, conversation, owner):
    socket = await open_socket(stack, conversation, owner)
    await socket.send(json.dumps({"type": "send", "content": "My name is Ada."}))
    first = await until_finished(socket)
    first_worker = (await Run.objects.aget(id=first[-1][1]["run_id"])).worker_id

    # Only a second worker is left; both it and the socket then sit idle past redis-py's 5 s socket
    # timeout, which kills idle channel-layer receivers unless configured (docs/architecture.md, trap 1).
    stack.start_worker("worker-2")
    stack.processes[0].stop()
    await asyncio.sleep(6)

    await socket.send(json.dumps({"type": "send", "content": "What is my name?"}))
    second = await until_finished(socket)
    await socket.close()

    answer = second[-2][1]["message"]["content"]
    assert "turn 2 of" in answer, "the second worker loaded the team state saved by the first"
    second_worker = (await Run.objects.aget(id=second[-1][1]["run_id"])).worker_id
    assert second_worker != first_worker


async def test_two_web_servers_deliver_the_same_events(stack, conversation, owner):
    other_port = stack.start_web("daphne-2")
    first = await open_socket(stack, conversation, owner)
    second = await open_socket(stack, conversation, owner, port=other_port)
    await first.send(json.dumps({"type": "send", "content": "[[tokens:25]]"}))
    seen_first = [e for _, e in await until_finished(first)]
    seen_second = [e for _, e in await until_finished(second)]
    await first.close()
    await second.close()
    assert seen_first == seen_second
    assert sum(e["type"] == "token" for e in seen_first) >= 1


async def test_a_group_chat_remembers_earlier_turns_on_another_worker(stack, owner, team):
    from agents_app.models import Team

    writer_critic = await Team.objects.aget(slug="writer-critic")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=writer_critic)
    socket = await open_socket(stack, conversation, owner)
    await socket.send(json.dumps({"type": "send", "content": "A haiku about rain. [[critic>reply:APPROVED]]"}))
    first = await until_finished(socket)
    stack.start_worker("worker-2")
    stack.processes[0].stop()  # the first worker is gone; only the second can take the next turn

    await socket.send(json.dumps({"type": "send", "content": "Now one about snow. [[critic>reply:APPROVED]]"}))
    second = await until_finished(socket)
    await socket.close()

    answers = [e["message"] for _, e in second if e["type"] == "message" and e["message"]["source"] == "writer"]
    assert second[-1][1]["status"] == "succeeded", second[-1][1]
    assert "turn 2 of" in answers[-1]["content"], "the writer's model saw the first turn"
    workers = [(await Run.objects.aget(id=run[-1][1]["run_id"])).worker_id for run in (first, second)]
    assert workers[0] != workers[1]


async def test_frames_of_every_size_arrive_whole_and_in_order(stack, conversation, owner):
    """daphne's sockets get their frames written straight to the TCP connection up to 64 KiB, and through
    daphne's own path beyond (agents_app/web/routing.py): each length encoding, multi-byte text and the two paths
    interleaved arrive whole and in order."""
    contents = [
        "a",
        "é" * 30,  # a frame under 126 bytes...
        "🎵" * 40,  # ...and over: a 16-bit length
        "ü" * 20_000,
        "x" * 40_000,  # content, html and JSON: a frame over 64 KiB, sent by daphne
        "b",
        "€" * 12_000,
        "c",
    ]
    for seq, content in enumerate(contents, start=1):
        await Message.objects.acreate(conversation=conversation, role="assistant", source="writer", content=content,
                                      seq=seq)  # fmt: skip
    cookie = await sync_to_async(session_cookie)(owner)
    socket = await websockets.connect(
        stack.ws_url(conversation.id) + "?after_seq=0",
        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{stack.web_port}"},
        max_size=2**22,
    )
    hello = json.loads(await asyncio.wait_for(socket.recv(), 10))
    received = [json.loads(await asyncio.wait_for(socket.recv(), 10)) for _ in contents]
    await socket.send("not JSON")  # answered by a short frame...
    await socket.send(json.dumps({"type": "resume", "after_seq": 4}))  # ...then large and small ones again
    error = json.loads(await asyncio.wait_for(socket.recv(), 10))
    again = [json.loads(await asyncio.wait_for(socket.recv(), 10)) for _ in contents[4:]]
    await socket.close()

    assert hello["type"] == "hello"
    assert [event["seq"] for event in received] == list(range(1, len(contents) + 1))
    assert [event["message"]["content"] for event in received] == contents
    assert error["code"] == "invalid_json"
    assert [event["message"]["content"] for event in again] == contents[4:]
    sizes = [len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()) for event in [error, *again]]
    assert min(sizes) < 126 and any(126 <= size < 65536 for size in sizes) and max(sizes) > 65535
