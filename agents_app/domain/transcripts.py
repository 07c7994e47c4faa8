"""A conversation as an admin reviews it: every message, tool call and run in seq order, with who, when, how long
and how many tokens. Read in five queries whatever its length (runs, messages, their files, tool calls,
questions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agents_app.domain.rendering import render_markdown, render_plain
from agents_app.models import Conversation, InputRequest, Message, Run, ToolCall


@dataclass
class RunBlock:
    """One run: its boundary (status, error, timings, tokens) and what it produced, in seq order."""

    run: Run
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def queued_for(self) -> timedelta | None:
        return self.run.started_at - self.run.created_at if self.run.started_at else None

    @property
    def duration(self) -> timedelta | None:
        return self.run.duration

    @property
    def time_to_first_token(self) -> timedelta | None:
        """From the run's start to its first event reaching the worker (stored with the run's end)."""
        if self.run.started_at and self.run.first_token_at:
            return self.run.first_token_at - self.run.started_at
        return None

    @property
    def first_output_within(self) -> timedelta | None:
        """For a run without a stored first token (it ended on a worker that died, or before Chorus stored
        it): the time to its first stored message or tool call, an upper bound of its time to first token."""
        if self.time_to_first_token is not None or not self.run.started_at or not self.items:
            return None
        within = self.items[0]["at"] - self.run.started_at
        return within if within >= timedelta(0) else None

    @property
    def usage(self) -> list[tuple[str, dict]]:
        return sorted((self.run.usage or {}).items())

    @property
    def tool_calls(self) -> int:
        return sum(1 for item in self.items if item["kind"] == "tool_call")


def admin_transcript(conversation: Conversation, *, prefetched: bool = False) -> list[dict[str, Any]]:
    """The conversation in order: each person's message as `{"kind": "message", ...}`, each run as
    `{"kind": "run", "block": RunBlock}` right after the message that started it, in five queries (none with
    `prefetched`: the conversation came from export.conversations_for_export()). A question the run asked the
    person is an item of its run (`{"kind": "question"}`), with the answer; the answer is no turn of its own.

    Every message item carries `html` rendered as the chat page renders it (a person's words as typed, a
    model's as sanitised Markdown); a tool call's arguments and result are plain text, for the template to
    escape. A step (another agent's words, a tool's, a replaced draft) has `step: True`; the answer
    `answer: True`."""
    if prefetched:
        runs, messages, calls = conversation.runs.all(), conversation.messages.all(), conversation.tool_calls.all()
        questions = conversation.input_requests.all()
    else:
        questions = InputRequest.objects.filter(conversation=conversation).select_related("answered_by").order_by("seq")
        runs = Run.objects.filter(conversation=conversation).select_related("team", "routed_by").order_by("created_at")
        messages = Message.objects.filter(conversation=conversation).order_by("seq").prefetch_related("attachments")
        calls = ToolCall.objects.filter(conversation=conversation).order_by("seq", "started_at")

    blocks = {run.id: RunBlock(run) for run in runs}
    top: list[tuple[tuple, dict[str, Any]]] = []
    trigger_seqs = {}
    for message in messages:
        item = _message_item(message, blocks.get(message.run_id))
        if message.run_id in trigger_seqs and message.role == Message.Role.USER:
            continue  # the person's answer to a question of the run: its question item shows it
        if message.role == Message.Role.USER or message.run_id not in blocks:
            top.append(((message.seq, 0), item))
            if message.run_id in blocks:
                trigger_seqs[message.run_id] = message.seq
        else:
            blocks[message.run_id].items.append(item)
    for call in calls:
        if call.run_id in blocks:
            blocks[call.run_id].items.append(_tool_call_item(call))
    for question in questions:
        if question.run_id in blocks:
            blocks[question.run_id].items.append(_question_item(question))
    for block in blocks.values():
        block.items.sort(key=lambda item: (item["seq"] is None, item["seq"] or 0, item["at"]))
        _add_durations(block)
        # Right after the message that started it; a run without one (its message deleted) where it began.
        where = trigger_seqs.get(block.run.id, block.run.started_seq or block.run.finished_seq or 0)
        top.append(((where, 1), {"kind": "run", "block": block}))
    return [item for _key, item in sorted(top, key=lambda pair: pair[0])]


def _message_item(message: Message, block: RunBlock | None) -> dict[str, Any]:
    is_user = message.role == Message.Role.USER
    answer = (
        not is_user
        and block is not None
        and (
            str(block.run.answer_message_id) == str(message.id)
            if block.run.answer_message_id
            else message.is_final_answer
        )
    )
    return {
        "kind": "message",
        "message": message,
        "seq": message.seq,
        "at": message.created_at,
        "html": render_plain(message.content) if is_user else render_markdown(message.content),
        "answer": answer,
        "draft": message.revised_seq is not None,
        "step": not is_user and not answer,
        "tokens": message.prompt_tokens + message.completion_tokens,
        "duration": None,
        "attachments": [a.payload() for a in message.attachments.all()] if is_user else [],
    }


def _tool_call_item(call: ToolCall) -> dict[str, Any]:
    ended = call.started_at + timedelta(milliseconds=call.duration_ms) if call.duration_ms is not None else None
    return {
        "kind": "tool_call",
        "call": call,
        "seq": call.seq,
        "at": call.started_at,
        "ended": ended,
        "step": True,
        "has_result": call.result_seq is not None or call.duration_ms is not None,
        "duration": timedelta(milliseconds=call.duration_ms) if call.duration_ms is not None else None,
    }


def _question_item(question: InputRequest) -> dict[str, Any]:
    """A question the run asked the person, with their answer, who gave it and when (or none yet)."""
    return {
        "kind": "question",
        "question": question,
        "seq": question.seq,
        "at": question.created_at,
        "step": False,
        "answered": question.answered_at is not None,
        "waited": question.answered_at - question.created_at if question.answered_at else None,
    }


def _add_durations(block: RunBlock) -> None:
    """A message's duration: how long its agent took to write it, from the run's previous stored event (its
    start, a message, a tool's result) to this message being stored. A tool call's is its own (measured by the
    worker from the call to its result)."""
    previous: datetime | None = block.run.started_at
    for item in block.items:
        if item["kind"] == "question":
            previous = item["question"].answered_at or item["at"]  # the run waited for the person meanwhile
        elif item["kind"] == "message":
            if previous is not None and item["at"] >= previous:
                item["duration"] = item["at"] - previous
            previous = item["at"]
        else:
            previous = item["ended"] or item["at"]
