"""AG-UI over Chorus (agents_app/web/agui.py): the translation of Chorus's events, then real runs through daphne, a
worker, Redis and the offline model, read by the official Python package (every event parsed by its types) and
by the official TypeScript client (`@ag-ui/client`'s HttpAgent, run by node)."""

import json
import os
import subprocess
import uuid

import httpx
import pytest
from ag_ui.core import EventType
from pydantic import TypeAdapter

from agents_app.models import Conversation, Message, Run
from agents_app.web import tokens
from agents_app.web.agui import Translator
from tests.support import ROOT

try:
    from ag_ui.core import Event as AguiEvent  # the discriminated union of every event type
except ImportError:  # pragma: no cover - older packages name it in events
    from ag_ui.core.events import Event as AguiEvent

EVENTS = TypeAdapter(AguiEvent)
CLIENT_DIR = ROOT / "tests" / "agui_client"
LONG_WAIT = 60  # seconds: a bound on waits, not a speed claim
TOOL_QUESTION = (
    'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]] [[reporter>reply:The answer is 42.]] '
    "[[planner>reply:Ask the analyst to compute it.]]"
)


# --- The translation, on recorded Chorus events ---------------------------------------------------------------

RUN = "3c8519ae-2d74-4fc1-8120-9dd26e2c3725"


def chorus_run() -> list[dict]:
    """A research-desk run as the socket sees it (the shape of test_teams' live capture)."""

    def message(seq, mid, source, content, role="assistant", final=False):
        return {"type": "message", "seq": seq, "message": {"id": mid, "run_id": RUN, "role": role, "source": source,
                "content": content, "html": "", "is_final_answer": final, "incomplete": False, "seq": seq,
                "created_at": "2026-12-06T12:00:00+00:00"}}  # fmt: skip

    def token(seq, mid, source, delta):
        return {"type": "token", "seq": seq, "run_id": RUN, "stream_id": mid, "source": source, "delta": delta}

    return [
        message(1, "u1", "user", "What is 6*7?", role="user"),
        {"type": "run.started", "seq": 2, "run_id": RUN, "team": "research-desk", "team_name": "Research desk",
         "final_speakers": ["reporter"], "steps": "folded", "route": None},
        token(3, "p1", "planner", "Ask the "),
        token(4, "p1", "planner", "analyst."),
        message(5, "p1", "planner", "Ask the analyst."),
        {"type": "tool.call", "seq": 6, "run_id": RUN, "call_id": "call_1", "source": "analyst", "name": "calculator",
         "arguments": '{"expression": "6*7"}'},
        {"type": "tool.result", "seq": 7, "run_id": RUN, "call_id": "call_1", "content": "42", "is_error": False},
        message(8, "a1", "analyst", "42", role="tool"),
        token(9, "r1", "reporter", "The answer "),
        token(10, "r1", "reporter", "is 42."),
        message(11, "r1", "reporter", "The answer is 42.", final=True),
        {"type": "run.finished", "seq": 12, "run_id": RUN, "status": "succeeded", "error": None,
         "answer_message_id": "r1", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "by_purpose": {}}},
    ]  # fmt: skip


def translated(events: list[dict], final_speakers=None) -> list:
    translator = Translator("thread-1", "run-1", final_speakers)
    out = [translator.started()]
    for event in events:
        if event["type"] == "run.finished":
            out += translator.finish(event, [])
        else:
            out += translator.translate(event)
    return out


def shape(events) -> list[str]:
    """Event types, with the step or agent they concern, consecutive CONTENTs of one message counted once."""
    names = []
    for event in events:
        kind = event.type.value if hasattr(event.type, "value") else event.type
        label = getattr(event, "step_name", None) or getattr(event, "name", None) or ""
        name = f"{kind}:{label}" if label else kind
        if kind == "TEXT_MESSAGE_CONTENT" and names and names[-1] == name:
            continue
        names.append(name)
    return names


def test_a_team_run_becomes_sub_agent_runs_named_by_agent_around_an_answer():
    assert shape(translated(chorus_run())) == [
        "RUN_STARTED", "CUSTOM:chorus.run.started",
        "SUBAGENT_STARTED:planner", "TEXT_MESSAGE_START:planner", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "SUBAGENT_FINISHED",
        "SUBAGENT_STARTED:analyst", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
        "SUBAGENT_FINISHED",
        "TEXT_MESSAGE_START:reporter", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "MESSAGES_SNAPSHOT", "RUN_FINISHED",
    ]  # fmt: skip


def test_every_event_is_valid_to_the_official_types_and_balanced():
    events = translated(chorus_run())
    for event in events:
        assert EVENTS.validate_json(event.model_dump_json(by_alias=True, exclude_none=True)) == event
    texts = {e.message_id: "" for e in events if e.type == EventType.TEXT_MESSAGE_START}
    for event in events:
        if event.type == EventType.TEXT_MESSAGE_CONTENT:
            texts[event.message_id] += event.delta
    assert texts == {"p1": "Ask the analyst.", "r1": "The answer is 42."}
    call = next(e for e in events if e.type == EventType.TOOL_CALL_ARGS)
    result = next(e for e in events if e.type == EventType.TOOL_CALL_RESULT)
    assert json.loads(call.delta) == {"expression": "6*7"} and (result.tool_call_id, result.content) == ("call_1", "42")
    finished = events[-1]
    assert (finished.thread_id, finished.run_id, finished.result["answer_message_id"]) == ("thread-1", "run-1", "r1")


def test_lost_tokens_are_made_up_from_the_stored_message():
    events = [e for e in chorus_run() if e["seq"] != 10]  # a token lost on the way
    out = translated(events)
    reporter = "".join(e.delta for e in out if e.type == EventType.TEXT_MESSAGE_CONTENT and e.message_id == "r1")
    assert reporter == "The answer is 42."


def test_a_replay_without_tokens_sends_each_message_whole():
    events = [e for e in chorus_run() if e["type"] not in ("token", "tool.call", "tool.result")]  # the log expired
    assert shape(translated(events)) == [
        "RUN_STARTED", "CUSTOM:chorus.run.started",
        "SUBAGENT_STARTED:planner", "TEXT_MESSAGE_START:planner", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "SUBAGENT_FINISHED",
        "SUBAGENT_STARTED:analyst", "TEXT_MESSAGE_START:analyst", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "SUBAGENT_FINISHED",
        "TEXT_MESSAGE_START:reporter", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "MESSAGES_SNAPSHOT", "RUN_FINISHED",
    ]  # fmt: skip


def test_a_resume_mid_answer_starts_the_message_again_and_ends_it():
    resumed = [e for e in chorus_run() if e["seq"] > 9]
    out = translated(resumed, final_speakers=["reporter"])
    assert shape(out) == ["RUN_STARTED", "TEXT_MESSAGE_START:reporter", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
                          "MESSAGES_SNAPSHOT", "RUN_FINISHED"]  # fmt: skip


def finished(status: str, error: dict | None = None) -> dict:
    return {"type": "run.finished", "seq": 12, "run_id": RUN, "status": status, "error": error,
            "answer_message_id": None, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}  # fmt: skip


def test_a_failed_run_closes_what_is_open_then_errs():
    error = {"code": "model_stream_cut", "detail": "The model server dropped the connection."}
    out = translated([*chorus_run()[:10], finished("failed", error)])  # the reporter was mid-answer
    assert shape(out)[-4:] == ["TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "MESSAGES_SNAPSHOT", "RUN_ERROR"]
    assert (out[-1].code, out[-1].message) == ("model_stream_cut", error["detail"])
    assert (out[-1].usage[0].input_tokens, out[-1].usage[0].output_tokens) == (3, 4)


def test_a_run_that_fails_inside_a_sub_agent_ends_that_sub_agent_with_its_error():
    error = {"code": "model_timeout", "detail": "The model took too long."}
    out = translated([*chorus_run()[:4], finished("failed", error)])  # the planner was mid-message
    assert shape(out)[-5:] == ["TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "SUBAGENT_ERROR", "MESSAGES_SNAPSHOT",
                               "RUN_ERROR"]  # fmt: skip
    assert out[-3].subagent_run_id == "planner:p1" and out[-3].code == "model_timeout"


def test_a_stopped_run_finishes_with_the_cancelled_outcome():
    out = translated([*chorus_run()[:10], finished("cancelled")])
    assert out[-1].type == EventType.RUN_FINISHED and out[-1].outcome.type == "cancelled"
    assert out[-1].result["status"] == "cancelled"


def test_a_sub_agents_events_carry_its_id_and_the_answers_none():
    out = translated(chorus_run())
    owner = None
    for event in out:
        if event.type == EventType.SUBAGENT_STARTED:
            owner = event.subagent_run_id
            assert owner == f"{event.name}:" + {"planner": "p1", "analyst": "call_1"}[event.name]
        elif event.type == EventType.SUBAGENT_FINISHED:
            assert event.subagent_run_id == owner
            owner = None
        elif event.type not in (EventType.RUN_STARTED, EventType.CUSTOM, EventType.MESSAGES_SNAPSHOT,
                                EventType.RUN_FINISHED):  # fmt: skip
            assert event.subagent_run_id == owner, event


def test_a_team_whose_every_agent_answers_has_no_sub_agents():
    events = [e for e in chorus_run() if e["type"] != "run.started"]
    out = translated(events, final_speakers=[])
    assert not [e for e in out if e.type in (EventType.SUBAGENT_STARTED, EventType.SUBAGENT_FINISHED)]
    assert all(getattr(e, "subagent_run_id", None) is None for e in out)


# --- Real runs: Python, then the TypeScript client ------------------------------------------------------------


def frames_user_id(frames) -> str:
    return Message.objects.get(role="user").client_id.removeprefix("agui:")


def test_a_message_id_too_long_for_a_client_id_is_hashed_into_one():
    from agents_app.web.agui import _client_id

    assert _client_id("m-1") == "agui:m-1"
    long = _client_id("x" * 100)
    assert len(long) <= 64 and long.startswith("agui#") and long != _client_id("x" * 101)


def agui_input(thread_id: str, run_id: str, text: str, message_id: str | None = None) -> dict:
    return {
        "threadId": thread_id,
        "runId": run_id,
        "state": {},
        "tools": [],
        "context": [],
        "forwardedProps": {},
        "messages": [{"id": message_id or str(uuid.uuid4()), "role": "user", "content": text}],
    }


def read_agui(response) -> list[tuple[int | None, object]]:
    """(id, event) of every SSE frame, each event parsed by ag-ui-protocol's own types."""
    frames, current_id, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("id: "):
            current_id = int(line[4:])
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            frames.append((current_id, EVENTS.validate_json("\n".join(data))))
            current_id, data = None, []
    return frames


@pytest.fixture
def secret(owner):
    return tokens.token_create(user=owner, name="ag-ui tests")[1]


@pytest.fixture
def web(stack, secret):
    return httpx.Client(
        base_url=f"http://127.0.0.1:{stack.web_port}",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=httpx.Timeout(LONG_WAIT),
    )


def post_agui(web, path: str, body: dict, **headers) -> list:
    with web.stream("POST", path, json=body, headers={"Accept": "text/event-stream", **headers}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_agui(response)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_python_reads_a_multi_agent_run_with_a_tool_call(web, owner, team):
    thread = f"desk-{uuid.uuid4()}"  # not a UUID: Chorus derives the conversation from it and the person
    frames = post_agui(web, "/api/agui/research-desk/", agui_input(thread, "run-1", TOOL_QUESTION))
    events = [event for _id, event in frames]

    assert shape(events) == [
        "RUN_STARTED", "CUSTOM:chorus.run.started",
        "SUBAGENT_STARTED:planner", "TEXT_MESSAGE_START:planner", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "SUBAGENT_FINISHED",
        "SUBAGENT_STARTED:analyst", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
        "SUBAGENT_FINISHED",
        "TEXT_MESSAGE_START:reporter", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "MESSAGES_SNAPSHOT", "RUN_FINISHED",
    ]  # fmt: skip
    assert (events[0].thread_id, events[0].run_id) == (thread, "run-1")
    start = next(e for e in events if e.type == EventType.TOOL_CALL_START)
    args = next(e for e in events if e.type == EventType.TOOL_CALL_ARGS)
    result = next(e for e in events if e.type == EventType.TOOL_CALL_RESULT)
    assert start.tool_call_name == "calculator" and json.loads(args.delta) == {"expression": "6*7"}
    assert result.tool_call_id == start.tool_call_id and result.content == "42"
    answer = "".join(e.delta for e in events if e.type == EventType.TEXT_MESSAGE_CONTENT
                     and e.message_id == events[-3].message_id)  # fmt: skip
    assert answer == "The answer is 42."

    conversation = Conversation.objects.get(owner=owner)
    assert conversation.team.slug == "research-desk" and str(conversation.id) != thread
    stored = list(Message.objects.filter(conversation=conversation).order_by("seq"))
    snapshot = events[-2].messages
    assert [m.role for m in snapshot][0] == "user" and snapshot[0].content == TOOL_QUESTION
    assert snapshot[-1].content == "The answer is 42." and snapshot[-1].name == "reporter"
    # Chorus's ids, except the person's message: the id the client sent it with (so the client keeps it).
    assert [m.id for m in snapshot][0] == frames_user_id(frames)
    assert {str(m.id) for m in stored if m.role not in ("tool", "user")} <= {m.id for m in snapshot}
    assert events[-1].result["answer_message_id"] == snapshot[-1].id == str(stored[-1].id)
    # Each frame that completes a Chorus event names its seq; they only grow.
    ids = [frame_id for frame_id, _event in frames if frame_id is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) and ids[-1] == Run.objects.get().finished_seq


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_reconnecting_client_resumes_without_sending_twice(web, owner, team):
    body = agui_input(str(uuid.uuid4()), "run-7", "Hello [[tokens:30]] [[tps:200]]")
    first = post_agui(web, "/api/agui/", body)
    ids = [frame_id for frame_id, _ in first if frame_id is not None]
    middle = ids[len(ids) // 2]

    resumed = post_agui(web, "/api/agui/", body, **{"Last-Event-ID": str(middle)})
    again = post_agui(web, "/api/agui/", body)  # no Last-Event-ID: the whole run, replayed
    at_end = post_agui(web, "/api/agui/", body, **{"Last-Event-ID": str(ids[-1])})

    assert Message.objects.filter(role="user").count() == 1 and Run.objects.count() == 1
    assert [event for _id, event in again] == [event for _id, event in first]
    assert resumed[0][1].type == EventType.RUN_STARTED and resumed[0][1].run_id == "run-7"
    assert [i for i, _ in resumed if i is not None] == [i for i in ids if i > middle]
    assert [e for _i, e in resumed[-2:]] == [e for _i, e in first[-2:]]
    # The same text, whatever was resent: the message that was mid-stream starts again from where it resumed.
    assert [e.type for _i, e in at_end] == [EventType.RUN_STARTED, EventType.MESSAGES_SNAPSHOT, EventType.RUN_FINISHED]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_failed_run_is_a_run_error_after_the_snapshot(web, team):
    frames = post_agui(web, "/api/agui/", agui_input(str(uuid.uuid4()), "r", "hi [[fault:400-context]]"))
    events = [event for _id, event in frames]
    assert [e.type for e in events[-2:]] == [EventType.MESSAGES_SNAPSHOT, EventType.RUN_ERROR]
    assert events[-1].code == "context_too_long" and events[-1].message


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_refusals_are_json_errors_before_any_stream(web, owner, other_user, team):
    theirs = Conversation.objects.create(owner=other_user, team=team)
    answers = [
        web.post("/api/agui/", json=agui_input(str(theirs.id), "r", "hi")),
        web.post("/api/agui/", json={"threadId": "t"}),
        web.post("/api/agui/", content=b"{not json", headers={"Content-Type": "application/json"}),
        web.post("/api/agui/nope/", json=agui_input("t2", "r", "hi")),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in answers] == [
        (404, "not_found"), (400, "invalid_body"), (400, "invalid_json"), (400, "unknown_team")
    ]  # fmt: skip
    thread = str(uuid.uuid4())
    post_agui(web, "/api/agui/", agui_input(thread, "r", "hi [[tps:0]]"))
    mismatch = web.post("/api/agui/research-desk/", json=agui_input(thread, "r2", "again"))
    assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (409, "team_mismatch")


def node_client(config: dict) -> dict:
    """Run tests/agui_client/run-agent.mjs (the official HttpAgent) with this config; its JSON output."""
    if not (CLIENT_DIR / "node_modules" / "@ag-ui" / "client").is_dir():
        pytest.fail("The AG-UI client is not installed: run `npm ci` in tests/agui_client (scripts/test.sh does).")
    run = subprocess.run(
        ["node", "run-agent.mjs", json.dumps(config)],
        cwd=CLIENT_DIR, capture_output=True, text=True, timeout=LONG_WAIT * 2,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_typescript_client_streams_a_team_with_a_tool_call(stack, secret, owner, team):
    thread = str(uuid.uuid4())
    user_message = {"id": str(uuid.uuid4()), "role": "user", "content": TOOL_QUESTION}
    output = node_client({"url": f"http://127.0.0.1:{stack.web_port}/api/agui/research-desk/", "token": secret,
                          "threadId": thread, "runId": "ts-run-1", "messages": [user_message]})  # fmt: skip
    run = output["first"]
    assert run["error"] is None, run["error"]
    kinds = [event["type"] for event in run["events"]]
    assert kinds[0] == "RUN_STARTED" and kinds[-2:] == ["MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    subagents = [event["name"] for event in run["events"] if event["type"] == "SUBAGENT_STARTED"]
    assert subagents == ["planner", "analyst"]
    call = next(event for event in run["events"] if event["type"] == "TOOL_CALL_START")
    result = next(event for event in run["events"] if event["type"] == "TOOL_CALL_RESULT")
    assert call["toolCallName"] == "calculator" and result["content"] == "42"
    assert run["result"]["answer_message_id"] == run["messages"][-1]["id"]
    messages = run["messages"]  # the client's state after the run: the snapshot
    assert messages[0]["content"] == TOOL_QUESTION and messages[-1]["content"] == "The answer is 42."
    assert str(Conversation.objects.get(owner=owner).id) == thread


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_typescript_client_runs_again_after_losing_the_stream(stack, secret, owner, team):
    user_message = {"id": str(uuid.uuid4()), "role": "user", "content": TOOL_QUESTION}
    output = node_client({"url": f"http://127.0.0.1:{stack.web_port}/api/agui/research-desk/", "token": secret,
                          "threadId": f"ts-{uuid.uuid4()}", "runId": "ts-run-2", "messages": [user_message],
                          "abortAfter": "TOOL_CALL_START"})  # fmt: skip
    first, again = output["first"], output["again"]
    assert "RUN_FINISHED" not in [event["type"] for event in first["events"]]
    assert again["error"] is None and again["events"][-1]["type"] == "RUN_FINISHED"
    assert again["messages"][-1]["content"] == "The answer is 42."
    assert Message.objects.filter(role="user").count() == 1, "the message was sent once"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_typescript_client_is_refused_by_a_revoked_token(stack, owner, team):
    token, secret = tokens.token_create(user=owner, name="gone")
    tokens.token_revoke(user=owner, token_id=token.id)
    output = node_client(
        {
            "url": f"http://127.0.0.1:{stack.web_port}/api/agui/",
            "token": secret,
            "threadId": "t",
            "runId": "r",
            "messages": [{"id": "m", "role": "user", "content": "hi"}],
        }
    )
    assert "401" in output["first"]["error"] and output["first"]["events"] == []
    assert not Conversation.objects.exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_user_message_names_an_uploaded_image_by_its_id(web, owner, team):
    """Attachments over AG-UI (issue 19): upload into the thread's conversation, then name the file in a
    `binary` content part; the offline model describes the image it received."""
    import io

    from PIL import Image

    from agents_app.domain import services

    conversation = services.conversation_create(owner=owner, team=team)
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (200, 30, 30)).save(buffer, "PNG")
    uploaded = web.post(
        f"/api/conversations/{conversation.id}/attachments/", files={"file": ("red.png", buffer.getvalue())}
    )
    assert uploaded.status_code == 201, uploaded.text
    body = agui_input(str(conversation.id), "run-1", "")
    body["messages"][0]["content"] = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "url", "value": uploaded.json()["url"], "mimeType": "image/png"}},
    ]
    events = [event for _id, event in post_agui(web, "/api/agui/", body)]
    answer = "".join(e.delta for e in events if e.type == EventType.TEXT_MESSAGE_CONTENT)
    assert answer.startswith("I see an image of 12×8 pixels, mostly red (#c81e1e).")
    stored = Message.objects.get(conversation=conversation, role="user")
    assert [a.name for a in stored.attachments.all()] == ["red.png"]
