"""The shipped teams end to end against the offline model server, the tool registry, team validation, intent
routing, and the admin's team editor. The offline model obeys per-agent directives like [[critic>reply:...]]."""

import asyncio
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from autogen_core import CancellationToken
from django.core.exceptions import ValidationError
from django.urls import reverse

from agents_app.domain import search, services
from agents_app.models import Conversation, Message, Run, Team
from agents_app.runner import registry_tool_config
from agents_app.runner.tools import build_tools, calculator, current_time
from tests.support import connect, receive_until


def collapse_tokens(events):
    """Event types in order, with each run of tokens from one source shown once as token:<source>."""
    shape = []
    for event in events:
        label = f"token:{event['source']}" if event["type"] == "token" else event["type"]
        if event["type"] == "message":
            label = f"message:{event['message']['source']}"
        elif event["type"] in ("tool.call",):
            label = f"tool.call:{event['name']}"
        if not shape or shape[-1] != label:
            shape.append(label)
    return shape


async def run_message(conversation, user, content):
    chat = await connect(conversation, user)
    connected, _ = await chat.connect()
    assert connected
    await chat.receive_json_from()
    await chat.send_json_to({"type": "send", "content": content})
    events = await receive_until(chat, "run.finished", timeout=30)
    await chat.disconnect()
    return events


@pytest.fixture
def team_named(team):
    return lambda slug: Team.objects.get(slug=slug)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_writer_and_critic_stream_and_the_writers_last_version_is_the_answer(owner, team_named, model):
    team = await sync_to_async(team_named)("writer-critic")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)

    events = await run_message(conversation, owner, "Write a haiku about rain. [[critic>reply:Shorter, please.]]")

    assert collapse_tokens(events) == [
        "message:user", "conversation.updated", "run.started",
        "token:writer", "message:writer", "token:critic", "message:critic",
        "token:writer", "message:writer", "token:critic", "message:critic",
        "message.updated", "run.finished",
    ]  # fmt: skip
    started = next(e for e in events if e["type"] == "run.started")
    assert (started["team"], started["final_speakers"], started["steps"]) == ("writer-critic", ["writer"], "folded")
    assert events[-1]["status"] == "succeeded"
    stored = await sync_to_async(list)(
        Message.objects.filter(conversation=conversation).exclude(role="user").values_list("source", "is_final_answer")
    )
    assert stored == [("writer", False), ("critic", False), ("writer", True), ("critic", False)]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_live_and_replay_agree_on_which_message_is_the_answer(owner, team_named, model):
    """Both drafts go out live as the answer when they complete; the first one's replacement is an event of its
    own (message.updated, with a seq), and run.finished names the answer. A replay (from the log, and from the
    database alone) sends the very same event objects, and GET .../messages/ shows the outcome."""
    team = await sync_to_async(team_named)("writer-critic")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)

    live = await run_message(conversation, owner, "Write a haiku about rain. [[critic>reply:Shorter, please.]]")

    drafts = [e["message"] for e in live if e["type"] == "message" and e["message"]["source"] == "writer"]
    assert [d["is_final_answer"] for d in drafts] == [True, True]
    updated, finished = live[-2], live[-1]
    assert updated["type"] == "message.updated" and updated["message"]["id"] == drafts[0]["id"]
    assert updated["message"]["is_final_answer"] is False and drafts[0]["seq"] < updated["seq"] < finished["seq"]
    assert finished["answer_message_id"] == drafts[1]["id"]

    first_seq = live[0]["seq"]
    chat = await connect(conversation, owner)
    await chat.connect()
    await chat.receive_json_from()  # hello
    await chat.send_json_to({"type": "resume", "after_seq": first_seq - 1})
    replayed = await receive_until(chat, "run.finished", timeout=10)
    await chat.disconnect()
    assert replayed == live

    from agents_app.domain.selectors import events_after

    stored = await sync_to_async(events_after)(conversation=conversation, after_seq=first_seq - 1)
    assert stored == [e for e in live if e["type"] not in ("token", "tool.call", "tool.result")]
    messages = await sync_to_async(list)(Message.objects.filter(id__in=[d["id"] for d in drafts]).order_by("seq"))
    assert [m.is_final_answer for m in messages] == [False, True]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_research_desk_plans_calls_a_real_tool_and_reports(owner, team_named, model):
    team = await sync_to_async(team_named)("research-desk")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    content = 'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]] [[reporter>reply:The answer is 42.]]'

    events = await run_message(conversation, owner, content)

    assert collapse_tokens(events) == [
        "message:user", "conversation.updated", "run.started",
        "token:planner", "message:planner",
        "tool.call:calculator", "tool.result", "message:analyst",
        "token:reporter", "message:reporter",
        "run.finished",
    ]  # fmt: skip
    call = next(e for e in events if e["type"] == "tool.call")
    result = next(e for e in events if e["type"] == "tool.result")
    assert call["source"] == "analyst" and json.loads(call["arguments"]) == {"expression": "6*7"}
    assert result["call_id"] == call["call_id"] and result["content"] == "42" and result["is_error"] is False
    messages = {e["message"]["source"]: e["message"] for e in events if e["type"] == "message"}
    assert messages["analyst"]["role"] == "tool" and not messages["analyst"]["is_final_answer"]
    assert not messages["planner"]["is_final_answer"]
    assert messages["reporter"]["is_final_answer"] and messages["reporter"]["content"] == "The answer is 42."
    # Usage counts every request of the run, the selector's choices of the next speaker included.
    usage = events[-1]["usage"]
    by_purpose = usage["by_purpose"]
    assert by_purpose["speaker_selection"]["requests"] >= 2 and by_purpose["agent"]["requests"] >= 3
    assert usage["prompt_tokens"] == sum(part["prompt_tokens"] for part in by_purpose.values()) > 0
    assert usage["completion_tokens"] == sum(part["completion_tokens"] for part in by_purpose.values()) > 0
    run = await Run.objects.aget(id=events[-1]["run_id"])
    assert (run.usage, run.prompt_tokens) == (by_purpose, usage["prompt_tokens"])


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_hidden_steps_never_reach_the_socket_but_are_kept_for_admins(owner, team_named, model, client):
    team = await sync_to_async(team_named)("research-desk")
    team.steps_display = Team.StepsDisplay.HIDDEN
    await team.asave()
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    content = 'Sum? [[analyst>tool:calculator {"expression": "2+2"}]] [[reporter>reply:It is 4.]]'

    events = await run_message(conversation, owner, content)

    assert collapse_tokens(events) == [
        "message:user",
        "conversation.updated",
        "run.started",
        "token:reporter",
        "message:reporter",
        "run.finished",
    ]
    assert await Message.objects.filter(conversation=conversation, source="planner").aexists(), "stored for admins"
    await sync_to_async(client.force_login)(owner)
    listed = await sync_to_async(client.get)(f"/api/conversations/{conversation.id}/messages/")
    assert [m["source"] for m in listed.json()] == ["user", "reporter"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_selector_model_that_names_no_one_still_gets_the_reporters_answer(owner, team_named, model):
    team = await sync_to_async(team_named)("research-desk")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)

    events = await run_message(conversation, owner, "What is 6*7? [[select:Nobody.]]")

    assert collapse_tokens(events) == ["message:user", "conversation.updated", "run.started", "token:reporter",
                                       "message:reporter", "run.finished"]  # fmt: skip
    assert events[-1]["status"] == "succeeded" and events[-2]["message"]["is_final_answer"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_an_empty_reply_ends_the_run_without_an_answer(owner, team, model):
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)

    events = await run_message(conversation, owner, "hi [[fault:blank]]")

    assert collapse_tokens(events) == ["message:user", "conversation.updated", "run.started", "token:assistant",
                                       "message:assistant", "run.finished"]  # fmt: skip
    finished = events[-1]
    assert finished["status"] == "failed" and finished["error"]["code"] == "no_answer"
    assert not events[-2]["message"]["is_final_answer"], "an empty reply is a step, never the answer"
    run = await Run.objects.aget(conversation=conversation)
    assert (run.status, run.error_code, run.answer_message_id) == ("failed", "no_answer", None)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_automatic_router_picks_a_team_per_message_and_says_why(owner, team_named, model):
    router = await sync_to_async(team_named)("automatic")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=router)

    first = await run_message(conversation, owner, "Please write a slogan for a bakery. [[critic>reply:APPROVED]]")
    second = await run_message(conversation, owner, "Hello! Which team answers this one?")

    first_start, second_start = (next(e for e in events if e["type"] == "run.started") for events in (first, second))
    assert first_start["team"] == "writer-critic"
    assert first_start["route"] == {"router": "automatic", "reason": "the message mentions “write”"}
    assert second_start["team"] == "assistant" and second_start["route"]["router"] == "automatic"
    runs = await sync_to_async(list)(Run.objects.filter(conversation=conversation).order_by("created_at"))
    assert [(r.team_id is not None, r.routed_by_id == router.id) for r in runs] == [(True, True), (True, True)]
    # Memory stays coherent across teams: the second team was given the conversation so far.
    answer = second[-2]["message"]["content"]
    assert "conversation so far" in answer.lower() and "slogan" in answer.lower()
    # The router asked its model about the second message (no keyword matched): that request counts too.
    assert "routing" not in first[-1]["usage"]["by_purpose"]
    by_purpose = second[-1]["usage"]["by_purpose"]
    assert by_purpose["routing"]["requests"] == 1 and by_purpose["agent"]["requests"] == 1
    assert second[-1]["usage"]["prompt_tokens"] == sum(part["prompt_tokens"] for part in by_purpose.values())


def test_calculator_does_arithmetic_and_nothing_else():
    assert calculator("6*7") == "42"
    assert calculator("(1 + 2) / 4") == "0.75"
    assert calculator("2 ** 1000").startswith("Error")
    assert calculator("__import__('os').system('true')").startswith("Error")
    assert calculator("1/0").startswith("Error")


def test_current_time_knows_time_zones():
    assert current_time("UTC").endswith("UTC")
    assert current_time("Mars/Olympus").startswith("Error: unknown time zone")


@pytest.mark.django_db(transaction=True)
def test_conversation_search_sees_only_the_owners_messages(owner, other_user, team):
    mine = services.conversation_create(owner=owner, team=team, title="Trip")
    theirs = services.conversation_create(owner=other_user, team=team, title="Secret")
    services.message_send(conversation=mine, content="Remember the blue umbrella")
    Run.objects.update(status="succeeded")
    services.message_send(conversation=theirs, content="The blue umbrella code is 1234")

    def search_as(user, query):
        tool = build_tools(search_conversations=search.for_person(user.pk))["search_my_conversations"]
        # AutoGen runs a sync tool in a thread of its own, with its own database connection: so does the test.
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, tool.run_json({"query": query}, CancellationToken())).result()

    found = search_as(owner, "blue umbrella")
    assert "Trip" in found and "Remember the blue umbrella" in found
    assert "1234" not in found and "Secret" not in found
    # Each person's tool is bound to that person, whoever's was built first in this process.
    found = search_as(other_user, "blue umbrella")
    assert "Secret" in found and "1234" in found
    assert "Trip" not in found and "Remember" not in found
    assert "No earlier message" in search_as(owner, "1234")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "slug, mutate, field, message",
    [
        ("research-desk", lambda c: _analyst_tools(c).append(registry_tool_config("rm_rf")), "config",
         "Unknown tool 'rm_rf'"),
        ("research-desk", lambda c: _analyst_tools(c).append({"provider": "autogen_core.tools.FunctionTool",
         "component_type": "tool", "config": {"source_code": "def f(): pass", "name": "f"}}), "config", "Tools cannot"),
        ("assistant", lambda c: c["config"]["participants"][0]["config"]["model_client"]["config"].update(
         api_key="sk-live-123"), "config", "API keys are not stored"),
        ("assistant", lambda c: c["config"]["participants"][0]["config"]["model_client"].update(
         provider="evil.Client"), "config", "not allowed"),
        ("automatic", lambda c: c["teams"].append("nope"), "config", "Unknown teams"),
        ("automatic", lambda c: c.update(fallback="elsewhere"), "config", '"fallback" must be one of'),
    ],
    ids=["unknown-tool", "function-tool", "stored-key", "unknown-provider", "router-unknown-team", "router-fallback"],
)  # fmt: skip
def test_validation_refuses_each_forbidden_config_with_a_clear_message(team, slug, mutate, field, message):
    target = Team.objects.get(slug=slug)
    target.config = copy.deepcopy(target.config)
    mutate(target.config)
    with pytest.raises(ValidationError) as error:
        target.full_clean()
    assert message in " ".join(error.value.message_dict[field])


def _analyst_tools(config):
    analyst = next(p for p in config["config"]["participants"] if p["config"]["name"] == "analyst")
    return analyst["config"]["workbench"][0]["config"]["tools"]


@pytest.mark.django_db
def test_final_speakers_must_be_agents_of_the_team(team):
    target = Team.objects.get(slug="writer-critic")
    target.final_speakers = ["editor"]
    with pytest.raises(ValidationError) as error:
        target.full_clean()
    assert "Not agents of this team: editor" in error.value.message_dict["final_speakers"][0]


@pytest.mark.django_db
def test_every_shipped_team_is_valid(team):
    for shipped in Team.objects.all():
        shipped.full_clean()


@pytest.mark.django_db
def test_the_admin_refuses_a_bad_config(client, staff, team):
    client.force_login(staff)
    research = Team.objects.get(slug="research-desk")
    url = reverse("admin:agents_app_team_change", args=[research.pk])
    form = client.get(url)
    assert form.status_code == 200 and b"team-config" in form.content
    config = copy.deepcopy(research.config)
    _analyst_tools(config).append(registry_tool_config("shell"))
    data = {"name": research.name, "slug": research.slug, "kind": "team", "description": research.description,
            "enabled": "on", "final_speakers": json.dumps(research.final_speakers), "steps_display": "folded",
            "config": json.dumps(config)}  # fmt: skip
    refused = client.post(url, data)
    assert refused.status_code == 200 and "Unknown tool &#x27;shell&#x27;" in refused.content.decode()
    research.refresh_from_db()
    assert "shell" not in json.dumps(research.config)


@pytest.mark.integration
def test_the_admins_team_test_is_answered_by_an_agent_worker_not_by_the_request(client, staff, team, stack):
    """The action queues a run in a conversation of the admin's own and returns at once; the worker process
    answers it, as it answers everyone."""
    client.force_login(staff)
    assistant = team
    disabled = Team.objects.create(name="Off", slug="off", config=assistant.config, enabled=False)

    page = client.post(
        reverse("admin:agents_app_team_changelist"),
        {"action": "test_team", "_selected_action": [assistant.pk, disabled.pk]},
    ).content.decode()

    conversation = Conversation.objects.get(owner=staff, team=assistant)
    assert conversation.title == "Team test: Assistant"
    assert "queued" in page and reverse("conversation-detail", args=[conversation.id]) in page
    assert "Enable the team first" in page and not Conversation.objects.filter(team=disabled).exists()
    run = conversation.runs.get()
    deadline = time.monotonic() + 30
    while run.status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        run.refresh_from_db()
    assert run.status == "succeeded" and run.worker_id.split(":")[1] == str(stack.processes[0].pid)
    assert run.messages.get(is_final_answer=True).content.strip()
