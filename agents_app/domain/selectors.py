"""Reads: what a user may see of conversations, messages, runs and teams."""

from typing import Any

from django.db.models import Exists, OuterRef, Q

from agents_app.domain import events
from agents_app.models import Conversation, Message, Run, Team, ToolCall


def conversation_for_user(*, user, conversation_id) -> Conversation | None:
    """The conversation if `user` owns it, else None: a stranger learns nothing, not even that it exists."""
    if not user.is_authenticated:
        return None
    return Conversation.objects.select_related("team").filter(id=conversation_id, owner=user).first()


def conversation_list_for_user(*, user, query: str = ""):
    """The person's conversations, most recently active first; with `query`, those whose title or a message
    the person can see contains it (case-insensitive)."""
    conversations = Conversation.objects.filter(owner=user)
    if query:
        said = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=query, replaced_seq=None)
        said = said.exclude(_hidden_steps())
        conversations = conversations.filter(Q(title__icontains=query) | Exists(said))
    from agents_app.domain.human_input import waiting_annotation

    conversations = conversations.annotate(waiting_for_input=waiting_annotation())
    return conversations.select_related("team").order_by("-updated_at", "-id")


def _hidden_steps() -> Q:
    """Messages a person does not see: steps of a team whose steps are hidden."""
    return Q(run__team__steps_display=Team.StepsDisplay.HIDDEN) & (
        Q(role=Message.Role.TOOL) | Q(role=Message.Role.ASSISTANT, is_final_answer=False, revised_seq__isnull=True)
    )  # a replaced draft was shown as the answer when it came: it stays visible, as a step


def message_list_for_conversation(*, conversation: Conversation):
    """The messages a person sees: a team whose steps are hidden shows its answers only; a replaced turn is
    gone."""
    messages = Message.objects.filter(conversation=conversation, replaced_seq=None)
    messages = messages.exclude(_hidden_steps()).order_by("seq")
    return messages.prefetch_related("attachments")


def run_active_for_conversation(*, conversation_id) -> Run | None:
    """The conversation's open run: queued, running, or waiting for the person (Stop ends it)."""
    return Run.objects.filter(conversation_id=conversation_id, status__in=Run.OPEN_STATUSES).first()


def team_list_enabled():
    return Team.objects.filter(enabled=True).order_by("name")


def team_default() -> Team | None:
    return Team.objects.filter(enabled=True).order_by("-is_default", "name").first()


def events_after(*, conversation: Conversation, after_seq: int) -> list[dict[str, Any]]:
    """The persisted events of a conversation with seq > after_seq, in seq order.

    Messages and run starts and ends live in the database; tokens do not (they are complete in the
    message that follows them).
    """
    visible = message_list_for_conversation(conversation=conversation)
    replay: list[dict[str, Any]] = [events.message_event(message) for message in visible.filter(seq__gt=after_seq)]
    replay += [events.message_updated_event(message) for message in visible.filter(revised_seq__gt=after_seq)]
    runs = _runs_shown(conversation).select_related("team", "routed_by")
    for run in runs.filter(started_seq__gt=after_seq):
        replay.append(events.run_started_event(run))
    for run in runs.filter(finished_seq__gt=after_seq):
        replay.append(events.run_finished_event(run))
    replaced = Message.objects.filter(conversation=conversation, role=Message.Role.USER, replaced_seq__gt=after_seq)
    replay += [events.turn_replaced_event(message) for message in replaced]
    from agents_app.domain.human_input import input_events_after

    replay += input_events_after(conversation=conversation, after_seq=after_seq)
    named = Conversation.objects.filter(id=conversation.id, title_seq__gt=after_seq).first()  # as it is now
    if named is not None:
        replay.append(events.conversation_updated_event(named))
    replay.sort(key=lambda event: event["seq"])
    return replay


def conversation_transcript(*, conversation: Conversation) -> list[dict[str, Any]]:
    """The chat page's history: each person's message, then each run with its team, its steps (folded, open
    or hidden as the team says) and its answer, in seq order."""
    items: list[tuple[int, dict[str, Any]]] = []
    run_entries: dict[Any, dict[str, Any]] = {}
    # A run that ended before it started (refused by a router's budget, say) is shown too: with its error.
    runs = _runs_shown(conversation).filter(Q(started_seq__isnull=False) | Q(finished_seq__isnull=False))
    for run in runs.select_related("team", "routed_by"):
        entry = {"kind": "run", "run": run, "steps": [], "answers": [], "final_speakers": run.team.final_speakers}
        run_entries[run.id] = entry
        items.append((run.started_seq or run.finished_seq, entry))
    for message in message_list_for_conversation(conversation=conversation):
        payload = events.message_payload(message)
        entry = run_entries.get(message.run_id)
        if message.role == Message.Role.USER or entry is None:
            items.append((message.seq, {"kind": "message", "message": payload}))
        elif message.role == Message.Role.TOOL or not message.is_final_answer:
            entry["steps"].append(payload)
        else:
            entry["answers"].append(payload)
    # Tool calls are steps too, each with its result, where its tool.call event showed it (never a hidden step).
    calls = ToolCall.objects.filter(conversation=conversation)
    calls = calls.exclude(run__team__steps_display=Team.StepsDisplay.HIDDEN).filter(run__in=list(run_entries))
    with_calls = set()
    for call in calls:
        if call.run_id in run_entries:
            run_entries[call.run_id]["steps"].append(_tool_call_step(call))
            with_calls.add(call.run_id)
    for run_id in with_calls:
        run_entries[run_id]["steps"].sort(key=lambda step: (step["seq"] is None, step["seq"] or 0))
    from agents_app.domain.human_input import split_runs_at_answers

    items = split_runs_at_answers(items, run_entries, conversation)
    return [entry for _seq, entry in sorted(items, key=lambda item: item[0])]


def _runs_shown(conversation: Conversation):
    """The runs of turns the person has not replaced (a run whose person's message is gone stays)."""
    return Run.objects.filter(conversation=conversation).exclude(trigger_message__replaced_seq__isnull=False)


def _tool_call_step(call: ToolCall) -> dict[str, Any]:
    """A stored tool call as the chat page shows it among the steps: as its tool.call and tool.result events
    drew it live (the template escapes every field: the arguments and the result are untrusted text)."""
    return {
        "kind": "tool_call",
        "id": f"call-{call.call_id}",
        "seq": call.seq,
        "source": call.source,
        "name": call.name,
        "arguments": call.arguments,
        "result": call.result,
        "has_result": call.result_seq is not None or call.duration_ms is not None,
        "is_error": call.is_error,
    }
