"""Chorus's own reader of the model's HTTP stream (agents_app/runner/modelstream.py), against the offline model server:
it must give AutoGen exactly what AutoGen's own OpenAI client gives, hand each text delta on as it arrives, raise
the SDK's errors for every fault, and stop at once on a Stop."""

import asyncio
import contextlib
import json
import time

import openai
import pytest
import pytest_asyncio
from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import CreateResult, UserMessage
from autogen_ext.models.openai import OpenAIChatCompletionClient

from agents_app.runner import modelstream
from fakellm import parse_stamp

pytestmark = pytest.mark.asyncio

MODEL_INFO = {"vision": False, "function_calling": True, "json_output": False, "family": "unknown",
              "structured_output": False}  # fmt: skip
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def openai_client(base_url, transport: str, **kwargs) -> OpenAIChatCompletionClient:
    model = OpenAIChatCompletionClient(model="chorus-offline", base_url=base_url, api_key="offline",
                                       model_info=MODEL_INFO, max_retries=0, **kwargs)  # fmt: skip
    return modelstream.with_aiohttp_transport(model) if transport == "aiohttp" else model


@contextlib.asynccontextmanager
async def model_server(completions):
    """A model server of the test's own on a free loopback port: `completions` answers POST /v1/chat/completions;
    yields the base URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


# Workers send over aiohttp (with_aiohttp_transport); the SDK's default httpx transport must work as well.
@pytest_asyncio.fixture(params=["aiohttp", "httpx"])
async def client(fakellm_url, request):
    model = openai_client(fakellm_url, request.param, stream_options={"include_usage": True})
    yield model
    await model.close()


async def ours(client, text, cancellation_token=None, **kwargs):
    deltas: list[tuple[int, str]] = []

    def on_delta(delta):
        deltas.append((time.time_ns(), delta))

    messages = [UserMessage(content=text, source="user")]
    stream = modelstream.stream_completion(client, messages, on_delta, cancellation_token=cancellation_token, **kwargs)
    items = [item async for item in stream]
    assert len(items) == 1 and isinstance(items[0], CreateResult)
    return deltas, items[0]


async def autogens(client, text, **kwargs):
    items = [item async for item in client.create_stream([UserMessage(content=text, source="user")], **kwargs)]
    return [i for i in items if isinstance(i, str)], items[-1]


async def test_text_and_usage_are_what_autogens_own_client_reports(client):
    deltas, result = await ours(client, "[[tokens:12]]")
    their_deltas, theirs = await autogens(client, "[[tokens:12]]")

    assert [d for _, d in deltas] == their_deltas
    assert result.content == theirs.content == "".join(their_deltas)
    assert (result.finish_reason, result.usage) == (theirs.finish_reason, theirs.usage)
    assert result.usage.completion_tokens == 12
    assert client.total_usage().completion_tokens == 24, "the client's usage totals count both streams"


async def test_each_delta_is_handed_on_while_the_model_is_still_writing(client):
    deltas, result = await ours(client, "[[stamp]] [[tokens:20]] [[tps:20]]")

    stamps = [(arrived, written) for arrived, delta in deltas for _seq, written in parse_stamp(delta)]
    assert len(stamps) == 20
    assert stamps[0][0] < stamps[-1][1], "the first delta arrived before the model wrote the last one"
    assert max(arrived - written for arrived, written in stamps) / 1e6 < 500


async def test_a_tool_call_is_assembled_like_autogens(client):
    deltas, result = await ours(client, '[[tool:get_weather {"city": "Oslo"}]]', tools=[WEATHER])
    _, theirs = await autogens(client, '[[tool:get_weather {"city": "Oslo"}]]', tools=[WEATHER])

    assert deltas == []
    [call] = result.content
    assert isinstance(call, FunctionCall) and call.id
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert (call.name, call.arguments) == (theirs.content[0].name, theirs.content[0].arguments)
    assert result.finish_reason == theirs.finish_reason == "function_calls"


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("401", openai.AuthenticationError),
        ("400-context", openai.BadRequestError),
        ("400-context-text", openai.BadRequestError),
        ("400-model", openai.BadRequestError),
        ("cut", openai.APIConnectionError),
        ("malformed", json.JSONDecodeError),
        ("stream-error", openai.APIError),
    ],
)
async def test_every_fault_raises_the_error_the_sdk_would(client, fault, error):
    with pytest.raises(error):
        await ours(client, f"[[fault:{fault}]]")


async def test_an_error_chunk_mid_stream_is_classified_as_autogens_own_client_error_is(client):
    """A gateway that ends a stream with `data: {"error": ...}`: ours raises ModelStreamError (an APIError, so
    nothing that catches the SDK's errors misses it), after handing on the deltas that came before it; AutoGen's
    own client raises the SDK's APIError. Both read as the model's error, never as a bug in Chorus."""
    from agents_app.runner import classify_error

    deltas: list[str] = []
    with pytest.raises(modelstream.ModelStreamError) as ours_error:
        stream = modelstream.stream_completion(client, [UserMessage(content="[[fault:stream-error]]", source="user")],
                                               deltas.append)  # fmt: skip
        async for _item in stream:
            pass
    with pytest.raises(openai.APIError) as their_error:
        await autogens(client, "[[fault:stream-error]]")
    assert deltas == ["Hello ", "from ", "**Chorus's "]
    assert isinstance(ours_error.value, openai.APIError)
    assert ours_error.value.message == their_error.value.message and "upstream" in ours_error.value.message
    for error in (ours_error.value, their_error.value):
        # As raised inside a group chat: AutoGen re-raises an agent's exception as RuntimeError("<Type>: ...").
        wrapped = RuntimeError(f"{type(error).__name__}: {error}\nTraceback: ...")
        for raised in (error, wrapped):
            code, detail = classify_error(raised)
            assert code == "model_error" and "upstream model stopped responding" in detail


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_model_that_never_answers_times_out(fakellm_url, transport):
    impatient = openai_client(fakellm_url, transport, timeout=0.5)
    try:
        with pytest.raises(openai.APITimeoutError):
            await ours(impatient, "[[fault:hang]]")
    finally:
        await impatient.close()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_model_server_that_is_down_is_unreachable_not_slow(transport):
    from tests.support import free_port

    down = openai_client(f"http://127.0.0.1:{free_port()}/v1", transport)
    try:
        with pytest.raises(openai.APIConnectionError) as raised:
            await ours(down, "hi")
        assert not isinstance(raised.value, openai.APITimeoutError)
    finally:
        await down.close()


async def test_a_stop_ends_the_stream_at_once(client):
    token = CancellationToken()
    seen: list[str] = []

    async def read():
        stream = modelstream.stream_completion(
            client, [UserMessage(content="[[tokens:500]] [[tps:50]]", source="user")], seen.append,
            cancellation_token=token,
        )  # fmt: skip
        return [item async for item in stream]

    reading = asyncio.create_task(read())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    stopped_at = time.monotonic()
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert time.monotonic() - stopped_at < 0.5
    count = len(seen)
    await asyncio.sleep(0.2)
    assert 3 <= count == len(seen) < 500, "no delta after the Stop"


async def test_structured_output_is_left_to_autogens_client(client):
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    assert modelstream.can_stream(client, None, {})
    assert not modelstream.can_stream(client, Answer, {})
    assert not modelstream.can_stream(object(), None, {})


async def test_the_request_on_the_wire_is_the_one_the_sdk_sends():
    """modelstream posts the body itself (without the SDK's transform): the model server must receive the same
    JSON, auth and options as from AutoGen's own client, tools, create args and extra_body included."""
    from aiohttp import web

    received: list[tuple[dict, dict]] = []

    async def completions(request):
        received.append((await request.json(), dict(request.headers)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}  # fmt: skip
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return response

    async with model_server(completions) as base_url:
        model = openai_client(base_url, "aiohttp", temperature=0.5, stream_options={"include_usage": True})
        try:
            from autogen_core.tools import FunctionTool

            def get_weather(city: str) -> str:
                return city

            tools = [FunctionTool(get_weather, description="The weather in a city.")]
            extra = {"extra_body": {"custom_flag": True}, "seed": 7}
            await ours(model, "hello", tools=tools, extra_create_args=extra)
            await autogens(model, "hello", tools=tools, extra_create_args=extra)
        finally:
            await model.close()
    (mine, my_headers), (theirs, their_headers) = received
    assert mine == theirs
    assert mine["custom_flag"] is True and mine["seed"] == 7 and mine["tools"][0]["function"]["name"] == "get_weather"
    for header in ("Authorization", "Content-Type", "User-Agent", "X-Stainless-Retry-Count"):
        assert my_headers.get(header) == their_headers.get(header), header
    assert "X-Stainless-Raw-Response" not in my_headers


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("compressed", [False, True])
async def test_a_body_is_read_whole_however_it_is_sent(transport, compressed, monkeypatch):
    """A worker's client reads an uncompressed body straight from aiohttp (modelstream._body); a compressed one,
    and any other transport, through the SDK's decoding iterator. Split into small pieces, the answer is whole."""
    import zlib

    from aiohttp import web

    bodies: list = []

    async def completions(request):
        pieces = []
        for word in ["Hello", ", ", "wörld", "!"]:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
            pieces.append(f"data: {json.dumps(chunk)}\n\n".encode())
        pieces.append(b"data: [DONE]\n\n")
        headers = {"Content-Type": "text/event-stream"}
        if compressed:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        body = b"".join(pieces)
        if compressed:
            gzip = zlib.compressobj(wbits=31)
            body = gzip.compress(body) + gzip.flush()
        for start in range(0, len(body), 7):  # pieces that cut lines and characters in two
            await response.write(body[start : start + 7])
            await asyncio.sleep(0)
        return response

    async with model_server(completions) as base_url:
        model = openai_client(base_url, transport)
        original_body = modelstream._body

        def spy(response):
            body = original_body(response)
            bodies.append(type(body).__name__)
            return body

        monkeypatch.setattr(modelstream, "_body", spy)
        try:
            deltas, result = await ours(model, "hello")
        finally:
            await model.close()
    assert result.content == "".join(d for _, d in deltas) == "Hello, wörld!"
    direct = transport == "aiohttp" and not compressed
    assert (bodies == ["AsyncStreamIterator"]) == direct, bodies
