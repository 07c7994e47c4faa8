"""The one place that builds the events a browser sees (protocol v1, docs/protocol.md) and sends them.

Every event is a JSON object with a `type` and a `seq`; it is encoded once and handed to the fan-out
(agents_app/realtime/fanout.py), which logs it for resuming sockets and delivers it to every socket of the conversation.
"""

from typing import Any

from agents_app.domain.rendering import render_markdown, render_plain
from agents_app.models import Conversation, InputRequest, Message, Run


def message_payload(message: Message, *, as_announced: bool = False) -> dict[str, Any]:
    """A message as the protocol and the JSON API show it. With `as_announced`, as its `message` event first
    showed it: a draft that a later answer replaced was announced as the answer (its `message.updated` says
    otherwise), so a replay sends the same event objects a live socket received."""
    return {
        "id": str(message.id),
        "run_id": str(message.run_id) if message.run_id else None,
        "role": message.role,
        "source": message.source,
        "content": message.content,
        "html": render_plain(message.content)
        if message.role == Message.Role.USER
        else render_markdown(message.content),
        "is_final_answer": message.is_final_answer or (as_announced and message.revised_seq is not None),
        "incomplete": message.incomplete,
        "seq": message.seq,
        "created_at": message.created_at.isoformat(),
        # Only a person's message carries files; an agent's never does (and is built where no query may run).
        "attachments": [a.payload() for a in message.attachments.all()] if message.role == Message.Role.USER else [],
    }


def hello_event(conversation: Conversation, active_run_id) -> dict[str, Any]:
    return {
        "type": "hello",
        "seq": conversation.last_seq,
        "conversation_id": str(conversation.id),
        "last_seq": conversation.last_seq,
        "active_run_id": str(active_run_id) if active_run_id else None,
    }


def message_event(message: Message) -> dict[str, Any]:
    return {"type": "message", "seq": message.seq, "message": message_payload(message, as_announced=True)}


def message_updated_event(message: Message) -> dict[str, Any]:
    """A stored message changed after its `message` event: a draft announced as the answer was replaced by a
    later one (`is_final_answer` is now false). Sent at the run's end, before `run.finished`."""
    return {"type": "message.updated", "seq": message.revised_seq, "message": message_payload(message)}


def conversation_updated_event(conversation: Conversation) -> dict[str, Any]:
    """The conversation was named (by its first message) or renamed: every open page shows the new title."""
    return {"type": "conversation.updated", "seq": conversation.title_seq, "title": conversation.title}


def turn_replaced_event(message: Message) -> dict[str, Any]:
    """The person replaced their last turn (edited or regenerated it): `message_id` (their message) and every
    message, tool call and step of `run_id` are gone from the conversation; the new turn follows."""
    return {
        "type": "turn.replaced",
        "seq": message.replaced_seq,
        "message_id": str(message.id),
        "run_id": str(message.run_id) if message.run_id else None,
    }


def run_started_event(run: Run) -> dict[str, Any]:
    route = {"router": run.routed_by.slug, "reason": run.route_reason} if run.routed_by_id else None
    return {
        "type": "run.started",
        "seq": run.started_seq,
        "run_id": str(run.id),
        "team": run.team.slug,
        "team_name": run.team.name,
        "final_speakers": run.team.final_speakers,
        "steps": run.team.steps_display,
        "route": route,
    }


def run_finished_event(run: Run) -> dict[str, Any]:
    error = {"code": run.error_code, "detail": run.error_detail} if run.error_code else None
    return {
        "type": "run.finished",
        "seq": run.finished_seq,
        "run_id": str(run.id),
        "status": run.status,
        "error": error,
        "answer_message_id": str(run.answer_message_id) if run.answer_message_id else None,
        "usage": {
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            "by_purpose": run.usage or {},
        },
    }


def token_event(seq: int, run_id, stream_id: str, source: str, delta: str) -> dict[str, Any]:
    return {
        "type": "token",
        "seq": seq,
        "run_id": str(run_id),
        "stream_id": stream_id,
        "source": source,
        "delta": delta,
    }


def tool_call_event(seq: int, run_id, call_id: str, source: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "tool.call",
        "seq": seq,
        "run_id": str(run_id),
        "call_id": call_id,
        "source": source,
        "name": name,
        "arguments": arguments,
    }


def tool_result_event(seq: int, run_id, call_id: str, content: str, is_error: bool) -> dict[str, Any]:
    return {
        "type": "tool.result",
        "seq": seq,
        "run_id": str(run_id),
        "call_id": call_id,
        "content": content,
        "is_error": is_error,
    }


def input_request_event(request: InputRequest) -> dict[str, Any]:
    """The team asks the person (docs/protocol.md#human-in-the-loop-questions-the-team-asks-the-person)."""
    return {
        "type": "input.request",
        "seq": request.seq,
        "run_id": str(request.run_id),
        "request_id": str(request.id),
        "kind": request.kind,
        "source": request.source,
        "prompt": request.prompt,
        "options": list(request.options or []),
    }


def input_answered_event(request: InputRequest, message_id, seq: int) -> dict[str, Any]:
    """The question is closed; `message_id` is the person's answer, whose `message` event came just before."""
    return {
        "type": "input.answered",
        "seq": seq,
        "run_id": str(request.run_id),
        "request_id": str(request.id),
        "message_id": str(message_id),
    }


def error_event(code: str, detail: str) -> dict[str, Any]:
    """A refused request; the only event without a seq, since it is for one socket and not the conversation."""
    return {"type": "error", "code": code, "detail": detail}


# Publishing is not the domain's: services call notify.notifier().publish(conversation_id, event), the worker
# agents_app.realtime.announce.publish; replays are agents_app.web.replay.replay_after.
