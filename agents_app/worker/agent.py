"""The agent worker: claims queued runs, runs their teams, and streams what happens to the conversation.

It runs as `python manage.py runworker agent-runs` (one or many processes, scaled by ops) or, with no
Redis configured, embedded in the web process. Either way the channel message on `agent-runs` is only a
doorbell: the worker claims work from the `Run` table, and a periodic poll finds runs whose doorbell was lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections import deque

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from agents_app.domain import attachments, events, human_input, search, services, usage
from agents_app.models import Attachment, Run, Team
from agents_app.ops import fastpaths, health, logs, metrics
from agents_app.realtime import announce, fanout
from agents_app.runner import (
    AgentLoop,
    FastPaths,
    ModelSettings,
    TeamTurn,
    TurnFile,
    TurnRequest,
    TurnResult,
    router,
    tools,
)
from agents_app.worker.pacing import _DONE, Mailbox, StartSlot, TurnBridge
from agents_app.worker.publisher import RunPublisher

logger = logging.getLogger(__name__)

# Why a worker stopped a turn itself; a person's Stop leaves the run "cancelled" instead.
STOP_REASONS = {
    "first_token_timeout": "The model did not start answering in time.",
    "run_timeout": "The answer took longer than this server allows.",
    "worker_shutdown": "The server restarted while answering; what had arrived is kept. Send again to retry.",
}


def model_settings() -> ModelSettings:
    # CHORUS_MODEL_ENDPOINTS included, their keys read from the env; the runner's fast paths as this process takes them.
    fast = FastPaths(model_stream=fastpaths.enabled("model_stream"), fallback_selector=fastpaths.fallback_selector())
    return ModelSettings.from_settings(settings, fast_paths=fast)


def turn_files(message_id) -> tuple[TurnFile, ...]:
    """The files of the person's message, for the model: images as they are; text files and PDFs as their
    text, all of them together within CHORUS_ATTACHMENT_TEXT_BUDGET characters (the rest is left out, and
    the model is told)."""
    budget = settings.CHORUS_ATTACHMENT_TEXT_BUDGET
    files: list[TurnFile] = []
    for attachment in Attachment.objects.filter(message_id=message_id).order_by("created_at", "id"):
        with attachment.file.open("rb") as handle:
            data = handle.read()
        if attachment.kind == Attachment.Kind.IMAGE:
            files.append(TurnFile(attachment.name, attachment.content_type, "image", data=data))
            continue
        text = attachments.text_of(kind=attachment.kind, data=data, limit=budget + 1)
        truncated = len(text) > budget
        text = text[: max(budget, 0)]
        budget -= len(text)
        files.append(TurnFile(attachment.name, attachment.content_type, "text", text=text, truncated=truncated))
    return tuple(files)


class AgentWorker:
    """One per process: runs up to CHORUS_WORKER_MAX_RUNS turns at once, all on the agent loop (one event loop
    in a thread of its own, runner.AgentLoop), and publishes their events from this process's own loop."""

    def __init__(self, max_runs: int | None = None):
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.max_runs = max_runs or settings.CHORUS_WORKER_MAX_RUNS
        tools.configure(timeout_seconds=settings.CHORUS_TOOL_TIMEOUT_SECONDS, threads=self.max_runs)
        self.agent_loop = AgentLoop()
        self.active: dict[str, asyncio.Task] = {}
        self.turns: dict[str, TeamTurn] = {}
        self.publishers: dict[str, RunPublisher] = {}
        self.bridge: TurnBridge | None = None
        self.channel = ""  # this process's own channel: Stop requests for its runs arrive there
        self.draining = False
        self.stopped: asyncio.Event | None = None
        self.start_slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Event | None = None
        self._fill_lock: asyncio.Lock | None = None
        self._fill_waiting = self._queued_beyond_room = False
        self._background: list[asyncio.Task] = []
        self.poll_ok_at = 0.0  # Unix time of the last poll that reached the database
        self.beacon: health.Beacon | None = None

    def ensure_started(self) -> None:
        """Start the control, poll and heartbeat loops on the running event loop, once per loop."""
        loop = asyncio.get_running_loop()
        if self._background and all(t.get_loop() is loop and not t.done() for t in self._background):
            return
        self.active, self.turns, self.publishers, self.draining = {}, {}, {}, False
        self.stopped, self._ready, self._fill_lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        self._fill_waiting = self._queued_beyond_room = False
        self.start_slots = asyncio.Semaphore(settings.CHORUS_WORKER_START_CONCURRENCY)
        self._background = [
            asyncio.create_task(self._control_forever()),
            asyncio.create_task(self._poll_forever()),
            asyncio.create_task(self._heartbeat_forever()),
        ]
        kind = type(loop).__module__.partition(".")[0]  # "uvloop" or "asyncio" (chatproject/eventloop.py)
        logger.info("agent worker %s started (max %d runs at once, %s event loop)", self.worker_id, self.max_runs, kind)

    def wake(self) -> None:
        self.ensure_started()
        self._fill_soon()

    def _fill_soon(self) -> None:
        """Look for queued runs now, unless a look is already waiting to start: that one will see every run
        committed before it claims, so a burst of doorbells costs a few claims, not one each."""
        if not self._fill_waiting:
            self._fill_waiting = True
            asyncio.get_running_loop().create_task(self.fill())

    async def fill(self) -> None:
        """Claim queued runs while there is room, as many at once as fit (and start them in the same few
        statements); never take a run that cannot start now.

        A claim is a database round trip, so none is made that would find nothing: a claim that got fewer
        runs than it asked for saw every queued run, and a run announced after it rings a doorbell of its
        own; a run that ends looks again only if runs were left waiting for room. The poll, every
        CHORUS_WORKER_POLL_SECONDS, still looks whatever happened (a lost doorbell, a run stopped between
        its claim and its read)."""
        await self._ready.wait()
        async with self._fill_lock:
            self._fill_waiting = False  # from here on a new doorbell needs a look of its own
            while not self.draining:
                room = self.max_runs - len(self.active)
                if room <= 0:
                    self._queued_beyond_room = True  # a doorbell rang with no room: look again as a run ends
                    return
                claim_started = time.monotonic()
                runs = await database_sync_to_async(services.run_claim_batch)(
                    worker_id=self.worker_id, worker_channel=self.channel, limit=room, start=True
                )
                metrics.claimed(time.monotonic() - claim_started, runs)
                for run in runs:
                    task = asyncio.create_task(self.execute(run))
                    self.active[str(run.id)] = task
                    metrics.WORKER_RUNS_ACTIVE.set(len(self.active))
                    task.add_done_callback(lambda _t, run_id=str(run.id): self._finished(run_id))
                if len(runs) < room:
                    self._queued_beyond_room = False
                    return

    def _finished(self, run_id: str) -> None:
        self.active.pop(run_id, None)
        metrics.WORKER_RUNS_ACTIVE.set(len(self.active))
        self.publishers.pop(run_id, None)
        if self._queued_beyond_room and not self.draining:
            # Runs were left waiting for room: take the next one now rather than at the next poll.
            self._fill_soon()

    def cancel(self, run_id: str, reason: str = "") -> bool:
        turn = self.turns.get(run_id)
        if turn is None:
            return False
        turn.stop_reason = turn.stop_reason or reason
        turn.cancel()
        return True

    async def _control_forever(self) -> None:
        layer = get_channel_layer()
        self.channel = await layer.new_channel("agent-worker.")
        self._ready.set()
        while True:
            try:
                message = await layer.receive(self.channel)
                if message.get("type") == "run.cancel":
                    self.cancel(message["run_id"])
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("worker control channel failed; retrying", exc_info=True)
                await asyncio.sleep(1)

    async def _poll_forever(self) -> None:
        await self._ready.wait()
        while True:
            try:
                await self.recover_stale_runs()
                await database_sync_to_async(human_input.poll_waiting_runs)()
                await self.fill()
                self.poll_ok_at = time.time()  # the database answers this worker (health.Beacon)
            except Exception:
                logger.exception("polling for queued runs failed")
            await asyncio.sleep(settings.CHORUS_WORKER_POLL_SECONDS)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.CHORUS_HEARTBEAT_SECONDS)
            await self._beat()
            if self.active:
                try:
                    lost, cancel_requested = await database_sync_to_async(services.run_heartbeat)(
                        run_ids=list(self.active), worker_id=self.worker_id
                    )
                except Exception:
                    logger.exception("heartbeat failed")
                    continue
                for run_id in lost:
                    self.lose(run_id)
                for run_id in cancel_requested:
                    self.cancel(run_id)  # the Stop request may have been lost on its way here

    async def _beat(self) -> None:
        """This worker's own heartbeat in Redis, which `manage.py worker_ready` reads (health.Beacon)."""
        try:
            if not settings.REDIS_URL:
                # An embedded worker: no registry, the web server's /readyz speaks for it.
                metrics.heartbeat(True, self.worker_id)
                return
            if self.beacon is None:
                self.beacon = health.Beacon(self.worker_id, settings.REDIS_URL)
            await self.beacon.beat(self, self.poll_ok_at)
        except Exception:  # never at the cost of the runs' own heartbeat below
            logger.exception("the worker's heartbeat in Redis failed")

    def lose(self, run_id: str) -> None:
        """Another worker holds this run now (this one was frozen too long): stop it, and publish and store
        nothing more of it."""
        publisher = self.publishers.get(run_id)
        if publisher is not None and not publisher.lost:
            publisher.lost = True
            logger.warning("run %s was taken over by another worker; stopping it here", run_id)
        self.cancel(run_id, reason="lost")

    async def recover_stale_runs(self) -> None:
        """Close runs another worker left: one that stopped heartbeating (killed, frozen, cut off) fails with
        a clear message, one whose Stop was not carried out in time ends as cancelled. What they had streamed
        is kept, marked incomplete; the user's message is already stored. A recovery that fails ends the run
        anyway (failed, `recovery_failed`), and a run is taken over at most CHORUS_RUN_MAX_TAKEOVERS times."""
        to_recover, ended = await database_sync_to_async(services.run_take_over_stale)(worker_id=self.worker_id)
        for run in ended:
            await announce.publish(run.conversation_id, events.run_finished_event(run))
            logger.error("run %s ended after %d takeovers", run.id, run.takeovers, extra=logs.run_ids(run))
        for run in to_recover:
            await self._stop_here(str(run.id))
            try:
                await self._recover(run)
            except Exception:
                logger.exception("recovering run %s failed; ending it", run.id, extra=logs.run_ids(run))
                detail = "This answer could not be recovered after its worker stopped; what had arrived is kept."
                if await database_sync_to_async(services.run_end_abandoned)(
                    run=run, worker_id=self.worker_id, code="recovery_failed", detail=detail
                ):
                    await announce.publish(run.conversation_id, events.run_finished_event(run))

    async def _stop_here(self, run_id: str) -> None:
        """A run of this very worker is being closed by the poll (its Stop was not carried out in time): end
        its task here first, so only the recovery writes its end."""
        task = self.active.get(run_id)
        if task is None:
            return
        self.lose(run_id)
        task.cancel()
        await asyncio.wait([task], timeout=5)

    async def _recover(self, run: Run) -> None:
        publisher = RunPublisher(run)
        for _seq, text in await fanout.backend().read_after(run.conversation_id, run.started_seq or 0):
            event = json.loads(text)
            if event.get("run_id") != str(run.id):
                continue
            if event["type"] == "token":
                stream_id = event["stream_id"]
                publisher.streamed.setdefault(stream_id, []).append(event["delta"])
                publisher.stream_sources[stream_id] = event["source"]
            elif event["type"] == "message":
                publisher.streamed.pop(event["message"]["id"], None)
        # A message the dead worker stored but had not published yet is in the database, not in the log: it
        # is kept as stored (a replay sends it), never stored twice.
        for message_id in await database_sync_to_async(services.message_ids_for_run)(run=run):
            publisher.streamed.pop(message_id, None)
        if run.takeover_reason == "cancel":
            result = TurnResult(status="cancelled")
        else:
            result = TurnResult(
                status="failed",
                error_code="worker_lost",
                error_detail="The worker running this answer stopped; what had arrived is kept. Send again to retry.",
            )
        if await self._finish(run, publisher, result, recovered=True):
            logger.warning("recovered run %s from worker %s (%s)", run.id, run.worker_id, run.takeover_reason,
                           extra=logs.run_ids(run))  # fmt: skip

    def begin_drain(self) -> None:
        """SIGTERM: take no more runs, let running ones finish within the grace period, then stop."""
        if self.draining:
            return
        logger.info("worker %s draining %d runs", self.worker_id, len(self.active))
        self.draining = True
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        running = list(self.active.values())
        if running:
            _done, pending = await asyncio.wait(running, timeout=settings.CHORUS_WORKER_GRACE_SECONDS)
            if pending:
                for run_id in list(self.turns):
                    self.cancel(run_id, reason="worker_shutdown")
                await asyncio.wait(pending, timeout=10)
        await fanout.backend().flushed()
        metrics.tally.flush()
        if self.beacon is not None:
            await self.beacon.gone()  # worker_ready says so at once
        try:
            await self.agent_loop.aclose()
        except Exception:
            logger.warning("could not close the agent loop's model clients", exc_info=True)
        self.stopped.set()

    async def execute(self, run: Run) -> None:
        """Run one claimed turn to its end. The single exception boundary: a run never kills the worker."""
        run_id = str(run.id)
        logs.bind(run_id=run_id, conversation_id=run.conversation_id, user_id=run.conversation.owner_id)  # this task's
        task = run.trigger_message.content if run.trigger_message else ""
        team_state = run.conversation.team_state
        publisher = self.publishers[run_id] = RunPublisher(run)
        routing_usage: dict[str, dict[str, int]] = {}
        resuming = getattr(run, "resuming", False)  # it waited for the person, who has answered
        try:
            if resuming:
                task = await self._resume(run, publisher)
            elif run.team.kind == Team.Kind.ROUTER:
                task, routing_usage = await self._route(run, task)
                team_state = None  # routed turns carry the conversation in their task instead
                publisher.hide_steps = run.team.steps_display == Team.StepsDisplay.HIDDEN  # the routed team's
                # The picked team's own daily budget, before its first request (the router's was checked on send).
                if run.team.daily_token_budget:
                    refusal = await database_sync_to_async(usage.team_budget_refusal)(team=run.team)
                    if refusal is not None:
                        raise services.ChatError("budget_exceeded", refusal)
            if run.started_seq is None:  # not started when claimed: a router's run, now routed
                await database_sync_to_async(services.run_start)(run=run)
            if not resuming:  # a resumed run goes on with seqs of a new block, without a second run.started
                publisher.seqs.begin_at(run.started_seq)
                await announce.publish(run.conversation_id, events.run_started_event(run))
            files = ()
            if run.trigger_message_id and not resuming:
                files = await database_sync_to_async(turn_files)(run.trigger_message_id)
            request = TurnRequest(
                team_config=run.team.config,
                task=task,
                team_state=team_state,
                final_speakers=frozenset(run.team.final_speakers or []),
                tools=tools.build_tools(search_conversations=search.for_person(run.conversation.owner_id)),
                files=files,
            )
            slot = StartSlot(self.start_slots)
            metrics.WORKER_RUNS_WAITING.inc()
            try:
                await slot.acquire()
            finally:
                metrics.WORKER_RUNS_WAITING.dec()
            try:
                result = await self._run_turn(run_id, request, publisher, slot)
            finally:
                slot.release()
        except services.ChatError as exc:
            result = TurnResult(status="failed", error_code=exc.code, error_detail=exc.detail)
        except Exception:
            logger.exception("run %s failed in the worker", run.id)
            result = TurnResult(
                status="failed", error_code="internal_error", error_detail="Chorus failed to run the team."
            )
        if routing_usage:  # the router's request counts in the run's usage too
            result.usage = {**result.usage, **routing_usage}
            result.prompt_tokens = sum(part["prompt_tokens"] for part in result.usage.values())
            result.completion_tokens = sum(part["completion_tokens"] for part in result.usage.values())
        if result.status == "waiting":
            if await self._wait(run, publisher, result):
                logger.info("run %s waits for the person", run.id)
                return
            result.status, result.error_code = "failed", "internal_error"
            result.error_detail = "Chorus could not keep the team's question for you; send again to retry."
        if resuming:  # what it used before it asked counts too
            result.usage = human_input.merge_usage(run.usage or {}, result.usage)
            result.prompt_tokens = sum(part["prompt_tokens"] for part in result.usage.values())
            result.completion_tokens = sum(part["completion_tokens"] for part in result.usage.values())
        try:
            await self._finish(run, publisher, result)
        except Exception:
            logger.exception("could not record the end of run %s", run.id)
            await self._end_after_failure(run)
        finally:
            self.publishers.pop(run_id, None)
        logger.info("run %s %s %s", run.id, result.status, result.error_code)

    async def _resume(self, run: Run, publisher: RunPublisher) -> str:
        """Prepare a run that waited for the person: the answer is its task; the tool calls its question was
        about get their results now (stored on their rows)."""
        answer = await database_sync_to_async(human_input.resume_answer)(run=run)
        for call_id, row_id in await database_sync_to_async(human_input.open_tool_call_rows)(run=run):
            publisher.open_tool_calls.setdefault(call_id, deque()).append((row_id, time.monotonic()))
        return answer or ""

    async def _wait(self, run: Run, publisher: RunPublisher, result: TurnResult) -> bool:
        """The team asked the person: keep its state and question, announce `input.request`, and let the run
        go (no worker holds it until the answer comes). False when that could not be recorded."""
        if publisher.lost:
            return True  # another worker holds the run now: its end is theirs
        if result.team_state is None or result.input_ask is None:
            return False
        try:
            await publisher.flush()
            seq = await publisher.seqs.take()
            request = await database_sync_to_async(human_input.run_wait)(
                run=run, worker_id=self.worker_id, ask=result.input_ask, team_state=result.team_state,
                usage=result.usage, seq=seq,
            )  # fmt: skip
        except Exception:
            logger.exception("could not keep the question of run %s", run.id)
            return False
        finally:
            self.publishers.pop(str(run.id), None)
        if request is not None:
            await announce.publish(run.conversation_id, events.input_request_event(request))
        return True

    async def _route(self, run: Run, text: str) -> tuple[str, dict[str, dict[str, int]]]:
        """Pick the team for a router's turn (recorded on the run) and return the task for it: the
        conversation so far and the new message, so memory stays coherent whichever team answers; and what
        asking the router's model cost (runner.TurnResult.usage's shape)."""
        router_team = run.team
        candidates, transcript = await database_sync_to_async(services.route_context)(run=run)
        picked = await router.route(router_team.config, candidates, text, model_settings())
        await database_sync_to_async(services.run_set_route)(run=run, router=router_team, slug=picked.team,
                                                             reason=picked.reason)  # fmt: skip
        if not transcript:
            return text, picked.usage
        return f"The conversation so far:\n{transcript}\n\nThe person now says:\n{text}", picked.usage

    async def _finish(self, run: Run, publisher: RunPublisher, result: TurnResult, recovered: bool = False) -> bool:
        """Record the run's end and announce it: what it streamed and never completed is kept (marked
        incomplete), drafts its final speakers replaced are marked so (`message.updated`), then
        `run.finished`. False when another worker holds the run now (its end is theirs to record); raises when
        the end could not be recorded."""
        if publisher.lost:
            return False
        await publisher.store_partial_answers(frozenset(run.team.final_speakers or []))
        # A recovered run's answers were stored by the worker that died: the database knows them.
        if recovered:
            answer_ids = await database_sync_to_async(services.run_answer_ids)(run=run)
        else:
            answer_ids = publisher.final_answer_ids
        revised_seqs = {message_id: await publisher.seqs.take() for message_id in answer_ids[:-1]}
        seq = await publisher.seqs.take()
        revised = await database_sync_to_async(services.run_finish)(
            run=run, result=result, seq=seq, worker_id=self.worker_id, answer_ids=answer_ids,
            revised_seqs=revised_seqs, first_token_at=publisher.first_token_at,
        )  # fmt: skip
        if revised is None:
            logger.warning("run %s was taken over by another worker; its end is theirs to record", run.id)
            return False
        for message in revised:
            await announce.publish(run.conversation_id, events.message_updated_event(message))
        await announce.publish(run.conversation_id, events.run_finished_event(run))
        metrics.run_finished(run, result, recovered)
        return True

    async def _end_after_failure(self, run: Run) -> None:
        """The last resort when a run's end could not be recorded: end it as failed, writing nothing else. When
        even that fails (the database is gone), the run's heartbeat stops and another worker recovers it."""
        detail = "Chorus could not record the end of this answer; what had arrived is kept."
        try:
            if await database_sync_to_async(services.run_end_abandoned)(
                run=run, worker_id=self.worker_id, code="internal_error", detail=detail
            ):
                await announce.publish(run.conversation_id, events.run_finished_event(run))
        except Exception:
            logger.exception("could not end run %s", run.id)

    async def _run_turn(
        self, run_id: str, request: TurnRequest, publisher: RunPublisher, slot: StartSlot | None = None
    ) -> TurnResult:
        loop = asyncio.get_running_loop()
        if self.bridge is None or self.bridge.loop is not loop:
            self.bridge = TurnBridge(loop)
        mailbox = Mailbox(self.bridge)
        # put and on_model_call are called in the turn's thread
        on_model_call = slot.release_from_thread if slot is not None else None
        turn = TeamTurn(request, model_settings(), mailbox.put, on_model_call=on_model_call)
        self.turns[run_id] = turn
        future = asyncio.wrap_future(turn.start(self.agent_loop))
        future.add_done_callback(lambda _f: mailbox.put(_DONE))
        started = time.monotonic()
        first_by, finish_by = started + settings.CHORUS_FIRST_TOKEN_TIMEOUT, started + settings.CHORUS_RUN_TIMEOUT
        # One timer watches the deadlines (no timeout per event): first the model's first event, then the run.
        reason = "first_token_timeout" if first_by < finish_by else "run_timeout"
        watchdog = loop.call_at(min(first_by, finish_by), lambda: self.cancel(run_id, reason=reason))
        flush_timer: asyncio.TimerHandle | None = None

        def flush_due() -> None:
            nonlocal flush_timer
            flush_timer = None
            mailbox.wake()

        got_event = False
        try:
            while True:
                await mailbox.wait()
                if flush_timer is None and publisher.flush_due_at() is not None:
                    await publisher.flush()  # the held frame's window has passed
                if not mailbox.items:
                    continue
                event = mailbox.items.popleft()
                if event is _DONE:
                    break
                if not got_event:
                    got_event = True
                    publisher.first_token_at = timezone.now()
                    watchdog.cancel()
                    watchdog = loop.call_at(finish_by, lambda: self.cancel(run_id, reason="run_timeout"))
                await publisher.handle(event)
                due = publisher.flush_due_at()
                if due is not None and flush_timer is None:
                    flush_timer = loop.call_at(due, flush_due)
            await publisher.flush()
        except BaseException:
            turn.cancel()
            raise
        finally:
            watchdog.cancel()
            if flush_timer is not None:
                flush_timer.cancel()
            self.turns.pop(run_id, None)
        result = future.result()
        if turn.stop_reason in STOP_REASONS:
            result.status = "failed"
            result.error_code = turn.stop_reason
            result.error_detail = STOP_REASONS[turn.stop_reason]
        return result


_worker: AgentWorker | None = None


def agent_worker() -> AgentWorker:
    """This process's worker, created on first use."""
    global _worker
    if _worker is None:
        _worker = AgentWorker()
    return _worker
