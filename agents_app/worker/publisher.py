"""Turning the runner's events into protocol events: seqs for a run, stored messages, and publishing."""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque

from channels.db import database_sync_to_async
from django.conf import settings

from agents_app.domain import events, services
from agents_app.models import Run, Team
from agents_app.ops import metrics
from agents_app.realtime import announce, fanout
from agents_app.runner import (
    CompletedMessage,
    RunnerEvent,
    TokenDelta,
    ToolCall,
    ToolResult,
)

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)


class SeqAllocator:
    """Hands out a conversation's seqs from blocks reserved in the database, so tokens cost no write."""

    def __init__(self, conversation_id):
        self.conversation_id = conversation_id
        self._next = 1
        self._end = 0

    def begin_at(self, started_seq: int) -> None:
        """The run's first block was reserved when it was started; started_seq (its first seq) is used."""
        self._next, self._end = started_seq + 1, started_seq + services.SEQ_BLOCK - 1

    async def take(self) -> int:
        if self._next > self._end:
            self._next = await database_sync_to_async(services.seq_reserve)(
                conversation_id=self.conversation_id, count=services.SEQ_BLOCK
            )
            self._end = self._next + services.SEQ_BLOCK - 1
        seq = self._next
        self._next += 1
        return seq


class RunPublisher:
    """Turns runner events into protocol events: numbers them, persists completed messages, and coalesces
    tokens into frames at least CHORUS_TOKEN_COALESCE_MS apart: a token that comes after a quiet spell goes out
    at once; tokens that follow it faster than that wait (at most that long) and go out together."""

    def __init__(self, run: Run):
        self.run = run
        self.seqs = SeqAllocator(run.conversation_id)
        # A team that hides its steps never sends them to a socket; they are still stored for admins.
        self.hide_steps = run.team.steps_display == Team.StepsDisplay.HIDDEN
        self.window = settings.CHORUS_TOKEN_COALESCE_MS / 1000
        self._pending: TokenDelta | None = None
        self._pending_parts: list[str] = []
        self._next_frame_at = 0.0  # monotonic time before which a new frame waits
        self.streamed: dict[str, list[str]] = {}  # stream_id -> deltas published so far, for partial answers
        self.run_id = str(run.id)
        self._pending_since = 0.0  # when the held frame's first token reached this loop (monotonic)
        self._first_token_sent = False
        self.stream_sources: dict[str, str] = {}  # stream_id -> agent name
        self.final_answer_ids: list[str] = []  # stored messages marked as the answer, in order
        # Set when another worker took the run over (this one was frozen past CHORUS_RUN_STALE_SECONDS): from
        # then on nothing more is published or stored from here.
        self.lost = False
        # Tool calls stored and waiting for their result: call_id -> [(row id, monotonic time of the call)].
        self.open_tool_calls: dict[str, deque[tuple[uuid.UUID, float]]] = {}
        self.tool_call_uses: dict[str, int] = {}  # call_id -> calls made with it (a model may reuse one)
        self.first_token_at = None  # when the run's first event arrived (_run_turn), stored with its end

    def flush_due_at(self) -> float | None:
        """When the held frame must go out (monotonic), or None when nothing is held."""
        return None if self._pending is None else self._next_frame_at

    async def handle(self, event: RunnerEvent) -> None:
        if self.lost:
            return
        if isinstance(event, TokenDelta):
            if self.hide_steps and self.run.team.is_step(event.source):
                return
            self.stream_sources[event.stream_id] = event.source
            if self._pending is not None and self._pending.stream_id != event.stream_id:
                await self.flush()
            if self._pending is None:
                self._pending = event
                self._pending_since = time.monotonic()
            self._pending_parts.append(event.delta)
            if time.monotonic() >= self._next_frame_at:
                await self.flush()
            return
        await self.flush()
        if isinstance(event, CompletedMessage):
            self.streamed.pop(event.id, None)
            await self._store_and_publish(
                event.id,
                event.role,
                event.source,
                event.content,
                event.is_final_answer,
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
            )
        elif isinstance(event, ToolCall):
            seq = await self.seqs.take()
            if not self.hide_steps:  # tool calls and results are steps: a team that hides them only stores them
                await announce.publish(
                    self.run.conversation_id,
                    events.tool_call_event(seq, self.run.id, event.call_id, event.source, event.name, event.arguments),
                )
            await self._store_tool_call(event, seq)
        elif isinstance(event, ToolResult):
            seq = await self.seqs.take()
            if not self.hide_steps:
                await announce.publish(
                    self.run.conversation_id,
                    events.tool_result_event(seq, self.run.id, event.call_id, event.content, event.is_error),
                )
            await self._store_tool_result(event, seq)

    async def _store_tool_call(self, event: ToolCall, seq: int) -> None:
        """Keep the call (for the page's history, admins and exports): one write per call, none per token. A
        model that reuses a call id within a run gets its later calls stored as `<id>#2`, `<id>#3`...; results
        pair with their calls in order. Failing to keep it is logged, and the run goes on."""
        pending = self.open_tool_calls.setdefault(event.call_id, deque())
        uses = self.tool_call_uses[event.call_id] = self.tool_call_uses.get(event.call_id, 0) + 1
        call_id = event.call_id if uses == 1 else f"{event.call_id}#{uses}"
        row_id = uuid.uuid4()
        pending.append((row_id, time.monotonic()))
        try:
            await database_sync_to_async(services.tool_call_store)(
                run=self.run, tool_call_id=row_id, call_id=call_id, source=event.source, name=event.name,
                arguments=event.arguments, seq=seq,
            )  # fmt: skip
        except Exception:
            logger.exception("could not store tool call %s of run %s", event.call_id, self.run_id)

    async def _store_tool_result(self, event: ToolResult, seq: int) -> None:
        pending = self.open_tool_calls.get(event.call_id)
        if not pending:
            return  # its call was made before this worker took the run over
        row_id, called_at = pending.popleft()
        try:
            await database_sync_to_async(services.tool_call_store_result)(
                tool_call_id=row_id, result=event.content, is_error=event.is_error, seq=seq,
                duration_ms=round((time.monotonic() - called_at) * 1000, 3),
            )  # fmt: skip
        except Exception:
            logger.exception("could not store the result of tool call %s of run %s", event.call_id, self.run_id)

    async def flush(self) -> None:
        if self._pending is None:
            return
        first, delta, tokens = self._pending, "".join(self._pending_parts), len(self._pending_parts)
        self._pending, self._pending_parts = None, []
        self._next_frame_at = time.monotonic() + self.window
        self.streamed.setdefault(first.stream_id, []).append(delta)
        seq = await self.seqs.take()
        metrics.tally.frames += 1  # plain integers: added to the counters with each heartbeat
        metrics.tally.tokens += tokens
        event = events.token_event(seq, self.run_id, first.stream_id, first.source, delta)
        await fanout.backend().publish(self.run.conversation_id, seq, announce.encode(event), self._pending_since)
        if not self._first_token_sent:
            self._first_token_sent = True
            metrics.first_token(self.run)

    async def _store_and_publish(self, message_id, role, source, content, is_final_answer, **fields) -> None:
        seq = await self.seqs.take()
        message = await database_sync_to_async(services.message_store_agent)(
            run=self.run, message_id=message_id, role=role, source=source, content=content,
            is_final_answer=is_final_answer, seq=seq, **fields,
        )  # fmt: skip
        if is_final_answer:
            self.final_answer_ids.append(message_id)
        if not (self.hide_steps and (role == "tool" or self.run.team.is_step(source))):
            await announce.publish(self.run.conversation_id, events.message_event(message))

    async def store_partial_answers(self, final_speakers: frozenset[str]) -> None:
        """Keep what a failed or stopped run had already streamed, marked incomplete, so nothing seen vanishes."""
        await self.flush()
        for stream_id, parts in list(self.streamed.items()):
            published = "".join(parts)
            source = self.stream_sources.get(stream_id, "assistant")
            await self._store_and_publish(
                stream_id, "assistant", source, published,
                not final_speakers or source in final_speakers, incomplete=True,
            )  # fmt: skip
