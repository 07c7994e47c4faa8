"""Personal API tokens: made on the settings page or by `manage.py api_token`, shown once, stored hashed, taken by
every API route, stream and socket, refused at once when revoked, and read-only when made so."""

import asyncio
import hashlib
import io
import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from agents_app.domain import services
from agents_app.models import ApiToken, Conversation, Message, Run
from agents_app.web import tokens
from agents_app.web.consumers import CLOSE_UNAUTHENTICATED

LONG_WAIT = 20  # seconds: a bound on waits, not a speed claim


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def token(owner):
    return tokens.token_create(user=owner, name="script")[1]


@pytest.fixture
def read_only_token(owner):
    return tokens.token_create(user=owner, name="dashboard", read_only=True)[1]


@pytest.fixture
def program():
    """A client as a program is: no cookie, and Django's CSRF check enforced as for any request."""
    return Client(enforce_csrf_checks=True)


# --- Made, shown once, stored hashed --------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_a_new_token_once_and_stores_only_its_hash(client, owner):
    client.force_login(owner)
    response = client.post(reverse("settings-tokens"), {"name": "laptop script"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    assert secret.startswith("chorus_") and len(secret) > 40 and secret in response.content.decode()
    stored = ApiToken.objects.get(user=owner)
    assert stored.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (stored.name, stored.read_only, stored.prefix) == ("laptop script", False, secret[:12])
    assert secret not in json.dumps(list(ApiToken.objects.values()), default=str)
    listed = client.get(reverse("settings-tokens")).content.decode()
    assert "laptop script" in listed and stored.prefix in listed and secret not in listed


@pytest.mark.django_db
def test_the_settings_page_makes_read_only_tokens_and_needs_a_login(client, owner):
    response = client.get(reverse("settings-tokens"))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    client.force_login(owner)
    client.post(reverse("settings-tokens"), {"name": "dashboard", "read_only": "on"})
    assert ApiToken.objects.get(user=owner).read_only


@pytest.mark.django_db
def test_a_nameless_token_is_refused_with_the_form_shown_again(client, owner):
    client.force_login(owner)
    response = client.post(reverse("settings-tokens"), {"name": "   "})
    assert response.status_code == 200 and response.context["secret"] is None
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_a_person_revokes_their_token_and_not_someone_elses(client, owner, other_user, token):
    theirs, _ = tokens.token_create(user=other_user, name="theirs")
    client.force_login(owner)
    assert client.post(reverse("settings-token-revoke", args=[theirs.id])).status_code == 404
    mine = ApiToken.objects.get(user=owner)
    response = client.post(reverse("settings-token-revoke", args=[mine.id]), follow=True)
    assert response.redirect_chain[-1][0] == reverse("settings-tokens")
    assert "revoked" in response.content.decode()
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.revoked_at is not None and theirs.revoked_at is None


@pytest.mark.django_db
def test_the_command_creates_lists_and_revokes(owner):
    out, err = io.StringIO(), io.StringIO()
    call_command("api_token", "create", "owner", "--name", "CI", "--read-only", stdout=out, stderr=err)
    secret = out.getvalue().strip()
    token = ApiToken.objects.get(user=owner)
    assert token.token_hash == tokens.hash_token(secret) and token.read_only and "shown only now" in err.getvalue()
    listing = io.StringIO()
    call_command("api_token", "list", "owner", stdout=listing)
    assert str(token.id) in listing.getvalue() and "CI" in listing.getvalue() and secret not in listing.getvalue()
    call_command("api_token", "revoke", "owner", str(token.id), stdout=io.StringIO())
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert tokens.token_authenticate(secret) is None


# --- Every API route ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_token_authenticates_every_api_route_without_csrf(program, owner, token, team):
    headers = bearer(token)
    created = program.post("/api/conversations/", {"title": "By token"}, content_type="application/json",
                           headers=headers)  # fmt: skip
    assert created.status_code == 201, created.content
    conversation = created.json()["id"]
    base = f"/api/conversations/{conversation}/"
    assert program.get("/api/teams/", headers=headers).status_code == 200
    assert [c["id"] for c in program.get("/api/conversations/", headers=headers).json()] == [conversation]
    assert program.get(base, headers=headers).json()["title"] == "By token"
    renamed = program.patch(base, {"title": "Renamed"}, content_type="application/json", headers=headers)
    assert renamed.status_code == 200 and renamed.json()["title"] == "Renamed"
    sent = program.post(base + "messages/", {"content": "hi"}, content_type="application/json", headers=headers)
    assert sent.status_code == 201 and sent.json()["message"]["content"] == "hi"
    assert [m["content"] for m in program.get(base + "messages/", headers=headers).json()] == ["hi"]
    cancelled = program.post(base + "cancel/", content_type="application/json", headers=headers)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert program.delete(base, headers=headers).status_code == 204
    assert not Conversation.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("secret", ["chorus_not-a-token", "something-else", "chorus_" + "x" * 300])
def test_an_unknown_token_is_401_invalid_token(program, team, secret):
    response = program.get("/api/teams/", headers=bearer(secret))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_token"
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_a_revoked_token_is_refused_by_the_next_request(program, owner, token, team):
    assert program.get("/api/teams/", headers=bearer(token)).status_code == 200
    tokens.token_revoke(user=owner, token_id=ApiToken.objects.get().id)
    response = program.get("/api/teams/", headers=bearer(token))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_token"


@pytest.mark.django_db
def test_a_deactivated_persons_token_is_refused(program, owner, token, team):
    owner.is_active = False
    owner.save()
    assert program.get("/api/teams/", headers=bearer(token)).status_code == 401


@pytest.mark.django_db
def test_without_a_token_or_session_the_api_is_401_not_authenticated(program, team):
    response = program.get("/api/conversations/")
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.django_db
def test_a_token_does_not_open_the_pages(program, token):
    response = program.get(reverse("conversation-list"), headers=bearer(token))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


@pytest.mark.django_db
def test_last_used_is_written_at_most_once_a_minute(program, token, team):
    row = ApiToken.objects.get()
    assert row.last_used_at is None
    program.get("/api/teams/", headers=bearer(token))
    row.refresh_from_db()
    first = row.last_used_at
    assert first is not None
    recently = timezone.now() - timedelta(seconds=30)
    ApiToken.objects.filter(id=row.id).update(last_used_at=recently)
    program.get("/api/teams/", headers=bearer(token))
    row.refresh_from_db()
    assert row.last_used_at == recently, "a use within the minute writes nothing"
    ApiToken.objects.filter(id=row.id).update(last_used_at=timezone.now() - timedelta(seconds=61))
    program.get("/api/teams/", headers=bearer(token))
    row.refresh_from_db()
    assert row.last_used_at > recently


# --- Sessions keep CSRF ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_session_writes_still_need_the_csrf_token(owner, conversation):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner)
    base = f"/api/conversations/{conversation.id}/"
    refused = [
        strict.patch(base, {"title": "x"}, content_type="application/json"),
        strict.delete(base),
        strict.post(base + "cancel/", content_type="application/json"),
        strict.post(base + "messages/", {"content": "hi"}, content_type="application/json"),
        strict.post("/api/agui/", {"threadId": str(conversation.id), "runId": "r", "messages": [], "tools": [],
                                   "context": [], "state": {}, "forwardedProps": {}}, content_type="application/json"),
    ]  # fmt: skip
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(403, "csrf_failed")] * len(refused)
    strict.get("/accounts/login/")
    csrf = strict.cookies["csrftoken"].value
    allowed = strict.patch(base, {"title": "ok"}, content_type="application/json", headers={"X-CSRFToken": csrf})
    assert allowed.status_code == 200
    assert Conversation.objects.get().title == "ok" and not Message.objects.exists()


# --- Read-only tokens -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_read_only_token_reads_and_changes_nothing(program, owner, read_only_token, conversation):
    services.message_send(conversation=conversation, content="earlier")
    headers = bearer(read_only_token)
    base = f"/api/conversations/{conversation.id}/"
    assert program.get("/api/conversations/", headers=headers).status_code == 200
    assert program.get(base + "messages/", headers=headers).status_code == 200
    agui = {"threadId": str(conversation.id), "runId": "r1", "state": {}, "tools": [], "context": [],
            "forwardedProps": {}, "messages": [{"id": "m1", "role": "user", "content": "hello"}]}  # fmt: skip
    refused = [
        program.post("/api/conversations/", {}, content_type="application/json", headers=headers),
        program.patch(base, {"title": "x"}, content_type="application/json", headers=headers),
        program.delete(base, headers=headers),
        program.post(base + "messages/", {"content": "hi"}, content_type="application/json", headers=headers),
        program.post(base + "cancel/", content_type="application/json", headers=headers),
        program.post("/api/agui/", agui, content_type="application/json", headers=headers),
        program.post("/api/agui/", {**agui, "threadId": "a-new-thread"}, content_type="application/json",
                     headers=headers),
    ]  # fmt: skip
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(403, "read_only_token")] * len(refused)
    conversation.refresh_from_db()
    assert Conversation.objects.count() == 1 and conversation.title == "earlier"
    assert list(Message.objects.values_list("content", flat=True)) == ["earlier"]
    assert Run.objects.get().status == Run.Status.QUEUED


# --- Another person's conversation ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_another_persons_conversation_is_a_404_on_every_route_to_a_token(program, other_user, conversation):
    _, theirs = tokens.token_create(user=other_user, name="other")
    headers = bearer(theirs)
    base = f"/api/conversations/{conversation.id}/"
    answers = [
        program.get(base, headers=headers),
        program.patch(base, {"title": "x"}, content_type="application/json", headers=headers),
        program.delete(base, headers=headers),
        program.get(base + "messages/", headers=headers),
        program.post(base + "messages/", {"content": "hi"}, content_type="application/json", headers=headers),
        program.get(base + "events/", headers=headers),
        program.post(base + "cancel/", content_type="application/json", headers=headers),
        program.post("/api/agui/", {"threadId": str(conversation.id), "runId": "r", "state": {}, "tools": [],
                                    "context": [], "forwardedProps": {},
                                    "messages": [{"id": "m", "role": "user", "content": "hi"}]},
                     content_type="application/json", headers=headers),
    ]  # fmt: skip
    assert [(r.status_code, r.json()["error"]["code"]) for r in answers] == [(404, "not_found")] * len(answers)
    assert program.get("/api/conversations/", headers=headers).json() == []
    assert Conversation.objects.get().title == "" and not Message.objects.exists()


# --- The socket and the streams -------------------------------------------------------------------------------


async def open_socket(conversation, headers):
    from chatproject.asgi import application

    return WebsocketCommunicator(application, f"/ws/conversations/{conversation.id}/", headers=headers)


async def close_code(communicator) -> tuple[int, list[dict]]:
    frames = []
    while True:
        output = await communicator.receive_output(timeout=LONG_WAIT)
        if output["type"] == "websocket.close":
            return output.get("code"), frames
        frames.append(json.loads(output["text"]))


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_socket_opens_with_a_bearer_header_and_no_origin(conversation, token):
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {token}".encode())])
    ok, _ = await communicator.connect()
    assert ok
    assert (await communicator.receive_json_from())["type"] == "hello"
    await communicator.send_json_to({"type": "cancel"})
    assert (await communicator.receive_json_from())["code"] == "no_active_run"
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("secret", ["chorus_unknown", "revoked"])
async def test_a_socket_with_a_bad_token_is_refused(conversation, owner, secret):
    if secret == "revoked":
        token, secret = await sync_to_async(tokens.token_create)(user=owner, name="gone")
        await sync_to_async(tokens.token_revoke)(user=owner, token_id=token.id)
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {secret}".encode())])
    ok, _ = await communicator.connect()
    assert not ok
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_socket_of_another_persons_token_is_refused(conversation, other_user):
    _, theirs = await sync_to_async(tokens.token_create)(user=other_user, name="other")
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {theirs}".encode())])
    assert not (await communicator.connect())[0]
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_read_only_socket_reads_but_cannot_send_or_stop(conversation, read_only_token):
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {read_only_token}".encode())])
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()  # hello
    for frame in ({"type": "send", "content": "hi"}, {"type": "cancel"}):
        await communicator.send_json_to(frame)
        assert (await communicator.receive_json_from())["code"] == "read_only_token"
    await communicator.send_json_to({"type": "resume", "after_seq": 0})  # reading is allowed
    assert await communicator.receive_nothing(timeout=0.5)
    await communicator.disconnect()
    assert not await Message.objects.aexists()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_revoking_a_token_closes_its_open_socket_at_once(settings, conversation, owner, token):
    settings.CHORUS_SESSION_CHECK_SECONDS = 3600  # no periodic check: the revocation itself closes it
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {token}".encode())])
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()  # hello
    row = await ApiToken.objects.aget()
    await sync_to_async(tokens.token_revoke)(user=owner, token_id=row.id)
    code, frames = await close_code(communicator)
    assert code == CLOSE_UNAUTHENTICATED and frames == []
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_revoked_tokens_socket_starts_nothing_with_its_next_frame(settings, conversation, token):
    settings.CHORUS_SESSION_CHECK_SECONDS = 3600
    communicator = await open_socket(conversation, [(b"authorization", f"Bearer {token}".encode())])
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()  # hello
    # An UPDATE sends no signal: only the frame's own check can find it out.
    await ApiToken.objects.all().aupdate(revoked_at=timezone.now())
    await communicator.send_json_to({"type": "send", "content": "hi"})
    code, frames = await close_code(communicator)
    assert code == CLOSE_UNAUTHENTICATED and frames == []
    await communicator.disconnect()
    assert not await Message.objects.aexists()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_revoking_a_token_ends_its_open_event_stream(settings, conversation, owner, token):
    settings.CHORUS_SESSION_CHECK_SECONDS = 3600
    await sync_to_async(services.message_send)(conversation=conversation, content="earlier")
    client = AsyncClient()
    response = await client.get(f"/api/conversations/{conversation.id}/events/", headers=bearer(token))
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    chunks = aiter(response.streaming_content)
    assert b"event: message" in await asyncio.wait_for(anext(chunks), LONG_WAIT)
    assert b"event: conversation.updated" in await asyncio.wait_for(anext(chunks), LONG_WAIT)  # its title
    row = await ApiToken.objects.aget()
    await sync_to_async(tokens.token_revoke)(user=owner, token_id=row.id)

    async def rest():
        return [chunk async for chunk in chunks if not chunk.startswith(b": keep-alive")]

    assert await asyncio.wait_for(rest(), LONG_WAIT) == []
    after = await client.get(f"/api/conversations/{conversation.id}/events/", headers=bearer(token))
    assert after.status_code == 401 and json.loads(after.content)["error"]["code"] == "invalid_token"
