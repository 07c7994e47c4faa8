"""Runs that must end, and limits that must hold, whatever the workers do (issue 18, points 1 and 4), tested as
a probe found them: real worker processes (two of them), a real Redis, and concurrent sends on the database.

- A worker that stored an answer and stalled before publishing it: the worker that takes the run over keeps
  the stored message (never inserts it again) and ends the run once.
- A recovery that fails ends the run (`recovery_failed`); a run is taken over a bounded number of times.
- Stop ends a run whatever its worker is doing (here: frozen with SIGSTOP), and the frozen worker, once
  thawed, writes nothing more of it.
- The per-person limits hold against sends fired at once.
"""

import asyncio
import json
import signal
import threading
import uuid
from datetime import timedelta

import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection
from django.utils import timezone

from agents_app.domain import events, services
from agents_app.models import Message, Run
from agents_app.realtime import fanout
from agents_app.realtime.announce import encode
from agents_app.web.replay import replay_after
from tests.conftest import Stack
from tests.test_reliability_processes import open_socket, receive_until, worker_pid


def claim_for_a_dead_worker(conversation, content="[[tokens:50]]") -> Run:
    """A run claimed and started by a worker that then stopped heartbeating."""
    services.message_send(conversation=conversation, content=content)
    Run.objects.update(announced=True)
    run = services.run_claim_batch(worker_id="dead-host:1:abcdef", limit=1, start=True)[0]
    Run.objects.filter(id=run.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    return run


def log_tokens(redis_url: str, run: Run, stream_id: str, deltas: list[str], first_seq: int) -> int:
    """What the dead worker had published: its tokens in the conversation's log, as the fan-out writes them."""
    client = redis.Redis.from_url(redis_url)
    seq = first_seq
    for delta in deltas:
        event = events.token_event(seq, run.id, stream_id, "assistant", delta)
        client.xadd(fanout.log_key(run.conversation_id), {"e": encode(event)}, id=f"{seq}-0")
        seq += 1
    return seq


async def wait_for_run_end(run_id, timeout=30.0) -> Run:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        run = await Run.objects.aget(id=run_id)
        if run.status not in Run.ACTIVE_STATUSES:
            return run
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} never ended")


@pytest.fixture
def recovery_env(stack_env):
    return {**stack_env, "CHORUS_RUN_STALE_SECONDS": "3", "CHORUS_HEARTBEAT_SECONDS": "0.5"}


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_message_stored_but_not_published_is_kept_once_and_the_run_ends(
    recovery_env, redis_url, process_logs, conversation, owner, reliability
):
    """The probe's never-ending run: the dead worker stored an agent message, then stalled before publishing
    it. Recovery used to insert it again, fail on the unique id, and be retried forever."""
    run = await sync_to_async(claim_for_a_dead_worker)(conversation)
    stored_id, streaming_id = str(uuid.uuid4()), str(uuid.uuid4())
    seq = await sync_to_async(log_tokens)(redis_url, run, stored_id, ["The plan", " is ready."], run.started_seq + 1)
    await sync_to_async(services.message_store_agent)(
        run=run, message_id=stored_id, role="assistant", source="assistant", content="The plan is ready.",
        is_final_answer=True, seq=seq,
    )  # fmt: skip
    await sync_to_async(log_tokens)(redis_url, run, streaming_id, ["Half an", " answer"], seq + 1)

    stack = Stack(recovery_env, process_logs)
    try:
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)  # before the workers: it sees the recovery
        stack.start_worker("worker-a")
        stack.start_worker("worker-b")
        finished = (await receive_until(socket, "run.finished", timeout=40))[-1]
        await socket.close()
        await asyncio.sleep(4)  # long enough for another takeover, were the run still open
    finally:
        stack.stop()

    run = await Run.objects.aget(id=run.id)
    assert (finished["status"], finished["error"]["code"]) == ("failed", "worker_lost"), stack.logs_text()
    assert (run.status, run.takeovers) == ("failed", 1)
    messages = [m async for m in Message.objects.filter(run=run, role="assistant").order_by("seq")]
    assert [(str(m.id), m.content, m.incomplete) for m in messages] == [
        (stored_id, "The plan is ready.", False),
        (streaming_id, "Half an answer", True),
    ]
    assert finished["answer_message_id"] == streaming_id
    assert "IntegrityError" not in stack.logs_text()
    reliability.add(
        "Worker stalled after storing a message, before publishing it", "a stored, unpublished message",
        "another worker keeps the stored message, stores the half-streamed one, fails the run `worker_lost` once",
        takeovers=run.takeovers, duplicates=0,
    )  # fmt: skip


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_recovery_that_fails_ends_the_run(redis_url, conversation, settings):
    """A log the recovery cannot read (here: a token without its stream id) must not leave the run open."""
    settings.REDIS_URL = redis_url
    run = await sync_to_async(claim_for_a_dead_worker)(conversation)
    bad = json.dumps({"type": "token", "seq": run.started_seq + 1, "run_id": str(run.id)})
    redis.Redis.from_url(redis_url).xadd(fanout.log_key(conversation.id), {"e": bad}, id=f"{run.started_seq + 1}-0")
    from agents_app.worker.agent import AgentWorker

    worker = AgentWorker()
    await worker.recover_stale_runs()
    await fanout.backend().flushed()

    run = await Run.objects.aget(id=run.id)
    assert (run.status, run.error_code, run.takeovers) == ("failed", "recovery_failed", 1)
    assert run.finished_seq > run.started_seq


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_run_is_taken_over_a_bounded_number_of_times(redis_url, conversation, settings):
    settings.REDIS_URL = redis_url
    run = await sync_to_async(claim_for_a_dead_worker)(conversation)
    await Run.objects.filter(id=run.id).aupdate(takeovers=settings.CHORUS_RUN_MAX_TAKEOVERS)
    from agents_app.worker.agent import AgentWorker

    worker = AgentWorker()
    await worker.recover_stale_runs()
    await fanout.backend().flushed()

    run = await Run.objects.aget(id=run.id)
    assert (run.status, run.error_code) == ("failed", "recovery_failed")
    assert run.takeovers == settings.CHORUS_RUN_MAX_TAKEOVERS + 1
    replay = [json.loads(text)["type"] for _seq, text in await replay_after(conversation, run.started_seq)]
    assert replay[-1] == "run.finished"


@pytest.mark.integration
@pytest.mark.asyncio
async def test_stop_ends_a_run_whose_worker_is_frozen_and_the_thawed_worker_writes_nothing(
    stack_env, process_logs, conversation, owner, reliability
):
    env = {**stack_env, "CHORUS_CANCEL_GRACE_SECONDS": "1", "CHORUS_HEARTBEAT_SECONDS": "0.5"}
    stack = Stack(env, process_logs)
    try:
        first, second = stack.start_worker("worker-a"), stack.start_worker("worker-b")
        stack.start_web()
        socket = await open_socket(stack, conversation, owner)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:400]] [[tps:40]]"}))
        seen = await receive_until(socket, "token")
        run = await Run.objects.aget(id=seen[-1]["run_id"])
        frozen = first if worker_pid(run) == first.pid else second
        frozen.signal(signal.SIGSTOP)
        await asyncio.sleep(0.5)  # frames already in flight arrive
        await socket.send(json.dumps({"type": "cancel"}))
        seen += await receive_until(socket, "run.finished", timeout=30)
        frozen.signal(signal.SIGCONT)
        await asyncio.sleep(3)  # the thawed worker's heartbeat finds the run is not its own any more
        late = []
        while True:
            try:
                late.append(json.loads(await asyncio.wait_for(socket.recv(), 0.5)))
            except TimeoutError:
                break
        await socket.close()
    finally:
        stack.stop()

    finished = seen[-1]
    assert finished["status"] == "cancelled", stack.logs_text()
    assert [e for e in late if e.get("run_id") == str(run.id)] == []
    messages = [m async for m in Message.objects.filter(run=run, role="assistant")]
    assert len(messages) == 1 and messages[0].incomplete
    streamed = "".join(e["delta"] for e in seen if e["type"] == "token")
    assert messages[0].content.startswith(streamed) or streamed.startswith(messages[0].content)
    run = await Run.objects.aget(id=run.id)
    assert run.status == "cancelled" and run.takeovers == 1
    reliability.add(
        "Stop while the worker is frozen (SIGSTOP)", "cancel frame while the holder is stopped",
        "another worker ends the run `cancelled` after CHORUS_CANCEL_GRACE_SECONDS; the thawed worker writes nothing",
        messages_lost=0, duplicates=0,
    )  # fmt: skip


def send_all_at_once(conversations, content="[[tokens:5]]") -> list[str]:
    """One thread per conversation, all released together; returns each send's outcome."""
    barrier = threading.Barrier(len(conversations))
    outcomes: list[str] = []

    def send(conversation) -> None:
        close_old_connections()
        try:
            barrier.wait()
            services.message_send(conversation=conversation, content=content)
            outcomes.append("accepted")
        except services.ChatError as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(c,)) for c in conversations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_concurrent_sends_cannot_beat_the_active_runs_limit(owner, team, settings, reliability):
    settings.CHORUS_MAX_ACTIVE_RUNS_PER_USER = 3
    conversations = [services.conversation_create(owner=owner, team=team) for _ in range(12)]
    outcomes = send_all_at_once(conversations)
    assert sorted(outcomes) == ["accepted"] * 3 + ["too_many_runs"] * 9
    assert Run.objects.filter(conversation__owner=owner, status__in=Run.ACTIVE_STATUSES).count() == 3
    reliability.add(
        "Sends fired at once against the limits", "12 threads send to 12 conversations at the same instant",
        "exactly the limit accepted (3 active runs), the rest `too_many_runs`", accepted=3, refused=9,
    )  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_concurrent_sends_cannot_beat_the_rate_limit(owner, team, settings):
    settings.CHORUS_RATE_LIMIT_PER_MINUTE = 5
    settings.CHORUS_MAX_ACTIVE_RUNS_PER_USER = 100
    conversations = [services.conversation_create(owner=owner, team=team) for _ in range(12)]
    outcomes = send_all_at_once(conversations)
    assert sorted(outcomes) == ["accepted"] * 5 + ["rate_limited"] * 7


PROBE = (
    '[[planner>reply:plan]] [[analyst>tool:calculator {"expression": "(((9**99)**99)**99)**25"}]] '
    "[[reporter>reply:done]] [[tps:0]]"
)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_the_probes_calculator_message_neither_freezes_the_worker_nor_another_answer(
    stack_env, process_logs, owner, other_user, team, reliability
):
    """The probe's message on the research desk, while another person's answer streams on the same worker:
    the other answer keeps coming (it stopped for 29.8 s before), and the probe's run ends with the tool's
    error as its result."""
    from agents_app.models import Team

    research_desk = await Team.objects.aget(slug="research-desk")
    probe = await sync_to_async(services.conversation_create)(owner=owner, team=research_desk)
    bystander = await sync_to_async(services.conversation_create)(owner=other_user, team=team)
    stack = Stack(stack_env, process_logs)
    try:
        stack.start_worker()
        stack.start_web()
        reader = await open_socket(stack, bystander, other_user)
        await reader.send(json.dumps({"type": "send", "content": "[[tokens:150]] [[tps:30]]"}))
        await receive_until(reader, "token")
        prober = await open_socket(stack, probe, owner)
        await prober.send(json.dumps({"type": "send", "content": PROBE}))
        loop = asyncio.get_running_loop()
        arrivals, events_seen = [loop.time()], []
        while not events_seen or events_seen[-1]["type"] != "run.finished":
            events_seen.append(json.loads(await asyncio.wait_for(reader.recv(), 30)))
            arrivals.append(loop.time())
        probed = await receive_until(prober, "run.finished", timeout=30)
        await reader.close()
        await prober.close()
    finally:
        stack.stop()

    longest_gap = max(later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False))
    assert events_seen[-1]["status"] == "succeeded"
    assert longest_gap < 5, f"the other answer stopped for {longest_gap:.1f} s"  # 29.8 s before the fix
    result = next(e for e in probed if e["type"] == "tool.result")
    assert result["content"].startswith("Error: numbers are limited to 10**300")
    assert probed[-1]["status"] == "succeeded", stack.logs_text()
    reliability.add(
        "A tool call that would take 31 s of CPU", "the probe's nested ** on the research desk, beside an answer",
        "the tool answers with an error at once; the other answer never stops",
        longest_gap_s=f"{longest_gap:.2f}",
    )  # fmt: skip
