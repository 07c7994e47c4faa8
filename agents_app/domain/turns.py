"""Replacing the person's last turn: edit-and-resend, regenerate and retry.

A replaced turn is not deleted: its messages, runs and tool calls stay for the admin's review and the usage
counts, marked `replaced_seq`, and every page and API listing stops showing them. The team forgets it too:
the conversation's memory goes back to what it was before the replaced message was sent (kept by
message_send as `state_before`), then the new message is sent as any other.
"""

from django.db import transaction
from django.db.models import Exists, OuterRef

from agents_app.domain import events, notify, services
from agents_app.domain.services import ChatError, SendOutcome
from agents_app.models import Attachment, Conversation, Message, Run

OPEN_STATUSES = (*Run.ACTIVE_STATUSES, Run.Status.WAITING)


def last_turn_message(*, conversation: Conversation) -> Message | None:
    """The person's last message that started a run and is still shown: the turn a replacement replaces (an
    answer to the team's question belongs to the run it answered, and goes with it)."""
    started = Run.objects.filter(trigger_message=OuterRef("pk"))
    shown = Message.objects.filter(conversation=conversation, role=Message.Role.USER, replaced_seq=None)
    return shown.filter(Exists(started)).order_by("-seq").first()


def turn_replace(
    *, conversation: Conversation, content: str | None = None, client_id: str | None = None
) -> SendOutcome:
    """Replace the person's last turn with a new one: their message with `content` (an edit) or as it was (a
    regenerate or a retry), its files kept. Refused while a run answers or waits, and for a turn sent before
    Chorus kept the team's earlier memory when the team remembers it."""
    with transaction.atomic():
        # The row lock orders this with a send (which updates the row as it takes its seq).
        locked = Conversation.objects.select_for_update().get(id=conversation.id)
        if Run.objects.filter(conversation=locked, status__in=OPEN_STATUSES).exists():
            raise ChatError("run_in_progress", "Wait for the current answer to finish (or stop it) first.")
        message = last_turn_message(conversation=locked)
        if message is None:
            raise ChatError("nothing_to_replace", "There is no message of yours to edit or answer again.")
        if locked.state_before_seq == message.seq:
            locked.team_state = locked.state_before
        elif _turn_changed_memory(message):
            raise ChatError(
                "cannot_replace", "This message was sent before Chorus could replace turns: send a new one instead."
            )
        text = message.content if content is None else content
        files = list(Attachment.objects.filter(message=message).values_list("id", flat=True))
        replaced_seq = services.seq_reserve(conversation_id=locked.id)
        Message.objects.filter(id=message.id).update(replaced_seq=replaced_seq)
        if message.run_id:
            Message.objects.filter(run_id=message.run_id).update(replaced_seq=replaced_seq)
        # The files go with the new message; the team's memory is what it was before the replaced message.
        Attachment.objects.filter(id__in=files).update(message=None)
        # A title the replaced message gave is given anew by the new one.
        title = "" if locked.title_seq == message.seq + 1 else locked.title
        Conversation.objects.filter(id=locked.id).update(
            team_state=locked.team_state, last_seq=replaced_seq, title=title
        )
        message.replaced_seq = replaced_seq
        transaction.on_commit(lambda: notify.notifier().publish(locked.id, events.turn_replaced_event(message)))
        conversation.title = title
        return services.message_send(
            conversation=conversation, content=text, client_id=client_id, attachments=[str(f) for f in files] or None
        )


def _turn_changed_memory(message: Message) -> bool:
    """Whether the team's saved memory includes this turn: its run succeeded and saved it (a failed, stopped or
    routed turn saves none)."""
    run = Run.objects.filter(id=message.run_id).first() if message.run_id else None
    return run is not None and run.status == Run.Status.SUCCEEDED and run.routed_by_id is None
