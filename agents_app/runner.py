"""Runs one turn of an AutoGen team and reports what happens as plain events.

This module knows nothing of Django or Channels: it takes plain data (the team's component config, its
saved state, the user's text, model settings) and an `emit` callback, and returns a `TurnResult`. The
worker turns the events into protocol events; the tests drive it with a scripted model client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import io
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.messages import (
    ModelClientStreamingChunkEvent,
    MultiModalMessage,
    TextMessage,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
    ToolCallSummaryMessage,
)
from autogen_agentchat.teams import BaseGroupChat, SelectorGroupChat
from autogen_agentchat.teams._group_chat._selector_group_chat import SelectorGroupChatConfig, SelectorGroupChatManager
from autogen_core import CancellationToken, Component, ComponentBase, Image
from autogen_core.models import ChatCompletionClient, CreateResult, ModelCapabilities, ModelInfo, RequestUsage
from autogen_core.tools import BaseTool, FunctionTool
from PIL import Image as PILImage
from pydantic import BaseModel

from agents_app import modelstream

logger = logging.getLogger(__name__)

# Providers a stored team config may name. Anything else (arbitrary classes, FunctionTool with source code
# that executes on load, code executors) is refused: a config is data, never code.
ALLOWED_PROVIDERS = {
    "team": {
        "autogen_agentchat.teams.RoundRobinGroupChat",
        "autogen_agentchat.teams.SelectorGroupChat",
        "autogen_agentchat.teams.Swarm",
        "agents_app.runner.FallbackSelectorGroupChat",
    },
    "agent": {"autogen_agentchat.agents.AssistantAgent"},
    "model": {
        "autogen_ext.models.openai.OpenAIChatCompletionClient",
        "autogen_ext.models.openai.AzureOpenAIChatCompletionClient",
    },
    "termination": {
        "autogen_agentchat.conditions.MaxMessageTermination",
        "autogen_agentchat.conditions.TextMentionTermination",
        "autogen_agentchat.conditions.StopMessageTermination",
        "autogen_agentchat.conditions.TokenUsageTermination",
        "autogen_agentchat.conditions.HandoffTermination",
        "autogen_agentchat.conditions.TimeoutTermination",
        "autogen_agentchat.conditions.SourceMatchTermination",
        "autogen_agentchat.conditions.TextMessageTermination",
        "autogen_agentchat.base.OrTerminationCondition",
        "autogen_agentchat.base.AndTerminationCondition",
        "agents_app.runner.TextFromSourcesTermination",
    },
    "chat_completion_context": {
        "autogen_core.model_context.UnboundedChatCompletionContext",
        "autogen_core.model_context.BufferedChatCompletionContext",
        "autogen_core.model_context.HeadAndTailChatCompletionContext",
    },
    "workbench": {"autogen_core.tools.StaticStreamWorkbench", "autogen_core.tools.StaticWorkbench"},
    "tool": {"agents_app.runner.RegistryTool"},
}
DEFAULT_MODEL = "default"  # a config's model name that means "the deployment's OPENAI_MODEL"
MASKED_KEY = "**********"  # what dump_component() writes for a key (STACK-NOTES trap 5)
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the deployment's endpoint when OPENAI_BASE_URL is empty
AZURE_PROVIDER = "autogen_ext.models.openai.AzureOpenAIChatCompletionClient"
# The key sent to an endpoint that needs none (a local Ollama). Never empty: given no key, the openai SDK
# would read OPENAI_API_KEY from the environment, the deployment's key, and send it there.
NO_KEY = "no-key"
# Model request purposes, the keys of TurnResult.usage (router.Route.usage has "routing").
AGENT, SPEAKER_SELECTION = "agent", "speaker_selection"


class TeamConfigError(ValueError):
    """A team config that Chorus refuses to load; the message says why, for the admin who wrote it."""


class TextFromSourcesConfig(BaseModel):
    text: str
    sources: list[str]


class TextFromSourcesTermination(TextMentionTermination, Component[TextFromSourcesConfig]):
    """Stop when one of `sources` says `text` (a critic's "APPROVED"), never because the person said it.

    AutoGen 0.7.5's TextMentionTermination takes `sources` but drops them when dumped to a config, so a stored
    team would stop as soon as a person's message contained the word.
    """

    component_config_schema = TextFromSourcesConfig
    component_provider_override = "agents_app.runner.TextFromSourcesTermination"

    def _to_config(self) -> TextFromSourcesConfig:
        return TextFromSourcesConfig(text=self._termination_text, sources=list(self._sources or []))

    @classmethod
    def _from_config(cls, config: TextFromSourcesConfig) -> TextFromSourcesTermination:
        return cls(config.text, sources=config.sources)


class FallbackSelectorConfig(SelectorGroupChatConfig):
    fallback_speaker: str | None = None


class _FallbackSelectorManager(SelectorGroupChatManager):
    """SelectorGroupChat's manager, except when the model names no valid speaker in all its attempts: then the
    turn goes to the fallback speaker, where AutoGen would give it to the previous speaker again."""

    def __init__(self, *args: Any, fallback_speaker: str | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._fallback_speaker = fallback_speaker
        self._model_pick: str | None = None  # the last answer's valid pick, by AutoGen's own rule

    def _mentioned_agents(self, message_content: Any, agent_names: list[str]) -> dict[str, int]:
        mentions = super()._mentioned_agents(message_content, agent_names)
        # AutoGen takes an answer that names exactly one agent, unless it repeats a speaker it may not repeat.
        name = next(iter(mentions)) if len(mentions) == 1 else None
        if name is not None and not self._allow_repeated_speaker and name == self._previous_speaker:
            name = None
        self._model_pick = name
        return mentions

    async def _select_speaker(self, roles: str, participants: list[str], max_attempts: int) -> str:
        self._model_pick = None
        speaker = await super()._select_speaker(roles, participants, max_attempts)
        if self._fallback_speaker is None or speaker == self._model_pick:
            return speaker
        logger.warning(
            "the model named no valid speaker in %d attempts; the turn goes to %s", max_attempts, self._fallback_speaker
        )
        return self._fallback_speaker


class FallbackSelectorGroupChat(SelectorGroupChat, Component[FallbackSelectorConfig]):
    """AutoGen's SelectorGroupChat with one more setting, kept in its config: `fallback_speaker`, the agent who
    gets the turn when the model names no valid speaker after `max_selector_attempts` tries.

    Left to itself, AutoGen 0.7.5 gives that turn to the previous speaker again: a small model that never
    answers the selection prompt with a name makes the planner speak until the message cap ends the run,
    without an answer. Its `selector_func` and `candidate_func` would do this, but are code, and AutoGen drops
    them from dumped configs. Naming the final speaker here ends such a run with an answer.
    """

    component_config_schema = FallbackSelectorConfig  # type: ignore[assignment]
    component_provider_override = "agents_app.runner.FallbackSelectorGroupChat"

    def __init__(self, participants: Any, model_client: ChatCompletionClient, *, fallback_speaker: str | None = None,
                 **kwargs: Any):  # fmt: skip
        super().__init__(participants, model_client, **kwargs)
        self._fallback_speaker: str | None = None
        self._set_fallback_speaker(fallback_speaker)

    def _set_fallback_speaker(self, name: str | None) -> None:
        if name is not None and name not in self._participant_names:
            agents = ", ".join(self._participant_names)
            raise ValueError(f"fallback_speaker {name!r} is not an agent of this team ({agents}).")
        self._fallback_speaker = name

    def _create_group_chat_manager_factory(
        self, name, group_topic_type, output_topic_type, participant_topic_types, participant_names,
        participant_descriptions, output_message_queue, termination_condition, max_turns, message_factory,
    ) -> Callable[[], _FallbackSelectorManager]:  # fmt: skip
        # SelectorGroupChat's own factory, with the manager above.
        return lambda: _FallbackSelectorManager(
            name, group_topic_type, output_topic_type, participant_topic_types, participant_names,
            participant_descriptions, output_message_queue, termination_condition, max_turns, message_factory,
            self._model_client, self._selector_prompt, self._allow_repeated_speaker, self._selector_func,
            self._max_selector_attempts, self._candidate_func, self._emit_team_events, self._model_context,
            self._model_client_streaming, fallback_speaker=self._fallback_speaker,
        )  # fmt: skip

    def _to_config(self) -> FallbackSelectorConfig:
        base = super()._to_config()
        return FallbackSelectorConfig(**base.model_dump(), fallback_speaker=self._fallback_speaker)

    @classmethod
    def _from_config(cls, config: FallbackSelectorConfig) -> FallbackSelectorGroupChat:  # type: ignore[override]
        team = super()._from_config(config)
        team._set_fallback_speaker(config.fallback_speaker)
        return team


class RegistryToolConfig(BaseModel):
    name: str


_tool_registry: contextvars.ContextVar[Mapping[str, BaseTool]] = contextvars.ContextVar("chorus_tools")


class RegistryTool(ComponentBase[RegistryToolConfig], Component[RegistryToolConfig]):
    """A tool named in a team config and resolved against the tools the caller provides (Chorus's registry).

    A stored config says `{"provider": "agents_app.runner.RegistryTool", "component_type": "tool",
    "config": {"name": "calculator"}}`: a name, never code. Loading returns the registry's tool itself.
    """

    component_type = "tool"
    component_config_schema = RegistryToolConfig
    component_provider_override = "agents_app.runner.RegistryTool"

    @classmethod
    def _from_config(cls, config: RegistryToolConfig) -> BaseTool:  # type: ignore[override]
        tools = _tool_registry.get({})
        if config.name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            raise TeamConfigError(f"Unknown tool {config.name!r}; the registry has: {known}.")
        return tools[config.name]

    def _to_config(self) -> RegistryToolConfig:
        raise NotImplementedError("registry tools are written by name, not dumped")


def registry_tool_config(name: str) -> dict[str, Any]:
    """What a team config says to give an agent the registry's tool `name`."""
    return {
        "provider": "agents_app.runner.RegistryTool",
        "component_type": "tool",
        "version": 1,
        "component_version": 1,
        "config": {"name": name},
    }


def load_team(
    config: dict[str, Any],
    model: ModelSettings,
    tools: Mapping[str, BaseTool],
    tap: Callable[[str, str, str], None] | None = None,
    on_model_call: Callable[[], None] | None = None,
    meter: UsageMeter | None = None,
) -> BaseGroupChat:
    """Build a team from a stored config, its tools resolved against `tools`. With `tap`, every agent's model
    client hands its streamed deltas to `tap(agent, stream_id, delta)` instead of through AutoGen, every model
    client (a SelectorGroupChat's too) counts its requests and tokens in `meter`, and calls `on_model_call()`
    as it sends each request to the model."""
    check_providers(config)
    prepared = prepare_team_config(config, model)
    if tap is not None:
        prepared = _tap_agents(prepared)
    tools_token, tap_token = _tool_registry.set(tools), _token_tap.set(tap or _no_tap)
    call_token = _model_call_hook.set(on_model_call or _no_hook)
    meter_token = _usage_meter.set(meter)
    try:
        return BaseGroupChat.load_component(prepared)
    finally:
        _tool_registry.reset(tools_token)
        _token_tap.reset(tap_token)
        _model_call_hook.reset(call_token)
        _usage_meter.reset(meter_token)


def _no_tap(agent: str, stream_id: str, delta: str) -> None:
    pass


def _no_hook() -> None:
    pass


def _tap_agents(config: dict[str, Any]) -> dict[str, Any]:
    for component in list(_components(config)):
        kind, inner = component.get("component_type"), component.get("config")
        if kind == "agent":
            inner["model_client"] = _tapped(inner["model_client"], inner["name"], AGENT)
        elif kind == "team" and isinstance(inner, dict) and isinstance(inner.get("model_client"), dict):
            # A SelectorGroupChat's speaker-selection client: counted, its text never streamed (trap 7).
            inner["model_client"] = _tapped(inner["model_client"], inner.get("name") or "selector", SPEAKER_SELECTION)
    return config


def _tapped(client: dict[str, Any], name: str, purpose: str) -> dict[str, Any]:
    return {
        "provider": "agents_app.runner.TappedModelClient",
        "component_type": "model",
        "version": 1,
        "component_version": 1,
        "config": {"agent": name, "inner": client, "purpose": purpose},
    }


class TapConfig(BaseModel):
    agent: str
    inner: dict[str, Any]
    purpose: str = AGENT


class UsageMeter:
    """The model requests of one turn and their tokens, by purpose: {purpose: {"prompt_tokens",
    "completion_tokens", "requests"}}. A request is counted as it is sent (a failed one counts, with the
    tokens it reported: none), its tokens when its result arrives: once per request, never per token."""

    def __init__(self) -> None:
        self.usage: dict[str, dict[str, int]] = {}

    def request(self, purpose: str) -> dict[str, int]:
        entry = self.usage.get(purpose)
        if entry is None:
            entry = self.usage[purpose] = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        entry["requests"] += 1
        return entry

    @staticmethod
    def add(entry: dict[str, int], usage: RequestUsage | None) -> None:
        if usage is not None:
            entry["prompt_tokens"] += usage.prompt_tokens
            entry["completion_tokens"] += usage.completion_tokens


# Model clients kept for reuse by the agent loop running this turn (None: a client per turn).
_client_cache: contextvars.ContextVar[dict[str, ChatCompletionClient] | None] = contextvars.ContextVar(
    "chorus_client_cache", default=None
)
# The create_stream arguments agents_app.modelstream takes; a call with others goes through AutoGen's client.
_OWN_STREAM_ARGS = {"tools", "tool_choice", "json_output", "extra_create_args", "cancellation_token"}
# Where a tapped model client sends each text delta: (agent name, stream id, delta). Set while a team loads.
_token_tap: contextvars.ContextVar[Callable[[str, str, str], None]] = contextvars.ContextVar("chorus_token_tap")
# What a tapped model client calls as it sends a request (the worker's start pacing). Set while a team loads.
_model_call_hook: contextvars.ContextVar[Callable[[], None]] = contextvars.ContextVar("chorus_model_call_hook")
# Where tapped model clients count their requests and tokens. Set while a team loads.
_usage_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("chorus_usage_meter", default=None)


def _load_model_client(config: dict[str, Any]) -> ChatCompletionClient:
    return modelstream.with_aiohttp_transport(ChatCompletionClient.load_component(config))


class TappedModelClient(ChatCompletionClient, Component[TapConfig]):
    """An agent's model client that hands each streamed delta straight to Chorus and gives AutoGen only the
    completed result.

    AutoGen turns every streamed chunk into a runtime event (about 0.7 ms of CPU per token in 0.7.5); read at
    the model-client layer, a token costs a callback. AutoGen still gets the full CreateResult (text, tool
    calls, usage) and still passes its cancellation token to the real client, so its semantics hold.
    """

    component_type = "model"
    component_config_schema = TapConfig
    component_provider_override = "agents_app.runner.TappedModelClient"

    def __init__(
        self,
        inner: ChatCompletionClient,
        agent: str,
        tap: Callable[[str, str, str], None],
        on_model_call: Callable[[], None] = _no_hook,
        *,
        meter: UsageMeter | None = None,
        purpose: str = AGENT,
    ):
        self._inner = inner
        self._agent = agent
        self._tap = tap if purpose == AGENT else _no_tap  # only agents' words are streamed
        self._on_model_call = on_model_call
        self._meter = meter if meter is not None else UsageMeter()
        self._purpose = purpose
        self._owns_inner = True

    @classmethod
    def _from_config(cls, config: TapConfig) -> TappedModelClient:
        cache = _client_cache.get()
        context = {"meter": _usage_meter.get(), "purpose": config.purpose}
        hook = _model_call_hook.get(_no_hook)
        if cache is None:
            return cls(_load_model_client(config.inner), config.agent, _token_tap.get(), hook, **context)
        key = json.dumps(config.inner, sort_keys=True)
        if key not in cache:
            cache[key] = _load_model_client(config.inner)
        client = cls(cache[key], config.agent, _token_tap.get(), hook, **context)
        client._owns_inner = False  # shared with later turns on the same loop
        return client

    def _to_config(self) -> TapConfig:
        raise NotImplementedError("a tapped client exists only while a turn runs")

    async def create(self, messages, **kwargs) -> CreateResult:
        self._on_model_call()
        entry = self._meter.request(self._purpose)
        result = await self._inner.create(messages, **kwargs)
        self._meter.add(entry, result.usage)
        return result

    async def create_stream(self, messages, **kwargs) -> AsyncGenerator[str | CreateResult, None]:
        self._on_model_call()
        entry = self._meter.request(self._purpose)
        stream_id = str(uuid.uuid4())

        def on_delta(text: str) -> None:
            self._tap(self._agent, stream_id, text)

        if kwargs.keys() <= _OWN_STREAM_ARGS and modelstream.can_stream(
            self._inner, kwargs.get("json_output"), kwargs.get("extra_create_args") or {}
        ):
            # The common case: read the HTTP stream here, a json.loads per chunk (agents_app/modelstream.py).
            chunks = modelstream.stream_completion(self._inner, messages, on_delta, **kwargs)
        else:
            chunks = self._inner.create_stream(messages, **kwargs)
        try:
            async for chunk in chunks:
                if isinstance(chunk, str):
                    if chunk:
                        on_delta(chunk)
                else:
                    if isinstance(chunk, CreateResult):  # the last item: once per request
                        self._meter.add(entry, chunk.usage)
                    yield chunk
        finally:
            # On a Stop, end the model's HTTP stream now rather than when the client is closed (trap 8).
            await chunks.aclose()

    async def close(self) -> None:
        if self._owns_inner:
            await self._inner.close()

    def actual_usage(self) -> RequestUsage:
        return self._inner.actual_usage()

    def total_usage(self) -> RequestUsage:
        return self._inner.total_usage()

    def count_tokens(self, messages, **kwargs) -> int:
        return self._inner.count_tokens(messages, **kwargs)

    def remaining_tokens(self, messages, **kwargs) -> int:
        return self._inner.remaining_tokens(messages, **kwargs)

    @property
    def capabilities(self) -> ModelCapabilities:  # type: ignore[override]
        return self._inner.capabilities

    @property
    def model_info(self) -> ModelInfo:
        return self._inner.model_info


@dataclass(frozen=True)
class ModelEndpoint:
    """A model server other than the deployment's, named in CHORUS_MODEL_ENDPOINTS, with a key of its own."""

    base_url: str
    api_key: str = ""  # "" when it needs none
    model: str = ""  # what a config's "default" model means there ("": OPENAI_MODEL)


@dataclass(frozen=True)
class ModelSettings:
    """Where model clients connect. Keys come only from here (the environment), never from a config.

    `api_key` is the deployment's key: it goes only to the deployment's endpoint, `base_url` (OpenAI's own API
    when None). Other endpoints are the `endpoints` a config may name, each with its own key."""

    api_key: str
    base_url: str | None = None
    model: str = "chorus-offline"  # used where a config names its model "default"
    timeout: float = 60.0
    max_retries: int = 2
    endpoints: Mapping[str, ModelEndpoint] = field(default_factory=dict, hash=False)

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] = os.environ) -> ModelSettings:
        """The deployment's settings, from Django's settings object (read as plain attributes)."""
        return cls(
            api_key=settings.OPENAI_API_KEY or "offline",
            base_url=settings.OPENAI_BASE_URL or None,
            model=settings.OPENAI_MODEL,
            timeout=settings.CHORUS_MODEL_TIMEOUT,
            max_retries=settings.CHORUS_MODEL_MAX_RETRIES,
            endpoints=model_endpoints(getattr(settings, "CHORUS_MODEL_ENDPOINTS", None) or {}, environ),
        )


def model_endpoints(raw: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, ModelEndpoint]:
    """CHORUS_MODEL_ENDPOINTS (`{"NAME": {"base_url": ..., "api_key_env": ..., "model": ...}}`) with each key
    read from the environment variable it names. Raises ValueError for a malformed entry."""
    endpoints = {}
    for name, spec in raw.items():
        url = spec.get("base_url") if isinstance(spec, Mapping) else None
        key_env, default_model = (spec.get("api_key_env") or "", spec.get("model") or "") if url else ("", "")
        if (
            not isinstance(url, str)
            or not url.strip()
            or not isinstance(key_env, str)
            or not isinstance(default_model, str)
        ):
            raise ValueError(
                f'CHORUS_MODEL_ENDPOINTS["{name}"] must be {{"base_url": "...", "api_key_env": "...", "model": "..."}} '
                "(api_key_env and model optional)."
            )
        endpoints[str(name)] = ModelEndpoint(url.strip(), environ.get(key_env, "") if key_env else "", default_model)
    return endpoints


@dataclass(frozen=True)
class TurnFile:
    """A file the person's message carries: an image's bytes, or the text of a text file or a PDF."""

    name: str
    content_type: str
    kind: str  # "image" or "text"
    data: bytes = b""  # an image's
    text: str = ""  # a text file's (within the message's budget)
    truncated: bool = False  # its text was cut to fit the budget


@dataclass(frozen=True)
class TurnRequest:
    team_config: dict[str, Any]
    task: str
    team_state: dict[str, Any] | None = None
    final_speakers: frozenset[str] = frozenset()  # empty: every agent's message is an answer
    tools: Mapping[str, BaseTool] = field(default_factory=dict)  # the registry, for RegistryTool names
    files: tuple[TurnFile, ...] = ()


def turn_task(request: TurnRequest) -> str | MultiModalMessage:
    """What the team is given: the person's text with each text file's (named, fenced), and their images as
    image parts of one MultiModalMessage (which a model without vision refuses: the send checked that)."""
    parts = [request.task] if request.task else []
    for file in request.files:
        if file.kind != "text":
            continue
        cut = " (cut to fit: the rest was left out)" if file.truncated else ""
        parts.append(f"Attached file {file.name} ({file.content_type}){cut}:\n~~~~\n{file.text}\n~~~~")
    text = "\n\n".join(parts)
    images = [file for file in request.files if file.kind == "image"]
    if not images:
        return text
    content: list[str | Image] = [text] if text else []
    for file in images:
        content.append(f"Attached image {file.name}:")
        content.append(Image(PILImage.open(io.BytesIO(file.data))))
    return MultiModalMessage(content=content, source="user")


# Events the runner emits, in the order AutoGen produces them.
@dataclass(frozen=True)
class TokenDelta:
    stream_id: str
    source: str
    delta: str


@dataclass(frozen=True)
class CompletedMessage:
    id: str
    role: str  # "assistant" or "tool"
    source: str
    content: str
    is_final_answer: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    source: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    content: str
    is_error: bool


RunnerEvent = TokenDelta | CompletedMessage | ToolCall | ToolResult


@dataclass
class TurnResult:
    status: str  # "succeeded" | "failed" | "cancelled"
    team_state: dict[str, Any] | None = None
    prompt_tokens: int = 0  # the sums over `usage`
    completion_tokens: int = 0
    # Every model request the turn made, by purpose ("agent", "speaker_selection"): {"prompt_tokens",
    # "completion_tokens", "requests"}. A purpose that made no request is absent.
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    error_code: str = ""
    error_detail: str = ""
    stop_reason: str = ""
    memory_reset: bool = False  # the saved state no longer fitted the team and was not used
    partial_streams: dict[str, str] = field(default_factory=dict)


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """Every component dict (one with a provider and a component_type) inside a config, depth first."""
    if isinstance(node, dict):
        if "provider" in node and "component_type" in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def validate_team_config(
    config: Any, tool_names: frozenset[str] = frozenset(), model: ModelSettings | None = None
) -> list[str]:
    """Check a stored team config and return its agents' names; raise TeamConfigError with the reason.

    `tool_names` are the names the tool registry offers; a config may name only those. `model` is the
    deployment's settings: a model client may connect only to its endpoint or to one of its named `endpoints`
    (without it: OpenAI's own API, and no named endpoints).
    """
    check_providers(config)
    placeholders = {name: _placeholder_tool(name) for name in tool_names}
    try:
        team = load_team(config, model or ModelSettings(api_key="validation"), placeholders)
    except TeamConfigError:
        raise
    except Exception as exc:  # AutoGen raises many kinds here; each means "this config does not load".
        raise TeamConfigError(f"The config does not load: {exc}") from None
    return [participant.name for participant in team._participants]


def check_providers(config: Any) -> None:
    """Refuse any class outside the allow-list, inline tool code and stored keys; runs again at every load,
    so a config that reached the database some other way than the admin still cannot run code."""
    if not isinstance(config, dict) or config.get("component_type") != "team":
        raise TeamConfigError("The config must be an AutoGen team component (component_type 'team').")
    for component in _components(config):
        kind, provider = component.get("component_type"), component.get("provider")
        if kind == "tool" and provider != "agents_app.runner.RegistryTool":
            raise TeamConfigError(
                f"Tools cannot be defined in a config ({provider}): name them from Chorus's tool registry."
            )
        allowed = ALLOWED_PROVIDERS.get(kind)
        if allowed is None or provider not in allowed:
            raise TeamConfigError(f"Provider {provider!r} ({kind}) is not allowed in a Chorus team.")
        if kind == "model":
            key = component.get("config", {}).get("api_key")
            if key not in (None, "", MASKED_KEY):
                raise TeamConfigError("API keys are not stored in team configs: they come from the environment.")


def _placeholder_tool(name: str) -> BaseTool:
    def placeholder() -> str:
        return ""

    return FunctionTool(placeholder, name=name, description=f"placeholder for {name}")


def prepare_team_config(config: dict[str, Any], model: ModelSettings) -> dict[str, Any]:
    """A copy of the config ready to load: endpoints and keys from the settings, every agent streaming, usage
    reported. Raises TeamConfigError for a model client that names an endpoint the settings do not know."""
    config = copy.deepcopy(config)
    for component in _components(config):
        inner = component.setdefault("config", {})
        if component.get("component_type") == "model":
            _connect_model_client(component.get("provider"), inner, model)
            inner.setdefault("timeout", model.timeout)
            inner.setdefault("max_retries", model.max_retries)
            # Without it a streamed completion reports zero tokens (STACK-NOTES trap 4).
            inner["stream_options"] = {"include_usage": True}
        elif component.get("component_type") == "agent":
            # Every agent streams, whatever the stored config says: the page shows words as they come.
            inner["model_client_stream"] = True
    return config


def _connect_model_client(provider: Any, inner: dict[str, Any], model: ModelSettings) -> None:
    """Set where a model client connects, and with which key, in its (copied) config.

    The deployment's key goes only to the deployment's endpoint. A config that names another server, by
    `"endpoint": "NAME"` or by a `base_url` (an AutoGen export pointing at a local Ollama), gets that server's
    own key from CHORUS_MODEL_ENDPOINTS, or is refused if the settings do not name that server."""
    name = inner.pop("endpoint", None)  # Chorus's own key, never AutoGen's
    url_key = "azure_endpoint" if provider == AZURE_PROVIDER else "base_url"
    urls = [inner[key] for key in ("base_url", "azure_endpoint") if isinstance(inner.get(key), str) and inner[key]]
    deployment_url = model.base_url or OPENAI_DEFAULT_BASE_URL
    known = ", ".join(sorted(model.endpoints)) or "none"
    endpoint: ModelEndpoint | None = None
    if name is not None:
        endpoint = model.endpoints.get(name) if isinstance(name, str) else None
        if endpoint is None:
            raise TeamConfigError(f"Unknown model endpoint {name!r}: CHORUS_MODEL_ENDPOINTS names {known}.")
        stray = [url for url in urls if not _same_endpoint(url, endpoint.base_url)]
        if stray:
            raise TeamConfigError(
                f"A model client names the endpoint {name!r} ({endpoint.base_url}) and also the URL {stray[0]}: "
                "leave the URL out."
            )
    elif urls:
        for url in urls:
            here = next((e for e in model.endpoints.values() if _same_endpoint(url, e.base_url)), None)
            if here is None and not _same_endpoint(url, deployment_url):
                raise TeamConfigError(
                    f"A model client connects to {url}, which is neither Chorus's model endpoint ({deployment_url}) "
                    f"nor one of CHORUS_MODEL_ENDPOINTS ({known}). Chorus sends its API key only to its own "
                    'endpoint: name the server in CHORUS_MODEL_ENDPOINTS, with its own key, and write "endpoint": '
                    '"NAME" in the model client\'s config instead of the URL.'
                )
            if endpoint is not None and here is not endpoint:
                raise TeamConfigError(f"A model client names two different endpoints: {', '.join(urls)}.")
            endpoint = here
    if endpoint is None:  # the deployment's endpoint, with the deployment's key
        if url_key == "base_url" and not urls:
            inner["base_url"] = deployment_url
        elif model.base_url and not urls:
            inner["base_url"] = model.base_url
        inner["api_key"] = model.api_key
        default_model = model.model
    else:
        if not urls:
            inner[url_key] = endpoint.base_url
        inner["api_key"] = endpoint.api_key or NO_KEY
        default_model = endpoint.model or model.model
    if inner.get("model") in (None, "", DEFAULT_MODEL):
        inner["model"] = default_model


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two URLs are the same endpoint (scheme, host, port and path; case and a trailing "/" aside)."""

    def key(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:  # a port that is not a number
        return False


# Gateways say "unknown model" and "too long" in words, under many statuses (LiteLLM: 400 "Invalid model name";
# vLLM: 400 "maximum context length"; Ollama: 404 "model ... not found"), and sometimes inside a stream.
_CONTEXT_TOO_LONG_RE = re.compile(
    r"context[ _]?length|context[ _]?window|maximum context|prompt is too long|too many tokens", re.IGNORECASE
)
_UNKNOWN_MODEL_RE = re.compile(
    r"invalid model|model_not_found|unknown model|no such model|\bmodel\b[^\n]{0,120}?(not found|does not exist)",
    re.IGNORECASE,
)
_MODEL_NOT_FOUND = (
    "The model server does not know the configured model (OPENAI_MODEL, or the one the team's config names)."
)
_READ_BY_TEXT = {"BadRequestError", "NotFoundError", "UnprocessableEntityError", "ConflictError",
                 "InternalServerError", "APIStatusError", "APIError", "ModelStreamError"}  # fmt: skip
# Errors that, once some of the answer has streamed, mean "the stream was cut": what arrived is kept.
_STREAM_BREAKS = {
    "APIConnectionError": "The model server dropped the connection mid-answer; what arrived is kept.",
    "APIError": "The model server broke off the answer with an error ({error}); what arrived is kept.",
    "ModelStreamError": "The model server broke off the answer with an error ({error}); what arrived is kept.",
}


def _error_kind(exc: BaseException) -> tuple[str, str]:
    """The exception's type name and message. Inside a group chat AutoGen re-raises an agent's exception as
    RuntimeError("<Type>: <message>\nTraceback: ..."): the agent's type and message are read from it."""
    text = str(exc)
    kind = type(exc).__name__
    if isinstance(exc, RuntimeError) and ":" in text:
        kind, _, text = text.partition(":")
        text = text.split("\nTraceback:", 1)[0].strip()
    return kind, text


def classify_error(exc: BaseException) -> tuple[str, str]:
    """A stable error code and a sentence a person can read, for an exception raised during a turn."""
    kind, text = _error_kind(exc)
    if kind in _READ_BY_TEXT:
        if _CONTEXT_TOO_LONG_RE.search(text):
            return "context_too_long", "The conversation is too long for the model's context window."
        if _UNKNOWN_MODEL_RE.search(text):
            return "model_not_found", _MODEL_NOT_FOUND
    known = {
        "APIConnectionError": ("model_unreachable", "The model server could not be reached."),
        "APITimeoutError": ("model_timeout", "The model server did not answer in time."),
        "RateLimitError": ("model_rate_limited", "The model server is rate limiting requests; try again shortly."),
        "AuthenticationError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "PermissionDeniedError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "InternalServerError": ("model_error", "The model server failed while answering."),
        "NotFoundError": ("model_not_found", _MODEL_NOT_FOUND),
    }
    if kind in known:
        return known[kind]
    if kind in ("BadRequestError", "UnprocessableEntityError"):
        return "model_bad_request", f"The model server refused the request: {text[:300]}"
    if kind in ("JSONDecodeError", "APIResponseValidationError"):
        return "model_bad_response", "The model server sent an answer Chorus could not read."
    if kind in ("APIError", "ModelStreamError"):
        return "model_error", f"The model server reported an error while answering: {text[:300]}"
    if kind in ("APIStatusError", "ConflictError"):
        return "model_error", f"The model server answered with an error: {text[:300]}"
    return "internal_error", f"The team failed: {kind}: {text[:300]}"


async def run_turn(
    request: TurnRequest,
    model: ModelSettings,
    emit: Callable[[RunnerEvent], None],
    cancellation: CancellationToken | None = None,
    *,
    team: BaseGroupChat | None = None,
    on_model_call: Callable[[], None] | None = None,
) -> TurnResult:
    """Run the team on the user's text, emitting events as they happen; never raises for a failed turn.

    `team` may be given ready-built (tests pass one with a scripted model client); otherwise it is loaded
    from `request.team_config`. Either way `on_model_call()` is called as each request goes to the model, and
    every request is counted in the result's `usage`.

    A turn that ends without an answer (no final speaker wrote one, or wrote nothing but whitespace) has failed:
    `no_answer`, its steps kept.
    """
    cancellation = cancellation or CancellationToken()
    result = TurnResult(status="succeeded")
    meter = UsageMeter()
    open_streams: dict[str, list[str]] = {}  # stream_id -> the deltas streamed so far
    agent_stream: dict[str, str] = {}  # agent -> its stream still being written

    def tap(agent: str, stream_id: str, delta: str) -> None:
        agent_stream[agent] = stream_id
        open_streams.setdefault(stream_id, []).append(delta)
        emit(TokenDelta(stream_id=stream_id, source=agent, delta=delta))

    def close_stream(agent: str, fallback_id: str) -> tuple[str, str]:
        """The id a completed message gets (the stream its tokens went out under, if it streamed) and the
        text streamed under it."""
        stream_id = agent_stream.pop(agent, None)
        if stream_id is None or stream_id not in open_streams:
            return fallback_id, ""
        return stream_id, "".join(open_streams.pop(stream_id))

    if team is None:
        try:
            team = load_team(request.team_config, model, request.tools, tap, on_model_call, meter)
        except Exception as exc:
            result.status, result.error_code = "failed", "team_config_invalid"
            result.error_detail = f"The team's configuration does not load: {str(exc)[:300]}"
            return result
    else:
        _tap_built_team(team, tap, on_model_call or _no_hook, meter)

    def is_final(source: str) -> bool:
        return not request.final_speakers or source in request.final_speakers

    answered = False
    empty_replies = 0  # a final speaker's replies with no text: no answer

    try:
        if request.team_state:
            try:
                await team.load_state(request.team_state)
            except (ValueError, KeyError) as exc:
                # The team's agents changed since the state was saved (an admin renamed or added one): go on
                # without the old memory rather than fail every later turn of the conversation.
                logger.warning("saved team state does not fit the team any more, starting afresh: %s", exc)
                result.memory_reset = True
        async for item in team.run_stream(task=turn_task(request), cancellation_token=cancellation):
            if isinstance(item, ModelClientStreamingChunkEvent):
                # Agents' tokens come through the tap. A chunk still seen here belongs to a client that was
                # not tapped (a team passed in ready-built) or to a SelectorGroupChat's speaker-selection
                # call (no full_message_id, trap 7: bookkeeping, never an answer).
                if item.full_message_id is None or not item.content:
                    continue
                tap(item.source, item.full_message_id, item.content)
            elif isinstance(item, TextMessage | ToolCallSummaryMessage):
                if item.source == "user":
                    continue  # the task itself, echoed back by the team
                message_id = close_stream(item.source, item.id)[0] if isinstance(item, TextMessage) else item.id
                usage = item.models_usage
                prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
                final = isinstance(item, TextMessage) and is_final(item.source)
                if final and not item.content.strip():
                    # An empty reply is no answer: kept as a step, so it never replaces an earlier answer.
                    final = False
                    empty_replies += 1
                answered = answered or final
                emit(
                    CompletedMessage(
                        id=message_id,
                        role="assistant" if isinstance(item, TextMessage) else "tool",
                        source=item.source,
                        content=item.content,
                        is_final_answer=final,
                        prompt_tokens=prompt,
                        completion_tokens=completion,
                    )
                )
            elif isinstance(item, ToolCallRequestEvent):
                # Text a model wrote before deciding to call tools is a step of its own.
                stream_id, text = close_stream(item.source, "")
                if stream_id:
                    emit(CompletedMessage(stream_id, "assistant", item.source, text, is_final_answer=False))
                for call in item.content:
                    emit(ToolCall(call_id=call.id, source=item.source, name=call.name, arguments=call.arguments))
            elif isinstance(item, ToolCallExecutionEvent):
                for outcome in item.content:
                    emit(ToolResult(call_id=outcome.call_id, content=outcome.content, is_error=bool(outcome.is_error)))
            elif isinstance(item, TaskResult):
                result.stop_reason = item.stop_reason or ""
    except asyncio.CancelledError:
        result.status = "cancelled"
    except Exception as exc:
        result.status = "failed"
        result.error_code, result.error_detail = classify_error(exc)
        kind, text = _error_kind(exc)
        if open_streams and kind in _STREAM_BREAKS and result.error_code in ("model_unreachable", "model_error"):
            result.error_code = "model_stream_cut"
            result.error_detail = _STREAM_BREAKS[kind].format(error=text[:200])
        logger.warning("turn failed: %s", exc.__class__.__name__, exc_info=result.error_code == "internal_error")
    result.partial_streams = {stream_id: "".join(parts) for stream_id, parts in open_streams.items()}
    if result.status == "succeeded" and not answered:
        result.status, result.error_code = "failed", "no_answer"
        result.error_detail = _no_answer_detail(request.final_speakers, empty_replies, result.stop_reason)
    if result.status == "succeeded":
        # Only a finished turn's state is kept. AutoGen 0.7.5 cannot save a cancelled team reliably (its
        # runtime is torn down mid-turn: STACK-NOTES trap 8), and a failed turn may hold half a reply, so
        # after either the conversation continues from the state before the turn.
        try:
            result.team_state = await team.save_state()
        except Exception:
            logger.exception("could not save team state")
    await _close_model_clients(team)
    result.usage = meter.usage
    result.prompt_tokens = sum(entry["prompt_tokens"] for entry in meter.usage.values())
    result.completion_tokens = sum(entry["completion_tokens"] for entry in meter.usage.values())
    return result


def _no_answer_detail(final_speakers: frozenset[str], empty_replies: int, stop_reason: str) -> str:
    if empty_replies:
        return "The model sent an empty reply, so there is no answer. Try again, or try another model."
    why = f" ({stop_reason[:200]})" if stop_reason else ""
    if not final_speakers:
        return f"The team stopped without an answer{why}."
    who = " or ".join(sorted(final_speakers))
    return f"The team stopped before {who} wrote an answer{why}. What the other agents wrote is kept as steps."


def _tap_built_team(
    team: BaseGroupChat, tap: Callable[[str, str, str], None], on_model_call: Callable[[], None], meter: UsageMeter
) -> None:
    """What load_team does to a config, done to a team built in code: every model client tapped and metered."""
    for participant in team._participants:
        client = getattr(participant, "_model_client", None)
        if isinstance(client, ChatCompletionClient):
            inner = client._inner if isinstance(client, TappedModelClient) else client
            participant._model_client = TappedModelClient(inner, participant.name, tap, on_model_call, meter=meter)
    selector = getattr(team, "_model_client", None)
    if isinstance(selector, ChatCompletionClient):
        inner = selector._inner if isinstance(selector, TappedModelClient) else selector
        team._model_client = TappedModelClient(inner, "selector", tap, on_model_call, meter=meter,
                                               purpose=SPEAKER_SELECTION)  # fmt: skip


async def _close_model_clients(team: BaseGroupChat) -> None:
    # A cancelled turn leaves the model's HTTP stream open until its client is closed (trap 8).
    clients = [getattr(participant, "_model_client", None) for participant in team._participants]
    clients.append(getattr(team, "_model_client", None))  # a SelectorGroupChat's
    for client in clients:
        if client is not None:
            try:
                await client.close()
            except Exception:
                logger.debug("closing a model client failed", exc_info=True)


CLOSE_SECONDS = 10.0  # how long closing the agent loop waits for its clients and its thread


class AgentLoop:
    """One event loop in one thread for all the turns of a worker process, so AutoGen's work never blocks the
    worker's own loop, and model clients (their HTTP pools and SSL contexts) are built once and reused."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: dict[str, ChatCompletionClient] = {}  # used only on this loop
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self._thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def aclose(self) -> None:
        """Close the model clients (their HTTP pools) and stop the loop and its thread: a worker's last step."""
        if not self._thread.is_alive():
            return

        async def close_clients() -> None:
            for client in self.clients.values():
                await client.close()
            self.clients.clear()

        try:
            await asyncio.wait_for(asyncio.wrap_future(self.submit(close_clients())), CLOSE_SECONDS)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self._thread.join, CLOSE_SECONDS)
            if not self._thread.is_alive():
                self.loop.close()


class TeamTurn:
    """One turn of a team, run on an AgentLoop (or, with `run()`, on a loop of its own in the calling
    thread); `cancel()` may be called from any thread."""

    def __init__(
        self,
        request: TurnRequest,
        model: ModelSettings,
        emit: Callable[[RunnerEvent], None],
        on_model_call: Callable[[], None] | None = None,  # called in the turn's thread
    ):
        self.request = request
        self.model = model
        self.emit = emit
        self.on_model_call = on_model_call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: CancellationToken | None = None
        self._ready = threading.Event()
        self._cancel_requested = False
        self.stop_reason = ""  # set by whoever stops the turn for a reason other than a person's Stop

    def run(self) -> TurnResult:
        """Blocking, on a new loop in this thread, with clients of its own."""
        return asyncio.run(self._main(None))

    def start(self, agent_loop: AgentLoop) -> concurrent.futures.Future:
        """Run on the shared agent loop, reusing its model clients; the future holds the TurnResult."""
        return agent_loop.submit(self._main(agent_loop.clients))

    async def _main(self, clients: dict[str, ChatCompletionClient] | None) -> TurnResult:
        self._loop = asyncio.get_running_loop()
        self._token = CancellationToken()
        self._ready.set()
        if self._cancel_requested:
            self._token.cancel()
        token = _client_cache.set(clients)
        try:
            return await run_turn(self.request, self.model, self.emit, self._token, on_model_call=self.on_model_call)
        finally:
            _client_cache.reset(token)

    def cancel(self) -> None:
        self._cancel_requested = True
        if self._ready.is_set() and self._loop is not None and self._token is not None:
            self._loop.call_soon_threadsafe(self._token.cancel)
