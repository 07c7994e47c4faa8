"""The agent runner on its own: no Django, no Channels, no browser. Scripted model clients and the offline
model server stand in for the LLM."""

import copy
import json
import subprocess
import sys
import threading
import time

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.replay import ReplayChatCompletionClient

from agents_app.runner import (
    CompletedMessage,
    ModelSettings,
    TeamConfigError,
    TeamTurn,
    TokenDelta,
    TurnRequest,
    prepare_team_config,
    run_turn,
    validate_team_config,
)
from agents_app.teams import HERE
from fakellm import parse_stamp
from tests.support import ROOT

ASSISTANT = json.loads((HERE / "assistant.json").read_text())
UNUSED = ModelSettings(api_key="unused")


def replay_team(*replies: str, names=("assistant",), max_turns: int = 1) -> RoundRobinGroupChat:
    agents = [
        AssistantAgent(name, model_client=ReplayChatCompletionClient(list(replies)), model_client_stream=True)
        for name in names
    ]
    return RoundRobinGroupChat(agents, max_turns=max_turns)


async def collect(request: TurnRequest, model=UNUSED, team=None):
    events = []
    result = await run_turn(request, model, events.append, team=team)
    return events, result


@pytest.mark.asyncio
async def test_it_streams_tokens_that_add_up_to_the_completed_message():
    events, result = await collect(TurnRequest(team_config={}, task="hi"), team=replay_team("Hello there, friend."))

    tokens = [e for e in events if isinstance(e, TokenDelta)]
    messages = [e for e in events if isinstance(e, CompletedMessage)]
    assert result.status == "succeeded"
    assert len(tokens) >= 3
    assert len(messages) == 1
    assert events[-1] == messages[0], "the completed message comes after its tokens"
    assert {t.stream_id for t in tokens} == {messages[0].id}
    assert "".join(t.delta for t in tokens) == messages[0].content == "Hello there, friend."
    assert messages[0].is_final_answer and messages[0].source == "assistant"
    assert result.completion_tokens > 0 and result.prompt_tokens > 0
    assert result.team_state["type"] == "TeamState"


@pytest.mark.asyncio
async def test_it_marks_only_the_final_speakers_messages_as_the_answer():
    team = replay_team("Draft one.", "Final version.", names=("writer", "editor"), max_turns=2)
    request = TurnRequest(team_config={}, task="write", final_speakers=frozenset({"editor"}))

    events, result = await collect(request, team=team)

    answers = {e.source: e.is_final_answer for e in events if isinstance(e, CompletedMessage)}
    assert answers == {"writer": False, "editor": True}


@pytest.mark.asyncio
async def test_it_remembers_earlier_turns_through_saved_state(fakellm_url):
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    first_events, first = await collect(TurnRequest(team_config=ASSISTANT, task="My name is Ada."), model)
    # A new team object, as on another worker: only the saved state carries the memory.
    request = TurnRequest(team_config=ASSISTANT, task="What is my name?", team_state=first.team_state)
    second_events, second = await collect(request, model)

    assert first.status == second.status == "succeeded"
    first_answer = [e for e in first_events if isinstance(e, CompletedMessage)][0].content
    second_answer = [e for e in second_events if isinstance(e, CompletedMessage)][0].content
    assert "turn 1 of" in first_answer
    assert "turn 2 of" in second_answer, "the model saw the first turn's messages"


@pytest.mark.asyncio
async def test_tokens_reach_the_callback_while_the_model_is_still_writing(fakellm_url):
    """The seed's question: with stream=True, are words passed on as the model produces them? Yes: each
    token is stamped by the model server when it is written and reaches `emit` within milliseconds, long
    before the model has finished (40 tokens at 20 tokens/s take 2 s)."""
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    arrivals: list[tuple[int, int, int]] = []  # (seq, written_ns, received_ns)

    def emit(event):
        if isinstance(event, TokenDelta):
            now = time.time_ns()
            arrivals.extend((seq, written, now) for seq, written in parse_stamp(event.delta))

    request = TurnRequest(team_config=ASSISTANT, task="[[stamp]] [[tokens:40]] [[tps:20]]")
    result = await run_turn(request, model, emit)

    assert result.status == "succeeded"
    assert [seq for seq, _, _ in arrivals] == list(range(1, 41))
    generation_ms = (arrivals[-1][1] - arrivals[0][1]) / 1e6
    first_delay_ms = (arrivals[0][2] - arrivals[0][1]) / 1e6
    assert generation_ms > 1500
    assert first_delay_ms < generation_ms / 4, "the first token did not wait for the whole answer"
    assert arrivals[0][2] < arrivals[-1][1], "the first token arrived before the model wrote the last one"


@pytest.mark.asyncio
async def test_it_reports_an_unreachable_model_as_a_failed_turn():
    model = ModelSettings(api_key="offline", base_url="http://127.0.0.1:9/v1", timeout=5)
    config = copy.deepcopy(ASSISTANT)
    config["config"]["participants"][0]["config"]["model_client"]["config"]["max_retries"] = 0

    events, result = await collect(TurnRequest(team_config=config, task="hi"), model)

    assert result.status == "failed"
    assert result.error_code == "model_unreachable"
    assert "could not be reached" in result.error_detail
    assert events == []


def test_a_turn_in_a_thread_stops_when_cancelled(fakellm_url):
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    first_token = threading.Event()
    events = []

    def emit(event):
        events.append(event)
        first_token.set()

    turn = TeamTurn(TurnRequest(team_config=ASSISTANT, task="[[tokens:500]] [[tps:50]]"), model, emit)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", turn.run()))
    thread.start()
    assert first_token.wait(10)
    turn.cancel()
    thread.join(10)

    assert not thread.is_alive()
    result = outcome["result"]
    assert result.status == "cancelled"
    assert 0 < len(events) < 500
    streamed = "".join(e.delta for e in events if isinstance(e, TokenDelta))
    assert streamed
    assert result.team_state is None, "a stopped turn leaves the memory as it was before it"


def test_prepare_forces_streaming_usage_and_the_environment_key():
    config = copy.deepcopy(ASSISTANT)
    agent = config["config"]["participants"][0]["config"]
    agent["model_client_stream"] = False
    agent["model_client"]["config"]["api_key"] = "**********"

    prepared = prepare_team_config(config, ModelSettings(api_key="from-env", base_url="http://h/v1", model="m-1"))

    agent = prepared["config"]["participants"][0]["config"]
    client = agent["model_client"]["config"]
    assert agent["model_client_stream"] is True
    assert client["api_key"] == "from-env"
    assert client["base_url"] == "http://h/v1"
    assert client["model"] == "m-1"
    assert client["stream_options"] == {"include_usage": True}
    assert config["config"]["participants"][0]["config"]["model_client_stream"] is False, "the input is not changed"


def test_validation_accepts_the_shipped_team():
    assert validate_team_config(ASSISTANT) == ["assistant"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(component_type="agent"), "must be an AutoGen team"),
        (lambda c: c.update(provider="os.system"), "not allowed"),
        (
            lambda c: c["config"]["participants"][0]["config"]["model_client"]["config"].update(api_key="sk-123"),
            "API keys are not stored",
        ),
        (
            lambda c: c["config"]["participants"][0]["config"]["workbench"][0]["config"]["tools"].append(
                {
                    "provider": "autogen_core.tools.FunctionTool",
                    "component_type": "tool",
                    "config": {"source_code": "import os\nos.system('touch /tmp/pwned')", "name": "x"},
                }
            ),
            "Tools cannot be defined in a config",
        ),
        (lambda c: c["config"].pop("participants"), "does not load"),
    ],
    ids=["not-a-team", "unknown-provider", "stored-key", "function-tool", "broken"],
)
def test_validation_refuses_configs_that_are_not_safe_data(mutate, message):
    config = copy.deepcopy(ASSISTANT)
    mutate(config)
    with pytest.raises(TeamConfigError, match=message):
        validate_team_config(config)


def test_the_runner_module_imports_nothing_from_django_or_channels():
    code = (
        "import sys, agents_app.runner; print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'channels'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.asyncio
async def test_the_critics_approval_ends_a_writer_critic_turn_but_the_persons_word_does_not(fakellm_url):
    config = json.loads((HERE / "writer_critic.json").read_text())
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    request = TurnRequest(team_config=config, task="APPROVED is my word; write a line. [[critic>reply:APPROVED]]")

    events, result = await collect(request, model)

    speakers = [(e.source, e.content) for e in events if isinstance(e, CompletedMessage)]
    assert [source for source, _ in speakers] == ["writer", "critic"]
    assert speakers[1][1] == "APPROVED" and result.stop_reason == "Text 'APPROVED' mentioned"


@pytest.mark.asyncio
async def test_a_config_with_a_forbidden_provider_never_loads_even_at_run_time():
    config = copy.deepcopy(ASSISTANT)
    config["config"]["participants"][0]["config"]["model_client"]["provider"] = "os.system"

    events, result = await collect(TurnRequest(team_config=config, task="hi"))

    assert (result.status, result.error_code) == ("failed", "team_config_invalid")
    assert "not allowed" in result.error_detail and events == []


@pytest.mark.asyncio
async def test_a_saved_state_that_no_longer_fits_the_team_is_set_aside(fakellm_url, caplog):
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    _events, first = await collect(TurnRequest(team_config=ASSISTANT, task="hi"), model)
    renamed = copy.deepcopy(ASSISTANT)
    renamed["config"]["participants"][0]["config"]["name"] = "helper"  # an admin renamed the agent

    events, result = await collect(TurnRequest(team_config=renamed, task="again", team_state=first.team_state), model)

    assert result.status == "succeeded"
    assert "saved team state does not fit the team any more" in caplog.text
    assert [e.source for e in events if isinstance(e, CompletedMessage)] == ["helper"]


@pytest.mark.asyncio
async def test_each_request_to_the_model_is_announced_before_its_first_token(fakellm_url):
    """The worker's start slots rely on on_model_call: called once per model request (a writer and a critic:
    two), before any token of that request reaches emit."""
    config = json.loads((HERE / "writer_critic.json").read_text())
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    request = TurnRequest(team_config=config, task="write a line [[critic>reply:APPROVED]] [[tokens:3]]")
    log: list[str] = []

    def emit(event):
        log.append(type(event).__name__)

    result = await run_turn(request, model, emit, on_model_call=lambda: log.append("model call"))

    assert result.status == "succeeded"
    assert log.count("model call") == 2
    assert log[0] == "model call", "the first request is announced before its first token"


@pytest.mark.asyncio
async def test_every_model_request_is_announced_and_counted_by_purpose(fakellm_url):
    """A selector team's speaker-selection requests are requests too: announced (the worker's start slots)
    and counted in the result's usage, apart from the agents' own."""
    from agents_app.runner.config import _placeholder_tool

    config = json.loads((HERE / "research_desk.json").read_text())
    tools = {name: _placeholder_tool(name) for name in ("calculator", "current_time", "search_my_conversations")}
    request = TurnRequest(team_config=config, task="Hi [[tps:0]]", final_speakers=frozenset({"reporter"}), tools=tools)
    calls: list[str] = []

    result = await run_turn(request, ModelSettings(api_key="offline", base_url=fakellm_url), lambda e: None,
                            on_model_call=lambda: calls.append("call"))  # fmt: skip

    assert result.status == "succeeded"
    assert set(result.usage) == {"agent", "speaker_selection"}
    assert len(calls) == sum(entry["requests"] for entry in result.usage.values()) == 6
    assert (result.prompt_tokens, result.completion_tokens) == (
        sum(entry["prompt_tokens"] for entry in result.usage.values()),
        sum(entry["completion_tokens"] for entry in result.usage.values()),
    )
