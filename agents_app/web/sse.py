"""The conversation's events as Server-Sent Events, for programmatic clients (protocol v1, docs/protocol.md).

Each event is sent as `id: <seq>`, `event: <type>`, `data: <the same JSON object the WebSocket sends>`.
"""

import asyncio
import json
from collections.abc import AsyncIterator

from agents_app.models import Conversation
from agents_app.realtime import fanout
from agents_app.web import session_watch
from agents_app.web.replay import replay_after

KEEPALIVE_SECONDS = 15
MAX_BEHIND = 10_000  # events queued for one slow reader before its stream is ended


class _Inbox:
    """A fan-out subscriber that queues events for one HTTP response."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue(maxsize=MAX_BEHIND)
        self.overflowed = False
        self.ended = False  # the session that opened the stream ended: the stream ends now
        self.last_seq = 0  # the last seq the stream sent, kept by stream()

    async def deliver(self, seq: int, text: str) -> None:
        try:
            self.queue.put_nowait((seq, text))
        except asyncio.QueueFull:
            # A reader this far behind must not grow the server's memory: its stream ends once it has read
            # what is queued, and it resumes with Last-Event-ID, losing nothing.
            self.overflowed = True

    async def session_ended(self, message=None) -> None:
        """From the session watch: this stream's session ended (logout, expiry, password change...)."""
        self.ended = True
        try:
            self.queue.put_nowait((-1, ""))  # wakes the stream if it waits (then the queue is empty)
        except asyncio.QueueFull:
            pass  # a full queue: the stream is not waiting, and looks at `ended` before its next event

    async def catch_up(self) -> None:
        """The fan-out lost Redis for a while: queue what this stream missed (stream() drops repeats)."""
        for seq, text in await replay_after(self.conversation, self.last_seq):
            await self.deliver(seq, text)


def frame(seq: int, text: str) -> tuple[str, str]:
    """The SSE frame of an encoded event, and the event's type."""
    event_type = json.loads(text)["type"]
    return f"id: {seq}\nevent: {event_type}\ndata: {text}\n\n", event_type


KEEP_ALIVE = ": keep-alive\n\n"


async def stream(
    conversation: Conversation, after_seq: int, ref, until_run_id: str | None = None
) -> AsyncIterator[str]:
    """The conversation's events as SSE frames (see `events`), with a keep-alive comment after a quiet spell."""
    async for item in events(conversation, after_seq, ref, until_run_id=until_run_id):
        yield KEEP_ALIVE if item is None else frame(*item)[0]


async def events(
    conversation: Conversation, after_seq: int, ref, until_run_id: str | None = None
) -> AsyncIterator[tuple[int, str] | None]:
    """Replay every event after `after_seq`, then continue live, as (seq, encoded event); None after
    KEEPALIVE_SECONDS without one. With `until_run_id`, end after that run's `run.finished`. Subscribes before
    replaying, and drops seqs already given: no gap, no duplicate. Ends within CHORUS_SESSION_CHECK_SECONDS of
    `ref` ending: a session (session_watch.py) or an API token (tokens.py)."""
    backend = fanout.backend()
    inbox = _Inbox(conversation)
    session_watch.watch(ref, inbox)
    await backend.subscribe(conversation.id, inbox)
    try:
        inbox.last_seq = after_seq
        for seq, text in await replay_after(conversation, after_seq):
            if inbox.ended:
                return
            inbox.last_seq = seq
            yield seq, text
            if until_run_id and _ends(text, until_run_id):
                return
        while True:
            if inbox.ended or (inbox.overflowed and inbox.queue.empty()):
                return
            try:
                seq, text = await asyncio.wait_for(inbox.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield None
                continue
            if inbox.ended:
                return
            if seq <= inbox.last_seq:
                continue
            inbox.last_seq = seq
            yield seq, text
            if until_run_id and _ends(text, until_run_id):
                return
    finally:
        session_watch.unwatch(ref, inbox)
        await backend.unsubscribe(conversation.id, inbox)


def _ends(text: str, run_id: str) -> bool:
    """Whether this encoded event is the run.finished of `run_id` (cheaply: most events are tokens)."""
    if '"type":"run.finished"' not in text[:40]:
        return False
    return json.loads(text)["run_id"] == run_id
