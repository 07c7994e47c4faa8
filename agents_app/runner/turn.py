"""Runs one turn of an AutoGen team and reports what happens as plain events.

This module knows nothing of Django or Channels: it takes plain data (the team's component config, its
saved state, the user's text, model settings) and an `emit` callback, and returns a `TurnResult`. The
worker turns the events into protocol events; the tests drive it with a scripted model client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import (
    HandoffMessage,
    ModelClientStreamingChunkEvent,
    MultiModalMessage,
    TextMessage,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
    ToolCallSummaryMessage,
)
from autogen_agentchat.teams import BaseGroupChat
from autogen_core import CancellationToken, Image
from autogen_core.models import ChatCompletionClient
from autogen_core.tools import BaseTool
from PIL import Image as PILImage

from agents_app.runner import human
from agents_app.runner.config import SPEAKER_SELECTION, ModelSettings
from agents_app.runner.errors import _STREAM_BREAKS, _error_kind, classify_error
from agents_app.runner.teams import TappedModelClient, UsageMeter, _client_cache, _no_hook, load_team

logger = logging.getLogger(__name__)


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
    status: str  # "succeeded" | "failed" | "cancelled" | "waiting" (for the person: see `input_ask`)
    team_state: dict[str, Any] | None = None
    prompt_tokens: int = 0  # the sums over `usage`
    completion_tokens: int = 0
    # Every model request the turn made, by purpose ("agent", "speaker_selection"): {"prompt_tokens",
    # "completion_tokens", "requests"}. A purpose that made no request is absent.
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    error_code: str = ""
    error_detail: str = ""
    stop_reason: str = ""
    input_ask: human.InputAsk | None = None  # what the team asks the person (status "waiting")


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
    `no_answer`, its steps kept. A turn whose team asked the person ends `waiting`, with `input_ask`.
    """
    turn = _Turn(request, emit)
    if team is None:
        team = turn.load(model, on_model_call)
        if team is None:
            return turn.result
    else:
        _tap_built_team(team, turn.tap, on_model_call or _no_hook, turn.meter)
    return await turn.run(team, cancellation or CancellationToken())


class _Turn:
    """One turn's bookkeeping while AutoGen runs the team: the streams still open, what each agent said last,
    the tool calls that wait for the person's approval, and the result being built."""

    def __init__(self, request: TurnRequest, emit: Callable[[RunnerEvent], None]) -> None:
        self.request, self.emit = request, emit
        self.result = TurnResult(status="succeeded")
        self.meter = UsageMeter()
        self.ledger = human.ApprovalLedger()
        self.open_streams: dict[str, list[str]] = {}  # stream_id -> the deltas streamed so far
        self.agent_stream: dict[str, str] = {}  # agent -> its stream still being written
        self.thoughts: dict[str, str] = {}  # agent -> the text it wrote before its last tool calls
        self.last_said = ""  # the last message an agent completed: what a user proxy's turn answers
        self.gated_calls: list[dict[str, str]] = []  # this turn's tool calls that wait for approval
        self.answered = False
        self.empty_replies = 0  # a final speaker's replies with no text: no answer

    def tap(self, agent: str, stream_id: str, delta: str) -> None:
        self.agent_stream[agent] = stream_id
        self.open_streams.setdefault(stream_id, []).append(delta)
        self.emit(TokenDelta(stream_id=stream_id, source=agent, delta=delta))

    def close_stream(self, agent: str, fallback_id: str) -> tuple[str, str]:
        """The id a completed message gets (the stream its tokens went out under, if it streamed) and the
        text streamed under it."""
        stream_id = self.agent_stream.pop(agent, None)
        if stream_id is None or stream_id not in self.open_streams:
            return fallback_id, ""
        return stream_id, "".join(self.open_streams.pop(stream_id))

    def load(self, model: ModelSettings, on_model_call: Callable[[], None] | None) -> BaseGroupChat | None:
        """The team from its config, tapped and metered; None (and a failed result) if it does not load."""
        ledger_token = human.set_ledger(self.ledger)
        try:
            return load_team(self.request.team_config, model, self.request.tools, self.tap, on_model_call, self.meter)
        except Exception as exc:
            self.result.status, self.result.error_code = "failed", "team_config_invalid"
            self.result.error_detail = f"The team's configuration does not load: {str(exc)[:300]}"
            return None
        finally:
            human.reset_ledger(ledger_token)

    async def run(self, team: BaseGroupChat, cancellation: CancellationToken) -> TurnResult:
        human.prepare_for_people(team, self.ledger)
        try:
            task = await self._task(team)
            async for item in team.run_stream(task=task, cancellation_token=cancellation):
                self._on_item(item)
        except asyncio.CancelledError:
            self.result.status = "cancelled"
        except Exception as exc:
            self._failed(exc)
        self._conclude()
        await self._save_state(team)
        await _close_model_clients(team)
        self.result.usage = self.meter.usage
        self.result.prompt_tokens = sum(entry["prompt_tokens"] for entry in self.meter.usage.values())
        self.result.completion_tokens = sum(entry["completion_tokens"] for entry in self.meter.usage.values())
        return self.result

    async def _task(self, team: BaseGroupChat):
        """The team's memory loaded, and what it is asked: the person's text, or their answer to its question."""
        team_state, waiting_for = human.split_state(self.request.team_state)
        if team_state:
            try:
                await team.load_state(team_state)
            except (ValueError, KeyError) as exc:
                # The team's agents changed since the state was saved (an admin renamed or added one): go on
                # without the old memory rather than fail every later turn of the conversation.
                logger.warning("saved team state does not fit the team any more, starting afresh: %s", exc)
                team_state = waiting_for = None
        handed_to = _handed_to_user(team_state)
        if waiting_for is None and not handed_to:
            return turn_task(self.request)
        # The team asked the person: this turn's text is the answer (after a Stop, the next message is).
        waiting_for = waiting_for or {"kind": human.HANDOFF, "source": handed_to}
        return await human.resume_task(
            waiting_for, self.request.task, self.request.tools,
            lambda call_id, content, is_error: self.emit(ToolResult(call_id, content, is_error)),
        )  # fmt: skip

    def _on_item(self, item) -> None:
        if isinstance(item, ModelClientStreamingChunkEvent):
            # Agents' tokens come through the tap. A chunk still seen here belongs to a client that was not
            # tapped (a team passed in ready-built) or to a SelectorGroupChat's speaker-selection call (no
            # full_message_id: bookkeeping, never an answer; docs/architecture.md, trap 7).
            if item.full_message_id is not None and item.content:
                self.tap(item.source, item.full_message_id, item.content)
        elif isinstance(item, TextMessage | ToolCallSummaryMessage):
            self._on_message(item)
        elif isinstance(item, ToolCallRequestEvent):
            self._on_tool_calls(item)
        elif isinstance(item, ToolCallExecutionEvent):
            waiting_ids = {call["call_id"] for call in self.gated_calls}
            for outcome in item.content:
                if outcome.call_id not in waiting_ids:  # a gated call's result comes once the person answered
                    self.emit(ToolResult(outcome.call_id, outcome.content, bool(outcome.is_error)))
        elif isinstance(item, HandoffMessage) and item.target == human.USER:
            prompt = self.thoughts.get(item.source, "").strip() or item.content
            self.result.input_ask = human.InputAsk(human.HANDOFF, item.source, prompt)
        elif isinstance(item, TaskResult):
            self.result.stop_reason = item.stop_reason or ""

    def _on_message(self, item: TextMessage | ToolCallSummaryMessage) -> None:
        if item.source == "user" or item.source in self.ledger.proxies:
            return  # the task itself echoed back, or the person's turn (stored as theirs)
        self.last_said = item.content
        text = isinstance(item, TextMessage)
        message_id = self.close_stream(item.source, item.id)[0] if text else item.id
        usage = item.models_usage
        final = text and (not self.request.final_speakers or item.source in self.request.final_speakers)
        if final and not item.content.strip():
            # An empty reply is no answer: kept as a step, so it never replaces an earlier answer.
            final = False
            self.empty_replies += 1
        self.answered = self.answered or final
        self.emit(
            CompletedMessage(
                id=message_id,
                role="assistant" if text else "tool",
                source=item.source,
                content=item.content,
                is_final_answer=final,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
        )

    def _on_tool_calls(self, item: ToolCallRequestEvent) -> None:
        # Text a model wrote before deciding to call tools is a step of its own.
        stream_id, text = self.close_stream(item.source, "")
        self.thoughts[item.source] = text
        if stream_id:
            self.emit(CompletedMessage(stream_id, "assistant", item.source, text, is_final_answer=False))
        for call in item.content:
            self.emit(ToolCall(call_id=call.id, source=item.source, name=call.name, arguments=call.arguments))
            if call.name in self.ledger.gated:
                self.gated_calls.append({"call_id": call.id, "source": item.source, "name": call.name,
                                         "arguments": call.arguments})  # fmt: skip

    def _failed(self, exc: Exception) -> None:
        result = self.result
        result.status = "failed"
        result.error_code, result.error_detail = classify_error(exc)
        kind, text = _error_kind(exc)
        if self.open_streams and kind in _STREAM_BREAKS and result.error_code in ("model_unreachable", "model_error"):
            result.error_code = "model_stream_cut"
            result.error_detail = _STREAM_BREAKS[kind].format(error=text[:200])
        logger.warning("turn failed: %s", exc.__class__.__name__, exc_info=result.error_code == "internal_error")

    def _conclude(self) -> None:
        """A turn that ran to its end: waiting for the person if the team asked them, failed if no answer."""
        result = self.result
        if result.status != "succeeded":
            return
        if self.gated_calls:
            calls = tuple(self.gated_calls)
            options = (human.APPROVE, human.REJECT)
            result.input_ask = human.InputAsk(
                human.APPROVAL, calls[0]["source"], human.approval_prompt(list(calls)), options, calls
            )
        if self.ledger.proxy_asked and result.input_ask is None:
            prompt = self.last_said.strip() or "Your turn: what do you say?"
            result.input_ask = human.InputAsk(human.USER_PROXY, self.ledger.proxy_asked, prompt)
        if result.input_ask is not None:
            result.status = "waiting"
        elif not self.answered:
            result.status, result.error_code = "failed", "no_answer"
            result.error_detail = _no_answer_detail(self.request.final_speakers, self.empty_replies, result.stop_reason)

    async def _save_state(self, team: BaseGroupChat) -> None:
        # Only a finished (or waiting) turn's state is kept. AutoGen cannot save a cancelled team reliably (its
        # runtime is torn down mid-turn: docs/architecture.md, trap 8), and a failed turn may hold half a reply,
        # so after either the conversation continues from the state before the turn.
        if self.result.status not in ("succeeded", "waiting"):
            return
        try:
            state = await team.save_state()
            if self.result.input_ask is not None:
                state = human.with_marker(state, self.result.input_ask)
            self.result.team_state = state
        except Exception:
            logger.exception("could not save team state")


def _handed_to_user(state: dict[str, Any] | None) -> str | None:
    """The agent that handed off to the user in a saved Swarm state with no marker (saved before Chorus
    waited for people): its next task must be a handoff back, or AutoGen refuses every later turn ("handoff
    target user is not one of the participants")."""
    for agent_state in ((state or {}).get("agent_states") or {}).values():
        thread = agent_state.get("message_thread") if isinstance(agent_state, dict) else None
        for message in reversed(thread or []):
            if isinstance(message, dict) and message.get("type") == "HandoffMessage":
                return message.get("source") if message.get("target") == human.USER else None
    return None


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
    # A cancelled turn leaves the model's HTTP stream open until its client is closed (docs/architecture.md, trap 8).
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
