"""Server-Sent Events for programmatic clients, through a real daphne and worker over Redis."""

import json

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from agents_app.domain import services
from agents_app.models import Message
from tests.support import session_cookie

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def logged_in_session(stack, user) -> aiohttp.ClientSession:
    cookie = await sync_to_async(session_cookie)(user)
    # unsafe=True: aiohttp otherwise refuses cookies from an IP address such as 127.0.0.1.
    session = aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{stack.web_port}",
        cookies={"sessionid": cookie},
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )
    async with session.get("/") as page:  # any page with a form sets the CSRF cookie
        assert page.status == 200
    return session


def csrf_headers(session) -> dict[str, str]:
    token = next(c.value for c in session.cookie_jar if c.key == "csrftoken")
    return {"X-CSRFToken": token}


async def read_events(response, stop_after_type="run.finished", limit=2000):
    """Parse SSE frames into (id, event, data) until an event of `stop_after_type`."""
    frames, current = [], {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line == "":
            if current:
                frames.append((int(current["id"]), current["event"], json.loads(current["data"])))
                current = {}
                if frames[-1][1] == stop_after_type or len(frames) >= limit:
                    return frames
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    return frames


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


async def test_posting_with_accept_event_stream_streams_the_answer_to_its_end(stack, conversation, owner):
    async with await logged_in_session(stack, owner) as session:
        url = f"/api/conversations/{conversation.id}/messages/"
        headers = {**csrf_headers(session), "Accept": "text/event-stream"}
        async with session.post(url, json={"content": "[[tokens:20]]"}, headers=headers) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            frames = await read_events(response)
        async with session.get(url) as listed:
            stored = await listed.json()

    kinds = [kind for _, kind, _ in frames]
    # The first message names the conversation (conversation.updated) before the run starts.
    assert kinds[:3] == ["message", "conversation.updated", "run.started"] and kinds[-2:] == ["message", "run.finished"]
    assert all(frame_id == data["seq"] and kind == data["type"] for frame_id, kind, data in frames)
    answer = frames[-2][2]["message"]
    assert "".join(d["delta"] for _, k, d in frames if k == "token") == answer["content"]
    assert [m["content"] for m in stored] == ["[[tokens:20]]", answer["content"]]


async def test_the_events_stream_resumes_from_last_event_id(stack, conversation, owner):
    async with await logged_in_session(stack, owner) as session:
        url = f"/api/conversations/{conversation.id}/messages/"
        async with session.post(url, json={"content": "[[tokens:10]]"}, headers=csrf_headers(session)) as sent:
            assert sent.status == 201 and (await sent.json())["message"]["content"] == "[[tokens:10]]"
        events_url = f"/api/conversations/{conversation.id}/events/?after_seq=0"
        async with session.get(events_url) as response:
            everything = await read_events(response)
        middle = everything[len(everything) // 2][0]
        # Last-Event-ID wins over after_seq, as for a browser's EventSource reconnecting.
        async with session.get(events_url, headers={"Last-Event-ID": str(middle)}) as response:
            resumed = await read_events(response)

    assert [f for f in everything if f[0] > middle] == resumed
    assert await sync_to_async(Message.objects.filter(conversation=conversation).count)() == 2


async def test_strangers_get_401_and_other_users_404(stack, conversation, other_user):
    base = f"http://127.0.0.1:{stack.web_port}/api/conversations/{conversation.id}/events/"
    async with aiohttp.ClientSession() as anonymous, anonymous.get(base) as response:
        assert response.status == 401
    async with await logged_in_session(stack, other_user) as session, session.get(base) as response:
        assert response.status == 404
