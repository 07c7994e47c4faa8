"""Replaying a conversation's events after a seq: what a resuming socket or event stream gets first."""

from channels.db import database_sync_to_async

from agents_app.domain.models import Conversation
from agents_app.domain.selectors import events_after
from agents_app.realtime import fanout
from agents_app.realtime.announce import encode


async def replay_after(conversation: Conversation, after_seq: int) -> list[tuple[int, str]]:
    """Every event of the conversation with seq > after_seq, encoded, in seq order: the stored ones from the
    database, the in-flight ones (tokens of a message still being written) from the fan-out's log. The
    database's copy wins where both have a seq."""
    persisted = await database_sync_to_async(events_after)(conversation=conversation, after_seq=after_seq)
    merged = dict(await fanout.backend().read_after(conversation.id, after_seq))
    merged.update((event["seq"], encode(event)) for event in persisted)
    return sorted(merged.items())
