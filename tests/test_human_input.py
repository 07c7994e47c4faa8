"""Human in the loop with real processes: daphne, runworker, Redis, PostgreSQL and the offline model (in its
demo roles, so the shipped teams behave as they do in `make run`). A run that asks the person waits with no
worker holding it, and goes on, with the same run id, wherever and whenever the answer comes."""

import asyncio
import json
import os
import signal

import pytest
from asgiref.sync import sync_to_async

from agents_app.domain import services
from agents_app.models import InputRequest, Message, Run, Team, ToolCall
from agents_app.teams import seed_builtin_teams
from tests.conftest import Stack
from tests.support import Process, free_port, python_args, wait_for_port
from tests.test_reliability_processes import open_socket, receive_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def demo_model(process_logs):
    """The offline model server with --demo-roles: the travel desk's concierge hands off by itself."""
    port = free_port()
    args = python_args("-m", "fakellm", "--host", "127.0.0.1", "--port", str(port), "--tps", "400", "--demo-roles")
    process = Process("fakellm-demo", args, os.environ.copy(), process_logs)
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


@pytest.fixture
def env(stack_env, demo_model):
    return {**stack_env, "OPENAI_BASE_URL": demo_model}


def conversation_with(owner, slug):
    seed_builtin_teams(Team)
    return services.conversation_create(owner=owner, team=Team.objects.get(slug=slug))


async def ask(socket, text) -> tuple[list[dict], dict]:
    await socket.send(json.dumps({"type": "send", "content": text}))
    events = await receive_until(socket, "input.request", timeout=30)
    assert "run.finished" not in [e["type"] for e in events], events
    return events, events[-1]


async def answer_and_finish(socket, request, content) -> list[dict]:
    frame = {"type": "input.response", "request_id": request["request_id"], "content": content}
    await socket.send(json.dumps(frame))
    return await receive_until(socket, "run.finished", timeout=40)


def answer_of(events) -> str:
    finished = events[-1]
    message = next(e["message"] for e in events if e["type"] == "message" and e["message"]["id"] ==
                   finished["answer_message_id"])  # fmt: skip
    return message["content"]


async def wait_status(run_id, status, timeout=15.0) -> Run:
    for _ in range(int(timeout / 0.1)):
        run = await Run.objects.aget(id=run_id)
        if run.status == status:
            return run
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} is {run.status}, not {status}")


async def test_a_question_outlives_its_worker_and_the_answer_on_another_server_finishes_the_run(
    env, process_logs, owner
):
    conversation = await sync_to_async(conversation_with)(owner, "travel-desk")
    stack = Stack(env, process_logs)
    try:
        first_worker = stack.start_worker("worker-a")
        stack.start_web("web-a")
        socket = await open_socket(stack, conversation, owner)
        events, request = await ask(socket, "Plan a weekend trip to Lyon for me.")
        run_id = request["run_id"]
        assert (request["kind"], request["source"], request["options"]) == ("handoff", "concierge", [])
        assert "Which dates" in request["prompt"]
        started = next(e for e in events if e["type"] == "run.started")
        assert started["run_id"] == run_id
        run = await wait_status(run_id, "waiting_for_input")
        assert (run.worker_id, run.heartbeat_at) == ("", None)  # no worker holds a waiting run
        await socket.close()

        first_worker.signal(signal.SIGKILL)  # the worker that ran the first half is gone
        first_worker.popen.wait(10)
        other_port = stack.start_web("web-b")
        stack.start_worker("worker-b")
        stack.web_port = other_port  # a fresh socket, on the other web server
        socket = await open_socket(stack, conversation, owner)
        rest = await answer_and_finish(socket, request, "Friday to Sunday, from Paris, 400 euros")
        await socket.close()
    finally:
        stack.stop()

    finished = rest[-1]
    assert (finished["run_id"], finished["status"]) == (run_id, "succeeded"), stack.logs_text()
    types = [e["type"] for e in rest]
    assert types[:2] == ["message", "input.answered"] and "run.started" not in types
    assert rest[0]["message"]["content"] == "Friday to Sunday, from Paris, 400 euros"
    assert rest[0]["message"]["run_id"] == run_id
    seqs = [e["seq"] for e in rest]
    assert seqs == sorted(seqs) and seqs[0] > request["seq"]  # the same run's stream goes on, seqs growing
    assert "Friday to Sunday, from Paris, 400 euros" in answer_of(rest)  # the answer is in the team's memory
    run = await Run.objects.aget(id=run_id)
    assert run.status == "succeeded" and str(first_worker.pid) not in run.worker_id
    assert await Run.objects.filter(conversation=conversation).acount() == 1


async def test_the_approval_teams_tool_runs_only_after_approve(env, process_logs, owner):
    conversation = await sync_to_async(conversation_with)(owner, "research-desk-approval")
    stack = Stack(env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        events, request = await ask(socket, "What is 17*23?")
        assert (request["kind"], request["options"]) == ("approval", ["Approve", "Reject"])
        assert "calculator" in request["prompt"] and "17*23" in request["prompt"]
        call = next(e for e in events if e["type"] == "tool.call")
        assert not [e for e in events if e["type"] == "tool.result"]  # nothing ran
        stored = await ToolCall.objects.aget(run_id=request["run_id"])
        assert (stored.result, stored.result_seq) == ("", None)

        rest = await answer_and_finish(socket, request, "Approve")
        await socket.close()
    finally:
        stack.stop()

    result = next(e for e in rest if e["type"] == "tool.result")
    assert (result["call_id"], result["content"], result["is_error"]) == (call["call_id"], "391", False)
    assert [e["type"] for e in rest].index("tool.result") > [e["type"] for e in rest].index("input.answered")
    assert rest[-1]["status"] == "succeeded", stack.logs_text()
    assert "391" in answer_of(rest)  # the reporter wrote up the approved call's result
    stored = await ToolCall.objects.aget(run_id=request["run_id"])
    assert (stored.result, stored.is_error, stored.result_seq) == ("391", False, result["seq"])


async def test_a_rejected_tool_call_never_runs_and_the_team_says_so(env, process_logs, owner):
    conversation = await sync_to_async(conversation_with)(owner, "research-desk-approval")
    stack = Stack(env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        _events, request = await ask(socket, "What is 17*23?")
        rest = await answer_and_finish(socket, request, "Reject")
        await socket.close()
    finally:
        stack.stop()

    assert rest[-1]["status"] == "succeeded", stack.logs_text()
    result = next(e for e in rest if e["type"] == "tool.result")
    assert result["is_error"] and "rejected" in result["content"]
    assert "391" not in json.dumps(rest)
    assert "rejected" in answer_of(rest)
    contents = [m async for m in Message.objects.filter(conversation=conversation).values_list("content", flat=True)]
    assert not any("391" in text for text in contents)


async def test_a_waiting_run_survives_a_restart_of_every_process(env, process_logs, owner, redis_url):
    conversation = await sync_to_async(conversation_with)(owner, "travel-desk")
    stack = Stack(env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        _events, request = await ask(socket, "Plan a trip to Porto.")
        await socket.close()
    finally:
        stack.stop()
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # nothing of the run is left but its rows

    stack = Stack(env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner, after_seq=0)
        replayed = await receive_until(socket, "input.request", timeout=10)
        assert replayed[-1] == request  # the question, as it was first sent
        rest = await answer_and_finish(socket, request, "Next weekend, from Lisbon")
        await socket.close()
    finally:
        stack.stop()

    assert (rest[-1]["run_id"], rest[-1]["status"]) == (request["run_id"], "succeeded"), stack.logs_text()
    assert "Next weekend, from Lisbon" in answer_of(rest)
    asked = await InputRequest.objects.aget(id=request["request_id"])
    assert asked.answer == "Next weekend, from Lisbon"


async def test_a_conversation_goes_on_after_its_swarm_handed_off_and_was_stopped(env, process_logs, owner):
    conversation = await sync_to_async(conversation_with)(owner, "travel-desk")
    stack = Stack(env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        _events, request = await ask(socket, "Plan a trip to Rome.")
        await socket.send(json.dumps({"type": "cancel"}))
        stopped = await receive_until(socket, "run.finished")
        assert (stopped[-1]["run_id"], stopped[-1]["status"]) == (request["run_id"], "cancelled")
        turns = []
        for text in ("In May, from Vienna", "And a day in Florence?"):
            await socket.send(json.dumps({"type": "send", "content": text}))
            turns.append(await receive_until(socket, "run.finished", timeout=40))
        await socket.close()
    finally:
        stack.stop()

    for events in turns:
        assert events[-1]["status"] == "succeeded", (events[-1], stack.logs_text())
    assert "In May, from Vienna" in answer_of(turns[0])
