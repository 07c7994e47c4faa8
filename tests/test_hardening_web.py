"""Issue 18, points 3, 5, 6, 7 and 8, each tested the way the probe found it: sockets and streams that outlived
their session, numbers nothing bounded, text no database stores, an Origin check of the host only, and model
output that borrowed the page's classes.

In-process through the real ASGI application (WebsocketCommunicator, Django's clients), and through a real
daphne, worker and Redis where the probe used them (the `integration` tests)."""

import asyncio
import json
from datetime import timedelta

import aiohttp
import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.test import AsyncClient, Client
from django.utils import timezone

from agents_app.domain import services
from agents_app.domain.rendering import render_markdown
from agents_app.domain.validation import MAX_SEQ, parse_seq, storable
from agents_app.models import Conversation, Message, Run
from agents_app.web.consumers import CLOSE_UNAUTHENTICATED
from tests.support import session_cookie
from tests.test_sse import csrf_headers, logged_in_session, read_events

HOST = "127.0.0.1:8000"
LONG_WAIT = 20  # seconds: a bound on waits, not a speed claim


async def open_socket(conversation, user=None, origin="http://127.0.0.1", host=None, query="", headers=()):
    """A WebsocketCommunicator on the real ASGI application; returns it and the session key of its cookie."""
    from chatproject.asgi import application

    sent = [(b"origin", origin.encode())] if origin else []
    if host:
        sent.append((b"host", host.encode()))
    key = None
    if user is not None:
        key = await sync_to_async(session_cookie)(user)
        sent.append((b"cookie", f"sessionid={key}".encode()))
    sent += list(headers)
    return WebsocketCommunicator(application, f"/ws/conversations/{conversation.id}/{query}", headers=sent), key


async def connected(communicator) -> dict:
    ok, _ = await communicator.connect()
    assert ok
    hello = await communicator.receive_json_from()
    assert hello["type"] == "hello"
    return hello


async def close_code(communicator, timeout: float = LONG_WAIT) -> tuple[int, list[dict]]:
    """Read until the server closes the socket: its close code, and the frames that came before."""
    frames = []
    while True:
        output = await communicator.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            return output.get("code"), frames
        frames.append(json.loads(output["text"]))


async def still_usable(communicator) -> None:
    await communicator.send_json_to({"type": "cancel"})
    assert (await communicator.receive_json_from())["code"] == "no_active_run"


def add_message(conversation, content, role="assistant"):
    seq = services.seq_reserve(conversation_id=conversation.id)
    return Message.objects.create(conversation=conversation, role=role, source=role, content=content, seq=seq)


# --- 3. Streams outlive the session ---------------------------------------------------------------------------


def _delete_session(user, key):
    Session.objects.filter(session_key=key).delete()


def _expire_session(user, key):
    Session.objects.filter(session_key=key).update(expire_date=timezone.now() - timedelta(seconds=1))


def _change_password(user, key):
    user.set_password("a-brand-new-password-9")
    user.save()


def _deactivate(user, key):
    user.is_active = False
    user.save()


ENDINGS = {
    "session-deleted": _delete_session,
    "session-expired": _expire_session,
    "password-changed": _change_password,
    "user-deactivated": _deactivate,
}


@pytest.fixture
def quick_checks(settings):
    settings.CHORUS_SESSION_CHECK_SECONDS = 0.2
    return settings


@pytest.fixture
def slow_checks(settings):
    """Checks too rare to matter within a test: what happens comes from elsewhere (a frame, a signal)."""
    settings.CHORUS_SESSION_CHECK_SECONDS = 3600
    return settings


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
async def test_an_open_socket_closes_4401_when_its_session_ends(quick_checks, conversation, owner, ending):
    communicator, key = await open_socket(conversation, owner)
    await connected(communicator)
    await sync_to_async(ENDINGS[ending])(owner, key)
    code, frames = await close_code(communicator)
    assert code == CLOSE_UNAUTHENTICATED and frames == []
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_only_the_ended_sessions_socket_closes(quick_checks, conversation, owner):
    ended, ended_key = await open_socket(conversation, owner)
    other, _ = await open_socket(conversation, owner)  # the same person, logged in elsewhere
    await connected(ended)
    await connected(other)
    await sync_to_async(_delete_session)(owner, ended_key)
    assert (await close_code(ended))[0] == CLOSE_UNAUTHENTICATED
    await asyncio.sleep(1)  # several checks
    await still_usable(other)
    await other.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", ["password-changed", "user-deactivated"])
async def test_a_change_to_the_user_closes_their_sockets_in_this_process_at_once(
    slow_checks, conversation, owner, ending
):
    communicator, key = await open_socket(conversation, owner)
    await connected(communicator)
    await sync_to_async(ENDINGS[ending])(owner, key)  # the user's post_save signal: no waiting for a check
    assert (await close_code(communicator))[0] == CLOSE_UNAUTHENTICATED
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_deactivated_user_stops_receiving_an_answer_mid_stream(quick_checks, conversation, owner, model):
    communicator, _ = await open_socket(conversation, owner)
    await connected(communicator)
    await communicator.send_json_to({"type": "send", "content": "long [[tokens:120]] [[tps:20]]"})
    while (await communicator.receive_json_from(timeout=LONG_WAIT))["type"] != "token":
        pass
    await sync_to_async(_deactivate)(owner, None)
    code, frames = await close_code(communicator)
    assert code == CLOSE_UNAUTHENTICATED
    assert "run.finished" not in [f["type"] for f in frames], "the socket closed before the answer ended"
    assert await communicator.receive_nothing(timeout=1), "nothing after the close"
    await communicator.disconnect()
    # The run goes on without its socket (as always): let it end before the test's database is emptied.
    for _ in range(LONG_WAIT * 10):
        if not await Run.objects.filter(status__in=Run.ACTIVE_STATUSES).aexists():
            break
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("frame", [{"type": "send", "content": "hi"}, {"type": "cancel"}], ids=["send", "cancel"])
async def test_a_frame_that_starts_work_checks_the_user_first(slow_checks, conversation, owner, frame):
    communicator, _ = await open_socket(conversation, owner)
    await connected(communicator)
    # An UPDATE sends no signal: only the frame's own check can find it out in time.
    await type(owner).objects.filter(pk=owner.pk).aupdate(is_active=False)
    await communicator.send_json_to(frame)
    code, frames = await close_code(communicator)
    assert code == CLOSE_UNAUTHENTICATED and frames == []
    await communicator.disconnect()
    assert await Message.objects.acount() == 0 and await Run.objects.acount() == 0


async def _events_stream(client, conversation):
    response = await client.get(f"/api/conversations/{conversation.id}/events/?after_seq=0")
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    chunks = aiter(response.streaming_content)
    first = await asyncio.wait_for(anext(chunks), LONG_WAIT)
    assert b"event: message" in first  # the replay: the stream is open and watched
    return chunks


async def _stream_ends(chunks) -> list[bytes]:
    async def rest():
        return [chunk async for chunk in chunks if not chunk.startswith(b": keep-alive")]

    return await asyncio.wait_for(rest(), LONG_WAIT)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
async def test_an_open_event_stream_ends_when_its_session_ends(quick_checks, conversation, owner, ending):
    await sync_to_async(add_message)(conversation, "earlier")
    client = AsyncClient()
    await client.aforce_login(owner)
    chunks = await _events_stream(client, conversation)
    await sync_to_async(ENDINGS[ending])(owner, client.cookies["sessionid"].value)
    assert await _stream_ends(chunks) == []


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_logout_ends_the_sessions_event_streams_at_once(slow_checks, conversation, owner):
    await sync_to_async(add_message)(conversation, "earlier")
    client = AsyncClient()
    await client.aforce_login(owner)
    chunks = await _events_stream(client, conversation)
    assert (await client.post("/accounts/logout/")).status_code == 302
    assert await _stream_ends(chunks) == []


# --- 5. Unbounded numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, parsed",
    [("0", 0), ("41", 41), (41, 41), (str(MAX_SEQ), MAX_SEQ), (MAX_SEQ, MAX_SEQ), ("²", None), ("١٢", None),
     (str(10**30), None), (10**30, None), (MAX_SEQ + 1, None), (str(MAX_SEQ + 1), None), ("-1", None), (-1, None),
     ("1.0", None), (1.0, None), (" 1", None), ("", None), (True, None), (None, None), ("0" * 30, None)],
)  # fmt: skip
def test_one_parser_takes_ascii_decimal_seqs_within_63_bits(value, parsed):
    assert parse_seq(value) == parsed


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("value", ["%C2%B2", str(10**30), str(MAX_SEQ + 1), "-1", "1.5", "x", ""])
async def test_a_bad_after_seq_in_the_url_is_an_error_frame_and_the_socket_stays(conversation, owner, value):
    communicator, _ = await open_socket(conversation, owner, query=f"?after_seq={value}")
    await connected(communicator)
    error = await communicator.receive_json_from()
    assert error["type"] == "error" and error["code"] == "invalid_after_seq" and error["detail"]
    await still_usable(communicator)
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_largest_after_seq_is_taken(conversation, owner):
    await sync_to_async(add_message)(conversation, "earlier")
    communicator, _ = await open_socket(conversation, owner, query=f"?after_seq={MAX_SEQ}")
    await connected(communicator)
    await communicator.send_json_to({"type": "resume", "after_seq": MAX_SEQ})
    await still_usable(communicator)  # no replay, no error, before the answer to this frame
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("after_seq", ["1e400", str(10**30), str(MAX_SEQ + 1), "-1", "1.5", '"3"', "true"])
async def test_a_resume_with_a_bad_after_seq_is_an_error_frame(conversation, owner, after_seq):
    communicator, _ = await open_socket(conversation, owner)
    await connected(communicator)
    await communicator.send_to(text_data=f'{{"type": "resume", "after_seq": {after_seq}}}')
    assert (await communicator.receive_json_from())["code"] == "invalid_frame"
    await still_usable(communicator)
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "query, header",
    [("?after_seq=%C2%B2", None), (f"?after_seq={10**30}", None), ("", "²"), ("", str(10**30)), ("", "-1")],
    ids=["query-superscript", "query-huge", "header-superscript", "header-huge", "header-negative"],
)
async def test_the_events_stream_refuses_a_bad_after_seq_with_json(conversation, owner, query, header):
    client = AsyncClient()
    await client.aforce_login(owner)
    headers = {"Last-Event-ID": header} if header else {}
    response = await client.get(f"/api/conversations/{conversation.id}/events/{query}", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_after_seq"


# --- 6. Text the database cannot store, and errors that were not JSON ---------------------------------------

BAD_TEXT = {"lone-surrogate": r"x\ud800y", "low-surrogate": r"x\udfffy", "nul": r"x\u0000y"}


def test_storable_text():
    assert storable("plain, accents é, emoji 🎉, CJK 漢字")
    assert not storable("x\x00y") and not storable("x\ud800y") and not storable("\udc80")


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


def post_raw(client, path, body: str | bytes, **extra):
    return client.generic("POST", path, body, content_type="application/json", **extra)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("text", list(BAD_TEXT.values()), ids=list(BAD_TEXT))
def test_the_api_refuses_text_the_database_cannot_store(owner_client, conversation, text):
    url = f"/api/conversations/{conversation.id}/messages/"
    refused = {
        "content": post_raw(owner_client, url, f'{{"content": "{text}"}}'),
        "client_id": post_raw(owner_client, url, f'{{"content": "fine", "client_id": "{text}"}}'),
        "title": post_raw(owner_client, "/api/conversations/", f'{{"title": "{text}"}}'),
        "team": post_raw(owner_client, "/api/conversations/", f'{{"team": "{text}"}}'),
    }
    codes = {field: (r.status_code, r.json()["error"]["code"]) for field, r in refused.items()}
    assert codes == {
        "content": (400, "invalid_text"),
        "client_id": (400, "invalid_client_id"),
        "title": (400, "invalid_text"),
        "team": (400, "unknown_team"),
    }
    assert not Message.objects.exists() and Conversation.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_surrogate_sent_as_raw_utf8_bytes_is_refused_too(owner_client, conversation):
    # json.loads decodes bytes with "surrogatepass": ED A0 80 becomes a lone surrogate.
    body = b'{"content": "x' + b"\xed\xa0\x80" + b'y"}'
    response = post_raw(owner_client, f"/api/conversations/{conversation.id}/messages/", body)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_text")


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "frame, code",
    [(f'{{"type": "send", "content": "{BAD_TEXT["lone-surrogate"]}"}}', "invalid_text"),
     (f'{{"type": "send", "content": "{BAD_TEXT["nul"]}"}}', "invalid_text"),
     (f'{{"type": "send", "content": "ok", "client_id": "{BAD_TEXT["nul"]}"}}', "invalid_client_id"),
     (f'{{"type": "send", "content": "ok", "client_id": "{BAD_TEXT["lone-surrogate"]}"}}', "invalid_client_id"),
     (f'{{"type": "cancel", "run_id": "{BAD_TEXT["nul"]}"}}', "no_active_run"),
     (f'{{"type": "cancel", "run_id": "{BAD_TEXT["lone-surrogate"]}"}}', "no_active_run"),
     (f'{{"type": "{BAD_TEXT["lone-surrogate"]}"}}', "unknown_type")],
    ids=["content-surrogate", "content-nul", "client-id-nul", "client-id-surrogate", "run-id-nul",
         "run-id-surrogate", "type-surrogate"],
)  # fmt: skip
async def test_the_socket_refuses_text_the_database_cannot_store(conversation, owner, frame, code):
    communicator, _ = await open_socket(conversation, owner)
    await connected(communicator)
    await communicator.send_to(text_data=frame)
    error = await communicator.receive_json_from()
    assert error["type"] == "error" and error["code"] == code
    json.dumps(error, ensure_ascii=False).encode()  # the error itself can be sent: no surrogate in it
    await still_usable(communicator)
    await communicator.disconnect()
    assert await Message.objects.acount() == 0


def csrf_client(owner) -> tuple[Client, str]:
    """A client that enforces CSRF as a browser meets it, with the token of its cookie."""
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner)
    strict.get("/accounts/login/")
    return strict, strict.cookies["csrftoken"].value


@pytest.mark.django_db
def test_a_multipart_post_to_the_api_is_a_json_error(owner, conversation):
    strict, token = csrf_client(owner)
    for url in ("/api/conversations/", f"/api/conversations/{conversation.id}/messages/"):
        response = strict.post(url, {"content": "hi", "title": "t"}, HTTP_X_CSRFTOKEN=token)  # multipart
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        form = strict.post(url, "content=hi", content_type="application/x-www-form-urlencoded", HTTP_X_CSRFTOKEN=token)
        assert form.status_code == 400 and form.json()["error"]["code"] == "invalid_json"
    assert Conversation.objects.count() == 1 and not Message.objects.exists()


@pytest.mark.django_db
def test_an_oversize_body_is_a_json_413(owner, conversation, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    strict, token = csrf_client(owner)
    big = json.dumps({"content": "x" * 2000})
    for url in ("/api/conversations/", f"/api/conversations/{conversation.id}/messages/"):
        response = strict.post(url, big, content_type="application/json", HTTP_X_CSRFTOKEN=token)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        form = strict.post(url, "a=" + "x" * 2000, content_type="application/x-www-form-urlencoded")
        assert form.status_code == 413 and form.json()["error"]["code"] == "body_too_large"
    assert not Message.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    ["/api/conversations/not-a-uuid/messages/", "/api/conversations/not-a-uuid/events/", "/api/nothing-here/",
     "/api/conversations/00000000-0000-0000-0000-00000000000g/messages/"],
)  # fmt: skip
def test_paths_that_are_no_route_under_api_are_a_json_404(owner_client, path):
    response = owner_client.get(path)
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found" and response.json()["error"]["detail"]


@pytest.mark.django_db
def test_json_nested_deeper_than_the_parser_goes_is_invalid_json(owner_client, conversation):
    body = '{"content": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for url in ("/api/conversations/", f"/api/conversations/{conversation.id}/messages/"):
        response = post_raw(owner_client, url, body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.django_db
def test_a_host_outside_allowed_hosts_is_a_json_400_under_the_api(owner_client):
    response = owner_client.get("/api/teams/", HTTP_HOST="evil.example")
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


@pytest.mark.django_db
def test_pages_outside_the_api_keep_djangos_answers(owner_client):
    response = owner_client.get("/conversations/not-a-uuid/")
    assert response.status_code == 404 and not response["Content-Type"].startswith("application/json")


# --- 7. The socket's Origin: scheme, host and port ---------------------------------------------------------


async def handshake(conversation, owner, origin, host=HOST, headers=()) -> bool:
    communicator, _ = await open_socket(conversation, owner, origin=origin, host=host, headers=headers)
    ok, _ = await communicator.connect()
    await communicator.disconnect()
    return ok


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "origin, accepted",
    [(f"http://{HOST}", True), ("http://127.0.0.1:9999", False), (f"https://{HOST}", False),
     ("http://127.0.0.1", False), ("https://127.0.0.1", False), ("http://evil.example", False),
     (f"http://{HOST}.evil.example", False), ("null", False), ("", False), (f"HTTP://{HOST}", False)],
)  # fmt: skip
async def test_the_socket_takes_only_its_own_origin(conversation, owner, origin, accepted):
    assert await handshake(conversation, owner, origin) is accepted


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "origin, accepted",
    [("https://chat.example.com", True), ("http://chat.example.com", False), ("https://chat.example.com:444", False),
     ("https://a.example.org", True), ("https://b.a.example.org", True), ("http://a.example.org", False),
     ("https://example.org.evil", False)],
)  # fmt: skip
async def test_the_socket_takes_csrf_trusted_origins(conversation, owner, settings, origin, accepted):
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com", "https://*.example.org"]
    assert await handshake(conversation, owner, origin) is accepted


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_behind_a_tls_proxy_the_origin_is_https(conversation, owner, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = [(b"x-forwarded-proto", b"https")]
    assert await handshake(conversation, owner, f"https://{HOST}", headers=proxied)
    assert not await handshake(conversation, owner, f"http://{HOST}", headers=proxied)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_host_outside_allowed_hosts_is_refused_even_with_a_matching_origin(conversation, owner):
    assert not await handshake(conversation, owner, "http://evil.example", host="evil.example")


# --- 8. Model output cannot imitate the interface --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['<div class="banner offline">Your session expired</div>', '<span class="run-error">Failed</span>',
     '<p class="flash">x</p>', '<code class="status">x</code>', '<div class="highlight banner">x</div>'],
)  # fmt: skip
def test_model_output_loses_its_classes(text):
    html = render_markdown(text)
    assert "banner" not in html and "run-error" not in html and "flash" not in html and "status" not in html
    assert 'class=""' not in html


def test_the_highlighter_keeps_its_classes():
    html = render_markdown("```python\nprint('hi')  # note\n```")
    assert html.startswith('<div class="highlight">')
    assert '<span class="nb">print</span>' in html and '<span class="c1"># note</span>' in html


def test_model_text_about_classes_is_kept_as_text():
    assert render_markdown('set class="" on it') == '<p>set class="" on it</p>'


@pytest.mark.django_db
def test_the_api_sends_model_output_without_its_classes(owner_client, conversation):
    add_message(conversation, '<div class="banner offline">Your session expired</div>')
    html = owner_client.get(f"/api/conversations/{conversation.id}/messages/").json()[0]["html"]
    assert html == "<div>Your session expired</div>"


# --- The same, through a real daphne, worker and Redis -----------------------------------------------------


@pytest.fixture
def stack_env(stack_env):
    return {**stack_env, "CHORUS_SESSION_CHECK_SECONDS": "0.5"}


@pytest.mark.integration
@pytest.mark.asyncio
async def test_daphne_an_event_stream_ends_after_logout(stack, conversation, owner, reliability):
    async with await logged_in_session(stack, owner) as session:
        url = f"/api/conversations/{conversation.id}/messages/"
        async with session.post(url, json={"content": "[[tokens:3]]"}, headers=csrf_headers(session)) as sent:
            assert sent.status == 201
        events_url = f"/api/conversations/{conversation.id}/events/?after_seq=0"
        async with session.get(events_url, timeout=aiohttp.ClientTimeout(total=LONG_WAIT)) as response:
            assert (await read_events(response))[-1][1] == "run.finished"  # replayed; the stream stays open
            async with session.post("/accounts/logout/", headers=csrf_headers(session)) as out:
                assert out.status == 200  # the login page, after the redirect
            assert await asyncio.wait_for(response.content.read(), LONG_WAIT) in (b"", b": keep-alive\n\n")
            assert response.content.at_eof()
    reliability.add(
        "Logout while an SSE stream is open", "POST /accounts/logout/ with the stream's session",
        "the stream ends (it used to keep receiving)", stream_ended="yes",
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.asyncio
async def test_daphne_a_socket_closes_4401_after_the_password_changes(stack, conversation, owner, reliability):
    cookie = await sync_to_async(session_cookie)(owner)
    origin = f"http://127.0.0.1:{stack.web_port}"
    async with websockets.connect(
        stack.ws_url(conversation.id), additional_headers={"Cookie": f"sessionid={cookie}", "Origin": origin}
    ) as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
        await sync_to_async(_change_password)(owner, cookie)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), LONG_WAIT)
    assert closed.value.rcvd.code == CLOSE_UNAUTHENTICATED
    reliability.add(
        "Password changed while a socket is open", "the password changed in the database, session kept",
        "the socket closes 4401 within CHORUS_SESSION_CHECK_SECONDS (it used to stream on)", close_code=4401,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.asyncio
async def test_daphne_refuses_other_schemes_and_ports_and_takes_its_own_origin(stack, conversation, owner, reliability):
    cookie = await sync_to_async(session_cookie)(owner)
    port = stack.web_port

    async def opens(origin: str) -> bool:
        try:
            async with websockets.connect(
                stack.ws_url(conversation.id), additional_headers={"Cookie": f"sessionid={cookie}", "Origin": origin}
            ) as socket:
                return json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
        except websockets.InvalidStatus as refused:
            assert refused.response.status_code == 403
            return False

    assert await opens(f"http://127.0.0.1:{port}")
    assert not await opens("http://127.0.0.1:9999")
    assert not await opens("https://127.0.0.1")
    assert not await opens(f"https://127.0.0.1:{port}")
    assert not await opens("http://127.0.0.1")
    reliability.add(
        "Socket from another origin on the same host", "Origin http://127.0.0.1:9999, https://127.0.0.1",
        "handshake refused (403): scheme, host and port must match", refused=4,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.asyncio
async def test_daphne_bad_numbers_are_json_errors_not_hangs(stack, conversation, owner, reliability):
    async with await logged_in_session(stack, owner) as session:
        events_url = f"/api/conversations/{conversation.id}/events/"
        timeout = aiohttp.ClientTimeout(total=LONG_WAIT)
        for query, headers in [("?after_seq=%C2%B2", {}), ("", {"Last-Event-ID": str(10**30)})]:
            async with session.get(events_url + query, headers=headers, timeout=timeout) as response:
                assert response.status == 400
                assert (await response.json())["error"]["code"] == "invalid_after_seq"
        # The largest seq is a valid Redis stream ID: the stream opens (and says nothing until an event comes).
        async with session.get(events_url, headers={"Last-Event-ID": str(MAX_SEQ)}, timeout=timeout) as response:
            assert response.status == 200
    cookie = await sync_to_async(session_cookie)(owner)
    headers = {"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{stack.web_port}"}
    for value in [str(10**30), "%C2%B2", str(MAX_SEQ)]:
        async with websockets.connect(
            f"{stack.ws_url(conversation.id)}?after_seq={value}", additional_headers=headers
        ) as socket:
            assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
            if value != str(MAX_SEQ):
                assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["code"] == "invalid_after_seq"
            await socket.send(json.dumps({"type": "resume", "after_seq": 10**30}))
            assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["code"] == "invalid_frame"
            await socket.send(json.dumps({"type": "send", "content": "x\ud800y"}))
            assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["code"] == "invalid_text"
    reliability.add(
        "Numbers and text no database takes", "after_seq ² and 10^30 (URL, resume, SSE), a lone surrogate",
        "a JSON 400 or an error frame; the socket stays open (it used to close 1011, 500 or hang)", hangs=0,
    )  # fmt: skip
