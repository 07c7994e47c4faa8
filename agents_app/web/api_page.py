"""The JSON API operations the chat page needs beyond the basics (docs/api.md): replacing the last turn (edit,
regenerate, retry), feedback on answers and share links. Registered on api.api, with its authentication and
error shape."""

from typing import Literal
from uuid import UUID

from ninja import Field, Schema, Status
from pydantic import BaseModel

from agents_app.domain import feedback, services, sharing, turns
from agents_app.domain.events import message_payload
from agents_app.domain.validation import storable
from agents_app.models import Message, ShareLink
from agents_app.web.api import ApiError, SendOut, _own_conversation, _status_of, _writer, api, errors


class ResendIn(BaseModel):
    content: str | None = Field(
        None, description="The edited text; omitted or null: the same text again (regenerate, retry)."
    )
    client_id: str | None = Field(None, description="An idempotency key, as for a send.")


NO_EDIT = ResendIn()


@api.post(
    "/conversations/{uuid:conversation_id}/resend/",
    response={201: SendOut, **errors(400, 403, 404, 409, 413, 429)},
    tags=["messages"],
    summary="Replace your last turn (edit, regenerate, retry)",
)
def conversation_resend(request, conversation_id: UUID, payload: ResendIn = NO_EDIT):
    """Replaces your last message and its answer with a new turn: your message with `content` (edited) or as it
    was, its files kept, answered afresh. The old turn disappears from the conversation (a `turn.replaced`
    event says so) and the team forgets it. 409 `run_in_progress` while it answers."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    try:
        outcome = turns.turn_replace(conversation=conversation, content=payload.content, client_id=payload.client_id)
    except services.ChatError as exc:
        status = 409 if exc.code in ("run_in_progress", "nothing_to_replace", "cannot_replace") else None
        raise ApiError(exc.code, exc.detail, status=status or _status_of(exc.code)) from None
    body = {"message": message_payload(outcome.message), "run_id": str(outcome.run.id) if outcome.run else None}
    return Status(201, body)


# --- Feedback on answers ------------------------------------------------------------------------------------


class FeedbackIn(BaseModel):
    rating: Literal[1, -1] = Field(description="1: thumbs up; -1: thumbs down.")
    comment: str = Field("", description="Optional, up to 2000 characters.")


class FeedbackOut(Schema):
    message_id: UUID
    rating: int
    comment: str


def _own_message(request, conversation_id: UUID, message_id: UUID) -> Message:
    conversation = _own_conversation(request, conversation_id)
    message = Message.objects.filter(id=message_id, conversation=conversation, replaced_seq=None).first()
    if message is None:
        raise ApiError("not_found", "No such message.", status=404)
    return message


@api.put(
    "/conversations/{uuid:conversation_id}/messages/{uuid:message_id}/feedback/",
    response={200: FeedbackOut, **errors(400, 403, 404, 413)},
    tags=["feedback"],
    summary="Rate an answer",
)
def message_feedback_set(request, conversation_id: UUID, message_id: UUID, payload: FeedbackIn):
    """Your thumbs up or down on one of the team's messages, with an optional comment; rating it again
    replaces your earlier rating. Admins see every rating on the transcript."""
    message = _own_message(request, conversation_id, message_id)
    _writer(request)
    if not storable(payload.comment):
        raise ApiError("invalid_text", "The comment contains a NUL or an unpaired surrogate, which cannot be stored.")
    try:
        given = feedback.feedback_set(user=request.auth, message=message, rating=payload.rating,
                                      comment=payload.comment)  # fmt: skip
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail) from None
    return {"message_id": message.id, "rating": given.rating, "comment": given.comment}


@api.delete(
    "/conversations/{uuid:conversation_id}/messages/{uuid:message_id}/feedback/",
    response={204: None, **errors(403, 404)},
    tags=["feedback"],
    summary="Take back your rating",
)
def message_feedback_clear(request, conversation_id: UUID, message_id: UUID):
    message = _own_message(request, conversation_id, message_id)
    _writer(request)
    feedback.feedback_clear(user=request.auth, message=message)
    return Status(204, None)


# --- Share links --------------------------------------------------------------------------------------------


class ShareLinkOut(Schema):
    id: UUID
    url: str = Field(description="The read-only page's path; anyone with it reads the conversation, no login.")
    created_at: str


@api.get(
    "/conversations/{uuid:conversation_id}/share-links/",
    response={200: list[ShareLinkOut], **errors(404)},
    tags=["sharing"],
    summary="List a conversation's live share links",
)
def share_links(request, conversation_id: UUID):
    conversation = _own_conversation(request, conversation_id)
    return [
        sharing.share_link_payload(link) for link in sharing.share_links_for_conversation(conversation=conversation)
    ]


@api.post(
    "/conversations/{uuid:conversation_id}/share-links/",
    response={201: ShareLinkOut, **errors(403, 404)},
    tags=["sharing"],
    summary="Share a conversation read-only",
)
def share_link_create(request, conversation_id: UUID):
    """A link that shows this conversation, read-only, to anyone who has it, until you revoke it. It opens
    nothing else: no other conversation, no socket, no API, no files."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    return Status(201, sharing.share_link_payload(sharing.share_link_create(conversation=conversation)))


@api.delete(
    "/conversations/{uuid:conversation_id}/share-links/{uuid:link_id}/",
    response={204: None, **errors(403, 404)},
    tags=["sharing"],
    summary="Revoke a share link",
)
def share_link_revoke(request, conversation_id: UUID, link_id: UUID):
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    link = ShareLink.objects.filter(id=link_id, conversation=conversation, revoked_at=None).first()
    if link is None:
        raise ApiError("not_found", "No such share link.", status=404)
    sharing.share_link_revoke(link=link)
    return Status(204, None)
