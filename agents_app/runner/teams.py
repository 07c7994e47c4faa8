"""Chorus's own AutoGen components (the tapped model client, the registry tool, the fallback selector, a
termination) and loading a team from its stored config.
"""

from __future__ import annotations

import contextvars
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.teams import BaseGroupChat, SelectorGroupChat
from autogen_core import Component, ComponentBase
from autogen_core.models import ChatCompletionClient, CreateResult, ModelCapabilities, ModelInfo, RequestUsage
from autogen_core.tools import BaseTool
from pydantic import BaseModel

from agents_app.runner import human
from agents_app.runner.config import (
    AGENT,
    SPEAKER_SELECTION,
    FastPaths,
    ModelSettings,
    TeamConfigError,
    _components,
    _placeholder_tool,
    check_providers,
    prepare_team_config,
)

logger = logging.getLogger(__name__)

# Two of Chorus's components lean on private parts of AutoGen and the openai SDK (fast paths; which one a process
# takes is decided by the worker from its settings and the installed versions: agents_app/ops/fastpaths.py).
# Where those parts are gone altogether, the runner still loads and takes AutoGen's own path.
try:
    from agents_app.runner import modelstream
except ImportError as exc:  # the openai SDK or autogen-ext moved what the model stream uses
    logger.warning("the model stream's fast path is unavailable (%s); using AutoGen's own client", exc)
    modelstream = None  # type: ignore[assignment]
try:
    from autogen_agentchat.teams._group_chat._selector_group_chat import SelectorGroupChatManager
except ImportError as exc:
    logger.warning("the selector's fallback speaker is unavailable (%s); AutoGen's own selector applies", exc)
    SelectorGroupChatManager = None  # type: ignore[assignment,misc]
SelectorGroupChatConfig = SelectorGroupChat.component_config_schema


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


class _FallbackSelectorManager(SelectorGroupChatManager or object):  # type: ignore[misc]
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
        # Chorus's manager replaces AutoGen's private one only on the AutoGen it was written against (the
        # worker's word, through load_team); elsewhere the fallback speaker is kept in the config, unused.
        self._own_manager = _fast_paths.get().fallback_selector and SelectorGroupChatManager is not None

    def _set_fallback_speaker(self, name: str | None) -> None:
        if name is not None and name not in self._participant_names:
            agents = ", ".join(self._participant_names)
            raise ValueError(f"fallback_speaker {name!r} is not an agent of this team ({agents}).")
        self._fallback_speaker = name

    def _create_group_chat_manager_factory(
        self, name, group_topic_type, output_topic_type, participant_topic_types, participant_names,
        participant_descriptions, output_message_queue, termination_condition, max_turns, message_factory,
    ) -> Callable[[], _FallbackSelectorManager]:  # fmt: skip
        if not self._own_manager:
            return super()._create_group_chat_manager_factory(
                name, group_topic_type, output_topic_type, participant_topic_types, participant_names,
                participant_descriptions, output_message_queue, termination_condition, max_turns, message_factory,
            )  # fmt: skip
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
    needs_approval: bool = False  # each call waits for the person's Approve (agents_app/runner/human.py)


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
        return human.gate(tools[config.name]) if config.needs_approval else tools[config.name]

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
    _no_reflection_on_gated_calls(prepared)
    tools_token, tap_token = _tool_registry.set(tools), _token_tap.set(tap or _no_tap)
    call_token = _model_call_hook.set(on_model_call or _no_hook)
    meter_token = _usage_meter.set(meter)
    fast_token = _fast_paths.set(model.fast_paths)
    try:
        return BaseGroupChat.load_component(prepared)
    finally:
        _fast_paths.reset(fast_token)
        _tool_registry.reset(tools_token)
        _token_tap.reset(tap_token)
        _model_call_hook.reset(call_token)
        _usage_meter.reset(meter_token)


def _no_reflection_on_gated_calls(config: dict[str, Any]) -> None:
    """An agent whose tools need approval ends its turn with the calls (no second model request on a result
    that only says "waiting for approval"), so the team stops there and waits for the person."""
    for component in _components(config):
        if component.get("component_type") != "agent":
            continue
        inner = component.get("config") or {}
        tools = [c for c in _components(inner) if c.get("component_type") == "tool"]
        if any((tool.get("config") or {}).get("needs_approval") for tool in tools):
            inner["reflect_on_tool_use"] = False


def _no_tap(agent: str, stream_id: str, delta: str) -> None:
    pass


def _no_hook() -> None:
    pass


def _tap_agents(config: dict[str, Any]) -> dict[str, Any]:
    for component in list(_components(config)):
        kind, inner = component.get("component_type"), component.get("config")
        if kind == "agent" and isinstance(inner.get("model_client"), dict):  # a user proxy has none
            inner["model_client"] = _tapped(inner["model_client"], inner["name"], AGENT)
        elif kind == "team" and isinstance(inner, dict) and isinstance(inner.get("model_client"), dict):
            # A SelectorGroupChat's speaker-selection client: counted, its text never streamed
            # (docs/architecture.md, trap 7).
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
# The create_stream arguments agents_app.runner.modelstream takes; a call with others goes through AutoGen's client.
_OWN_STREAM_ARGS = {"tools", "tool_choice", "json_output", "extra_create_args", "cancellation_token"}
# Where a tapped model client sends each text delta: (agent name, stream id, delta). Set while a team loads.
_token_tap: contextvars.ContextVar[Callable[[str, str, str], None]] = contextvars.ContextVar("chorus_token_tap")
# What a tapped model client calls as it sends a request (the worker's start pacing). Set while a team loads.
_model_call_hook: contextvars.ContextVar[Callable[[], None]] = contextvars.ContextVar("chorus_model_call_hook")
# Where tapped model clients count their requests and tokens. Set while a team loads.
_usage_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("chorus_usage_meter", default=None)
# Which fast paths the team being loaded takes (ModelSettings.fast_paths). Set while a team loads.
_ALL_FAST = FastPaths()  # frozen: a safe default
_fast_paths: contextvars.ContextVar[FastPaths] = contextvars.ContextVar("chorus_fast_paths", default=_ALL_FAST)


def _fast_model_stream() -> bool:
    return modelstream is not None and _fast_paths.get().model_stream


def _load_model_client(config: dict[str, Any], fast: bool) -> ChatCompletionClient:
    client = ChatCompletionClient.load_component(config)
    return modelstream.with_aiohttp_transport(client) if fast else client


async def _unreachable_not_slow(chunks: AsyncGenerator) -> AsyncGenerator:
    """AutoGen's own stream from a client that sends over aiohttp, its errors as the SDK's httpx would raise them
    (modelstream.unreachable_not_slow)."""
    try:
        with modelstream.unreachable_not_slow():
            async for chunk in chunks:
                yield chunk
    finally:
        await chunks.aclose()


class TappedModelClient(ChatCompletionClient, Component[TapConfig]):
    """An agent's model client that hands each streamed delta straight to Chorus and gives AutoGen only the
    completed result.

    AutoGen turns every streamed chunk into a runtime event, the largest CPU cost per token of a worker
    (docs/performance-history.md); read at the model-client layer, a token costs a callback. AutoGen still
    gets the full CreateResult (text, tool calls, usage) and still passes its cancellation token to the real
    client, so its semantics hold.
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
        self._fast = False  # read the stream with modelstream (only an inner client made for it: _from_config)

    @classmethod
    def _from_config(cls, config: TapConfig) -> TappedModelClient:
        cache = _client_cache.get()
        context = {"meter": _usage_meter.get(), "purpose": config.purpose}
        hook = _model_call_hook.get(_no_hook)
        fast = _fast_model_stream()
        if cache is None:
            client = cls(_load_model_client(config.inner, fast), config.agent, _token_tap.get(), hook, **context)
        else:
            key = json.dumps([config.inner, fast], sort_keys=True)
            if key not in cache:
                cache[key] = _load_model_client(config.inner, fast)
            client = cls(cache[key], config.agent, _token_tap.get(), hook, **context)
            client._owns_inner = False  # shared with later turns on the same loop
        client._fast = fast
        return client

    def _to_config(self) -> TapConfig:
        raise NotImplementedError("a tapped client exists only while a turn runs")

    async def create(self, messages, **kwargs) -> CreateResult:
        self._on_model_call()
        entry = self._meter.request(self._purpose)
        if self._fast:
            with modelstream.unreachable_not_slow():  # the inner client sends over aiohttp
                result = await self._inner.create(messages, **kwargs)
        else:
            result = await self._inner.create(messages, **kwargs)
        self._meter.add(entry, result.usage)
        return result

    async def create_stream(self, messages, **kwargs) -> AsyncGenerator[str | CreateResult, None]:
        self._on_model_call()
        entry = self._meter.request(self._purpose)
        stream_id = str(uuid.uuid4())

        def on_delta(text: str) -> None:
            self._tap(self._agent, stream_id, text)

        if not self._fast:
            chunks = self._inner.create_stream(messages, **kwargs)  # the stock path: AutoGen's own client
        elif kwargs.keys() <= _OWN_STREAM_ARGS and modelstream.can_stream(
            self._inner, kwargs.get("json_output"), kwargs.get("extra_create_args") or {}
        ):
            # The common case: read the HTTP stream here, a json.loads per chunk (agents_app/runner/modelstream.py).
            chunks = modelstream.stream_completion(self._inner, messages, on_delta, **kwargs)
        else:
            chunks = _unreachable_not_slow(self._inner.create_stream(messages, **kwargs))
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
            # On a Stop, end the model's HTTP stream now rather than when the client is closed
            # (docs/architecture.md, trap 8).
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
