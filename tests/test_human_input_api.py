"""Answering a team's question: the HTTP route, the socket frame, a message typed while a run waits, Stop and
expiry, the refusals, the conversation list's flag and the replay from the database. The waiting run is made
by the domain's own functions (as a worker makes it); the runs going on are the process tests'
(tests/test_human_input.py)."""

import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from agents_app.domain import human_input, selectors, services
from agents_app.models import Conversation, InputRequest, Message, Run, Team
from agents_app.runner.human import InputAsk
from tests.support import connect

pytestmark = pytest.mark.django_db


def waiting_run(conversation, *, options=("Approve", "Reject")) -> InputRequest:
    """A run that asked the person, as a worker leaves it: claimed, started, then waiting."""
    services.message_send(conversation=conversation, content="What is 6*7?")
    Run.objects.update(announced=True)
    run = services.run_claim_batch(worker_id="host:1:abc", limit=1, start=True)[0]
    ask = InputAsk("approval", "analyst", "analyst wants to run calculator with {}. Approve?", options)
    seq = services.seq_reserve(conversation_id=conversation.id, count=services.SEQ_BLOCK)
    state = {"type": "TeamState", "agent_states": {}, "chorus_waiting": ask.marker()}
    return human_input.run_wait(run=run, worker_id="host:1:abc", ask=ask, team_state=state, usage={}, seq=seq)


@pytest.fixture
def answer(api, django_capture_on_commit_callbacks):
    """POST an answer, and run what its commit sets off (publishing it, queueing the run)."""

    def post(conversation, request_id, content="Approve"):
        body = {"request_id": str(request_id), "content": content}
        with django_capture_on_commit_callbacks(execute=True):
            return api.post(f"/api/conversations/{conversation.id}/input/", body, content_type="application/json")

    return post


def test_it_answers_over_http_and_the_same_run_is_queued_again(api, conversation, owner, answer):
    asked = waiting_run(conversation)
    assert Run.objects.get(id=asked.run_id).status == "waiting_for_input"

    response = answer(conversation, asked.id)

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["request_id"], body["run_id"]) == (str(asked.id), str(asked.run_id))
    assert (body["message"]["role"], body["message"]["content"], body["message"]["run_id"]) == (
        "user", "Approve", str(asked.run_id),
    )  # fmt: skip
    asked.refresh_from_db()
    assert (asked.answer, asked.answered_by) == ("Approve", owner) and asked.answered_at is not None
    run = Run.objects.get(id=asked.run_id)
    assert run.status == "queued" and run.started_seq is not None
    assert body["message"]["seq"] > asked.seq


def test_a_second_answer_is_refused(api, conversation, answer):
    asked = waiting_run(conversation)
    assert answer(conversation, asked.id).status_code == 200

    again = answer(conversation, asked.id, "Reject")

    assert again.status_code == 409 and again.json()["error"]["code"] == "input_already_answered"
    assert InputRequest.objects.get(id=asked.id).answer == "Approve"
    assert Message.objects.filter(run_id=asked.run_id, role="user").count() == 2  # the question's and one answer


def test_another_persons_question_is_not_found(api, client, conversation, other_user, team, answer):
    theirs = services.conversation_create(owner=other_user, team=team)
    asked = waiting_run(theirs)

    into_mine = answer(conversation, asked.id)  # their request id, posted to my conversation
    into_theirs = answer(theirs, asked.id)  # their conversation itself

    assert into_mine.status_code == 404 and into_mine.json()["error"]["code"] == "input_not_found"
    assert into_theirs.status_code == 404
    assert InputRequest.objects.get(id=asked.id).answered_at is None
    assert answer(conversation, "not-a-uuid").json()["error"]["code"] == "input_not_found"


def test_stop_ends_a_waiting_run_and_its_question_no_longer_waits(api, conversation, answer):
    asked = waiting_run(conversation)

    stopped = api.post(f"/api/conversations/{conversation.id}/cancel/", {}, content_type="application/json")

    assert stopped.status_code == 202 and stopped.json()["status"] == "cancelled"
    run = Run.objects.get(id=asked.run_id)
    assert (run.status, run.error_code) == ("cancelled", "") and run.finished_seq > asked.seq
    late = answer(conversation, asked.id)
    assert late.status_code == 409 and late.json()["error"]["code"] == "input_not_waiting"
    conversation.refresh_from_db()
    assert conversation.team_state["chorus_waiting"]["closed"] is True  # no approval after a Stop
    # The conversation goes on: the next message starts a new run.
    outcome = services.message_send(conversation=conversation, content="Never mind.")
    assert outcome.run.id != run.id and outcome.run.status == "queued"


def test_a_message_sent_while_a_run_waits_is_its_answer(conversation):
    asked = waiting_run(conversation)

    outcome = services.message_send(conversation=conversation, content="Reject: no tools today", client_id="c-1")

    assert str(outcome.run.id) == str(asked.run_id) and outcome.created
    assert InputRequest.objects.get(id=asked.id).answer == "Reject: no tools today"
    assert Run.objects.filter(conversation=conversation).count() == 1
    again = services.message_send(conversation=conversation, content="Reject: no tools today", client_id="c-1")
    assert again.created is False and again.message.id == outcome.message.id  # a resend changes nothing


def test_the_conversation_list_and_payload_say_which_conversations_wait(api, conversation, owner, team):
    idle = services.conversation_create(owner=owner, team=team, title="idle")
    waiting_run(conversation)

    listed = {c["id"]: c["waiting_for_input"] for c in api.get("/api/conversations/").json()}

    assert listed == {str(conversation.id): True, str(idle.id): False}
    assert api.get(f"/api/conversations/{conversation.id}/").json()["waiting_for_input"] is True


def test_a_replay_from_the_database_has_the_question_and_its_answer(conversation, answer):
    asked = waiting_run(conversation)
    message_seq = answer(conversation, asked.id).json()["message"]["seq"]

    replay = selectors.events_after(conversation=conversation, after_seq=0)

    kinds = [(event["type"], event["seq"]) for event in replay]
    assert ("input.request", asked.seq) in kinds
    assert kinds.index(("input.request", asked.seq)) < kinds.index(("message", message_seq))
    answered = next(event for event in replay if event["type"] == "input.answered")
    assert answered["seq"] == message_seq + 1 and answered["request_id"] == str(asked.id)
    request_event = next(event for event in replay if event["type"] == "input.request")
    assert request_event["options"] == ["Approve", "Reject"] and request_event["kind"] == "approval"
    after = [event["type"] for event in selectors.events_after(conversation=conversation, after_seq=message_seq)]
    assert after == ["input.answered"]


def test_a_run_that_waited_too_long_is_ended_with_a_clear_message(conversation, settings):
    asked = waiting_run(conversation)
    InputRequest.objects.filter(id=asked.id).update(created_at=timezone.now() - timedelta(seconds=120))
    settings.CHORUS_INPUT_WAIT_MAX_SECONDS = 0
    assert human_input.expire_waiting_runs() == 0  # off by default

    settings.CHORUS_INPUT_WAIT_MAX_SECONDS = 60
    assert human_input.expire_waiting_runs() == 1

    run = Run.objects.get(id=asked.run_id)
    assert (run.status, run.error_code) == ("cancelled", "input_timeout")
    assert "Nobody answered" in run.error_detail


def test_a_waiting_run_does_not_count_against_the_active_runs_limit(conversation, owner, team, settings):
    settings.CHORUS_MAX_ACTIVE_RUNS_PER_USER = 1
    waiting_run(conversation)
    other = services.conversation_create(owner=owner, team=team)

    outcome = services.message_send(conversation=other, content="hello")

    assert outcome.run.status == "queued"


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_socket_frame_answers_and_refuses_clearly(conversation, owner):
    asked = await sync_to_async(waiting_run)(conversation)
    socket = await connect(conversation, owner)
    connected, _ = await socket.connect()
    assert connected
    hello = json.loads(await socket.receive_from())
    assert hello["active_run_id"] == str(asked.run_id)  # a waiting run is the conversation's open run

    await socket.send_to(text_data=json.dumps({"type": "input.response", "request_id": 7, "content": "x"}))
    assert json.loads(await socket.receive_from())["code"] == "invalid_frame"
    await socket.send_to(text_data=json.dumps({"type": "input.response", "request_id": str(asked.run_id),
                                               "content": "Approve"}))  # fmt: skip
    assert json.loads(await socket.receive_from())["code"] == "input_not_found"
    await socket.send_to(text_data=json.dumps({"type": "input.response", "request_id": str(asked.id),
                                               "content": "Approve"}))  # fmt: skip
    echoed = json.loads(await socket.receive_from())
    answered = json.loads(await socket.receive_from())
    assert (echoed["type"], echoed["message"]["content"]) == ("message", "Approve")
    assert answered == {"type": "input.answered", "seq": echoed["seq"] + 1, "run_id": str(asked.run_id),
                        "request_id": str(asked.id), "message_id": echoed["message"]["id"]}  # fmt: skip
    await socket.send_to(text_data=json.dumps({"type": "input.response", "request_id": str(asked.id),
                                               "content": "Approve"}))  # fmt: skip
    refused = json.loads(await socket.receive_from())
    while refused["type"] != "error":  # the run goes on meanwhile (the embedded worker): skip its events
        refused = json.loads(await socket.receive_from())
    assert refused["code"] == "input_already_answered"
    await socket.disconnect()


def test_the_shipped_teams_are_seeded(team):
    slugs = set(Team.objects.values_list("slug", flat=True))
    assert {"research-desk-approval", "travel-desk"} <= slugs


def test_the_admin_transcript_shows_the_question_the_answer_who_answered_and_when(
    client, api, staff, conversation, answer
):
    from django.urls import reverse

    asked = waiting_run(conversation)
    answer(conversation, asked.id, "Reject: not now")
    client.force_login(staff)

    page = client.get(reverse("admin:agents_app_conversation_change", args=[conversation.id])).content.decode()

    question = page[page.index(f'id="question-{asked.id}"') :]
    question = question[: question.index("</li>")]
    assert "analyst wants to run calculator with {}. Approve?" in question
    assert "Options: Approve, Reject" in question
    assert "Reject: not now" in question and f"by <strong>{conversation.owner.username}</strong>" in question
    answered_at = InputRequest.objects.get(id=asked.id).answered_at
    assert answered_at.strftime("%Y-%m-%d %H:%M:%S") in question
    # The answer sits in its run, after the question, not above the run as a new turn.
    assert page.index(f'id="run-{asked.run_id}"') < page.index(f'id="question-{asked.id}"')


def test_a_malformed_answer_is_refused_and_loses_nothing(api, conversation, answer):
    asked = waiting_run(conversation)
    url = f"/api/conversations/{conversation.id}/input/"

    missing = api.post(url, {"content": "Approve"}, content_type="application/json")
    empty = answer(conversation, asked.id, "   ")
    too_long = answer(conversation, asked.id, "x" * 100_000)

    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "invalid_body")
    assert (empty.status_code, empty.json()["error"]["code"]) == (400, "empty_message")
    assert too_long.json()["error"]["code"] == "message_too_long"
    assert Run.objects.get(id=asked.run_id).status == "waiting_for_input"
    assert answer(conversation, asked.id).status_code == 200  # the question still waits for its answer


def test_an_answer_whose_web_process_died_before_queueing_is_queued_by_the_poll(conversation, owner):
    asked = waiting_run(conversation)
    # Answered, committed, and then the web process died: its on-commit work (publish, queue) never ran.
    human_input.input_answer(conversation=conversation, user=owner, request_id=asked.id, content="Approve")
    assert Run.objects.get(id=asked.run_id).status == "waiting_for_input"
    assert human_input.queue_answered_runs() == 0  # within the grace period the web process may still do it

    InputRequest.objects.filter(id=asked.id).update(answered_at=timezone.now() - timedelta(seconds=30))
    human_input.poll_waiting_runs()

    run = Run.objects.get(id=asked.run_id)
    assert (run.status, run.announced) == ("queued", True)


def test_the_markdown_export_has_the_question_and_its_answer(conversation, answer):
    from agents_app.domain import export

    asked = waiting_run(conversation)
    answer(conversation, asked.id, "Reject: not now")

    text = export.export_markdown(Conversation.objects.filter(id=conversation.id))

    assert "#### Question from analyst (approval)" in text
    assert "analyst wants to run calculator with {}. Approve?" in text and "Options: Approve, Reject" in text
    assert f"Answered by {conversation.owner.username}" in text and "Reject: not now" in text


def test_the_chat_history_reads_in_order_around_an_answer(client, owner, conversation, answer):
    asked = waiting_run(conversation)
    reply = answer(conversation, asked.id, "Approve").json()["message"]
    seq = services.seq_reserve(conversation_id=conversation.id)
    Message.objects.create(conversation=conversation, run_id=asked.run_id, role="assistant", source="assistant",
                           content="391", is_final_answer=True, seq=seq)  # fmt: skip

    history = selectors.conversation_transcript(conversation=conversation)

    shape = [(e["kind"], e.get("continued", False)) for e in history]
    assert shape == [("message", False), ("run", False), ("message", False), ("run", True)]
    assert history[1]["question"]["request_id"] == str(asked.id) and history[1]["answers"] == []
    assert history[2]["message"]["id"] == reply["id"]
    assert [a["content"] for a in history[3]["answers"]] == ["391"]
    client.force_login(owner)
    page = client.get(f"/conversations/{conversation.id}/")
    assert page.status_code == 200 and 'data-input-request=""' in page.content.decode()  # answered: no card


def test_the_chat_page_carries_the_open_question_for_a_reload(client, owner, conversation):
    asked = waiting_run(conversation)
    client.force_login(owner)

    page = client.get(f"/conversations/{conversation.id}/")

    assert page.context["waiting_for_input"] is True
    assert json.loads(page.context["input_request"])["request_id"] == str(asked.id)
