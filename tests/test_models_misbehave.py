"""Models that misbehave (issue 13, point 3), each reproduced with the offline model server's directives:

- a selector model that never names a valid speaker (small local models do this),
- an empty or whitespace-only reply,
- usage that must count every model request (the selector's and the router's too),
- a gateway that breaks off a stream with an error chunk, or answers "unknown model" / "context too long" in
  its own words,
- a team config that names its own model server, which must never receive the deployment's API key.

The runner knows nothing of Django; only the Team.clean and settings tests touch Django.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import subprocess
import sys

import pytest
from aiohttp import web
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool
from autogen_ext.models.replay import ReplayChatCompletionClient

from agents_app.runner import (
    NO_KEY,
    CompletedMessage,
    FallbackSelectorGroupChat,
    ModelSettings,
    TeamConfigError,
    TokenDelta,
    TurnRequest,
    classify_error,
    model_endpoints,
    modelstream,
    prepare_team_config,
    router,
    run_turn,
    validate_team_config,
)
from agents_app.teams import HERE
from fakellm.server import FakeLLMConfig, build_app
from tests.support import ROOT, free_port

ASSISTANT = json.loads((HERE / "assistant.json").read_text())
RESEARCH_DESK = json.loads((HERE / "research_desk.json").read_text())
REPORTER = frozenset({"reporter"})
TOOL_NAMES = ("calculator", "current_time", "search_my_conversations")


def autogens_selector(config: dict) -> dict:
    """The research desk as it shipped before: AutoGen's own SelectorGroupChat, no fallback speaker."""
    config = copy.deepcopy(config)
    config["provider"] = "autogen_agentchat.teams.SelectorGroupChat"
    del config["config"]["fallback_speaker"]
    return config


def tools() -> dict:
    def make(name):
        def tool(expression: str = "") -> str:
            return "42"

        return FunctionTool(tool, name=name, description=f"{name} (a stand-in)")

    return {name: make(name) for name in TOOL_NAMES}


def model_clients(config: dict) -> list[dict]:
    """The config dict of every model client in a team config (agents' and a selector's)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("component_type") == "model":
                found.append(node["config"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


async def turn(config, task, model, final_speakers=frozenset(), team=None):
    events = []
    request = TurnRequest(team_config=config, task=task, final_speakers=final_speakers, tools=tools())
    result = await run_turn(request, model, events.append, team=team)
    result.streamed = "".join(e.delta for e in events if isinstance(e, TokenDelta))  # what a page would have shown
    return [e for e in events if not isinstance(e, TokenDelta)], result


def chorus_tracebacks(caplog) -> list:
    """Chorus's own log records with a traceback (AutoGen's runtime logs every agent's error with one)."""
    return [r for r in caplog.records if r.name.startswith("agents_app") and r.exc_info]


def offline(url: str) -> ModelSettings:
    return ModelSettings(api_key="offline", base_url=url, max_retries=0, timeout=10)


# ------------------------------------------------------------------------ a selector that names no one


@pytest.mark.asyncio
async def test_autogens_selector_falls_back_to_the_planner_until_the_cap_and_the_run_says_there_is_no_answer(
    fakellm_url,
):
    """The bug as reported: AutoGen gives the turn back to the previous speaker after three failed selections,
    so the planner speaks nine times and the message cap ends the run. It must fail with `no_answer`, its
    steps kept, and its usage must count the 27 speaker-selection requests."""
    events, result = await turn(
        autogens_selector(RESEARCH_DESK), "What is 6*7? [[select:Nobody.]] [[tps:0]]", offline(fakellm_url), REPORTER
    )

    assert [(e.source, e.is_final_answer) for e in events] == [("planner", False)] * 9, "the steps are kept"
    assert (result.status, result.error_code) == ("failed", "no_answer")
    assert result.error_detail.startswith("The team stopped before reporter wrote an answer (Maximum number")
    assert result.team_state is None, "a turn without an answer leaves the memory as it was"
    assert {purpose: entry["requests"] for purpose, entry in result.usage.items()} == {
        "speaker_selection": 27,
        "agent": 9,
    }
    assert result.usage["speaker_selection"]["completion_tokens"] == 27  # "Nobody." is one token
    assert result.prompt_tokens == sum(entry["prompt_tokens"] for entry in result.usage.values())
    assert result.completion_tokens == sum(entry["completion_tokens"] for entry in result.usage.values())
    assert result.usage["agent"]["completion_tokens"] == sum(e.completion_tokens for e in events)


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["Nobody.", "planner or analyst", ""], ids=["no-name", "two-names", "empty"])
async def test_the_shipped_selector_team_gives_a_failed_selection_to_the_reporter(fakellm_url, answer):
    events, result = await turn(
        RESEARCH_DESK, f"What is 6*7? [[select:{answer}]] [[tps:0]]", offline(fakellm_url), REPORTER
    )

    assert (result.status, result.error_code) == ("succeeded", "")
    assert [(e.source, e.is_final_answer) for e in events] == [("reporter", True)]
    assert result.usage["speaker_selection"]["requests"] == 3  # max_selector_attempts, then the fallback
    assert result.usage["agent"]["requests"] == 1


@pytest.mark.asyncio
async def test_a_selector_that_names_speakers_is_obeyed_and_every_request_is_counted(fakellm_url):
    task = 'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]] [[reporter>reply:It is 42.]] [[tps:0]]'
    events, result = await turn(RESEARCH_DESK, task, offline(fakellm_url), REPORTER)

    assert result.status == "succeeded"
    assert [e.source for e in events if isinstance(e, CompletedMessage)] == ["planner", "analyst", "reporter"]
    assert {purpose: entry["requests"] for purpose, entry in result.usage.items()} == {
        "speaker_selection": 3,
        "agent": 3,
    }
    assert result.usage["speaker_selection"]["completion_tokens"] == 3  # one name each
    assert all(entry["prompt_tokens"] > 0 for entry in result.usage.values())


@pytest.mark.asyncio
async def test_a_team_built_in_code_is_metered_too_its_selector_included():
    """Teams passed to run_turn ready-built (tests, the bench) get the same treatment as loaded ones."""

    def agent(name, replies):
        return AssistantAgent(name, model_client=ReplayChatCompletionClient(replies), model_client_stream=True)

    selector = ReplayChatCompletionClient(["hmm", "well", "no idea"])
    team = FallbackSelectorGroupChat(
        [agent("planner", ["A plan."]), agent("reporter", ["The answer."])],
        model_client=selector,
        fallback_speaker="reporter",
        max_turns=1,
    )

    events, result = await turn({}, "hi", ModelSettings(api_key="unused"), REPORTER, team=team)

    assert [(e.source, e.is_final_answer, e.content) for e in events] == [("reporter", True, "The answer.")]
    assert result.status == "succeeded"
    assert {purpose: entry["requests"] for purpose, entry in result.usage.items()} == {
        "speaker_selection": 3,
        "agent": 1,
    }


def test_the_fallback_speaker_is_kept_in_the_dumped_config_and_must_be_an_agent():
    planner = AssistantAgent("planner", model_client=ReplayChatCompletionClient(["x"]))
    reporter = AssistantAgent("reporter", model_client=ReplayChatCompletionClient(["x"]))
    team = FallbackSelectorGroupChat([planner, reporter], model_client=ReplayChatCompletionClient(["x"]),
                                     fallback_speaker="reporter")  # fmt: skip
    dumped = team.dump_component().model_dump(mode="json")
    assert dumped["provider"] == "agents_app.runner.FallbackSelectorGroupChat"
    assert dumped["config"]["fallback_speaker"] == "reporter"
    assert FallbackSelectorGroupChat.load_component(dumped)._fallback_speaker == "reporter"

    assert validate_team_config(RESEARCH_DESK, frozenset(TOOL_NAMES)) == ["planner", "analyst", "reporter"]
    wrong = copy.deepcopy(RESEARCH_DESK)
    wrong["config"]["fallback_speaker"] = "editor"
    with pytest.raises(TeamConfigError, match="'editor' is not an agent of this team"):
        validate_team_config(wrong, frozenset(TOOL_NAMES))


# -------------------------------------------------------------------------------------- empty replies


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["empty", "blank"])
async def test_an_empty_or_blank_reply_is_no_answer(fakellm_url, kind):
    events, result = await turn(ASSISTANT, f"hi [[fault:{kind}]]", offline(fakellm_url), frozenset({"assistant"}))

    assert (result.status, result.error_code) == ("failed", "no_answer")
    assert "empty reply" in result.error_detail
    assert [(e.source, e.is_final_answer, e.content.strip()) for e in events] == [("assistant", False, "")]
    assert result.team_state is None
    assert result.usage["agent"]["requests"] == 1


@pytest.mark.asyncio
async def test_an_empty_revision_never_replaces_the_draft_that_was_the_answer():
    writer = AssistantAgent("writer", model_client=ReplayChatCompletionClient(["Draft.", "  "]),
                            model_client_stream=True)  # fmt: skip
    critic = AssistantAgent("critic", model_client=ReplayChatCompletionClient(["Shorter."]), model_client_stream=True)
    team = RoundRobinGroupChat([writer, critic], max_turns=3)

    events, result = await turn({}, "write", ModelSettings(api_key="unused"), frozenset({"writer"}), team=team)

    assert result.status == "succeeded"
    assert [(e.source, e.is_final_answer) for e in events] == [("writer", True), ("critic", False), ("writer", False)]


# ---------------------------------------------------------------------------------------- usage: routing


@pytest.mark.asyncio
async def test_the_routers_model_request_is_counted_on_its_route(fakellm_url):
    config = {"component_type": "chorus.router", "teams": ["assistant", "writer-critic"], "fallback": "assistant",
              "rules": [{"team": "writer-critic", "keywords": ["poem"]}], "use_model": True}  # fmt: skip
    candidates = {"assistant": "One assistant.", "writer-critic": "A writer and a critic."}

    by_rule = await router.route(config, candidates, "a poem please", offline(fakellm_url))
    by_model = await router.route(
        config, candidates, "Hi there [[reply:writer-critic, it fits.]]", offline(fakellm_url)
    )
    unreachable = offline(f"http://127.0.0.1:{free_port()}/v1")
    failed = await router.route(config, candidates, "Hi there", unreachable)

    assert by_rule.usage == {}
    assert by_model.team == "writer-critic"
    assert by_model.usage["routing"]["requests"] == 1
    assert by_model.usage["routing"]["completion_tokens"] == 3 and by_model.usage["routing"]["prompt_tokens"] > 0
    assert "failed (model_unreachable)" in failed.reason
    assert failed.usage == {"routing": {"prompt_tokens": 0, "completion_tokens": 0, "requests": 1}}


# --------------------------------------------------------------------------- gateways' errors, classified


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["chorus", "autogen"])
async def test_an_error_chunk_after_some_tokens_is_a_cut_stream_with_the_text_kept(
    fakellm_url, transport, monkeypatch, caplog
):
    """`data: {"error": ...}` after a few tokens, read by Chorus's stream reader or by AutoGen's own client."""
    if transport == "autogen":
        monkeypatch.setattr(modelstream, "can_stream", lambda *args: False)
    caplog.set_level(logging.WARNING)

    events, result = await turn(ASSISTANT, "hi [[fault:stream-error]] [[tps:0]]", offline(fakellm_url))

    assert (result.status, result.error_code) == ("failed", "model_stream_cut")
    assert result.error_detail.startswith("The model server broke off the answer with an error (litellm.")
    assert result.error_detail.endswith("what arrived is kept.")
    assert result.streamed == "Hello from **Chorus's "
    assert events == []
    assert not chorus_tracebacks(caplog), "no traceback: the model's fault, not a bug in Chorus"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("stream-error:0", "model_error"),  # the error chunk before any token: nothing was cut
        ("400-model", "model_not_found"),  # LiteLLM: 400 "Invalid model name passed in model=..."
        ("400-context-text", "context_too_long"),  # vLLM: 400 "This model's maximum context length is ..."
        ("400-context", "context_too_long"),  # OpenAI: 400, code context_length_exceeded
    ],
)
async def test_gateways_errors_map_to_what_they_mean(fakellm_url, fault, code, caplog):
    caplog.set_level(logging.WARNING)
    events, result = await turn(ASSISTANT, f"hi [[fault:{fault}]]", offline(fakellm_url))

    assert (result.status, result.error_code) == ("failed", code)
    assert events == [] and result.streamed == ""
    assert not chorus_tracebacks(caplog)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        # As AutoGen re-raises an agent's error inside a group chat.
        ("BadRequestError: Error code: 400 - {'error': {'message': \"{'error': '/chat/completions: Invalid model "
         "name passed in model=llama3'}\", 'type': 'None', 'param': 'None', 'code': '400'}}", "model_not_found"),
        ("NotFoundError: Error code: 404 - {'error': {'message': 'model \"llama3\" not found, try pulling it first'}}",
         "model_not_found"),
        ("BadRequestError: Error code: 400 - {'error': {'message': 'litellm.ContextWindowExceededError: "
         "litellm.BadRequestError: prompt is too long'}}", "context_too_long"),
        ("UnprocessableEntityError: Error code: 422 - {'detail': 'bad field'}", "model_bad_request"),
        ("InternalServerError: Error code: 500 - {'error': {'message': 'This model's maximum context length is "
         "8192 tokens'}}", "context_too_long"),
        ("APIError: An error occurred during streaming", "model_error"),
        ("ModelStreamError: upstream failed", "model_error"),
        ("KeyError: 'x'", "internal_error"),
    ],
)  # fmt: skip
def test_classify_error_reads_gateways_words(error, code):
    assert classify_error(RuntimeError(error + "\nTraceback: ..."))[0] == code


# ------------------------------------------------------------------ the deployment's key stays at home


class RecordingServer:
    """The offline model server in this process on a loopback port, recording every request's headers."""

    def __init__(self):
        self.headers: list[dict[str, str]] = []
        self.url = ""

    @property
    def authorizations(self) -> list[str | None]:
        return [h.get("Authorization") for h in self.headers]

    def heard(self, secret: str) -> bool:
        return any(secret in value for h in self.headers for value in h.values())


@contextlib.asynccontextmanager
async def recording_server():
    server = RecordingServer()

    @web.middleware
    async def record(request, handler):
        server.headers.append(dict(request.headers))
        return await handler(request)

    app = build_app(FakeLLMConfig(tps=0))
    app.middlewares.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
def deployment_key():
    return "sk-deployment-" + secrets.token_hex(8)


def with_model_clients(config: dict, **settings) -> dict:
    config = copy.deepcopy(config)
    for client in model_clients(config):
        client.update(settings)
    return config


@pytest.mark.asyncio
async def test_a_config_naming_another_server_is_refused_and_that_server_never_hears_from_chorus(deployment_key):
    async with recording_server() as deployment, recording_server() as other:
        model = ModelSettings(api_key=deployment_key, base_url=deployment.url, max_retries=0)
        config = with_model_clients(ASSISTANT, base_url=other.url)  # an AutoGen export pointing at a local Ollama

        with pytest.raises(TeamConfigError, match="which is neither Chorus's model endpoint"):
            validate_team_config(config, model=model)
        events, result = await turn(config, "hi", model)

        assert (result.status, result.error_code) == ("failed", "team_config_invalid")
        assert "CHORUS_MODEL_ENDPOINTS" in result.error_detail
        assert other.headers == [] and deployment.headers == [] and events == []


@pytest.mark.asyncio
@pytest.mark.parametrize("named_by", ["name", "url", "name-no-key"])
async def test_a_named_endpoint_gets_its_own_key_and_never_the_deployments(deployment_key, named_by):
    async with recording_server() as deployment, recording_server() as other:
        key_env = {} if named_by == "name-no-key" else {"api_key_env": "CHORUS_TEST_LOCAL_KEY"}
        endpoints = model_endpoints({"local": {"base_url": other.url + "/", **key_env}},
                                    {"CHORUS_TEST_LOCAL_KEY": "local-key"})  # fmt: skip
        model = ModelSettings(api_key=deployment_key, base_url=deployment.url, max_retries=0, endpoints=endpoints)
        how = {"base_url": other.url} if named_by == "url" else {"endpoint": "local"}
        config = with_model_clients(RESEARCH_DESK, **how)  # the selector's client too

        assert validate_team_config(config, frozenset(TOOL_NAMES), model) == ["planner", "analyst", "reporter"]
        _events, result = await turn(config, "hi [[select:Nobody.]]", model, REPORTER)

        assert result.status == "succeeded"
        expected = "Bearer no-key" if named_by == "name-no-key" else "Bearer local-key"
        assert other.authorizations == [expected] * 4  # three selections, then the reporter
        assert not other.heard(deployment_key)
        assert deployment.headers == []


@pytest.mark.asyncio
async def test_the_deployments_own_endpoint_named_in_a_config_gets_the_deployment_key(deployment_key):
    async with recording_server() as deployment:
        model = ModelSettings(api_key=deployment_key, base_url=deployment.url, max_retries=0)
        config = with_model_clients(ASSISTANT, base_url=deployment.url + "/")

        _events, result = await turn(config, "hi", model)

        assert result.status == "succeeded"
        assert deployment.authorizations == [f"Bearer {deployment_key}"]


def test_endpoints_are_resolved_in_the_config_and_refused_when_unknown_or_contradictory():
    model = ModelSettings(
        api_key="sk-deployment",
        base_url="http://127.0.0.1:9/v1",
        model="gpt-4o-mini",
        endpoints=model_endpoints(
            {
                "ollama": {"base_url": "http://127.0.0.1:11434/v1", "model": "llama3.2"},
                "azure": {"base_url": "https://chorus.openai.azure.com", "api_key_env": "AZ"},
            },
            {"AZ": "az-key"},
        ),
    )

    def client_of(config):
        return model_clients(prepare_team_config(config, model))[0]

    deployment = client_of(ASSISTANT)
    assert (deployment["base_url"], deployment["api_key"], deployment["model"]) == (
        "http://127.0.0.1:9/v1", "sk-deployment", "gpt-4o-mini"
    )  # fmt: skip
    ollama = client_of(with_model_clients(ASSISTANT, endpoint="ollama"))
    assert (ollama["base_url"], ollama["api_key"], ollama["model"]) == ("http://127.0.0.1:11434/v1", NO_KEY, "llama3.2")
    assert "endpoint" not in ollama, "Chorus's own key is not passed on to AutoGen"
    named_model = client_of(with_model_clients(ASSISTANT, endpoint="ollama", model="qwen2.5"))
    assert named_model["model"] == "qwen2.5"
    openai_default = prepare_team_config(ASSISTANT, ModelSettings(api_key="sk-deployment"))
    assert model_clients(openai_default)[0]["base_url"] == "https://api.openai.com/v1"

    refused = {
        "Unknown model endpoint 'nope'": with_model_clients(ASSISTANT, endpoint="nope"),
        "also the URL http://127.0.0.1:9/v1": with_model_clients(ASSISTANT, endpoint="ollama",
                                                                 base_url="http://127.0.0.1:9/v1"),
        "connects to http://127.0.0.1:11435/v1": with_model_clients(ASSISTANT, base_url="http://127.0.0.1:11435/v1"),
        "connects to https://api.openai.com/v1": with_model_clients(ASSISTANT, base_url="https://api.openai.com/v1"),
        "connects to http://user@evil.example/v1": with_model_clients(ASSISTANT,
                                                                      base_url="http://user@evil.example/v1"),
    }  # fmt: skip
    for message, config in refused.items():
        with pytest.raises(TeamConfigError, match=message.replace(".", r"\.")):
            validate_team_config(config, model=model)

    # An Azure client: its azure_endpoint is where the key goes, so it too must be the deployment's or named.
    azure = with_model_clients(ASSISTANT)
    azure["config"]["participants"][0]["config"]["model_client"] = {
        "provider": "autogen_ext.models.openai.AzureOpenAIChatCompletionClient",
        "component_type": "model",
        "config": {"model": "gpt-4o", "azure_endpoint": "https://other.openai.azure.com", "api_version": "2024-06-01",
                   "azure_deployment": "d", "model_info": ASSISTANT["config"]["participants"][0]["config"][
                       "model_client"]["config"]["model_info"]},
    }  # fmt: skip
    with pytest.raises(TeamConfigError, match="connects to https://other.openai.azure.com"):
        validate_team_config(azure, model=model)
    client = azure["config"]["participants"][0]["config"]["model_client"]["config"]
    client["azure_endpoint"] = "https://chorus.openai.azure.com/"
    prepared = client_of(azure)  # (loading an Azure client needs the azure package, not installed here)
    assert (prepared["api_key"], "base_url" in prepared) == ("az-key", False)


def test_model_endpoints_refuse_malformed_entries():
    for bad in ({"x": "http://h/v1"}, {"x": {}}, {"x": {"base_url": " "}}, {"x": {"base_url": "http://h", "model": 3}}):
        with pytest.raises(ValueError, match="CHORUS_MODEL_ENDPOINTS"):
            model_endpoints(bad, {})


@pytest.mark.django_db
def test_team_validation_uses_the_deployments_endpoints(settings):
    from django.core.exceptions import ValidationError

    from agents_app.models import Team

    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    settings.CHORUS_MODEL_ENDPOINTS = {"ollama": {"base_url": "http://127.0.0.1:11434/v1"}}

    def team(**client_settings) -> Team:
        config = with_model_clients(ASSISTANT, **client_settings)
        return Team(slug="t", name="T", config=config, final_speakers=["assistant"])

    team().clean()
    team(base_url="http://127.0.0.1:9/v1/").clean()
    team(base_url="http://127.0.0.1:11434/v1").clean()
    team(endpoint="ollama").clean()
    for bad in ({"base_url": "http://127.0.0.1:11435/v1"}, {"endpoint": "lmstudio"}):
        with pytest.raises(ValidationError) as raised:
            team(**bad).clean()
        assert "CHORUS_MODEL_ENDPOINTS" in raised.value.message_dict["config"][0]


def test_settings_read_the_endpoints_and_refuse_a_malformed_variable():
    code = "from django.conf import settings; print(settings.CHORUS_MODEL_ENDPOINTS)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.test_settings"}
    endpoints = json.dumps({"ollama": {"base_url": "http://127.0.0.1:11434/v1", "api_key_env": "OLLAMA_KEY"}})
    good = subprocess.run([sys.executable, "-c", code], env={**env, "CHORUS_MODEL_ENDPOINTS": endpoints},
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "'base_url': 'http://127.0.0.1:11434/v1'" in good.stdout
    for bad in ("{not json", '["a"]', '{"ollama": {"api_key_env": "K"}}'):
        run = subprocess.run([sys.executable, "-c", code], env={**env, "CHORUS_MODEL_ENDPOINTS": bad},
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert run.returncode != 0 and "ImproperlyConfigured: CHORUS_MODEL_ENDPOINTS" in run.stderr
