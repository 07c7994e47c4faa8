"""One run seen by a program over each transport, with a Bearer token, through a real daphne, worker and Redis:
the WebSocket, the events stream and the answer of a POST with `Accept: text/event-stream` carry the same events
in the same order; a revoked token ends them; a read-only token watches but cannot send."""

import asyncio
import json

import aiohttp
import pytest
import websockets
from asgiref.sync import sync_to_async

from agents_app.domain import services
from agents_app.models import ApiToken, Message
from agents_app.web import tokens
from agents_app.web.consumers import CLOSE_UNAUTHENTICATED
from tests.test_hardening_web import add_message
from tests.test_sse import read_events

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]
LONG_WAIT = 30  # seconds: a bound on waits, not a speed claim


@pytest.fixture
def stack_env(stack_env):
    return {**stack_env, "CHORUS_SESSION_CHECK_SECONDS": "0.5"}


@pytest.fixture
def research_conversation(owner, team):
    from agents_app.models import Team

    return services.conversation_create(owner=owner, team=Team.objects.get(slug="research-desk"))


def api(stack, secret) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{stack.web_port}",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=aiohttp.ClientTimeout(total=LONG_WAIT * 2),
    )


async def socket_events(socket, until_type="run.finished") -> list[dict]:
    received = []
    while True:
        event = json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))
        if event["type"] == "hello":
            continue
        received.append(event)
        if event["type"] == until_type:
            return received


async def test_the_sse_streams_equal_the_sockets_events_for_the_same_run(stack, research_conversation, owner):
    _, secret = await sync_to_async(tokens.token_create)(user=owner, name="transports")
    conversation = research_conversation
    content = 'Sum? [[analyst>tool:calculator {"expression": "2+2"}]] [[reporter>reply:It is 4.]] [[tps:100]]'
    # A program's socket: the token in a header, no cookie, no Origin.
    async with (
        websockets.connect(
            stack.ws_url(conversation.id), additional_headers={"Authorization": f"Bearer {secret}"}
        ) as socket,
        api(stack, secret) as session,
        session.get(f"/api/conversations/{conversation.id}/events/") as events_stream,
    ):
        assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
        assert events_stream.status == 200
        url = f"/api/conversations/{conversation.id}/messages/"
        async with session.post(url, json={"content": content}, headers={"Accept": "text/event-stream"}) as posted:
            assert posted.status == 200
            from_post = [data for _id, _kind, data in await read_events(posted)]
        from_socket = await socket_events(socket)
        from_events = [data for _id, _kind, data in await read_events(events_stream)]

    kinds = [event["type"] for event in from_socket]
    assert {"token", "tool.call", "tool.result", "message", "run.started", "run.finished"} <= set(kinds)
    assert from_events == from_socket
    assert from_post == from_socket


async def test_a_revoked_token_ends_its_socket_and_stream_and_is_refused_next_time(stack, conversation, owner):
    token, secret = await sync_to_async(tokens.token_create)(user=owner, name="to revoke")
    await sync_to_async(add_message)(conversation, "earlier")  # something to replay; no run
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        websockets.connect(stack.ws_url(conversation.id), additional_headers=headers) as socket,
        api(stack, secret) as session,
        session.get(f"/api/conversations/{conversation.id}/events/?after_seq=0") as stream,
    ):
        assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
        assert (await stream.content.readline()).startswith(b"id: ")
        # Revoked in this test's process (whose channel layer is not the server's): the web server finds out
        # at its next check (CHORUS_SESSION_CHECK_SECONDS, 0.5 s here) and ends both.
        await sync_to_async(tokens.token_revoke)(user=owner, token_id=token.id)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(socket.recv(), LONG_WAIT)
        assert closed.value.rcvd.code == CLOSE_UNAUTHENTICATED
        rest = await asyncio.wait_for(stream.content.read(), LONG_WAIT)
        assert rest.startswith(b"event: message") and rest.count(b"\n\n") == 1, "the replay, then the end"
        assert stream.content.at_eof()
        async with session.get("/api/teams/") as refused:
            assert refused.status == 401 and (await refused.json())["error"]["code"] == "invalid_token"
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(stack.ws_url(conversation.id), additional_headers=headers):
            pass
    assert denied.value.response.status_code == 403
    assert await ApiToken.objects.filter(revoked_at__isnull=False).acount() == 1


async def test_a_read_only_token_watches_but_cannot_send(stack, conversation, owner):
    _, secret = await sync_to_async(tokens.token_create)(user=owner, name="watcher", read_only=True)
    async with websockets.connect(
        stack.ws_url(conversation.id), additional_headers={"Authorization": f"Bearer {secret}"}
    ) as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["type"] == "hello"
        await socket.send(json.dumps({"type": "send", "content": "hi"}))
        assert json.loads(await asyncio.wait_for(socket.recv(), LONG_WAIT))["code"] == "read_only_token"
    async with api(stack, secret) as session:
        url = f"/api/conversations/{conversation.id}/messages/"
        async with session.post(url, json={"content": "hi"}) as refused:
            assert refused.status == 403 and (await refused.json())["error"]["code"] == "read_only_token"
        async with session.get(url) as listed:
            assert listed.status == 200 and await listed.json() == []
    assert not await Message.objects.aexists()
