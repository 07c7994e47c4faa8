"""Reads: what a user may see of conversations, messages, runs and teams."""

from typing import Any

from agents_app import events
from agents_app.models import Conversation, Message, Run, Team


def conversation_for_user(*, user, conversation_id) -> Conversation | None:
    """The conversation if `user` owns it, else None: a stranger learns nothing, not even that it exists."""
    if not user.is_authenticated:
        return None
    return Conversation.objects.select_related("team").filter(id=conversation_id, owner=user).first()


def conversation_list_for_user(*, user):
    return Conversation.objects.filter(owner=user).select_related("team").order_by("-updated_at")


def message_list_for_conversation(*, conversation: Conversation):
    return Message.objects.filter(conversation=conversation).order_by("seq")


def run_active_for_conversation(*, conversation_id) -> Run | None:
    return Run.objects.filter(conversation_id=conversation_id, status__in=Run.ACTIVE_STATUSES).first()


def team_list_enabled():
    return Team.objects.filter(enabled=True).order_by("name")


def team_default() -> Team | None:
    return Team.objects.filter(enabled=True).order_by("-is_default", "name").first()


def events_after(*, conversation: Conversation, after_seq: int) -> list[dict[str, Any]]:
    """The persisted events of a conversation with seq > after_seq, in seq order.

    Messages and run starts and ends live in the database; tokens do not (they are complete in the
    message that follows them).
    """
    replay: list[dict[str, Any]] = [
        events.message_event(message)
        for message in Message.objects.filter(conversation=conversation, seq__gt=after_seq).order_by("seq")
    ]
    runs = Run.objects.filter(conversation=conversation).select_related("team")
    for run in runs.filter(started_seq__gt=after_seq):
        replay.append(events.run_started_event(run, run.team.slug))
    for run in runs.filter(finished_seq__gt=after_seq):
        replay.append(events.run_finished_event(run))
    replay.sort(key=lambda event: event["seq"])
    return replay
