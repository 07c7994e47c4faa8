"""A soak test inside CI's budget: 2 daphnes, 3 workers and PostgreSQL serve 200 conversations sending at a
steady rate while one worker is SIGKILLed and one daphne restarted midway. Every person ends with their complete
answer, stored once; every socket got every event (reconnecting with ?after_seq= as the page does); the memory of
the processes that lived through it stays flat. What it measured is printed and kept in
$CHORUS_VAR_DIR/soak-report.json.

It takes about a minute and a half: 200 messages over 40 s, answers of 60 tokens at 15 a second (4 s each), so
about 20 are being written at any moment.
"""

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections

from agents_app.domain import services
from agents_app.models import Message, Run
from tests.conftest import Stack
from tests.support import rss_bytes, session_cookie

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

CONVERSATIONS = 200
PEOPLE = 20
SEND_OVER_SECONDS = 40.0
TOKENS = 60
PROMPT = f"[[tokens:{TOKENS}]] [[tps:15]]"
ANSWER = " ".join(f"tok{n}" for n in range(1, TOKENS + 1))
KILL_WORKER_AT = 14.0  # seconds into the sending
RESTART_WEB_AT = 26.0
MAX_TRIES = 4  # a person whose answer was lost with its worker sends again (the page says "Send again")
RSS_GROWTH_LIMIT = 150 * 2**20  # generous: measured growth is a few MB (printed)


@pytest_asyncio.fixture(autouse=True)
async def release_the_database_thread():
    """The async ORM's calls ran on asgiref's database thread: close its connection there, as a request's end
    does, so no session outlives the test."""
    yield
    await sync_to_async(connections.close_all)()


class Person:
    """One conversation's page: one socket, one message, reading to the answer's end, reconnecting after a drop
    with the last seq it saw, and sending again when its answer was lost with a worker."""

    def __init__(self, index: int, conversation, cookie: str, port: int):
        self.index = index
        self.conversation = conversation
        self.cookie = cookie
        self.port = port
        self.socket = None
        self.last_seq = 0
        self.seqs: list[int] = []
        self.events: list[dict] = []
        self.reconnects = 0
        self.tries = 0
        self.outcomes: list[str] = []  # each run.finished: status or error code
        self.errors: list[dict] = []
        self.frame = ""  # the last send frame
        self.awaiting_echo = False  # sent, and its echo not seen yet: after a drop it is sent again (same client_id)

    async def connect(self, after_seq: int | None = None) -> None:
        query = f"?after_seq={after_seq}" if after_seq is not None else ""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.socket = await websockets.connect(
                    f"ws://127.0.0.1:{self.port}/ws/conversations/{self.conversation.id}/{query}",
                    additional_headers={
                        "Cookie": f"sessionid={self.cookie}",
                        "Origin": f"http://127.0.0.1:{self.port}",
                    },
                    open_timeout=10,
                )
                hello = json.loads(await asyncio.wait_for(self.socket.recv(), 15))
                assert hello["type"] == "hello"
                return
            except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def send(self, again: bool = False) -> None:
        """Send the message (again: the same frame, after a drop before its echo; its client_id makes the server
        store it once whatever happened to the first)."""
        if not again:
            self.tries += 1
            self.frame = json.dumps({"type": "send", "content": PROMPT, "client_id": str(uuid.uuid4())})
        self.awaiting_echo = True
        while True:
            try:
                await self.socket.send(self.frame)
                return
            except websockets.ConnectionClosed:
                self.reconnects += 1
                await self.connect(after_seq=self.last_seq)

    async def live(self, send_at: float) -> None:
        await self.connect()
        await asyncio.sleep(max(0.0, send_at - time.monotonic()))
        await self.send()
        while True:
            try:
                event = json.loads(await asyncio.wait_for(self.socket.recv(), 60))
            except websockets.ConnectionClosed:
                self.reconnects += 1
                await self.connect(after_seq=self.last_seq)
                if self.awaiting_echo:
                    await self.send(again=True)
                continue
            if event["type"] == "error":
                self.errors.append(event)
                continue
            assert event["seq"] > self.last_seq, f"person {self.index}: seq {event['seq']} after {self.last_seq}"
            self.last_seq = event["seq"]
            self.seqs.append(event["seq"])
            self.events.append(event)
            if event["type"] == "message" and event["message"]["role"] == "user":
                self.awaiting_echo = False
            if event["type"] != "run.finished":
                continue
            self.outcomes.append(event["status"] if event["status"] == "succeeded" else event["error"]["code"])
            if event["status"] == "succeeded" or self.tries >= MAX_TRIES:
                await self.socket.close()
                return
            await self.send()

    def answer_as_streamed(self) -> tuple[str, str, str]:
        """(the answer's message id, its tokens joined, its message event's content) of the last run seen."""
        finished = self.events[-1]
        answer_id = finished["answer_message_id"]
        tokens = "".join(e["delta"] for e in self.events if e["type"] == "token" and e["stream_id"] == answer_id)
        message = next(e["message"]["content"] for e in self.events if e["type"] == "message"
                       and e["message"]["id"] == answer_id)  # fmt: skip
        return answer_id, tokens, message


def rss_mb(process) -> float:
    return round(rss_bytes(process.pid) / 2**20, 1)


async def test_two_hundred_conversations_through_a_killed_worker_and_a_restarted_web_server(
    stack_env, process_logs, django_user_model, team
):
    if connection.vendor != "postgresql":
        pytest.skip("the soak runs on PostgreSQL (scripts/test.sh uses it when it answers)")
    env = {**stack_env, "CHORUS_RATE_LIMIT_PER_MINUTE": "100000", "CHORUS_MAX_ACTIVE_RUNS_PER_USER": "1000",
           "CHORUS_RUN_STALE_SECONDS": "3", "CHORUS_LOG_FORMAT": "json"}  # fmt: skip

    def cast():
        people = [django_user_model.objects.create_user(f"soak-{n}", password="soak-password-1") for n in range(PEOPLE)]
        cookies = [session_cookie(person) for person in people]
        conversations = [services.conversation_create(owner=people[n % PEOPLE], team=team)
                         for n in range(CONVERSATIONS)]  # fmt: skip
        return conversations, [cookies[n % PEOPLE] for n in range(CONVERSATIONS)]

    conversations, cookies = await sync_to_async(cast)()
    stack = Stack(env, process_logs)
    report: dict = {"conversations": CONVERSATIONS, "people": PEOPLE, "send_over_seconds": SEND_OVER_SECONDS,
                    "tokens_per_answer": TOKENS}  # fmt: skip
    try:
        workers = [stack.start_worker(f"worker-{n}") for n in (1, 2, 3)]
        ports = [stack.start_web("daphne-a"), stack.start_web("daphne-b")]
        webs = [stack.processes[-2], stack.processes[-1]]
        people = [Person(n, conversations[n], cookies[n], ports[n % 2]) for n in range(CONVERSATIONS)]

        # Warm-up: a few answers before the baseline, so start-up allocations are not counted as growth.
        warm = people[:4]
        started = time.monotonic()
        await asyncio.gather(*(person.live(started) for person in warm))
        survivors = {"daphne-a": webs[0], "worker-2": workers[1], "worker-3": workers[2]}
        rss_start = {name: rss_mb(process) for name, process in survivors.items()}

        began = time.monotonic()
        rest = people[4:]
        interval = SEND_OVER_SECONDS / len(rest)
        lives = [asyncio.create_task(person.live(began + n * interval)) for n, person in enumerate(rest)]

        await asyncio.sleep(KILL_WORKER_AT)
        in_flight = await Run.objects.filter(status="running", worker_id__contains=f":{workers[0].pid}:").acount()
        workers[0].signal(signal.SIGKILL)
        workers[0].popen.wait(10)
        report["runs_on_the_killed_worker"] = in_flight

        await asyncio.sleep(max(0.0, began + RESTART_WEB_AT - time.monotonic()))
        restarted = time.monotonic()
        webs[1].stop()
        stack.start_web("daphne-b-again", port=ports[1])
        report["web_restart_seconds"] = round(time.monotonic() - restarted, 1)

        done, pending = await asyncio.wait(lives, timeout=SEND_OVER_SECONDS + 120)
        assert not pending, f"{len(pending)} people still waiting for their answer\n{stack.logs_text()}"
        for life in done:
            life.result()  # a client that failed its own checks says so here
        report["seconds"] = round(time.monotonic() - began, 1)
        await asyncio.sleep(2)  # past the last frees
        rss_end = {name: rss_mb(process) for name, process in survivors.items()}
        report["rss_mb"] = {name: {"start": rss_start[name], "end": rss_end[name]} for name in survivors}
    finally:
        stack.stop()

    # Every person: a complete answer, as streamed and as stored, after at most MAX_TRIES sends.
    everyone = warm + rest
    unanswered = [(p.index, p.outcomes) for p in everyone if not p.outcomes or p.outcomes[-1] != "succeeded"]
    assert not unanswered, unanswered
    lost = [outcome for person in everyone for outcome in person.outcomes[:-1]]
    assert set(lost) <= {"worker_lost"}, lost
    assert not [person.errors for person in everyone if person.errors]

    def stored() -> dict:
        runs = list(Run.objects.filter(conversation__in=conversations).values("id", "status", "error_code",
                                                                                "conversation_id"))  # fmt: skip
        messages = list(Message.objects.filter(conversation__in=conversations, role="assistant")
                        .values("id", "run_id", "content", "is_final_answer", "incomplete"))  # fmt: skip
        users = Message.objects.filter(conversation__in=conversations, role="user").count()
        return {"runs": runs, "messages": messages, "user_messages": users}

    rows = await sync_to_async(stored)()
    by_run: dict = {}
    for message in rows["messages"]:
        by_run.setdefault(message["run_id"], []).append(message)
    succeeded = [run for run in rows["runs"] if run["status"] == "succeeded"]
    assert len(succeeded) == CONVERSATIONS, "one answered run per conversation"
    assert all(run["status"] in ("succeeded", "failed") for run in rows["runs"]), "no run left queued or running"
    assert {run["error_code"] for run in rows["runs"] if run["status"] == "failed"} <= {"worker_lost"}
    for run in succeeded:
        (answer,) = by_run[run["id"]]  # stored once
        assert answer["content"] == ANSWER and answer["is_final_answer"] and not answer["incomplete"]
    assert rows["user_messages"] == sum(person.tries for person in everyone), "each send stored once"
    for person in everyone:
        answer_id, tokens, message = person.answer_as_streamed()
        assert tokens == message == ANSWER, f"person {person.index} (reconnects {person.reconnects}) missed events"
        assert len(set(person.seqs)) == len(person.seqs)

    report.update(
        answers=len(succeeded),
        runs=len(rows["runs"]),
        runs_lost_with_the_worker=len(lost),
        people_who_sent_again=sum(person.tries > 1 for person in everyone),
        reconnects=sum(person.reconnects for person in everyone),
        people_reconnected=sum(person.reconnects > 0 for person in everyone),
    )
    print(f"\nsoak: {json.dumps(report)}")
    out = Path(settings.VAR_DIR) / "soak-report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    assert report["people_reconnected"] >= 1, "the web server's restart dropped its sockets"
    for name, rss in report["rss_mb"].items():
        assert rss["end"] - rss["start"] < RSS_GROWTH_LIMIT / 2**20, f"{name} grew {rss}"
