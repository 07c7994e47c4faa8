"""A person's thumbs up or down (and optional comment) on the answers of their own conversations."""

from agents_app.domain.services import ChatError
from agents_app.models import Feedback, Message

MAX_COMMENT_CHARS = 2000


def feedback_set(*, user, message: Message, rating: int, comment: str = "") -> Feedback:
    """Record the person's rating of an answer; a second rating of the same answer replaces the first."""
    if rating not in (Feedback.Rating.UP, Feedback.Rating.DOWN):
        raise ChatError("invalid_rating", "rating is 1 (thumbs up) or -1 (thumbs down).")
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise ChatError("comment_too_long", f"Comments are limited to {MAX_COMMENT_CHARS} characters.")
    if message.role == Message.Role.USER:
        raise ChatError("not_an_answer", "Only the team's messages take feedback.")
    feedback, _created = Feedback.objects.update_or_create(
        message=message, user=user, defaults={"rating": rating, "comment": comment}
    )
    return feedback


def feedback_clear(*, user, message: Message) -> None:
    Feedback.objects.filter(message=message, user=user).delete()


def feedback_by_message(*, user, conversation) -> dict[str, int]:
    """The person's ratings in a conversation, by message id (as text), for the chat page."""
    rows = Feedback.objects.filter(user=user, message__conversation=conversation).values_list("message_id", "rating")
    return {str(message_id): rating for message_id, rating in rows}
