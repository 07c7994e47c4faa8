"""What the chat page stores beyond messages: feedback on answers (and the admin's view of it), and read-only
share links that open one conversation to anyone with the link, and nothing else."""

import pytest

from agents_app.domain import services, sharing, turns
from agents_app.models import Feedback, Message, Run, ShareLink

pytestmark = pytest.mark.django_db


def said(conversation, content, role="assistant", final=True) -> Message:
    seq = services.seq_reserve(conversation_id=conversation.id)
    return Message.objects.create(
        conversation=conversation, role=role, source=role, content=content, seq=seq, is_final_answer=final
    )


def feedback_url(message) -> str:
    return f"/api/conversations/{message.conversation_id}/messages/{message.id}/feedback/"


def test_it_records_replaces_and_takes_back_a_rating(api, owner, conversation):
    answer = said(conversation, "42")
    first = api.put(feedback_url(answer), {"rating": -1}, content_type="application/json")
    assert first.status_code == 200 and first.json()["rating"] == -1
    again = api.put(feedback_url(answer), {"rating": 1, "comment": " Spot on "}, content_type="application/json")
    assert again.json() == {"message_id": str(answer.id), "rating": 1, "comment": "Spot on"}
    assert Feedback.objects.filter(message=answer, user=owner).count() == 1
    assert api.delete(feedback_url(answer)).status_code == 204
    assert not Feedback.objects.exists()


@pytest.mark.parametrize(
    ("body", "code"),
    [({"rating": 0}, "invalid_body"), ({"rating": 1, "comment": "x" * 2001}, "comment_too_long"), ({}, "invalid_body")],
)
def test_a_bad_rating_is_refused(api, conversation, body, code):
    answer = said(conversation, "42")
    refused = api.put(feedback_url(answer), body, content_type="application/json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == code
    assert not Feedback.objects.exists()


def test_the_persons_own_message_takes_no_rating(api, conversation):
    mine = said(conversation, "hello", role="user", final=False)
    refused = api.put(feedback_url(mine), {"rating": 1}, content_type="application/json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_an_answer"


def test_a_stranger_cannot_rate_or_see_anothers_answer(client, other_user, conversation):
    answer = said(conversation, "42")
    client.force_login(other_user)
    assert client.put(feedback_url(answer), {"rating": 1}, content_type="application/json").status_code == 404


def test_staff_see_feedback_in_the_admin(client, staff, owner, conversation):
    answer = said(conversation, "The capital of France is Lyon.")
    Feedback.objects.create(message=answer, user=owner, rating=-1, comment="Wrong capital")
    client.force_login(staff)
    listing = client.get("/admin/agents_app/feedback/")
    assert listing.status_code == 200
    assert b"Wrong capital" in listing.content and b"The capital of France is Lyon." in listing.content
    assert client.get("/admin/agents_app/feedback/add/").status_code == 403, "written by people, never by staff"


def test_a_share_link_opens_the_conversation_read_only_to_anyone(api, client, owner, team, conversation):
    said(conversation, "What is a haiku?", role="user", final=False)
    said(conversation, "Five, seven, five.")
    private = services.conversation_create(owner=owner, team=team, title="My private plans")
    made = api.post(f"/api/conversations/{conversation.id}/share-links/", content_type="application/json")
    assert made.status_code == 201
    url = made.json()["url"]

    anonymous = client.__class__()
    page = anonymous.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "Five, seven, five." in text and "What is a haiku?" in text
    assert "My private plans" not in text and str(private.id) not in text, "nothing else of the owner's"
    assert "chat.js" not in text and "composer" not in text, "read-only: no socket, no composer"
    assert page["X-Robots-Tag"] == "noindex"
    # The link opens this page only: the socket, the API and the other pages still want a login.
    assert anonymous.get(f"/api/conversations/{conversation.id}/messages/").status_code == 401
    assert anonymous.get(f"/conversations/{conversation.id}/").status_code == 302
    assert ShareLink.objects.get().revoked_at is None and "secret" not in str(made.json()).lower()


def test_a_wrong_secret_or_a_revoked_link_is_a_404(api, client, conversation):
    link = sharing.share_link_create(conversation=conversation)
    assert client.get(f"/share/{link.id}/{'0' * 40}/").status_code == 404
    assert client.get(sharing.share_path(link)).status_code == 200
    listed = api.get(f"/api/conversations/{conversation.id}/share-links/").json()
    assert [item["id"] for item in listed] == [str(link.id)]
    assert api.delete(f"/api/conversations/{conversation.id}/share-links/{link.id}/").status_code == 204
    assert client.get(sharing.share_path(link)).status_code == 404
    assert api.get(f"/api/conversations/{conversation.id}/share-links/").json() == []


def test_only_the_owner_shares_or_revokes(client, other_user, conversation):
    link = sharing.share_link_create(conversation=conversation)
    client.force_login(other_user)
    assert (
        client.post(f"/api/conversations/{conversation.id}/share-links/", content_type="application/json").status_code
        == 404
    )
    assert client.delete(f"/api/conversations/{conversation.id}/share-links/{link.id}/").status_code == 404
    assert ShareLink.objects.get().revoked_at is None


def test_the_secret_depends_on_the_deployments_key(settings, conversation):
    link = sharing.share_link_create(conversation=conversation)
    before = sharing.share_secret(link.id)
    settings.SECRET_KEY = "another-deployment-key-" + "x" * 40
    assert sharing.share_secret(link.id) != before


def test_the_admin_transcript_marks_a_replaced_turn(client, staff, conversation):
    services.message_send(conversation=conversation, content="first try")
    Run.objects.filter(conversation=conversation).update(status=Run.Status.FAILED)
    turns.turn_replace(conversation=conversation, content="second try")
    client.force_login(staff)
    page = client.get(f"/admin/agents_app/conversation/{conversation.id}/change/").content.decode()
    assert "first try" in page and "second try" in page, "the admin keeps every turn"
    assert page.count("replaced by the person") == 1
