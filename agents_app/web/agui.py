"""AG-UI (the Agent-User Interaction protocol) over Chorus: `POST /api/agui/` and `/api/agui/<team_slug>/`.

An AG-UI client (CopilotKit, `@ag-ui/client`'s HttpAgent, any program) posts a `RunAgentInput`; Chorus sends
the last user message of it to the conversation its `threadId` names (created on first use) and streams the
run as AG-UI events, built with the official `ag-ui-protocol` package's types and encoder:

    Chorus (docs/protocol.md)           AG-UI
    the stream opens                    RUN_STARTED {threadId, runId}
    run.started                         CUSTOM "chorus.run.started" (the team, its final speakers, the route)
    token / message of a final speaker  TEXT_MESSAGE_START / CONTENT (each token) / END, name = the agent
    a step agent's turn                 SUBAGENT_STARTED {name: the agent} ... SUBAGENT_FINISHED, its text and
                                        tool events inside carrying its subagentRunId
    tool.call                           TOOL_CALL_START / ARGS / END
    tool.result                         TOOL_CALL_RESULT
    message.updated                     CUSTOM "chorus.message.updated"
    run.finished                        MESSAGES_SNAPSHOT of the conversation, then RUN_FINISHED (succeeded;
                                        cancelled: outcome "cancelled") or RUN_ERROR (failed: its code, detail)

Each SSE frame that completes a Chorus event carries `id: <its seq>`. Resuming: post the same RunAgentInput
again (the same last user message, so nothing is sent twice: its id is the idempotency key) with
`Last-Event-ID: <the last id seen>`; the stream starts with RUN_STARTED and goes on after that seq. Without
the header it replays the run from its start. docs/api.md says more.
"""

import hashlib
import json
import re
import uuid
from typing import Any

from ag_ui.core import (
    PROTOCOL_VERSION,
    AssistantMessage,
    CustomEvent,
    EventType,
    FunctionCall,
    MessagesSnapshotEvent,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedSuccessOutcome,
    RunStartedEvent,
    SubagentErrorEvent,
    SubagentFinishedEvent,
    SubagentFinishedSuccessOutcome,
    SubagentStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TokenUsage,
    ToolCall,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    ToolMessage,
    UserMessage,
)
from ag_ui.encoder import EventEncoder
from asgiref.sync import sync_to_async
from django.db import IntegrityError
from django.utils.crypto import salted_hmac

from agents_app.domain import selectors, services
from agents_app.domain.validation import parse_seq, storable
from agents_app.models import Conversation, Message, Run, Team
from agents_app.models import ToolCall as StoredToolCall
from agents_app.web import sse, tokens
from agents_app.web.api import (
    NOT_FOUND,
    ApiError,
    _status_of,
    _writer,
    api,
    errors,
    event_stream,
    sse_response,
)

_ENCODER = EventEncoder()
CLIENT_ID_PREFIX = "agui:"
HASHED_PREFIX = "agui#"


# --- Chorus events -> AG-UI events --------------------------------------------------------------------------


class Translator:
    """Turns one run's Chorus events into AG-UI events. It remembers what is open (text messages, the sub-agent
    run of the agent speaking), so every START gets its END, as AG-UI clients verify.

    Each turn of a step's agent (an agent not among the team's final speakers) is an AG-UI sub-agent run:
    SUBAGENT_STARTED named by the agent, its text and tool events marked with its `subagentRunId`, then
    SUBAGENT_FINISHED. The id is `<agent>:<the id of the turn's first message or tool call>`, so a replay and
    the MESSAGES_SNAPSHOT give the same one. The answer's agents speak as the run itself."""

    def __init__(self, thread_id: str, run_id: str, final_speakers: list[str] | None):
        self.thread_id = thread_id
        self.run_id = run_id
        self.final_speakers = final_speakers  # None until known; [] means every agent answers
        self.open_texts: dict[str, str] = {}  # message id -> text streamed so far
        self.agent: str | None = None  # the step's agent whose sub-agent run is open
        self.subagent: str | None = None  # its subagentRunId
        self.turn_results = False  # the open turn streamed tool results (its tool message repeats them)
        self.call_sources: dict[str, str] = {}  # tool call id -> the agent that called it

    def started(self) -> RunStartedEvent:
        return RunStartedEvent(
            type=EventType.RUN_STARTED, thread_id=self.thread_id, run_id=self.run_id, protocol_version=PROTOCOL_VERSION
        )

    def is_step(self, source: str) -> bool:
        return bool(self.final_speakers) and source not in self.final_speakers

    def translate(self, event: dict[str, Any]) -> list:
        kind = event["type"]
        if kind == "token":
            return self._token(event)
        if kind == "message":
            return self._message(event["message"])
        if kind == "tool.call":
            return self._tool_call(event)
        if kind == "tool.result":
            return self._tool_result(event)
        if kind == "run.started":
            self.final_speakers = list(event.get("final_speakers") or [])
            return [CustomEvent(type=EventType.CUSTOM, name="chorus.run.started", value=event)]
        if kind == "message.updated":
            return [CustomEvent(type=EventType.CUSTOM, name="chorus.message.updated", value=event["message"])]
        return []

    def finish(self, event: dict[str, Any], snapshot: list) -> list:
        """The run's end: what is still open is closed, then the conversation as stored, then the outcome."""
        status, error = event["status"], event.get("error") or {}
        code = "cancelled" if status == "cancelled" else error.get("code") or "error"
        detail = "The answer was stopped." if status == "cancelled" else error.get("detail") or "The answer failed."
        out = self._close_texts()
        if self.subagent is not None:
            if status == "succeeded":
                out += self._enter(None, "")
            else:
                out.append(SubagentErrorEvent(type=EventType.SUBAGENT_ERROR, subagent_run_id=self.subagent,
                                              message=detail, code=code))  # fmt: skip
                self.agent = self.subagent = None
        out.append(MessagesSnapshotEvent(type=EventType.MESSAGES_SNAPSHOT, messages=snapshot))
        usage = _usage(event.get("usage"))
        if status == "failed":
            out.append(RunErrorEvent(type=EventType.RUN_ERROR, message=detail, code=code, usage=usage))
            return out
        result = {
            "conversation_id": event.get("conversation_id"),
            "chorus_run_id": event["run_id"],
            "status": status,
            "answer_message_id": event.get("answer_message_id"),
            "usage": event.get("usage"),
        }
        outcome = RunFinishedCancelledOutcome() if status == "cancelled" else RunFinishedSuccessOutcome()
        out.append(RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id=self.thread_id, run_id=self.run_id,
                                    result=result, outcome=outcome, usage=usage))  # fmt: skip
        return out

    def finished_without_run(self, snapshot: list) -> list:
        return [
            MessagesSnapshotEvent(type=EventType.MESSAGES_SNAPSHOT, messages=snapshot),
            RunFinishedEvent(
                type=EventType.RUN_FINISHED,
                thread_id=self.thread_id,
                run_id=self.run_id,
                outcome=RunFinishedSuccessOutcome(),
            ),  # fmt: skip
        ]

    def _enter(self, source: str | None, first_id: str) -> list:
        """Events that put what follows in `source`'s turn: a sub-agent run for a step's agent, none for the
        answer's agents (or None: the run's end)."""
        agent = source if source is not None and self.is_step(source) else None
        if agent == self.agent:
            return []
        out = []
        if self.subagent is not None:
            out += self._close_texts()
            out.append(SubagentFinishedEvent(type=EventType.SUBAGENT_FINISHED, subagent_run_id=self.subagent,
                                             outcome=SubagentFinishedSuccessOutcome()))  # fmt: skip
        self.agent, self.subagent, self.turn_results = agent, None, False
        if agent is not None:
            self.subagent = subagent_run_id(agent, first_id)
            out.append(SubagentStartedEvent(type=EventType.SUBAGENT_STARTED, subagent_run_id=self.subagent, name=agent))
        return out

    def _close_texts(self) -> list:
        ends = [TextMessageEndEvent(type=EventType.TEXT_MESSAGE_END, message_id=mid, subagent_run_id=self.subagent)
                for mid in self.open_texts]  # fmt: skip
        self.open_texts.clear()
        return ends

    def _token(self, event: dict) -> list:
        message_id, delta = event["stream_id"], event["delta"]
        out = self._enter(event["source"], message_id)
        if message_id not in self.open_texts:
            out += self._close_texts()
            out.append(self._start(message_id, event["source"]))
            self.open_texts[message_id] = ""
        if delta:
            self.open_texts[message_id] += delta
            out.append(self._content(message_id, delta))
        return out

    def _message(self, message: dict) -> list:
        if message["role"] == "user":
            return []  # the client sent it; the snapshot has it
        message_id, content = message["id"], message["content"]
        out = self._enter(message["source"], message_id)
        if message["role"] == "tool" and self.turn_results and message_id not in self.open_texts:
            return out  # the tool results it repeats were streamed as TOOL_CALL_RESULT
        if message_id in self.open_texts:
            streamed = self.open_texts.pop(message_id)
            # Tokens lost on the way (a Redis restart) are sent now: the text adds up to the stored message.
            rest = content[len(streamed) :] if content.startswith(streamed) else ""
        else:
            out += self._close_texts()
            out.append(self._start(message_id, message["source"]))
            rest = content
        if rest:
            out.append(self._content(message_id, rest))
        out.append(TextMessageEndEvent(type=EventType.TEXT_MESSAGE_END, message_id=message_id,
                                       subagent_run_id=self.subagent))  # fmt: skip
        return out

    def _tool_call(self, event: dict) -> list:
        call_id = event["call_id"]
        out = self._enter(event["source"], call_id) + self._close_texts()
        self.call_sources[call_id] = event["source"]
        sub = self.subagent
        out.append(ToolCallStartEvent(type=EventType.TOOL_CALL_START, tool_call_id=call_id,
                                      tool_call_name=event["name"], subagent_run_id=sub))  # fmt: skip
        if event["arguments"]:
            out.append(ToolCallArgsEvent(type=EventType.TOOL_CALL_ARGS, tool_call_id=call_id,
                                         delta=event["arguments"], subagent_run_id=sub))  # fmt: skip
        out.append(ToolCallEndEvent(type=EventType.TOOL_CALL_END, tool_call_id=call_id, subagent_run_id=sub))
        return out

    def _tool_result(self, event: dict) -> list:
        call_id = event["call_id"]
        source = self.call_sources.get(call_id)
        out = self._enter(source, call_id) if source is not None else []
        self.turn_results = True
        out.append(ToolCallResultEvent(type=EventType.TOOL_CALL_RESULT, message_id=result_message_id(call_id),
                                       tool_call_id=call_id, content=event["content"], role="tool",
                                       subagent_run_id=self.subagent))  # fmt: skip
        return out

    def _start(self, message_id: str, source: str) -> TextMessageStartEvent:
        return TextMessageStartEvent(type=EventType.TEXT_MESSAGE_START, message_id=message_id, role="assistant",
                                     name=source, subagent_run_id=self.subagent)  # fmt: skip

    def _content(self, message_id: str, delta: str) -> TextMessageContentEvent:
        return TextMessageContentEvent(type=EventType.TEXT_MESSAGE_CONTENT, message_id=message_id, delta=delta,
                                       subagent_run_id=self.subagent)  # fmt: skip


def subagent_run_id(agent: str, first_id: str) -> str:
    """A step agent's turn, named by the agent and the first message or tool call of the turn."""
    return f"{agent}:{first_id}"


def result_message_id(call_id: str) -> str:
    """The id of the AG-UI tool message that carries a tool call's result (the stream's and the snapshot's)."""
    return f"{call_id}:result"


def _usage(usage: dict | None) -> list[TokenUsage] | None:
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return [TokenUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)]


def encode(event, seq: int | None = None) -> str:
    """One AG-UI event as an SSE frame, by the official encoder; with `seq`, an `id:` line first (Last-Event-ID)."""
    text = _ENCODER.encode(event)
    return text if seq is None else f"id: {seq}\n{text}"


# --- The conversation as AG-UI messages ----------------------------------------------------------------------


def messages_snapshot(conversation: Conversation) -> list:
    """The conversation as AG-UI messages, as a person sees it: their messages, the agents' (named; a step's
    agent's marked with its turn's subagentRunId, as streamed), and each stored tool call as an assistant
    message that makes it, followed by the tool message of its result."""
    messages = list(selectors.message_list_for_conversation(conversation=conversation).select_related("run__team"))
    calls = list(
        StoredToolCall.objects.filter(conversation=conversation, seq__isnull=False)
        .exclude(run__team__steps_display=Team.StepsDisplay.HIDDEN)
        .select_related("run__team")
        .order_by("seq")
    )
    with_calls = {(call.run_id, call.source) for call in calls}
    items: list[tuple[int, int, Any]] = []  # (seq, order, a Message or a stored tool call)
    for message in messages:
        if message.role == Message.Role.TOOL and (message.run_id, message.source) in with_calls:
            continue  # its results are the tool messages of its calls
        items.append((message.seq, 0, message))
    for call in calls:
        items.append((call.seq, 0, call))
    items.sort(key=lambda item: (item[0], item[1]))
    out, turn_agent, turn_id = [], None, None
    for _seq, _order, item in items:
        step = item.run is not None and item.run.team.is_step(item.source)
        if isinstance(item, Message) and item.role == Message.Role.USER:
            step = False
        if not step:
            turn_agent = turn_id = None
        elif item.source != turn_agent:
            first = item.call_id if isinstance(item, StoredToolCall) else str(item.id)
            turn_agent, turn_id = item.source, subagent_run_id(item.source, first)
        sub = {"subagent_run_id": turn_id} if turn_id else {}
        if isinstance(item, StoredToolCall):
            call = ToolCall(id=item.call_id, type="function",
                            function=FunctionCall(name=item.name, arguments=item.arguments or "{}"))  # fmt: skip
            out.append(AssistantMessage(id=item.call_id, role="assistant", name=item.source, tool_calls=[call], **sub))
            out.append(ToolMessage(id=result_message_id(item.call_id), role="tool", content=item.result,
                                   tool_call_id=item.call_id, error=item.result if item.is_error else None,
                                   **sub))  # fmt: skip
        elif item.role == Message.Role.USER:
            out.append(UserMessage(id=agui_message_id(item), role="user", content=item.content))
        else:
            out.append(AssistantMessage(id=str(item.id), role="assistant", content=item.content, name=item.source,
                                        **sub))  # fmt: skip
    return out


# --- The route -----------------------------------------------------------------------------------------------


def _conversation_id(user, thread_id: str) -> uuid.UUID:
    """The conversation a threadId names: the UUID itself, or for any other string one derived from it and the
    person (keyed by SECRET_KEY, so nobody can claim another person's thread id in advance)."""
    try:
        return uuid.UUID(thread_id)
    except ValueError:
        digest = salted_hmac("chorus.agui.thread", f"{user.pk}:{thread_id}", algorithm="sha256").digest()
        return uuid.UUID(bytes=digest[:16], version=4)


def _thread(user, thread_id: str, team_slug: str | None, may_create: bool) -> Conversation:
    if not storable(thread_id) or not thread_id.strip():
        raise ApiError("invalid_body", "threadId must be a non-empty string that can be stored.")
    conversation_id = _conversation_id(user, thread_id)
    conversation = Conversation.objects.select_related("team").filter(id=conversation_id).first()
    if conversation is not None:
        if conversation.owner_id != user.pk:
            raise NOT_FOUND()
        if team_slug is not None and conversation.team.slug != team_slug:
            raise ApiError(
                "team_mismatch", f"This thread is a conversation with the team {conversation.team.slug!r}.", status=409
            )
        return conversation
    team = None
    if team_slug is not None:
        team = selectors.team_list_enabled().filter(slug=team_slug).first()
        if team is None:
            raise ApiError("unknown_team", "No enabled team has that slug; GET /api/teams/ lists them.")
    if not may_create:
        raise ApiError("read_only_token", "This API token is read-only: it cannot start a conversation.", status=403)
    try:
        return services.conversation_create(owner=user, team=team, conversation_id=conversation_id)
    except IntegrityError:  # the same new thread posted twice at once: the other request created it
        conversation = Conversation.objects.select_related("team").filter(id=conversation_id, owner=user).first()
        if conversation is None:
            raise NOT_FOUND() from None
        return conversation
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=409) from None


ATTACHMENT_URL = re.compile(r"/api/conversations/[0-9a-f-]{36}/attachments/(?P<id>[0-9a-f-]{36})/$")


def _attachment_ref(part) -> str | None:
    """The attachment an `image` or `document` part names: its `id`, else its source's `url` (the upload's)."""
    if getattr(part, "id", None):
        return part.id
    source = getattr(part, "source", None)
    value = getattr(source, "value", None) if getattr(source, "type", None) == "url" else None
    match = ATTACHMENT_URL.search(value) if isinstance(value, str) else None
    return match["id"] if match else None


def _user_text(message) -> tuple[str, list[str]]:
    """The message's text, and the attachments it names: an `image` or `document` part whose `id` (or source
    URL) is a file uploaded into the thread's conversation (POST /api/conversations/<id>/attachments/)."""
    content = message.content
    if isinstance(content, str):
        return content, []
    parts, attachments = [], []
    for part in content:
        kind = getattr(part, "type", None)
        if kind == "text":
            parts.append(part.text)
        elif kind in ("binary", "image", "document") and _attachment_ref(part):
            attachments.append(_attachment_ref(part))
        else:
            raise ApiError(
                "invalid_body",
                "A user message's content parts must be text, or name a file uploaded first "
                "(POST /api/conversations/<threadId>/attachments/) by its id.",
            )
    return "\n".join(parts), attachments


def _client_id(message_id: str) -> str:
    """The idempotency key of an AG-UI user message: `agui:<its id>`, or for an id too long to fit (a client id
    is at most 64 characters), `agui#` and its hash."""
    key = CLIENT_ID_PREFIX + message_id
    if len(key) <= 64 and storable(key):
        return key
    return HASHED_PREFIX + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:59]


def agui_message_id(message: Message) -> str:
    """The id an AG-UI client knows a stored message by: the one it sent it with, else Chorus's."""
    if message.client_id and message.client_id.startswith(CLIENT_ID_PREFIX):
        return message.client_id[len(CLIENT_ID_PREFIX) :]
    return str(message.id)


def _prepare(request, user, payload: RunAgentInput, team_slug: str | None, last_event_id: int | None):
    """The conversation, the run to follow (None: nothing to run) and where to start. Sends the message."""
    last_user = next((m for m in reversed(payload.messages) if m.role == "user"), None)
    text, attachments = _user_text(last_user) if last_user is not None else (None, [])
    conversation = _thread(user, payload.thread_id, team_slug, may_create=not tokens.is_read_only(request))
    run = message = None
    if last_user is not None:
        message = _stored(conversation, last_user.id)
        if message is None:
            _writer(request)
            try:
                outcome = services.message_send(
                    conversation=conversation,
                    content=text,
                    client_id=_client_id(last_user.id),
                    attachments=attachments or None,
                )
            except services.ChatError as exc:
                raise ApiError(exc.code, exc.detail, status=_status_of(exc.code)) from None
            message, run = outcome.message, outcome.run
        else:
            run = message.triggered_runs.first()
    else:
        run = selectors.run_active_for_conversation(conversation_id=conversation.id)
    if run is None:
        return conversation, None, 0, None
    run = Run.objects.select_related("team", "trigger_message").get(id=run.id)
    start = (message or run.trigger_message).seq - 1
    if last_event_id is not None:
        start = max(start, last_event_id)
    if run.finished_seq is not None:
        start = min(start, run.finished_seq - 1)  # its end is always sent: a client that saw it all still gets it
    final_speakers = list(run.team.final_speakers) if run.started_seq is not None else None
    return conversation, run, start, final_speakers


def _stored(conversation: Conversation, message_id: str) -> Message | None:
    """The stored message an AG-UI message is: one of this conversation's ids, or one it sent before."""
    try:
        by_id = Message.objects.filter(conversation=conversation, id=uuid.UUID(message_id), role=Message.Role.USER)
    except ValueError:
        by_id = Message.objects.none()
    return by_id.first() or Message.objects.filter(conversation=conversation, client_id=_client_id(message_id)).first()


async def _agui(request, payload: RunAgentInput, team_slug: str | None):
    user = request.auth
    header = request.headers.get("Last-Event-ID")
    last_event_id = None
    if header is not None:
        last_event_id = parse_seq(header)
        if last_event_id is None:
            raise ApiError("invalid_after_seq", "Last-Event-ID is a whole number from 0 to 2**63 - 1.")
    conversation, run, start, final_speakers = await sync_to_async(_prepare)(
        request, user, payload, team_slug, last_event_id
    )
    translator = Translator(payload.thread_id, payload.run_id, final_speakers)
    ref = tokens.auth_ref(request, user)
    return event_stream(_frames(translator, conversation, run, start, ref))


async def _frames(translator: Translator, conversation: Conversation, run: Run | None, start: int, ref):
    yield encode(translator.started())
    if run is None:
        snapshot = await sync_to_async(messages_snapshot)(conversation)
        for event in translator.finished_without_run(snapshot):
            yield encode(event)
        return
    run_id = str(run.id)
    async for item in sse.events(conversation, start, ref, until_run_id=run_id):
        if item is None:
            yield sse.KEEP_ALIVE
            continue
        seq, text = item
        event = json.loads(text)
        if event["type"] == "run.finished" and event["run_id"] == run_id:
            snapshot = await sync_to_async(messages_snapshot)(conversation)
            out = translator.finish({**event, "conversation_id": str(conversation.id)}, snapshot)
        elif _run_of(event) != run_id:
            continue  # another run's: the stream is this run's
        else:
            out = translator.translate(event)
        for index, agui_event in enumerate(out):
            yield encode(agui_event, seq if index == len(out) - 1 else None)


def _run_of(event: dict) -> str | None:
    return event["message"]["run_id"] if "message" in event else event.get("run_id")


AGUI_DOC = (
    "AG-UI events as Server-Sent Events (`data:` one event, by the official encoder; `id:` the Chorus seq on "
    "the frame that completes a Chorus event, for Last-Event-ID). docs/api.md#ag-ui has the mapping."
)
AGUI_RESPONSES = {200: None, **errors(400, 403, 404, 409, 413, 429)}


@api.post(
    "/agui/",
    response=AGUI_RESPONSES,
    tags=["ag-ui"],
    summary="Run a thread's team (AG-UI)",
    openapi_extra=sse_response(AGUI_DOC),
)
async def agui_run(request, payload: RunAgentInput):
    """AG-UI's RunAgentInput in, AG-UI events out. `threadId` is a conversation of yours (created with the
    default team when new); the last user message of `messages` is sent (once: its id is the idempotency key);
    `runId` is echoed in RUN_STARTED and RUN_FINISHED. `state`, `tools`, `context` and `forwardedProps` are
    accepted and not used: Chorus's teams have their own tools, and Chorus keeps the conversation itself."""
    return await _agui(request, payload, None)


@api.post(
    "/agui/{slug:team_slug}/",
    response=AGUI_RESPONSES,
    tags=["ag-ui"],
    summary="Run a thread with a given team (AG-UI)",
    openapi_extra=sse_response(AGUI_DOC),
)
async def agui_run_team(request, team_slug: str, payload: RunAgentInput):
    """As POST /api/agui/, with the team a new thread's conversation gets. An existing thread keeps its team:
    another slug is 409 `team_mismatch`."""
    return await _agui(request, payload, team_slug)
