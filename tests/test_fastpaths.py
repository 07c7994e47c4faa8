"""The fast paths' switches: each is on by default, its setting (or CHORUS_FAST_PATHS=0) turns it off, a library
version other than the one it was written against turns it off with one log line, and off means the library's own
path does the work. The fan-out's two wires are exercised end to end in test_fanout.py and test_ops_redis.py."""

import json
import logging
import re

import pytest
from channels.consumer import AsyncConsumer

from agents_app.ops import fastpaths
from agents_app.realtime import dispatch, resp, wire
from agents_app.runner import CompletedMessage, FastPaths, ModelSettings, TokenDelta, TurnRequest, modelstream, run_turn
from agents_app.runner.tools import build_tools
from agents_app.teams import HERE
from agents_app.web import routing
from tests.support import ROOT

SWITCHED = [name for name, path in fastpaths.PATHS.items() if path.setting]


@pytest.fixture(autouse=True)
def fresh_version_checks(settings):
    settings.CHORUS_FAST_PATHS = True  # as shipped, whatever the environment of this test run says
    fastpaths.reset()
    yield
    fastpaths.reset()


@pytest.fixture
def other_versions(monkeypatch):
    """The process sees other versions of every library than the fast paths were written against."""
    monkeypatch.setattr(fastpaths, "installed_version", lambda distribution: "999.0")


def test_every_fast_path_is_on_by_default():
    assert all(fastpaths.enabled(name) for name in SWITCHED)
    assert fastpaths.fallback_selector()


def test_the_versions_the_guard_expects_are_the_ones_installed_and_pinned():
    """A library upgraded without re-checking the fast path that leans on it fails here, not in production."""
    requirements = (ROOT / "requirements.txt").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[\w+\])?==([^\s#]+)", requirements, re.M))
    for path in fastpaths.PATHS.values():
        for distribution, version in path.written_for.items():
            assert fastpaths.installed_version(distribution) == version, (path.name, distribution)
            if distribution in pinned:
                assert pinned[distribution] == version, (path.name, distribution)


@pytest.mark.parametrize("name", SWITCHED)
def test_each_setting_turns_its_own_path_off(settings, name):
    setattr(settings, fastpaths.PATHS[name].setting, False)
    assert not fastpaths.enabled(name)
    assert all(fastpaths.enabled(other) for other in SWITCHED if other != name)


def test_fast_paths_off_turns_every_one_off(settings):
    settings.CHORUS_FAST_PATHS = False
    assert not any(fastpaths.enabled(name) for name in SWITCHED)


def test_other_library_versions_turn_each_path_off_with_one_log_line(other_versions, caplog):
    with caplog.at_level(logging.WARNING, logger="agents_app.ops.fastpaths"):
        for _ in range(3):
            assert not any(fastpaths.enabled(name) for name in SWITCHED)
            assert not fastpaths.fallback_selector()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(fastpaths.PATHS), lines
    assert any("fast path wire is off: hiredis 999.0 (written for 3.5.0)" in line for line in lines)


def test_the_startup_line_names_each_path_and_its_state(settings, caplog):
    settings.CHORUS_FAST_FRAMES = False
    with caplog.at_level(logging.INFO, logger="agents_app.ops.fastpaths"):
        fastpaths.log_summary()
    assert "fast paths: wire on, frames off, dispatch on, model_stream on, layer_send on, fallback_selector on" in (
        caplog.text
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("fast", [True, False])
async def test_the_wire_off_or_on_other_versions_is_redis_pys(settings, redis_url, monkeypatch, fast):
    settings.CHORUS_FAST_WIRE = fast
    connection = await wire.connect(redis_url)
    try:
        assert isinstance(connection, resp.RespConnection if fast else wire.RedisPyConnection)
        assert await connection.call([("PING",)]) == [b"PONG"]
    finally:
        await connection.close()
    settings.CHORUS_FAST_WIRE = True
    monkeypatch.setattr(fastpaths, "installed_version", lambda distribution: "0.1")
    fastpaths.reset()
    connection = await wire.connect(redis_url)
    await connection.close()
    assert isinstance(connection, wire.RedisPyConnection)


@pytest.mark.asyncio
@pytest.mark.parametrize("fast", [True, False])
async def test_frames_off_go_through_daphnes_own_send(settings, monkeypatch, fast):
    settings.CHORUS_FAST_FRAMES = fast
    written, sent = [], []
    monkeypatch.setattr(routing, "direct_text_writer", lambda send: lambda text: written.append(text) or True)

    async def send(message):
        sent.append(message)

    await routing.text_sender(send)('{"type": "token"}')
    if fast:
        assert written == ['{"type": "token"}'] and sent == []
    else:
        assert written == [] and sent == [{"type": "websocket.send", "text": '{"type": "token"}'}]


@pytest.mark.asyncio
@pytest.mark.parametrize("fast", [True, False])
async def test_dispatch_off_is_channels_own_with_its_connection_cleanup(settings, monkeypatch, fast):
    settings.CHORUS_FAST_DISPATCH = fast
    cleanups = []

    async def aclose_old_connections():
        cleanups.append(1)

    monkeypatch.setattr("channels.consumer.aclose_old_connections", aclose_old_connections)

    class Consumer(dispatch.DirectDispatch, AsyncConsumer):
        handled: list = []

        async def chat_token(self, message):
            self.handled.append(message["type"])

    consumer = Consumer()
    await consumer.dispatch({"type": "chat.token"})
    assert consumer.handled == ["chat.token"]
    assert cleanups == ([] if fast else [1])
    with pytest.raises(ValueError, match="No handler"):
        await consumer.dispatch({"type": "chat.nothing"})


def test_the_worker_gives_the_runner_the_paths_this_process_takes(settings, other_versions):
    from agents_app.worker.agent import model_settings

    assert model_settings().fast_paths == FastPaths(model_stream=False, fallback_selector=False)
    fastpaths.reset()
    settings.CHORUS_FAST_MODEL_STREAM = False
    assert model_settings().fast_paths.model_stream is False


async def answer(fakellm_url, fast_paths: FastPaths, team: str, task: str):
    config = json.loads((HERE / f"{team}.json").read_text())
    model = ModelSettings(api_key="offline", base_url=fakellm_url, fast_paths=fast_paths)
    tools = build_tools(search_conversations=lambda query: "nothing found")
    events = []
    result = await run_turn(TurnRequest(team_config=config, task=task, tools=tools), model, events.append)
    return events, result


@pytest.mark.asyncio
@pytest.mark.parametrize("fast", [True, False])
async def test_the_model_stream_off_is_autogens_own_client(fakellm_url, monkeypatch, fast):
    read = []
    own = modelstream.stream_completion

    def spy(*args, **kwargs):
        read.append(1)
        return own(*args, **kwargs)

    monkeypatch.setattr(modelstream, "stream_completion", spy)
    events, result = await answer(fakellm_url, FastPaths(model_stream=fast), "assistant", "Say something.")

    assert result.status == "succeeded"
    (message,) = [e for e in events if isinstance(e, CompletedMessage)]
    assert "".join(e.delta for e in events if isinstance(e, TokenDelta)) == message.content != ""
    assert result.completion_tokens > 0, "usage is reported on either path"
    assert bool(read) is fast


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", [True, False])
async def test_without_its_own_manager_the_selector_is_autogens(fakellm_url, fallback):
    """A selection model that names no one: Chorus's manager gives the turn to the fallback speaker (the reporter
    answers); AutoGen's own gives it to a speaker again until the message cap, without an answer."""
    paths = FastPaths(fallback_selector=fallback)
    events, result = await answer(fakellm_url, paths, "research_desk", "What is 6*7? [[select:Nobody.]]")

    speakers = [e.source for e in events if isinstance(e, CompletedMessage)]
    assert ("reporter" in speakers) is fallback, speakers


@pytest.mark.asyncio
async def test_a_down_model_server_reads_unreachable_without_changing_the_sdk_for_anyone_else():
    import aiohttp
    import httpx2
    import openai
    from autogen_core.models import UserMessage
    from autogen_ext.models.openai import OpenAIChatCompletionClient
    from openai._vendor.httpx_aiohttp import transport

    from tests.support import free_port

    info = {"vision": False, "function_calling": True, "json_output": False, "family": "unknown",
            "structured_output": False}  # fmt: skip
    client = OpenAIChatCompletionClient(model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k",
                                        model_info=info, max_retries=0)  # fmt: skip
    modelstream.with_aiohttp_transport(client)
    try:
        with pytest.raises(openai.APIConnectionError) as raised:
            async for _ in modelstream.stream_completion(client, [UserMessage(content="hi", source="user")], print):
                pass
        assert not isinstance(raised.value, openai.APITimeoutError)
    finally:
        await client.close()
    assert transport.AIOHTTP_EXC_MAP[aiohttp.ClientConnectionError] is httpx2.ConnectTimeout, "the SDK's own map"


@pytest.mark.integration
def test_every_server_and_worker_says_which_fast_paths_it_takes(stack):
    """The processes the tests start inherit CHORUS_FAST_PATHS: `make test`'s second pass runs them all off."""
    import os
    import time

    all_off = os.environ.get("CHORUS_FAST_PATHS", "1").strip().lower() in ("0", "false", "no", "off")
    expected = "off" if all_off else "on"
    deadline = time.monotonic() + 20
    for process in stack.processes:
        while not (lines := [line for line in process.log_tail(400).splitlines() if "fast paths: " in line]):
            assert time.monotonic() < deadline, f"{process.name} never said which fast paths it takes"
            time.sleep(0.1)
        states = re.findall(r"(\w+) (on|off)\b", lines[0].split("fast paths: ", 1)[1])
        assert len(states) == len(fastpaths.PATHS), lines[0]
        assert all(state == expected for name, state in states if name != "fallback_selector"), lines[0]
