"""Pages and the JSON API: login on everything, nobody else's data, and safe rendering of model output."""

import json
import re

import pytest
from django.urls import reverse

from agents_app.domain import services
from agents_app.domain.rendering import render_markdown
from agents_app.models import Conversation, Message, Run, Team

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


def add_message(conversation, content, role="assistant", seq=None):
    seq = seq or services.seq_reserve(conversation_id=conversation.id)
    return Message.objects.create(conversation=conversation, role=role, source=role, content=content, seq=seq)


@pytest.mark.parametrize("name", ["conversation-list"])
def test_pages_send_strangers_to_the_login_page(client, name):
    response = client.get(reverse(name))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_the_chat_page_needs_a_login(client, conversation):
    response = client.get(reverse("conversation-detail", args=[conversation.id]))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


@pytest.mark.parametrize("path", ["/api/conversations/", "/api/teams/"])
def test_the_api_answers_401_without_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_the_messages_api_answers_401_without_a_login(client, conversation):
    assert client.get(f"/api/conversations/{conversation.id}/messages/").status_code == 401


def test_another_users_conversation_is_a_404_everywhere(client, other_user, conversation):
    add_message(conversation, "private words")
    client.force_login(other_user)
    assert client.get(reverse("conversation-detail", args=[conversation.id])).status_code == 404
    assert client.get(f"/api/conversations/{conversation.id}/messages/").status_code == 404
    listing = client.get("/api/conversations/").json()
    assert listing == []
    assert b"private words" not in client.get(reverse("conversation-list")).content


def test_login_with_the_real_form_reaches_the_conversation_list(client, owner):
    page = client.get(reverse("login"))
    assert page.status_code == 200
    response = client.post(reverse("login"), {"username": "owner", "password": "owner-password-1"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("conversation-list")
    assert b"Conversations" in response.content


def test_signup_creates_an_account_and_logs_in(client, team):
    response = client.post(
        reverse("signup"),
        {"username": "newcomer", "password1": "a-long-new-password-7", "password2": "a-long-new-password-7"},
    )
    assert response.status_code == 302
    assert client.get("/api/conversations/").status_code == 200


def test_signup_can_be_turned_off(client, settings):
    settings.CHORUS_SIGNUP_ENABLED = False
    assert client.get(reverse("signup")).status_code == 404


def test_the_new_conversation_form_opens_a_chat_with_the_chosen_team(owner_client, owner, team):
    response = owner_client.post(reverse("conversation-create"), {"team": team.pk})
    conversation = Conversation.objects.get(owner=owner)
    assert response.status_code == 302 and response.url == reverse("conversation-detail", args=[conversation.id])
    assert conversation.team == team


def test_api_creates_and_lists_conversations(owner_client, team):
    response = owner_client.post("/api/conversations/", data={"title": "Plans"}, content_type="application/json")
    assert response.status_code == 201
    created = response.json()
    assert created["title"] == "Plans" and created["team"] == "assistant" and created["id"]
    assert [c["id"] for c in owner_client.get("/api/conversations/").json()] == [created["id"]]


@pytest.mark.parametrize(
    "body, code",
    [("not json", "invalid_json"), ("[]", "invalid_body"), ('{"team": "nope"}', "unknown_team"),
     ('{"title": 5}', "invalid_body")],
)  # fmt: skip
def test_api_refuses_bad_bodies_with_a_clear_error(owner_client, team, body, code):
    response = owner_client.post("/api/conversations/", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert not Conversation.objects.exists()


def test_api_lists_enabled_teams_only(owner_client, team):
    Team.objects.filter(slug="writer-critic").update(enabled=False)
    teams = owner_client.get("/api/teams/").json()
    assert [t["slug"] for t in teams] == [
        "assistant",
        "automatic",
        "research-desk",
        "research-desk-approval",
        "travel-desk",
    ]
    assert all(t["name"] and t["description"] for t in teams)


def test_api_starts_a_conversation_with_the_chosen_team(owner_client, team):
    response = owner_client.post("/api/conversations/", data={"team": "research-desk"}, content_type="application/json")
    assert response.status_code == 201 and response.json()["team"] == "research-desk"
    Team.objects.filter(slug="writer-critic").update(enabled=False)
    refused = owner_client.post("/api/conversations/", data={"team": "writer-critic"}, content_type="application/json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_team"


def test_messages_api_returns_messages_in_seq_order_with_rendered_html(owner_client, conversation):
    add_message(conversation, "hi", role="user")
    add_message(conversation, "**bold** answer")
    messages = owner_client.get(f"/api/conversations/{conversation.id}/messages/").json()
    assert [m["content"] for m in messages] == ["hi", "**bold** answer"]
    assert messages[1]["html"] == "<p><strong>bold</strong> answer</p>"
    assert set(messages[1]) >= {"id", "run_id", "role", "source", "content", "html", "is_final_answer", "created_at"}


def test_the_chat_page_shows_the_whole_history(owner_client, conversation):
    add_message(conversation, "first question", role="user")
    add_message(conversation, "first *answer*")
    page = owner_client.get(reverse("conversation-detail", args=[conversation.id])).content.decode()
    assert "first question" in page and "<em>answer</em>" in page
    assert page.index("first question") < page.index("<em>answer</em>")


def test_model_output_cannot_inject_script(owner_client, conversation):
    add_message(conversation, 'Hi <script>alert(1)</script><img src=x onerror="alert(2)"> [x](javascript:alert(3))')
    page = owner_client.get(reverse("conversation-detail", args=[conversation.id])).content.decode()
    assert "<script>alert" not in page and "onerror" not in page and "javascript:" not in page


def test_rendering_highlights_code_and_drops_dangerous_html():
    html = render_markdown("```python\nprint('hi')\n```\n\n<iframe src=x></iframe><b onclick=x>b</b>")
    assert 'class="highlight"' in html
    assert "iframe" not in html and "onclick" not in html


def test_pages_carry_a_content_security_policy_and_no_inline_script(owner_client, conversation):
    response = owner_client.get(reverse("conversation-detail", args=[conversation.id]))
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", response.content.decode(), flags=re.S)
    assert scripts and all('src="' in attrs and body.strip() == "" for attrs, body in scripts)


def test_the_offline_model_is_announced_on_the_page(owner_client, settings):
    settings.CHORUS_OFFLINE_MODEL = True
    assert b"Offline model" in owner_client.get(reverse("conversation-list")).content
    settings.CHORUS_OFFLINE_MODEL = False
    assert b"Offline model" not in owner_client.get(reverse("conversation-list")).content


def test_health_check_answers_without_login(client):
    assert client.get("/healthz").content == b"ok"


def test_api_post_is_protected_by_csrf(owner, team):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner)
    response = strict.post("/api/conversations/", data=json.dumps({}), content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"


def test_api_errors_are_json(owner_client, other_user, team):
    theirs = services.conversation_create(owner=other_user, team=team)
    missing = owner_client.get(f"/api/conversations/{theirs.id}/messages/")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = owner_client.delete("/api/teams/")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_staff_export_transcripts_as_json(client, staff, conversation):
    add_message(conversation, "exported words", role="user")
    client.force_login(staff)
    response = client.post(
        reverse("admin:agents_app_conversation_changelist"),
        {"action": "export_transcripts", "_selected_action": [str(conversation.pk)]},
    )
    exported = json.loads(response.content)["conversations"]
    assert response["Content-Disposition"].startswith("attachment")
    assert exported[0]["id"] == str(conversation.id) and exported[0]["messages"][0]["content"] == "exported words"


def test_a_persons_own_words_are_shown_as_typed_not_run_dropped_or_reformatted(owner_client, conversation):
    add_message(conversation, "<b>hi</b> & <script>x</script>\nis 2*3 more than 4*5?\n\n**ok**", role="user")
    messages = owner_client.get(f"/api/conversations/{conversation.id}/messages/").json()
    assert messages[0]["html"] == (
        "<p>&lt;b&gt;hi&lt;/b&gt; &amp; &lt;script&gt;x&lt;/script&gt;<br>is 2*3 more than 4*5?</p><p>**ok**</p>"
    )


def test_a_conversation_keeps_the_name_of_its_first_message(conversation):
    first = services.message_send(conversation=conversation, content="What is a haiku?")
    Run.objects.filter(id=first.run.id).update(status=Run.Status.SUCCEEDED)
    # The same object a socket holds since it connected, its title still empty.
    services.message_send(conversation=conversation, content="And a limerick?")
    conversation.refresh_from_db()
    assert conversation.title == "What is a haiku?"
    assert conversation.last_seq == 3  # the first message, its conversation.updated (the naming), the second
