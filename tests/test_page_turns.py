"""Replacing the last turn (edit, regenerate, retry) and live titles: what the page shows is what the team
remembers, and every socket (live or resuming) hears of it."""

import pytest

from agents_app.domain import selectors, services, turns
from agents_app.models import Conversation, Message, Run
from agents_app.web import tokens

pytestmark = pytest.mark.django_db


def answered(conversation, text: str, answer: str, state: dict) -> tuple[Message, Message]:
    """A turn whose run succeeded: the person's message, the team's answer, and the memory the team saved."""
    outcome = services.message_send(conversation=conversation, content=text)
    seq = services.seq_reserve(conversation_id=conversation.id)
    reply = Message.objects.create(
        conversation=conversation, run=outcome.run, role="assistant", source="assistant", content=answer,
        is_final_answer=True, seq=seq,
    )  # fmt: skip
    Run.objects.filter(id=outcome.run.id).update(status=Run.Status.SUCCEEDED)
    Conversation.objects.filter(id=conversation.id).update(team_state=state)
    conversation.refresh_from_db()
    return outcome.message, reply


def test_it_replaces_the_last_turn_and_the_team_forgets_it(conversation):
    answered(conversation, "first question", "first answer", {"turns": 1})
    old, old_reply = answered(conversation, "second question", "second answer", {"turns": 2})

    outcome = turns.turn_replace(conversation=conversation, content="second question, edited")

    conversation.refresh_from_db()
    assert conversation.team_state == {"turns": 1}, "the team's memory is back to before the replaced turn"
    shown = [m.content for m in selectors.message_list_for_conversation(conversation=conversation)]
    assert shown == ["first question", "first answer", "second question, edited"]
    old.refresh_from_db()
    old_reply.refresh_from_db()
    assert old.replaced_seq and old_reply.replaced_seq == old.replaced_seq, "kept for review, marked replaced"
    assert outcome.message.seq > old.replaced_seq and outcome.run.status == Run.Status.QUEUED
    # The new turn can be replaced in its turn: its snapshot is the restored memory.
    assert conversation.state_before == {"turns": 1} and conversation.state_before_seq == outcome.message.seq


def test_a_resuming_socket_hears_the_turn_was_replaced(conversation):
    old, _reply = answered(conversation, "a question", "an answer", {"turns": 1})
    turns.turn_replace(conversation=conversation)
    replay = selectors.events_after(conversation=conversation, after_seq=old.seq)
    assert [e["seq"] for e in replay] == sorted(e["seq"] for e in replay)
    replay = [event for event in replay if event["type"] != "conversation.updated"]  # named anew: tested below
    kinds = [event["type"] for event in replay]
    assert kinds[0] == "turn.replaced" and kinds[1] == "message"
    assert replay[0]["message_id"] == str(old.id) and replay[0]["run_id"] == str(old.run_id)
    assert replay[1]["message"]["content"] == "a question", "regenerate sends the same text again"


def test_a_replaced_turn_is_not_found_by_search(owner, conversation):
    answered(conversation, "about zebras", "zebras are striped", {"turns": 1})
    turns.turn_replace(conversation=conversation, content="about lions")
    assert list(selectors.conversation_list_for_user(user=owner, query="zebra")) == []
    assert list(selectors.conversation_list_for_user(user=owner, query="lions")) == [conversation]
    conversation.refresh_from_db()
    assert conversation.title == "about lions", "the title the replaced message gave is given by the new one"


def test_it_refuses_while_the_team_answers(conversation):
    services.message_send(conversation=conversation, content="still answering")
    with pytest.raises(services.ChatError) as refused:
        turns.turn_replace(conversation=conversation, content="edited")
    assert refused.value.code == "run_in_progress"


def test_it_refuses_a_turn_the_team_remembers_without_the_memory_before_it(conversation):
    old, _reply = answered(conversation, "old question", "old answer", {"turns": 1})
    Conversation.objects.filter(id=conversation.id).update(state_before_seq=None)  # sent before Chorus kept it
    with pytest.raises(services.ChatError) as refused:
        turns.turn_replace(conversation=conversation)
    assert refused.value.code == "cannot_replace"
    old.refresh_from_db()
    assert old.replaced_seq is None, "nothing changed"


def test_a_failed_turn_is_retried_with_the_memory_it_left(conversation):
    outcome = services.message_send(conversation=conversation, content="this fails")
    Run.objects.filter(id=outcome.run.id).update(status=Run.Status.FAILED, error_code="model_error")
    Conversation.objects.filter(id=conversation.id).update(state_before_seq=None)  # a failed run saves no memory
    retried = turns.turn_replace(conversation=conversation)
    assert retried.message.content == "this fails" and retried.run.id != outcome.run.id


def test_the_api_replaces_the_owners_last_turn_only(api, client, conversation, other_user):
    answered(conversation, "question", "answer", {"turns": 1})
    stranger = client.__class__()
    stranger.defaults["HTTP_AUTHORIZATION"] = f"Bearer {tokens.token_create(user=other_user, name='t')[1]}"
    url = f"/api/conversations/{conversation.id}/resend/"
    assert stranger.post(url, {}, content_type="application/json").status_code == 404
    made = api.post(url, {"content": "question, edited"}, content_type="application/json")
    assert made.status_code == 201, made.content
    assert made.json()["message"]["content"] == "question, edited"
    again = api.post(url, {}, content_type="application/json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_in_progress"
    empty = Conversation.objects.create(owner=conversation.owner, team=conversation.team)
    nothing = api.post(f"/api/conversations/{empty.id}/resend/", {}, content_type="application/json")
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_replace"


def test_the_first_message_names_the_conversation_with_an_event(conversation):
    outcome = services.message_send(conversation=conversation, content="Plan a trip to Lisbon")
    conversation.refresh_from_db()
    assert conversation.title == "Plan a trip to Lisbon" and conversation.title_seq == outcome.message.seq + 1
    replay = selectors.events_after(conversation=conversation, after_seq=0)
    named = [e for e in replay if e["type"] == "conversation.updated"]
    assert named == [{"type": "conversation.updated", "seq": outcome.message.seq + 1, "title": "Plan a trip to Lisbon"}]


def test_a_rename_is_an_event_too(api, conversation):
    renamed = api.patch(f"/api/conversations/{conversation.id}/", {"title": "Trip"}, content_type="application/json")
    assert renamed.status_code == 200
    conversation.refresh_from_db()
    replay = selectors.events_after(conversation=conversation, after_seq=0)
    assert replay == [{"type": "conversation.updated", "seq": conversation.title_seq, "title": "Trip"}]
    assert conversation.last_seq == conversation.title_seq


def test_an_answer_to_the_teams_question_goes_with_the_turn_it_answered(conversation):
    trigger, _reply = answered(conversation, "Book a train", "Booked.", {"turns": 1})
    seq = services.seq_reserve(conversation_id=conversation.id)
    answer = Message.objects.create(conversation=conversation, run_id=trigger.run_id, role="user", source="user",
                                    content="Friday", seq=seq)  # fmt: skip
    assert turns.last_turn_message(conversation=conversation) == trigger, "the message that started the run"
    outcome = turns.turn_replace(conversation=conversation)
    answer.refresh_from_db()
    assert answer.replaced_seq is not None and outcome.message.content == "Book a train"
    shown = [m.content for m in selectors.message_list_for_conversation(conversation=conversation)]
    assert shown == ["Book a train"]
