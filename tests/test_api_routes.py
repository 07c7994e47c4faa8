"""The routes programs asked for: a paged, searchable list; rename; delete; cancel; one conversation; and every
refusal in the one JSON shape, with the protocol's codes."""

import pytest

from agents_app.domain import services
from agents_app.models import Conversation, Message, Run, Team

pytestmark = pytest.mark.django_db


def make(owner, team, title="", said=()):
    conversation = services.conversation_create(owner=owner, team=team, title=title)
    for text in said:
        seq = services.seq_reserve(conversation_id=conversation.id)
        Message.objects.create(conversation=conversation, role="user", source="user", content=text, seq=seq)
    return conversation


def test_the_list_pages_with_a_link_to_the_next_page(api, owner, team):
    made = [make(owner, team, title=f"c{i}") for i in range(5)]
    first = api.get("/api/conversations/?limit=2")
    assert [c["title"] for c in first.json()] == ["c4", "c3"]
    assert first["Link"] == '</api/conversations/?limit=2&offset=2>; rel="next"'
    second = api.get("/api/conversations/?limit=2&offset=2")
    third = api.get("/api/conversations/?limit=2&offset=4")
    assert [c["title"] for c in second.json()] == ["c2", "c1"] and [c["title"] for c in third.json()] == ["c0"]
    assert "Link" not in third
    assert len(api.get("/api/conversations/").json()) == len(made)


def test_the_list_searches_titles_and_message_text(api, owner, other_user, team):
    make(owner, team, title="Garden plans")
    make(owner, team, title="Taxes", said=["When do I plant the GARDEN tomatoes?"])
    make(owner, team, title="Other")
    make(other_user, team, title="Their garden")
    found = api.get("/api/conversations/?q=garden").json()
    assert sorted(c["title"] for c in found) == ["Garden plans", "Taxes"]
    assert api.get("/api/conversations/?q=nothing-like-this").json() == []
    paged = api.get("/api/conversations/?q=garden&limit=1")
    assert paged["Link"] == '</api/conversations/?limit=1&offset=1&q=garden>; rel="next"'


def test_the_search_does_not_see_hidden_steps(api, owner, team):
    desk = Team.objects.get(slug="research-desk")
    desk.steps_display = Team.StepsDisplay.HIDDEN
    desk.save()
    conversation = make(owner, desk, title="Desk")
    run = Run.objects.create(conversation=conversation, team=desk, status=Run.Status.SUCCEEDED)
    seq = services.seq_reserve(conversation_id=conversation.id)
    Message.objects.create(
        conversation=conversation, run=run, role="assistant", source="planner", content="a plan", seq=seq
    )
    assert api.get("/api/conversations/?q=plan").json() == []


@pytest.mark.parametrize(
    "query, code",
    [("limit=0", "invalid_query"), ("limit=201", "invalid_query"), ("offset=-1", "invalid_query"),
     ("limit=x", "invalid_query"), ("q=%00", "invalid_text"), ("q=" + "x" * 201, "invalid_query")],
)  # fmt: skip
def test_bad_list_parameters_are_refused(api, team, query, code):
    response = api.get(f"/api/conversations/?{query}")
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_one_conversation_renamed_then_deleted(api, owner, team):
    conversation = make(owner, team, title="Old", said=["hello"])
    url = f"/api/conversations/{conversation.id}/"
    assert api.get(url).json()["title"] == "Old"
    before = Conversation.objects.get().updated_at
    renamed = api.patch(url, {"title": "  New name  "}, content_type="application/json")
    assert renamed.status_code == 200 and renamed.json()["title"] == "New name"
    assert Conversation.objects.get().updated_at == before, "a rename does not move it up the list"
    assert api.delete(url).status_code == 204
    assert not Conversation.objects.exists() and not Message.objects.exists()
    assert api.get(url).status_code == 404 and api.delete(url).status_code == 404


@pytest.mark.parametrize(
    "body, code",
    [('{"title": 5}', "invalid_body"), ("{}", "invalid_body"), ("[]", "invalid_body"), ("nope", "invalid_json"),
     ('{"title": "x\\u0000y"}', "invalid_text")],
)  # fmt: skip
def test_a_bad_rename_is_refused(api, owner, team, body, code):
    conversation = make(owner, team, title="Kept")
    response = api.generic("PATCH", f"/api/conversations/{conversation.id}/", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert Conversation.objects.get().title == "Kept"


def test_a_conversation_that_is_answering_cannot_be_deleted(api, owner, team):
    conversation = make(owner, team)
    services.message_send(conversation=conversation, content="hi")
    response = api.delete(f"/api/conversations/{conversation.id}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "run_in_progress"
    assert Conversation.objects.exists()


def test_cancel_stops_a_queued_answer_and_says_when_nothing_runs(api, owner, team):
    conversation = make(owner, team)
    sent = services.message_send(conversation=conversation, content="hi")
    url = f"/api/conversations/{conversation.id}/cancel/"
    wrong = api.post(url, {"run_id": "not-this-one"}, content_type="application/json")
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "no_active_run"
    stopped = api.post(url, {"run_id": str(sent.run.id)}, content_type="application/json")
    assert stopped.status_code == 202 and stopped.json() == {"run_id": str(sent.run.id), "status": "cancelled"}
    assert Run.objects.get().status == Run.Status.CANCELLED
    again = api.post(url, content_type="application/json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_active_run"


def test_sending_keeps_its_answers_201_and_200_for_a_resend(api, owner, team):
    conversation = make(owner, team)
    url = f"/api/conversations/{conversation.id}/messages/"
    first = api.post(url, {"content": "hi", "client_id": "k1"}, content_type="application/json")
    again = api.post(url, {"content": "hi", "client_id": "k1"}, content_type="application/json")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json() and set(first.json()) == {"message", "run_id"}


@pytest.mark.parametrize(
    "body, code",
    [('{"content": 5}', "invalid_body"), ('{"content": "hi", "client_id": 7}', "invalid_client_id"),
     ('{"content": "   "}', "empty_message"), ("{}", "invalid_body")],
)  # fmt: skip
def test_send_refusals_keep_the_sockets_codes(api, owner, team, body, code):
    conversation = make(owner, team)
    response = api.generic("POST", f"/api/conversations/{conversation.id}/messages/", body,
                           content_type="application/json")  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_a_team_that_is_not_a_slug_is_an_unknown_team(api, team):
    response = api.post("/api/conversations/", '{"team": 5}', content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_team"


def test_methods_a_route_does_not_take_are_405_with_allow(api, owner, team):
    conversation = make(owner, team)
    response = api.put(f"/api/conversations/{conversation.id}/")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert set(response["Allow"].replace(" ", "").split(",")) == {"GET", "PATCH", "DELETE"}
