"""The admin's conversations: the list (columns, filters, queries whatever the rows), the transcript page (order,
answers, steps and tool calls folded, run boundaries, sanitised model text, queries whatever the length), who may
see and who may change or delete, and tool calls stored by the worker and shown after a reload."""

import json
import re
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from agents_app.domain import services
from agents_app.models import Conversation, Message, Run, Team, ToolCall
from tests.admin_rows import CHANGE_ALL, VIEW_ALL, add_turn, grant, table_row
from tests.support import connect, receive_until

LIST = "admin:agents_app_conversation_changelist"


def transcript_url(conversation) -> str:
    return reverse("admin:agents_app_conversation_change", args=[conversation.id])


@pytest.fixture
def viewer(django_user_model, db):
    user = django_user_model.objects.create_user("viewer", password="viewer-password-1", is_staff=True)
    grant(user, *VIEW_ALL)
    return user


@pytest.fixture
def editor(django_user_model, db):
    """Staff with every permission Chorus has, delete included, but not a superuser."""
    user = django_user_model.objects.create_user("editor", password="editor-password-1", is_staff=True)
    grant(user, *VIEW_ALL, *CHANGE_ALL)
    return user


@pytest.fixture
def research(team):
    return Team.objects.get(slug="research-desk")


@pytest.fixture
def reviewed(owner, research):
    """A research-desk conversation: a successful turn with a step, a tool call and an answer; then a failed one."""
    conversation = services.conversation_create(owner=owner, team=research, title="Sums")
    add_turn(conversation, "What is 6*7?", steps=(("planner", "Plan: use the calculator."),), tool={},
             answer="It is **42**.")  # fmt: skip
    add_turn(conversation, "And 1/0?", answer=None, status=Run.Status.FAILED, first_token=False,
             error=("model_timeout", "The model took too long to answer."), usage={})  # fmt: skip
    return conversation


def bulk_conversations(owner, team, count: int) -> None:
    """`count` conversations, each with a question, a run and an answer, in a few statements."""
    conversations = [Conversation(owner=owner, team=team, title=f"Conversation {i}", last_seq=3) for i in range(count)]
    Conversation.objects.bulk_create(conversations)
    runs, messages = [], []
    for conversation in conversations:
        run = Run(conversation=conversation, team=team, status=Run.Status.SUCCEEDED, prompt_tokens=7,
                  completion_tokens=3, started_seq=2, finished_seq=4)  # fmt: skip
        runs.append(run)
        messages += [Message(conversation=conversation, run=run, role="user", source="user", content="Hi", seq=1),
                     Message(conversation=conversation, run=run, role="assistant", source="assistant",
                             content="Hello", is_final_answer=True, seq=3)]  # fmt: skip
    Run.objects.bulk_create(runs)
    Message.objects.bulk_create(messages)


# The list ----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_list_shows_owner_team_messages_activity_tokens_and_the_last_runs_status(client, staff, reviewed):
    client.force_login(staff)
    response = client.get(reverse(LIST))
    assert response.status_code == 200
    cells = table_row(response.content.decode(), "Sums")
    # title, owner, team, messages (2 questions, a step, an answer), last activity, tokens (30 + 12), last run
    assert cells[:4] == ["Sums", "owner", "Research desk", "4"]
    assert cells[5:] == ["42", "failed (model_timeout)"]


@pytest.mark.django_db
def test_the_list_filters_by_team_owner_date_and_failed_runs(client, staff, reviewed, owner, other_user, team):
    quiet = services.conversation_create(owner=other_user, team=team, title="Quiet one")
    add_turn(quiet, "Hello?", answer="Hi.")
    client.force_login(staff)

    def titles(query: str) -> set[str]:
        page = client.get(reverse(LIST) + query)
        assert page.status_code == 200, query
        return set(re.findall(r'class="field-__str__"><a [^>]*>([^<]+)</a>', page.content.decode()))

    assert titles("") == {"Sums", "Quiet one"}
    assert titles(f"?team__id__exact={team.pk}") == {"Quiet one"}
    assert titles(f"?owner__id__exact={owner.pk}") == {"Sums"}
    assert titles("?runs=failed") == {"Sums"} and titles("?runs=last_failed") == {"Sums"}
    assert titles("?runs=none") == set()
    today = reviewed.created_at
    assert titles(f"?created_at__year={today.year}&created_at__month={today.month}") == {"Sums", "Quiet one"}
    assert titles(f"?created_at__year={today.year - 1}") == set()
    page = client.get(reverse(LIST)).content.decode()
    assert "By last activity" in page and "By runs" in page and 'class="toplinks"' in page  # filters, dates


@pytest.mark.django_db
def test_the_list_costs_the_same_queries_for_1000_conversations_as_for_10(
    client, staff, owner, team, django_assert_max_num_queries
):
    client.force_login(staff)
    bulk_conversations(owner, team, 10)
    client.get(reverse(LIST))  # the session and content types, cached from now on
    with CaptureQueriesContext(connection) as few:
        assert client.get(reverse(LIST)).status_code == 200
    bulk_conversations(owner, team, 990)
    with django_assert_max_num_queries(len(few)):
        response = client.get(reverse(LIST))
    assert response.status_code == 200 and "1000 conversations" in response.content.decode()
    with CaptureQueriesContext(connection) as filtered_few:
        client.get(reverse(LIST) + "?runs=failed&o=-4")
    assert len(filtered_few) <= len(few)
    print(f"conversation list: {len(few)} queries for 10 conversations and for 1000")


# The transcript --------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_transcript_shows_everything_in_order_answers_marked_steps_and_tool_calls_folded(client, staff, reviewed):
    client.force_login(staff)
    response = client.get(transcript_url(reviewed))
    assert response.status_code == 200
    page = response.content.decode()
    transcript = page[page.index('id="transcript"') :]
    order = [transcript.index(text) for text in (
        "What is 6*7?", "Research desk", "Plan: use the calculator.", "<code>calculator</code>",
        "<strong>42</strong>", 'Run <span class="t-status">succeeded</span>', "And 1/0?",
        'Run <span class="t-status">failed</span>', "model_timeout", "The model took too long to answer.",
    )]  # fmt: skip
    assert order == sorted(order), "person, run start, step, tool call, answer, run end; then the next turn"
    assert transcript.count("final answer") == 1
    step = re.search(r'<li class="t-step t-assistant">\s*<details>(.*?)</details>', transcript, re.S).group(1)
    assert "planner" in step and "Plan: use the calculator." in step
    tool = re.search(r'<li class="t-step t-tool">\s*<details>(.*?)</details>', transcript, re.S).group(1)
    assert "<code>calculator</code>" in tool and "analyst" in tool and "0.01 s" in tool
    assert "{&quot;expression&quot;: &quot;6*7&quot;}" in tool and "<pre>42</pre>" in tool
    assert "time to first token 0.25 s" in transcript and "queued 1.00 s" in transcript and "took 3.00 s" in transcript
    assert "agent: 2 requests" in transcript
    # The failed run: its boundary says why, and has no first token recorded.
    failed = transcript[transcript.index("And 1/0?") :]
    assert "t-run-failed" in failed and "time to first token —" in failed
    assert "Export JSON" in page and "Export Markdown" in page


@pytest.mark.django_db
def test_model_text_is_sanitised_as_on_the_page_and_tool_text_escaped(client, staff, owner, research):
    conversation = services.conversation_create(owner=owner, team=research, title="Hostile")
    add_turn(conversation, "<b>me</b> & <script>alert(1)</script>",
             steps=(("planner", '<img src=x onerror="alert(2)"> <a href="javascript:alert(3)">x</a>'),),
             tool={"arguments": '{"expression": "<script>alert(4)</script>"}', "result": "<svg onload=alert(5)>"},
             answer='<script>alert(6)</script> **bold** <span class="banner offline">fake</span>')  # fmt: skip
    client.force_login(staff)
    page = client.get(transcript_url(conversation)).content.decode()
    transcript = page[page.index('id="transcript"') :]
    assert "<script>alert" not in transcript and "onerror" not in transcript and "javascript:" not in transcript
    assert "<svg onload" not in transcript and 'class="banner' not in transcript
    assert "&lt;b&gt;me&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in transcript  # the person's, as typed
    assert "<strong>bold</strong>" in transcript  # the model's Markdown, rendered
    assert "&lt;svg onload=alert(5)&gt;" in transcript  # the tool's result, as text


@pytest.mark.django_db
def test_the_transcript_costs_the_same_queries_for_200_turns_as_for_2(client, staff, owner, research):
    conversation = services.conversation_create(owner=owner, team=research, title="Long")
    for _ in range(2):
        add_turn(conversation, steps=(("planner", "Plan."),), tool={"call_id": f"call_{uuid.uuid4().hex}"})
    client.force_login(staff)
    client.get(transcript_url(conversation))
    with CaptureQueriesContext(connection) as short:
        assert client.get(transcript_url(conversation)).status_code == 200
    for _ in range(198):
        add_turn(conversation, steps=(("planner", "Plan."),), tool={"call_id": f"call_{uuid.uuid4().hex}"})
    with CaptureQueriesContext(connection) as long:
        response = client.get(transcript_url(conversation))
    assert response.status_code == 200 and response.content.decode().count("final answer") == 200
    assert len(long) == len(short), [q["sql"][:120] for q in long.captured_queries]
    print(f"transcript: {len(short)} queries for 2 turns and for 200 (600 messages and 200 tool calls)")


# Who may do what --------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_viewer_reviews_transcripts_and_exports_but_changes_nothing(client, viewer, reviewed, team):
    client.force_login(viewer)
    listing = client.get(reverse(LIST))
    assert listing.status_code == 200 and "Sums" in listing.content.decode()
    assert 'value="delete_selected"' not in listing.content.decode()
    page = client.get(transcript_url(reviewed))
    assert page.status_code == 200 and "final answer" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    for name in ("run", "message", "toolcall"):
        assert client.get(reverse(f"admin:agents_app_{name}_changelist")).status_code == 200
    # Exports are reading: allowed.
    exported = client.post(reverse(LIST), {"action": "export_transcripts", "_selected_action": [str(reviewed.pk)]})
    assert exported.status_code == 200 and json.loads(exported.content)["conversations"][0]["title"] == "Sums"
    # Changing anything is not.
    assert client.post(transcript_url(reviewed), {"title": "Renamed"}).status_code == 403
    assert client.get(reverse("admin:agents_app_conversation_delete", args=[reviewed.pk])).status_code == 403
    team_url = reverse("admin:agents_app_team_change", args=[team.pk])
    assert 'name="_save"' not in client.get(team_url).content.decode()
    assert client.post(team_url, {"name": "Hacked", "daily_token_budget": "1"}).status_code == 403
    assert client.get(reverse("admin:agents_app_personsettings_add")).status_code == 403
    refused = client.post(reverse("admin:agents_app_team_changelist"),
                          {"action": "test_team", "_selected_action": [str(team.pk)]})  # fmt: skip
    assert refused.status_code in (302, 200) and b"Team test" not in refused.content  # not offered: no model run
    reviewed.refresh_from_db()
    team.refresh_from_db()
    assert (reviewed.title, team.name, team.daily_token_budget) == ("Sums", "Assistant", None)


@pytest.mark.django_db
def test_only_superusers_delete(client, editor, staff, reviewed):
    delete_url = reverse("admin:agents_app_conversation_delete", args=[reviewed.pk])
    client.force_login(editor)  # every permission, delete included, but not a superuser
    assert client.get(delete_url).status_code == 403
    assert client.post(delete_url, {"post": "yes"}).status_code == 403
    listing = client.post(reverse(LIST), {"action": "delete_selected", "_selected_action": [str(reviewed.pk)],
                                          "post": "yes"})  # fmt: skip
    assert listing.status_code in (200, 302)
    assert Conversation.objects.filter(pk=reviewed.pk).exists()
    assert client.get(reverse("admin:agents_app_run_delete", args=[reviewed.runs.first().pk])).status_code == 403

    client.force_login(staff)  # a superuser
    assert client.get(delete_url).status_code == 200
    assert client.post(delete_url, {"post": "yes"}).status_code == 302
    assert not Conversation.objects.filter(pk=reviewed.pk).exists()
    assert not ToolCall.objects.exists()


@pytest.mark.django_db
def test_strangers_and_people_without_staff_status_see_no_transcript(client, owner, reviewed):
    assert client.get(transcript_url(reviewed)).status_code == 302  # to the admin's login
    client.force_login(owner)
    response = client.get(transcript_url(reviewed))
    assert response.status_code == 302 and "login" in response.url


# Tool calls, stored by the worker --------------------------------------------------------------------------------


async def _run(conversation, user, content: str) -> list[dict]:
    chat = await connect(conversation, user)
    connected, _ = await chat.connect()
    assert connected
    try:
        await chat.receive_json_from()
        await chat.send_json_to({"type": "send", "content": content})
        return await receive_until(chat, "run.finished", timeout=30)
    finally:
        await chat.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_worker_stores_each_tool_call_and_the_page_shows_it_after_a_reload(owner, team, model, client):
    research = await Team.objects.aget(slug="research-desk")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=research)
    content = 'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]] [[reporter>reply:The answer is 42.]]'

    events = await _run(conversation, owner, content)

    call = next(e for e in events if e["type"] == "tool.call")
    result = next(e for e in events if e["type"] == "tool.result")
    stored = await ToolCall.objects.aget(conversation=conversation)
    assert (stored.call_id, stored.source, stored.name, stored.arguments) == (
        call["call_id"], "analyst", "calculator", call["arguments"])  # fmt: skip
    assert (stored.result, stored.is_error, stored.seq, stored.result_seq) == ("42", False, call["seq"], result["seq"])
    assert stored.duration_ms is not None and stored.duration_ms > 0
    assert str(stored.run_id) == events[-1]["run_id"]
    run = await Run.objects.aget(id=events[-1]["run_id"])
    assert run.started_at < run.first_token_at < run.finished_at

    await sync_to_async(client.force_login)(owner)
    page = (await sync_to_async(client.get)(reverse("conversation-detail", args=[conversation.id]))).content.decode()
    steps = page[page.index('class="step-list"') : page.index('class="answers"')]
    assert f'data-message-id="call-{call["call_id"]}"' in steps
    assert "calculator({&quot;expression&quot;: &quot;6*7&quot;})</code><pre>42</pre>" in steps
    # In the steps' order: the planner, the call, then the analyst's summary of it.
    assert (
        steps.index("planner")
        < steps.index("calculator(")
        < steps.index('data-message-id="', steps.index("calculator("))
    )


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_failed_tool_call_is_stored_with_its_error_and_hidden_steps_store_calls_without_showing_them(
    owner, team, model, client
):
    research = await Team.objects.aget(slug="research-desk")
    research.steps_display = Team.StepsDisplay.HIDDEN
    await research.asave()
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=research)
    content = 'Sum? [[analyst>tool:calculator {"nonsense": 1}]] [[reporter>reply:Could not.]]'

    events = await _run(conversation, owner, content)

    assert not [e for e in events if e["type"].startswith("tool.")], "hidden steps are never sent"
    stored = await ToolCall.objects.aget(conversation=conversation)
    assert stored.is_error and stored.result and stored.arguments == '{"nonsense": 1}'
    await sync_to_async(client.force_login)(owner)
    page = (await sync_to_async(client.get)(reverse("conversation-detail", args=[conversation.id]))).content.decode()
    history = page[page.index('id="messages"') :]
    assert 'class="message tool' not in history and 'class="steps"' not in history, "no step, no tool call"
