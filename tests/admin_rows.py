"""Rows as Chorus's worker stores them, made directly: turns with steps, tool calls, answers and usage, for the
admin, usage, budget and export tests. Times are real (now, or a given moment), so durations are positive."""

import re
import uuid
from datetime import timedelta

from django.contrib.auth.models import Permission
from django.db import transaction
from django.utils import timezone

from agents_app.models import Conversation, Message, Run, ToolCall

SEQS_PER_TURN = 20


def usage_of(prompt: int, completion: int, *, selection: tuple[int, int] | None = None) -> dict:
    """A Run.usage: the agents' requests, and optionally a selector's (prompt, completion) on top."""
    parts = {"agent": {"prompt_tokens": prompt, "completion_tokens": completion, "requests": 2}}
    if selection:
        parts["speaker_selection"] = {"prompt_tokens": selection[0], "completion_tokens": selection[1], "requests": 3}
    return parts


@transaction.atomic  # the question and its run point at each other: their keys are checked at commit
def add_turn(
    conversation: Conversation,
    question: str = "What is 6*7?",
    *,
    answer: str | None = "It is **42**.",
    steps: tuple[tuple[str, str], ...] = (),
    tool: dict | None = None,
    status: str = Run.Status.SUCCEEDED,
    error: tuple[str, str] = ("", ""),
    usage: dict | None = None,
    when=None,
    team=None,
    routed_by=None,
    first_token: bool = True,
) -> Run:
    """One turn: the person's message, its run (started 1 s after, first token 0.25 s later, ended 3 s after),
    the steps (agent, text), a tool call (`tool`: ToolCall fields), and the answer."""
    when = when or timezone.now()
    usage = usage_of(30, 12) if usage is None else usage
    prompt = sum(part["prompt_tokens"] for part in usage.values())
    completion = sum(part["completion_tokens"] for part in usage.values())
    conversation.refresh_from_db(fields=["seq_reserved"])
    seq = conversation.seq_reserved + 1
    Conversation.objects.filter(id=conversation.id).update(
        seq_reserved=seq + SEQS_PER_TURN, last_seq=seq + SEQS_PER_TURN - 1, updated_at=when
    )
    run_id = uuid.uuid4()
    question_row = Message.objects.create(
        conversation=conversation, run_id=run_id, role="user", source="user", content=question, seq=seq
    )
    started = when + timedelta(seconds=1)
    run = Run.objects.create(
        id=run_id, conversation=conversation, team=team or conversation.team, trigger_message=question_row,
        status=status, started_at=started, finished_at=when + timedelta(seconds=4),
        first_token_at=started + timedelta(milliseconds=250) if first_token else None,
        started_seq=seq + 1, finished_seq=seq + SEQS_PER_TURN - 1, error_code=error[0], error_detail=error[1],
        prompt_tokens=prompt, completion_tokens=completion, usage=usage, routed_by=routed_by,
        route_reason="the message mentions “write”" if routed_by else "", announced=True,
    )  # fmt: skip
    next_seq = seq + 2
    for source, text in steps:
        Message.objects.create(conversation=conversation, run=run, role="assistant", source=source, content=text,
                               seq=next_seq, completion_tokens=3)  # fmt: skip
        next_seq += 1
    if tool is not None:
        fields = {"call_id": "call_1", "source": "analyst", "name": "calculator",
                  "arguments": '{"expression": "6*7"}', "result": "42", "duration_ms": 12.5, **tool}  # fmt: skip
        ToolCall.objects.create(run=run, conversation=conversation, seq=next_seq, result_seq=next_seq + 1, **fields)
        next_seq += 2
    if answer is not None:
        answer_row = Message.objects.create(
            conversation=conversation, run=run, role="assistant", source=(team or conversation.team).final_speakers[0]
            if (team or conversation.team).final_speakers else "assistant", content=answer, is_final_answer=True,
            seq=next_seq, prompt_tokens=prompt, completion_tokens=completion,
        )  # fmt: skip
        Run.objects.filter(id=run.id).update(answer_message_id=answer_row.id)
        run.answer_message_id = answer_row.id
    # created_at is stamped by the database's clock on insert: put the run where the test wants it.
    Run.objects.filter(id=run.id).update(created_at=when)
    run.created_at = when
    return run


def grant(user, *codenames: str) -> None:
    """Give a user Chorus's permissions by codename (e.g. "view_run")."""
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="agents_app", codename__in=codenames))


VIEW_ALL = ("view_conversation", "view_run", "view_message", "view_toolcall", "view_team", "view_personsettings")
CHANGE_ALL = tuple(f"{action}_{model}" for action in ("add", "change", "delete")
                   for model in ("conversation", "run", "message", "toolcall", "team", "personsettings"))  # fmt: skip


def table_row(html: str, label: str) -> list[str]:
    """The cells (th and td, as text) of the first table row whose first non-empty cell starts with `label`;
    empty cells before it (an admin list's checkbox) are left out."""
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
        while cells and not cells[0]:
            cells.pop(0)
        if cells and cells[0].startswith(label):
            return cells
    raise AssertionError(f"no row {label!r}")
