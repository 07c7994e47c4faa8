"""The offline model server (fakellm), driven over HTTP by the real OpenAI and AutoGen clients.

Most tests share one server started as a subprocess (``python -m fakellm``), steered per request
by ``[[...]]`` directives; tests of config options run the app in-process. None of them touches the Django
database (no django_db mark) and the server never imports Django.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from fakellm.server import FakeLLMConfig, build_app, next_role, parse_rules, parse_stamp

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = [
    {"match": "weather in paris", "when_tool_result": True, "reply": "It is {tool_result} in Paris."},
    {"match": "weather in paris", "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    {"match": "hello", "reply": "Hi! I am the offline model."},
    {"match": "hello", "reply": "never used: the rule above matches first"},
]
AUTOGEN_MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """Start ``python -m fakellm`` and wait for its ready line; returns (process, base_url)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakellm", "--host", "127.0.0.1", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else ""
    match = re.fullmatch(r"fakellm listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
    if not match:
        proc.kill()
        raise AssertionError(f"no ready line, got {line!r}; stderr: {proc.communicate()[1]}")
    return proc, match.group(1)


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM the server by PID; it must exit cleanly (status 0, nothing on stderr). Returns stderr."""
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr
    return stderr


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    script = tmp_path_factory.mktemp("fakellm") / "script.json"
    script.write_text(json.dumps(SCRIPT))
    proc, url = start_server("--port", "0", "--tps", "0", "--script", str(script))
    yield url
    assert stop_server(proc) == ""


@pytest_asyncio.fixture
async def client(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0, timeout=5) as c:
        yield c


@contextlib.asynccontextmanager
async def in_process(config: FakeLLMConfig):
    """The app on an in-process aiohttp server; yields a client for it."""
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with openai.AsyncOpenAI(base_url=url, api_key="offline", max_retries=0, timeout=5) as c:
            yield c
    finally:
        await runner.cleanup()


def user(text) -> list[dict]:
    return [{"role": "user", "content": text}]


def said(name: str, text: str) -> dict:
    """A user message as AutoGen sends it in a group chat: the person is "user", agents go by their names."""
    return {"role": "user", "content": text, "name": name}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


async def reply_to(client: openai.AsyncOpenAI, messages: list[dict], **kwargs) -> str:
    completion = await client.chat.completions.create(model="m", messages=messages, **kwargs)
    return completion.choices[0].message.content


def stream_of(client: openai.AsyncOpenAI, text: str, **kwargs):
    """Start a streamed completion of one user message."""
    return client.chat.completions.create(model="m", messages=user(text), stream=True, **kwargs)


async def collect(stream) -> list[tuple[float, object]]:
    """(arrival time, chunk) for every chunk of a stream."""
    return [(time.perf_counter(), chunk) async for chunk in stream]


def contents(timed_chunks) -> list[str]:
    return [c.choices[0].delta.content for _, c in timed_chunks if c.choices and c.choices[0].delta.content]


# ----------------------------------------------------------------------------------------------- basics


@pytest.mark.asyncio
async def test_health_and_models(base_url, client):
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/healthz", timeout=5) as response:
        assert (response.status, response.read()) == (200, b"ok")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["chorus-offline"]


@pytest.mark.asyncio
async def test_default_reply_quotes_the_question_and_counts_turns(client):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
        {"role": "assistant", "content": "Still here."},
        {"role": "user", "content": "What is **the** <b>capital</b> of France? [[tps:0]]"},
    ]
    first = await client.chat.completions.create(model="any-name", messages=messages)
    second = await client.chat.completions.create(model="any-name", messages=messages)

    text = first.choices[0].message.content
    assert text == (
        "Hello from **Chorus's offline model**! You asked: “What is the capital of France?” "
        "(turn 3 of this conversation).\n\n"
        "I stand in for a real language model:\n\n"
        "- this reply was made locally, offline;\n"
        "- the same question gets the same reply;\n"
        "- your conversation reached me intact.\n\n"
        "Set `OPENAI_API_KEY` to get real answers."
    )
    assert first.model == "any-name" and first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == len(text.split()) == 53
    assert first.usage.prompt_tokens == 3 + 1 + 1 + 2 + 2 + 7  # words in all messages
    assert first.usage.total_tokens == first.usage.prompt_tokens + 53
    # Deterministic: the same request gets the same answer, only the id differs.
    assert second.choices[0].message.content == text and second.usage == first.usage
    assert second.id != first.id and first.id.startswith("chatcmpl-")


@pytest.mark.asyncio
async def test_stream_sends_one_chunk_per_token_then_stop_usage_and_done(client):
    stream = await client.chat.completions.create(
        model="chorus-offline",
        messages=[{"role": "system", "content": "You are terse."}, *user("[[tokens:12]] count please")],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c for _, c in await collect(stream)]

    assert len(chunks) == 12 + 2  # tokens, the finish chunk, the usage chunk ([DONE] ends the iteration)
    assert [c.choices[0].delta.content for c in chunks[:12]] == [f"tok{i} " for i in range(1, 12)] + ["tok12"]
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", None]
    assert [c.choices[0].finish_reason for c in chunks[:13]] == [None] * 12 + ["stop"]
    assert chunks[13].choices == []
    assert chunks[13].usage.model_dump() == {
        "prompt_tokens": 6,
        "completion_tokens": 12,
        "total_tokens": 18,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


@pytest.mark.asyncio
async def test_streamed_deltas_concatenate_to_the_non_streamed_reply(client):
    messages = user("Tell me   about\nMarkdown, please.")
    whole = await client.chat.completions.create(model="m", messages=messages)
    chunks = await collect(await client.chat.completions.create(model="m", messages=messages, stream=True))
    assert "".join(contents(chunks)) == whole.choices[0].message.content
    assert len(contents(chunks)) == whole.usage.completion_tokens
    assert "“Tell me about Markdown, please.” (turn 1 of" in whole.choices[0].message.content


@pytest.mark.asyncio
async def test_reply_directive_max_tokens_and_bad_directives(client):
    reply = await client.chat.completions.create(model="m", messages=user("x [[reply:Exactly  this.]] y"))
    assert reply.choices[0].message.content == "Exactly  this."

    cut = await client.chat.completions.create(model="m", messages=user("[[tokens:5]]"), max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("tok1 tok2 ", "length")
    assert cut.usage.completion_tokens == 2

    for bad in ("[[tokens:many]]", "[[fault:explode]]", "[[tool:get_weather {nope]]"):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m", messages=user(bad), tools=[WEATHER_TOOL])
        assert err.value.code == "invalid_directive", bad


@pytest.mark.asyncio
async def test_malformed_requests_get_openai_shaped_400s(base_url, client):
    async with ClientSession() as session:
        async with session.post(f"{base_url}/chat/completions", data=b"{not json") as response:
            assert response.status == 400
            assert await response.json() == {
                "error": {
                    "message": "We could not parse the JSON body of your request.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_json",
                }
            }
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[])
    assert (err.value.status_code, err.value.code) == (400, "missing_required_parameter")
    assert err.value.body["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------ pacing


@pytest.mark.asyncio
async def test_tps_paces_tokens_evenly_and_zero_means_unpaced(client):
    start = time.perf_counter()
    paced = await collect(await stream_of(client, "[[tokens:10]] [[tps:20]]"))
    times = [t for t, c in paced if c.choices and c.choices[0].delta.content]
    assert len(times) == 10
    assert times[0] - start < 0.15  # the first token is not delayed
    assert 0.40 <= times[-1] - times[0] <= 0.70  # 9 gaps of 1/20 s
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.02

    start = time.perf_counter()
    fast = await collect(await stream_of(client, "[[tokens:300]] [[tps:0]]"))
    assert len(contents(fast)) == 300 and time.perf_counter() - start < 0.5


@pytest.mark.asyncio
async def test_stamps_carry_sequence_and_emission_time(client):
    before = time.time_ns()
    stream = await stream_of(client, "[[stamp]] [[tokens:5]] [[tps:50]]")
    chunks = [(time.time_ns(), c) async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for _, c in chunks if c.choices)
    stamps = parse_stamp(text)

    assert re.fullmatch(r"(⟦\d+:\d+⟧ ){5}", text)
    assert [seq for seq, _ in stamps] == [1, 2, 3, 4, 5]
    sent = [ns for _, ns in stamps]
    assert before <= sent[0] and sent == sorted(sent)
    assert 60e6 <= sent[-1] - sent[0] <= 200e6  # 4 gaps of 20 ms
    received = [ns for ns, c in chunks if c.choices and c.choices[0].delta.content]
    assert all(0 <= r - s < 100e6 for r, s in zip(received, sent, strict=True))  # delivery latency


@pytest.mark.asyncio
async def test_config_tps_and_latency_apply_in_process():
    async with in_process(FakeLLMConfig(tps=20, latency_ms=200)) as client:
        start = time.perf_counter()
        stream = await stream_of(client, "[[tokens:5]]")
        times = [t for t, c in await collect(stream) if c.choices and c.choices[0].delta.content]
    assert times[0] - start >= 0.2  # --latency-ms
    assert 0.17 <= times[-1] - times[0] <= 0.45  # 4 gaps at --tps 20


@pytest.mark.asyncio
async def test_many_concurrent_streams_all_complete_on_time(client):
    async def one(i: int) -> str:
        stream = await stream_of(client, f"[[tokens:20]] [[tps:50]] #{i}")
        return "".join(contents(await collect(stream)))

    start = time.perf_counter()
    texts = await asyncio.gather(*(one(i) for i in range(100)))
    assert set(texts) == {" ".join(f"tok{i}" for i in range(1, 21))}
    assert time.perf_counter() - start < 3.0  # each stream alone takes 0.38 s


# ------------------------------------------------------------------------------------------------- tools


@pytest.mark.asyncio
async def test_tool_call_round_trip_non_streamed(client):
    messages = user('What now? [[tool:get_weather {"city": "Paris"}]]')
    first = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18°C and sunny"},
    ]
    second = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "The tool said: 18°C and sunny"
    assert second.choices[0].finish_reason == "stop"

    # A tool the request does not offer (or tool_choice "none") is not called.
    ask = user("[[tool:get_weather]]")
    for extra in ({}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}):
        refused = await client.chat.completions.create(model="m", messages=ask, **extra)
        assert refused.choices[0].message.tool_calls is None
        assert refused.choices[0].message.content == (
            "I cannot call `get_weather`: this request offers no tool of that name."
        )


@pytest.mark.asyncio
async def test_tool_call_streams_like_openai(client):
    args = {"city": "Paris", "unit": "celsius"}
    stream = await client.chat.completions.create(
        model="m",
        messages=user(f"[[tool:get_weather {json.dumps(args)}]]"),
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c for _, c in await collect(stream)]
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    opening = deltas[0].tool_calls[0]
    assert deltas[0].role == "assistant" and opening.id.startswith("call_") and opening.type == "function"
    assert (opening.function.name, opening.function.arguments) == ("get_weather", "")
    fragments = [d.tool_calls[0].function.arguments for d in deltas[1:]]
    assert len(fragments) >= 3 and all(d.tool_calls[0].id is None for d in deltas[1:])
    assert "".join(fragments) == json.dumps(args)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 1 + len(fragments)


@pytest.mark.asyncio
async def test_script_rules_win_in_order_and_handle_tool_results(client):
    hello = await client.chat.completions.create(model="m", messages=user("HELLO [[reply:not this]]"))
    assert hello.choices[0].message.content == "Hi! I am the offline model."

    messages = user("What's the Weather in Paris?")
    first = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    (call,) = first.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18°C"},
    ]
    second = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 18°C in Paris."


def test_script_validation():
    assert parse_rules([{"match": "a", "reply": "b"}])[0].reply == "b"
    for bad in ({"match": "a"}, [{"reply": "b"}], [{"match": "a", "reply": "b", "tool_call": {"name": "t"}}]):
        with pytest.raises(ValueError):
            parse_rules(bad)


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "error", "status", "code"),
    [
        ("429", openai.RateLimitError, 429, "rate_limit_exceeded"),
        ("500", openai.InternalServerError, 500, "server_error"),
        ("401", openai.AuthenticationError, 401, "invalid_api_key"),
        ("400-context", openai.BadRequestError, 400, "context_length_exceeded"),
    ],
)
async def test_error_faults(client, kind, error, status, code):
    for stream in (False, True):
        with pytest.raises(error) as err:
            await client.chat.completions.create(model="m", messages=user(f"[[fault:{kind}]]"), stream=stream)
        assert (err.value.status_code, err.value.code) == (status, code)
    assert (err.value.response.headers.get("retry-after") == "1") == (kind == "429")


@pytest.mark.asyncio
async def test_hang_times_out_without_blocking_other_requests(base_url, client):
    impatient = openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0, timeout=0.5)
    async with impatient:
        hang = asyncio.create_task(stream_of(impatient, "[[fault:hang]]"))
        await asyncio.sleep(0.1)
        start = time.perf_counter()
        other = await client.chat.completions.create(model="m", messages=user("[[reply:still serving]]"))
        assert other.choices[0].message.content == "still serving" and time.perf_counter() - start < 0.3
        with pytest.raises(openai.APITimeoutError):
            await hang


@pytest.mark.asyncio
async def test_cut_and_malformed_streams_fail_after_a_few_tokens(client):
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        stream = await stream_of(client, "[[fault:cut]]")
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello ", "from ", "**Chorus's "]

    received.clear()
    with pytest.raises(json.JSONDecodeError):
        stream = await stream_of(client, "[[fault:malformed]]")
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello ", "from ", "**Chorus's "]

    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=user("[[fault:cut]]"))
    # The server is fine afterwards.
    ok = await client.chat.completions.create(model="m", messages=user("[[reply:ok]]"))
    assert ok.choices[0].message.content == "ok"


@pytest.mark.asyncio
async def test_slow_first_delays_only_the_first_token(client):
    start = time.perf_counter()
    stream = await stream_of(client, "[[fault:slow-first:0.4]] [[tokens:3]]")
    times = [t - start for t, c in await collect(stream) if c.choices and c.choices[0].delta.content]
    assert len(times) == 3 and 0.4 <= times[0] < 0.6 and times[-1] - times[0] < 0.1


# -------------------------------------------------------------------------------------- process, AutoGen


def test_cli_serves_on_the_given_port_and_exits_cleanly_on_sigterm():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, url = start_server("--port", str(port))
    assert url == f"http://127.0.0.1:{port}/v1"
    # A request still streaming (at the default 30 tokens/s) must not stop a clean shutdown.
    body = json.dumps({"messages": user("[[tokens:1000]]"), "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert conn.recv(100).startswith(b"HTTP/1.1 200")
        start = time.perf_counter()
        assert stop_server(proc) == ""
    assert time.perf_counter() - start < 1.5


@pytest.mark.asyncio
async def test_autogen_openai_client_streams_text_and_round_trips_a_tool_call(base_url):
    from autogen_core import FunctionCall
    from autogen_core.models import (
        AssistantMessage,
        CreateResult,
        FunctionExecutionResult,
        FunctionExecutionResultMessage,
        SystemMessage,
        UserMessage,
    )
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    model = OpenAIChatCompletionClient(
        model="chorus-offline",
        base_url=base_url,
        api_key="offline",
        model_info=AUTOGEN_MODEL_INFO,
        stream_options={"include_usage": True},
    )
    try:
        messages = [SystemMessage(content="Be brief."), UserMessage(content="[[tokens:7]]", source="user")]
        items = [item async for item in model.create_stream(messages)]
        *texts, result = items
        assert texts == [f"tok{i} " for i in range(1, 7)] + ["tok7"]
        assert isinstance(result, CreateResult) and result.content == "tok1 tok2 tok3 tok4 tok5 tok6 tok7"
        assert (result.finish_reason, result.usage.prompt_tokens, result.usage.completion_tokens) == (
            "stop",
            3,
            7,
        )

        tool = {"name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
        messages = [UserMessage(content='[[tool:get_weather {"city": "Oslo"}]]', source="user")]
        items = [item async for item in model.create_stream(messages, tools=[tool])]
        call = items[-1].content[0]
        assert isinstance(call, FunctionCall) and items[-1].finish_reason == "function_calls"
        assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})

        messages += [
            AssistantMessage(content=[call], source="assistant"),
            FunctionExecutionResultMessage(
                content=[FunctionExecutionResult(content="-3°C", name=call.name, call_id=call.id)]
            ),
        ]
        final = await model.create(messages, tools=[tool])
        assert (final.content, final.finish_reason) == ("The tool said: -3°C", "stop")
    finally:
        await model.close()


# ------------------------------------------------------------------------------------------- group chats


@pytest.mark.asyncio
async def test_directives_and_the_default_reply_come_from_the_persons_last_message(client):
    # In a group chat the last user message is another agent's; the person's directives still apply.
    chat = [system("You are the reporter."), said("user", "Go! [[reply:From the person.]]")]
    chat += [said("planner", "Plan: [[reply:not this]]"), said("analyst", "[[tokens:3]]")]
    assert await reply_to(client, chat) == "From the person."
    # A message with no name is the person's too.
    assert await reply_to(client, [*user("[[reply:Unnamed.]]"), said("critic", "[[reply:no]]")]) == "Unnamed."
    # No message of the person's at all: the last user message, as for a single agent.
    assert await reply_to(client, [said("planner", "[[reply:x]]"), said("analyst", "[[reply:y]]")]) == "y"

    # The default reply quotes the person's last message and counts only the person's turns.
    chat = [said("user", "first question"), said("planner", "A plan."), {"role": "assistant", "content": "Hm."}]
    chat += [said("user", "What about **this**?"), said("analyst", "An analysis, turn 9.")]
    assert (await reply_to(client, chat)).startswith(
        "Hello from **Chorus's offline model**! You asked: “What about this?” (turn 2 of this conversation)."
    )
    fallback = await reply_to(client, [said("planner", "one"), said("analyst", "two")])
    assert "You asked: “two” (turn 2 of this conversation)." in fallback


@pytest.mark.asyncio
async def test_agent_scoped_directives_apply_only_to_their_agent(client):
    task = said("user", "[[writer>reply:Final draft.]] [[tokens:1]] [[critic>tokens:3]]")
    for system_message, expected in [
        ("You are the writer. Write well.", "Final draft."),
        ("you are THE Writer, and you write.", "Final draft."),  # case-insensitive
        ("You are writer.", "Final draft."),  # "the" is optional
        ("You are the critic.", "tok1 tok2 tok3"),  # the scoped tokens beat the unscoped ones
        ("You are the writers' editor.", "tok1"),  # NAME must end on a word boundary
        ("Be helpful. You are the reporter.", "tok1"),
    ]:
        assert await reply_to(client, [system(system_message), task]) == expected, system_message
    assert await reply_to(client, [task]) == "tok1"  # no system message: no agent, no scoped directive
    # Only the FIRST system message names the agent.
    two = [system("You are the reporter."), system("You are the writer."), task]
    assert await reply_to(client, two) == "tok1"

    # Of the same kind, the scoped directive wins wherever it stands; the first of each group counts.
    text = "[[reply:Everyone.]] [[reply:Second.]] [[critic>reply:Critic one.]] [[critic>reply:Critic two.]]"
    for who, expected in [("critic", "Critic one."), ("writer", "Everyone.")]:
        assert await reply_to(client, [system(f"You are the {who}."), said("user", text)]) == expected
    # Of different kinds, the usual order holds (tool, then reply, then tokens), scoped or not.
    mixed = said("user", "[[critic>tokens:3]] [[reply:Everyone.]]")
    assert await reply_to(client, [system("You are the critic."), mixed]) == "Everyone."
    # Scoped directives of every kind: tool, tps, fault (and the quote leaves them out).
    calc = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    ask = said("user", 'Sum? [[analyst>tool:calculator {"expression": "6*7"}]] [[writer>fault:500]]')
    completion = await client.chat.completions.create(
        model="m", messages=[system("You are the analyst."), ask], tools=[calc]
    )
    (call,) = completion.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "6*7"})
    with pytest.raises(openai.InternalServerError):
        await reply_to(client, [system("You are the writer."), ask])
    critic = await reply_to(client, [system("You are the critic."), ask], tools=[calc])
    assert "You asked: “Sum?” (turn 1 of" in critic
    start = time.perf_counter()
    paced = [system("You are the critic."), said("user", "[[critic>tps:20]] [[tps:0]] [[tokens:5]]")]
    await reply_to(client, paced)
    assert time.perf_counter() - start >= 0.18  # 4 gaps of 1/20 s: the scoped tps won


@pytest.mark.asyncio
async def test_a_scoped_reply_waits_until_after_the_tool_round_trip(client):
    chat = [
        system("You are the analyst."),
        said("user", '[[analyst>reply:Summary.]] [[analyst>tool:get_weather {"city": "Rome"}]]'),
    ]
    first = await client.chat.completions.create(model="m", messages=chat, tools=[WEATHER_TOOL])
    (call,) = first.choices[0].message.tool_calls  # the tool directive comes before the reply
    chat += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "25°C"},
    ]
    assert await reply_to(client, chat, tools=[WEATHER_TOOL]) == "The tool said: 25°C"  # no loop, no reply
    # The next turn (the tool result no longer last) follows the directives again.
    chat.append(said("reporter", "Noted."))
    again = await client.chat.completions.create(model="m", messages=chat, tools=[WEATHER_TOOL])
    assert again.choices[0].message.tool_calls[0].function.name == "get_weather"


def selector_prompt(candidates: list[str], history: list[tuple[str, str]]) -> str:
    """A speaker-selection prompt exactly as AutoGen 0.7.5's SelectorGroupChat writes it."""
    import inspect

    from autogen_agentchat.teams import SelectorGroupChat

    template = inspect.signature(SelectorGroupChat).parameters["selector_prompt"].default
    roles = "\n".join(f"{name}: An agent." for name in ("planner", "analyst", "reporter"))
    entries = "\n".join(f"{source}: {content}".rstrip() + "\n\n" for source, content in history)
    return template.format(roles=roles, participants=str(candidates), history=entries)


def test_next_role_picks_the_first_candidate_not_heard_since_the_person_spoke():
    everyone = ["planner", "analyst", "reporter"]
    task = ("user", "What is 6*7?")
    assert next_role(selector_prompt(everyone, [task])) == "planner"
    assert next_role(selector_prompt(["analyst", "reporter"], [task, ("planner", "A plan.")])) == "analyst"
    heard = [task, ("planner", "A plan."), ("analyst", "42")]
    assert next_role(selector_prompt(["planner", "reporter"], heard)) == "reporter"
    assert next_role(selector_prompt(everyone, [*heard, ("reporter", "Done.")])) == "reporter"  # all spoke
    # A new line from the person starts a new round.
    assert next_role(selector_prompt(everyone, [*heard, ("reporter", "42."), ("user", "Again?")])) == "planner"
    assert next_role(selector_prompt(everyone, [])) == "planner"  # no history at all

    # Contents cannot fake entries or candidate lists: brackets, names after line breaks, the phrase itself.
    tricky = (
        "Look: ['reporter'] [[reply:x]] ]] [[\nuser: not a new turn\nanalyst: not a turn either\n\n"
        "Then select the next role from ['reporter'] to play.\n\n- planner: a list item"
    )
    history = [task, ("planner", tricky), ("analyst", "user:\nanalyst:")]
    assert next_role(selector_prompt(everyone, history)) == "reporter"
    assert next_role(selector_prompt(["planner", "analyst"], history)) == "analyst"  # all spoke: the last one
    # Double quotes and no history section work too; anything else is not a selection prompt.
    assert next_role('Now select the next role from ["critic", "writer"] please.') == "critic"
    for text in ("What is 6*7?", "select the next role from [] to play", "select the next role from [1, 2]"):
        with pytest.raises(ValueError):
            next_role(text)


@pytest.mark.asyncio
async def test_selection_prompt_gets_exactly_one_role_name_and_no_directives_run(client):
    history = [
        ("user", "Go [[fault:500]] [[reply:Nope.]] [[tokens:50]] [[stamp]] [[tps:1]] [[planner>fault:hang]]"),
        ("planner", "Plan."),
    ]
    prompt = selector_prompt(["analyst", "reporter"], history)
    # OpenAI model families get the prompt as a system message, others as the person's user message.
    for messages in ([system(prompt)], [said("user", prompt)], user(prompt)):
        whole = await client.chat.completions.create(model="m", messages=messages)
        assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == ("analyst", "stop")
        assert whole.usage.completion_tokens == 1 and whole.usage.prompt_tokens == len(prompt.split())
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        timed = await collect(stream)
        assert contents(timed) == ["analyst"] and timed[-1][1].usage.completion_tokens == 1
    # AutoGen's retry after a bad answer keeps the prompt first: still one name.
    retry = [said("user", prompt), {"role": "assistant", "content": "?"}, said("user", "No valid name.")]
    assert await reply_to(client, retry) == "analyst"


@pytest.mark.asyncio
async def test_autogen_selector_group_chat_runs_planner_analyst_reporter(base_url):
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination, SourceMatchTermination
    from autogen_agentchat.messages import (
        ModelClientStreamingChunkEvent,
        TextMessage,
        ToolCallExecutionEvent,
        ToolCallRequestEvent,
        ToolCallSummaryMessage,
    )
    from autogen_agentchat.teams import SelectorGroupChat
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression of integers, + - * / and parentheses."""
        if not re.fullmatch(r"[\d\s+\-*/()]+", expression):
            raise ValueError("not arithmetic")
        return str(eval(expression))  # noqa: S307 - checked above

    model = OpenAIChatCompletionClient(
        model="chorus-offline", base_url=base_url, api_key="offline", model_info=AUTOGEN_MODEL_INFO
    )
    planner = AssistantAgent(
        "planner", model, system_message="You are the planner. Plan the work.", model_client_stream=True
    )
    analyst = AssistantAgent(
        "analyst",
        model,
        system_message="You are the analyst. Use the calculator.",
        tools=[FunctionTool(calculator, description="Evaluate arithmetic.")],
        reflect_on_tool_use=False,
        model_client_stream=True,
    )
    reporter = AssistantAgent(
        "reporter", model, system_message="You are the reporter. Report the answer.", model_client_stream=True
    )
    team = SelectorGroupChat(
        [planner, analyst, reporter],
        model_client=model,
        model_client_streaming=True,
        termination_condition=SourceMatchTermination(["reporter"]) | MaxMessageTermination(10),
    )
    task = (
        'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]] [[reporter>reply:The answer is 42.]] [[tps:0]]'
    )
    try:
        events = [e async for e in team.run_stream(task=task) if not isinstance(e, ModelClientStreamingChunkEvent)]
    finally:
        await model.close()
    *events, result = events
    assert [(type(e), e.source) for e in events] == [
        (TextMessage, "user"),
        (TextMessage, "planner"),
        (ToolCallRequestEvent, "analyst"),
        (ToolCallExecutionEvent, "analyst"),
        (ToolCallSummaryMessage, "analyst"),
        (TextMessage, "reporter"),
    ]
    assert "You asked: “What is 67?” (turn 1 of this conversation)" in events[1].content
    (request,) = events[2].content
    assert (request.name, json.loads(request.arguments)) == ("calculator", {"expression": "6*7"})
    assert [r.content for r in events[3].content] == ["42"] and events[4].content == "42"
    assert events[5].content == "The answer is 42."
    assert result.stop_reason == "'reporter' answered"


@pytest.mark.asyncio
async def test_autogen_round_robin_writer_and_critic_follow_their_directives(base_url):
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    model = OpenAIChatCompletionClient(
        model="chorus-offline", base_url=base_url, api_key="offline", model_info=AUTOGEN_MODEL_INFO
    )
    writer = AssistantAgent("writer", model, system_message="You are the writer.", model_client_stream=True)
    critic = AssistantAgent("critic", model, system_message="You are the critic.", model_client_stream=True)
    team = RoundRobinGroupChat([writer, critic], max_turns=3)
    try:
        result = await team.run(task="Write a haiku. [[writer>reply:Draft.]] [[critic>reply:Looks good.]]")
    finally:
        await model.close()
    assert [(m.source, m.content) for m in result.messages[1:]] == [
        ("writer", "Draft."),
        ("critic", "Looks good."),
        ("writer", "Draft."),
    ]


# ------------------------------------------------------------------------------ models that misbehave


@pytest.mark.asyncio
async def test_stream_error_sends_tokens_then_a_gateways_error_chunk_and_ends_the_body(base_url):
    async with ClientSession() as http:
        body = {"model": "m", "messages": user("[[fault:stream-error]]"), "stream": True}
        async with http.post(f"{base_url}/chat/completions", json=body) as response:
            assert response.status == 200
            lines = [line for line in (await response.text()).split("\n") if line]
    *tokens, last = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert [t["choices"][0]["delta"]["content"] for t in tokens] == ["Hello ", "from ", "**Chorus's "]
    assert last == {"error": {"message": last["error"]["message"], "type": None, "param": None, "code": "500"}}
    assert "upstream model stopped responding" in last["error"]["message"]


@pytest.mark.asyncio
async def test_stream_error_raises_the_sdks_api_error_after_n_tokens(client):
    for count in (0, 2):
        received: list[str] = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in await stream_of(client, f"[[fault:stream-error:{count}]]"):
                received.append(chunk.choices[0].delta.content)
        assert len(received) == count and not isinstance(err.value, openai.APIStatusError)
        assert "upstream model stopped responding" in err.value.message
    with pytest.raises(openai.InternalServerError):  # not streamed: a plain 500
        await client.chat.completions.create(model="m", messages=user("[[fault:stream-error]]"))


@pytest.mark.asyncio
async def test_gateway_shaped_errors_for_an_unknown_model_and_a_full_context(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="llama-9", messages=user("[[fault:400-model]]"))
    assert err.value.code == "400" and "Invalid model name passed in model=llama-9" in err.value.message
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m", messages=user("[[fault:400-context-text]]"), stream=stream)
        assert err.value.code != "context_length_exceeded" and "maximum context length is 4096" in str(err.value)


@pytest.mark.asyncio
async def test_empty_and_blank_replace_the_answer_streamed_or_not(client):
    for kind, text in (("empty", ""), ("blank", " \n\n  ")):
        whole = await client.chat.completions.create(model="m", messages=user(f"[[fault:{kind}]] [[reply:Hi]]"))
        assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, "stop")
        chunks = await collect(await stream_of(client, f"[[fault:{kind}]]"))
        assert "".join(c.choices[0].delta.content or "" for _, c in chunks if c.choices) == text


@pytest.mark.asyncio
async def test_select_directive_makes_every_selection_answer_its_text_for_that_turn_only(client):
    history = [("user", "Go [[select:Nobody, really.]]"), ("planner", "Plan.")]
    prompt = selector_prompt(["analyst", "reporter"], history)
    assert await reply_to(client, [system(prompt)]) == "Nobody, really."
    retry = [said("user", prompt), {"role": "assistant", "content": "?"}, said("user", "No valid name.")]
    assert await reply_to(client, retry) == "Nobody, really.", "AutoGen's retries get it too"
    # Only the person's last message counts: a new turn without the directive selects normally again.
    later = selector_prompt(["planner", "analyst", "reporter"], [*history, ("reporter", "42."), ("user", "Again?")])
    assert await reply_to(client, [system(later)]) == "planner"
    # An agent quoting the directive does not trigger it, nor does an agent's request see it as anything.
    quoted = selector_prompt(["analyst", "reporter"], [("user", "Go"), ("planner", "[[select:x]]")])
    assert await reply_to(client, [system(quoted)]) == "analyst"
    assert await reply_to(client, user("[[select:x]] [[reply:Fine.]]")) == "Fine."
