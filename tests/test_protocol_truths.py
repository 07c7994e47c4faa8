"""The protocol never contradicts itself (issue 13, point 2), over real processes: `hello.last_seq` is the
conversation's true highest seq, tokens in flight included, and never goes backwards for a client."""

import asyncio
import json

import pytest
import websockets
from asgiref.sync import sync_to_async

from tests.support import session_cookie
from tests.test_reliability_processes import open_socket, receive_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def hello_of(stack, conversation, user, after_seq=None):
    """A new socket and its hello."""
    cookie = await sync_to_async(session_cookie)(user)
    url = stack.ws_url(conversation.id) + (f"?after_seq={after_seq}" if after_seq is not None else "")
    headers = {"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{stack.web_port}"}
    socket = await websockets.connect(url, additional_headers=headers)
    return socket, json.loads(await asyncio.wait_for(socket.recv(), 10))


async def test_hello_names_the_true_last_seq_while_a_run_streams(stack, conversation, owner):
    reader = await open_socket(stack, conversation, owner)
    await reader.send(json.dumps({"type": "send", "content": "[[tokens:200]] [[tps:50]]"}))
    seen = await receive_until(reader, "token")
    seen += [json.loads(await asyncio.wait_for(reader.recv(), 10)) for _ in range(6)]
    highest = max(event["seq"] for event in seen)

    late, hello = await hello_of(stack, conversation, owner)
    assert hello["active_run_id"] == seen[-1]["run_id"]
    assert hello["last_seq"] == hello["seq"] >= highest, "a socket that read `highest` must not be told less"

    # A client that missed nothing since the hello gets nothing twice and nothing out of order from here on.
    following = await receive_until(late, "run.finished", timeout=30)
    assert all(event["seq"] > hello["last_seq"] for event in following)
    assert [event["seq"] for event in following] == sorted(event["seq"] for event in following)
    await late.close()

    # Reconnecting with the last seq it saw, the reader is told at least as much as it has.
    rest = await receive_until(reader, "run.finished", timeout=30)
    await reader.close()
    again, hello_again = await hello_of(stack, conversation, owner, after_seq=rest[-1]["seq"])
    await again.close()
    assert hello_again["last_seq"] >= rest[-1]["seq"] >= hello["last_seq"]
