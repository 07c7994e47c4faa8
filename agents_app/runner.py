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
import json
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.messages import (
    ModelClientStreamingChunkEvent,
    TextMessage,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
    ToolCallSummaryMessage,
)
from autogen_agentchat.teams import BaseGroupChat
from autogen_core import CancellationToken, Component, ComponentBase
from autogen_core.models import ChatCompletionClient, CreateResult, ModelCapabilities, ModelInfo, RequestUsage
from autogen_core.tools import BaseTool, FunctionTool
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
) -> BaseGroupChat:
    """Build a team from a stored config, its tools resolved against `tools`. With `tap`, every agent's model
    client hands its streamed deltas to `tap(agent, stream_id, delta)` instead of through AutoGen, and calls
    `on_model_call()` as it sends each request to the model."""
    check_providers(config)
    prepared = prepare_team_config(config, model)
    if tap is not None:
        prepared = _tap_agents(prepared)
    tools_token, tap_token = _tool_registry.set(tools), _token_tap.set(tap or _no_tap)
    call_token = _model_call_hook.set(on_model_call or _no_hook)
    try:
        return BaseGroupChat.load_component(prepared)
    finally:
        _tool_registry.reset(tools_token)
        _token_tap.reset(tap_token)
        _model_call_hook.reset(call_token)


def _no_tap(agent: str, stream_id: str, delta: str) -> None:
    pass


def _no_hook() -> None:
    pass


def _tap_agents(config: dict[str, Any]) -> dict[str, Any]:
    for component in _components(config):
        if component.get("component_type") == "agent":
            inner = component["config"]
            inner["model_client"] = {
                "provider": "agents_app.runner.TappedModelClient",
                "component_type": "model",
                "version": 1,
                "component_version": 1,
                "config": {"agent": inner["name"], "inner": inner["model_client"]},
            }
    return config


class TapConfig(BaseModel):
    agent: str
    inner: dict[str, Any]


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
    ):
        self._inner = inner
        self._agent = agent
        self._tap = tap
        self._on_model_call = on_model_call
        self._owns_inner = True

    @classmethod
    def _from_config(cls, config: TapConfig) -> TappedModelClient:
        cache = _client_cache.get()
        hook = _model_call_hook.get(_no_hook)
        if cache is None:
            return cls(_load_model_client(config.inner), config.agent, _token_tap.get(), hook)
        key = json.dumps(config.inner, sort_keys=True)
        if key not in cache:
            cache[key] = _load_model_client(config.inner)
        client = cls(cache[key], config.agent, _token_tap.get(), hook)
        client._owns_inner = False  # shared with later turns on the same loop
        return client

    def _to_config(self) -> TapConfig:
        raise NotImplementedError("a tapped client exists only while a turn runs")

    async def create(self, messages, **kwargs) -> CreateResult:
        self._on_model_call()
        return await self._inner.create(messages, **kwargs)

    async def create_stream(self, messages, **kwargs) -> AsyncGenerator[str | CreateResult, None]:
        self._on_model_call()
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
class ModelSettings:
    """Where model clients connect. Keys come only from here (the environment), never from a config."""

    api_key: str
    base_url: str | None = None
    model: str = "chorus-offline"  # used where a config names its model "default"
    timeout: float = 60.0
    max_retries: int = 2


@dataclass(frozen=True)
class TurnRequest:
    team_config: dict[str, Any]
    task: str
    team_state: dict[str, Any] | None = None
    final_speakers: frozenset[str] = frozenset()  # empty: every agent's message is an answer
    tools: Mapping[str, BaseTool] = field(default_factory=dict)  # the registry, for RegistryTool names


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
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


def validate_team_config(config: Any, tool_names: frozenset[str] = frozenset()) -> list[str]:
    """Check a stored team config and return its agents' names; raise TeamConfigError with the reason.

    `tool_names` are the names the tool registry offers; a config may name only those.
    """
    check_providers(config)
    placeholders = {name: _placeholder_tool(name) for name in tool_names}
    try:
        team = load_team(config, ModelSettings(api_key="validation"), placeholders)
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
    """A copy of the config ready to load: keys from the settings, every agent streaming, usage reported."""
    config = copy.deepcopy(config)
    for component in _components(config):
        inner = component.setdefault("config", {})
        if component.get("component_type") == "model":
            inner["api_key"] = model.api_key
            if inner.get("model") in (None, "", DEFAULT_MODEL):
                inner["model"] = model.model
            if model.base_url and not inner.get("base_url"):
                inner["base_url"] = model.base_url
            inner.setdefault("timeout", model.timeout)
            inner.setdefault("max_retries", model.max_retries)
            # Without it a streamed completion reports zero tokens (STACK-NOTES trap 4).
            inner["stream_options"] = {"include_usage": True}
        elif component.get("component_type") == "agent":
            # Every agent streams, whatever the stored config says: the page shows words as they come.
            inner["model_client_stream"] = True
    return config


def classify_error(exc: BaseException) -> tuple[str, str]:
    """A stable error code and a sentence a person can read, for an exception raised during a turn."""
    # Inside a group chat AutoGen re-raises an agent's exception as RuntimeError("<Type>: <message>...").
    text = str(exc)
    kind = type(exc).__name__
    if isinstance(exc, RuntimeError) and ":" in text:
        kind, _, text = text.partition(":")
        text = text.split("\nTraceback:", 1)[0].strip()
    known = {
        "APIConnectionError": ("model_unreachable", "The model server could not be reached."),
        "APITimeoutError": ("model_timeout", "The model server did not answer in time."),
        "RateLimitError": ("model_rate_limited", "The model server is rate limiting requests; try again shortly."),
        "AuthenticationError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "PermissionDeniedError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "InternalServerError": ("model_error", "The model server failed while answering."),
        "NotFoundError": ("model_not_found", "The model server does not know the configured model (OPENAI_MODEL)."),
    }
    if kind in known:
        return known[kind]
    if kind == "BadRequestError":
        if "context_length" in text or "context length" in text.lower():
            return "context_too_long", "The conversation is too long for the model's context window."
        return "model_bad_request", f"The model server refused the request: {text[:300]}"
    if kind in ("JSONDecodeError", "APIResponseValidationError"):
        return "model_bad_response", "The model server sent an answer Chorus could not read."
    if kind == "APIStatusError":
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
    from `request.team_config`, and `on_model_call()` is called as each request goes to the model.
    """
    cancellation = cancellation or CancellationToken()
    result = TurnResult(status="succeeded")
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
            team = load_team(request.team_config, model, request.tools, tap, on_model_call)
        except Exception as exc:
            result.status, result.error_code = "failed", "team_config_invalid"
            result.error_detail = f"The team's configuration does not load: {str(exc)[:300]}"
            return result

    def is_final(source: str) -> bool:
        return not request.final_speakers or source in request.final_speakers

    try:
        if request.team_state:
            try:
                await team.load_state(request.team_state)
            except (ValueError, KeyError) as exc:
                # The team's agents changed since the state was saved (an admin renamed or added one): go on
                # without the old memory rather than fail every later turn of the conversation.
                logger.warning("saved team state does not fit the team any more, starting afresh: %s", exc)
                result.memory_reset = True
        async for item in team.run_stream(task=request.task, cancellation_token=cancellation):
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
                result.prompt_tokens += prompt
                result.completion_tokens += completion
                emit(
                    CompletedMessage(
                        id=message_id,
                        role="assistant" if isinstance(item, TextMessage) else "tool",
                        source=item.source,
                        content=item.content,
                        is_final_answer=isinstance(item, TextMessage) and is_final(item.source),
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
                if item.models_usage:
                    result.prompt_tokens += item.models_usage.prompt_tokens
                    result.completion_tokens += item.models_usage.completion_tokens
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
        if result.error_code == "model_unreachable" and open_streams:
            result.error_code = "model_stream_cut"
            result.error_detail = "The model server dropped the connection mid-answer; what arrived is kept."
        logger.warning("turn failed: %s", exc.__class__.__name__, exc_info=result.error_code == "internal_error")
    result.partial_streams = {stream_id: "".join(parts) for stream_id, parts in open_streams.items()}
    if result.status == "succeeded":
        # Only a finished turn's state is kept. AutoGen 0.7.5 cannot save a cancelled team reliably (its
        # runtime is torn down mid-turn: STACK-NOTES trap 8), and a failed turn may hold half a reply, so
        # after either the conversation continues from the state before the turn.
        try:
            result.team_state = await team.save_state()
        except Exception:
            logger.exception("could not save team state")
    await _close_model_clients(team)
    return result


async def _close_model_clients(team: BaseGroupChat) -> None:
    # A cancelled turn leaves the model's HTTP stream open until its client is closed (trap 8).
    for participant in team._participants:
        client = getattr(participant, "_model_client", None)
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
