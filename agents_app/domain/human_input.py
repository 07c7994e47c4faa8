"""Runs that wait for the person: a team's question (InputRequest), the person's answer, Stop and expiry.

A run that asks is `waiting_for_input`: no worker holds it, its team's state (with what it waits for) is the
conversation's `team_state`, and its question is an InputRequest whose seq is its `input.request` event. The
answer is stored as the person's message in the run, the run is queued again, and whichever worker claims it
goes on from the saved state with the same run id (agents_app/worker/agent.py).
"""

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from agents_app.domain import events, notify, services, sql
from agents_app.domain.validation import made_storable, storable
from agents_app.models import Conversation, InputRequest, Message, Run, ToolCall

logger = logging.getLogger(__name__)

WAITING_KEY = "chorus_waiting"  # the marker a waiting team's saved state carries (agents_app/runner/human.py)
EXPIRED_DETAIL = "Nobody answered the question in time, so this answer was stopped. Send a message to go on."


def run_wait(*, run: Run, worker_id: str, ask, team_state, usage: dict, seq: int) -> InputRequest | None:
    """The run's team asked the person (`ask`: runner.human.InputAsk): keep its state, store the question
    at `seq`, and let go of the run (no worker holds it while it waits). None when `worker_id` no longer
    holds the run. Tokens used so far are kept on the run; its end adds the rest."""
    merged = merge_usage(run.usage or {}, usage)
    with transaction.atomic():
        waiting = {
            "status": Run.Status.WAITING, "worker_id": "", "worker_channel": "", "heartbeat_at": None,
            "usage": merged, "prompt_tokens": _total(merged, "prompt_tokens"),
            "completion_tokens": _total(merged, "completion_tokens"),
        }  # fmt: skip
        if not sql.update(Run, {"id": run.id, "status": Run.Status.RUNNING, "worker_id": worker_id}, waiting):
            return None
        for name, value in waiting.items():
            setattr(run, name, value)
        request = InputRequest.objects.create(
            run=run, conversation_id=run.conversation_id, kind=ask.kind, source=ask.source[:100],
            prompt=made_storable(ask.prompt), options=list(ask.options), seq=seq,
        )  # fmt: skip
        extra = {"team_state": team_state} if team_state is not None else {}
        services.seq_record(run.conversation_id, seq, **extra)
    return request


def merge_usage(before: dict, after: dict) -> dict:
    """Token usage by purpose, added up (a run that waited used tokens before and after)."""
    merged = {purpose: dict(entry) for purpose, entry in before.items()}
    for purpose, entry in after.items():
        into = merged.setdefault(purpose, {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})
        for key in ("prompt_tokens", "completion_tokens", "requests"):
            into[key] = into.get(key, 0) + entry.get(key, 0)
    return merged


def _total(usage: dict, key: str) -> int:
    return sum(entry.get(key, 0) for entry in usage.values())


def input_answer(*, conversation: Conversation, user, request_id, content, client_id=None) -> services.SendOutcome:
    """The person's answer to a waiting run's question: stored as their message in the run, which is queued
    again (any worker goes on with it). After the commit every socket gets the `message`, then
    `input.answered`. Refused: `input_not_found` (no such question in this conversation),
    `input_already_answered`, `input_not_waiting` (the run was stopped or expired)."""
    content = _checked(content)
    try:
        request_uuid = uuid.UUID(str(request_id))
    except ValueError:
        raise services.ChatError("input_not_found", "There is no such question in this conversation.") from None
    with transaction.atomic():
        request = InputRequest.objects.select_for_update().filter(id=request_uuid, conversation=conversation).first()
        if request is None:
            raise services.ChatError("input_not_found", "There is no such question in this conversation.")
        if request.answered_at is not None:
            raise services.ChatError("input_already_answered", "This question has already been answered.")
        run = Run.objects.select_for_update().get(id=request.run_id)
        if run.status != Run.Status.WAITING:
            raise services.ChatError("input_not_waiting", "This question no longer waits: its answer was stopped.")
        # Two seqs: the answer's message, then input.answered (rebuilt as the message's seq + 1 on replay).
        seq = services.seqs_take([conversation.id], 2, record_first=True)[conversation.id]
        message = Message.objects.create(
            conversation=conversation, run=run, role=Message.Role.USER, source="user", content=content,
            client_id=client_id, seq=seq,
        )  # fmt: skip
        InputRequest.objects.filter(id=request.id).update(
            answer=content, answered_at=timezone.now(), answered_by=user if user.is_authenticated else None
        )
        services.seq_record(conversation.id, seq + 1)
        # The run is queued once the answer is published (_announce_answer), so no worker streams the rest
        # before every socket has the answer; should this process die first, the poll queues it
        # (queue_answered_runs).
        transaction.on_commit(lambda: _announce_answer(request, message, run))
    return services.SendOutcome(message=message, run=run, created=True)


def _checked(content) -> str:
    if not isinstance(content, str) or not content.strip():
        raise services.ChatError("empty_message", "The answer is empty.")
    content = content.strip()
    if len(content) > settings.CHORUS_MAX_MESSAGE_CHARS:
        raise services.ChatError(
            "message_too_long", f"Messages are limited to {settings.CHORUS_MAX_MESSAGE_CHARS} characters."
        )
    if not storable(content):
        raise services.ChatError("invalid_text", "The answer contains a NUL or an unpaired surrogate.")
    return content


def _announce_answer(request: InputRequest, message: Message, run: Run) -> None:
    try:
        notify.notifier().publish(message.conversation_id, events.message_event(message))
        answered = events.input_answered_event(request, message.id, message.seq + 1)
        notify.notifier().publish(message.conversation_id, answered)
    except Exception:
        logger.exception("could not announce the answer to run %s", run.id)
    if _queue(run.id):
        run.status = Run.Status.QUEUED
        try:
            services.run_ring_doorbell(run_id=run.id)
        except Exception:
            logger.exception("could not wake a worker for run %s", run.id)  # the poll finds it


def _queue(run_id) -> bool:
    """Queue a waiting run whose question is answered (False: it was stopped meanwhile, or queued already)."""
    ready = {"status": Run.Status.QUEUED, "announced": True, "cancel_requested_at": None}
    return bool(sql.update(Run, {"id": run_id, "status": Run.Status.WAITING}, ready))


def queue_answered_runs() -> int:
    """Queue the waiting runs whose question was answered but not queued: the web process that took the
    answer died before it could. How many were queued."""
    before = timezone.now() - timedelta(seconds=services.UNANNOUNCED_GRACE_SECONDS)
    open_questions = InputRequest.objects.filter(run=OuterRef("pk"), answered_at__isnull=True)
    stuck = Run.objects.filter(status=Run.Status.WAITING, input_requests__answered_at__lt=before)
    stuck = stuck.exclude(Exists(open_questions)).values_list("id", flat=True).distinct()[:50]
    return sum(_queue(run_id) for run_id in stuck)


def answer_waiting_run(*, conversation: Conversation, content, client_id=None) -> services.SendOutcome | None:
    """A message sent while a run of the conversation waits is the answer to its question (None when no run
    waits). Called when the send found the conversation busy."""
    request = (
        InputRequest.objects.filter(conversation=conversation, answered_at__isnull=True, run__status=Run.Status.WAITING)
        .order_by("-seq")
        .first()
    )
    if request is None:
        return None
    return input_answer(
        conversation=conversation, user=conversation.owner, request_id=request.id, content=content, client_id=client_id
    )


def run_cancel_waiting(*, run: Run, code: str = "", detail: str = "") -> bool:
    """End a waiting run (a person's Stop, or expiry with `code`): cancelled, its question no longer waits,
    and the conversation goes on from the state saved when it asked (the next message goes to the agent that
    asked; an approval is no longer possible). False when it was not waiting any more."""
    seq = services.seq_reserve(conversation_id=run.conversation_id)
    ending = {"status": Run.Status.CANCELLED, "finished_at": timezone.now(), "finished_seq": seq,
              "error_code": code, "error_detail": detail}  # fmt: skip
    with transaction.atomic():
        if not sql.update(Run, {"id": run.id, "status": Run.Status.WAITING}, ending):
            return False
        conversation = Conversation.objects.select_for_update().get(id=run.conversation_id)
        state = conversation.team_state
        extra = {}
        if isinstance(state, dict) and isinstance(state.get(WAITING_KEY), dict):
            extra["team_state"] = {**state, WAITING_KEY: {**state[WAITING_KEY], "closed": True}}
        services.seq_record(run.conversation_id, seq, **extra)
    for name, value in ending.items():
        setattr(run, name, value)
    notify.notifier().publish(run.conversation_id, events.run_finished_event(run))
    return True


def poll_waiting_runs() -> None:
    """A worker's poll: queue answered runs nobody queued, end those that waited too long."""
    queue_answered_runs()
    expire_waiting_runs()


def expire_waiting_runs() -> int:
    """End the runs that waited longer than CHORUS_INPUT_WAIT_MAX_SECONDS (0: never); how many were ended."""
    limit = settings.CHORUS_INPUT_WAIT_MAX_SECONDS
    if not limit:
        return 0
    asked_before = timezone.now() - timedelta(seconds=limit)
    old = InputRequest.objects.filter(answered_at__isnull=True, created_at__lt=asked_before, run=OuterRef("pk"))
    ended = 0
    for run in Run.objects.filter(Exists(old), status=Run.Status.WAITING)[:50]:
        ended += run_cancel_waiting(run=run, code="input_timeout", detail=EXPIRED_DETAIL)
    return ended


def resume_answer(*, run: Run) -> str | None:
    """The answer a claimed run goes on with, or None for a run that never asked (or asks again)."""
    request = run.input_requests.filter(answered_at__isnull=False).order_by("-seq").first()
    if request is None or run.input_requests.filter(answered_at__isnull=True).exists():
        return None
    return request.answer


def open_tool_call_rows(*, run: Run) -> list[tuple[str, uuid.UUID]]:
    """(call id, row id) of the run's stored tool calls that have no result yet (an approval's), in order."""
    rows = ToolCall.objects.filter(run=run, result_seq__isnull=True, duration_ms__isnull=True).order_by("seq")
    return [(call_id, row_id) for call_id, row_id in rows.values_list("call_id", "id")]


def input_events_after(*, conversation: Conversation, after_seq: int) -> list[dict]:
    """The conversation's `input.request` and `input.answered` events with seq > after_seq (for a replay)."""
    replay = []
    requests = InputRequest.objects.filter(conversation=conversation).order_by("seq")
    answers = {}
    for message in Message.objects.filter(
        conversation=conversation, role=Message.Role.USER, run__input_requests__isnull=False
    ).distinct():
        answers.setdefault(message.run_id, []).append(message)
    for request in requests:
        if request.seq > after_seq:
            replay.append(events.input_request_event(request))
        if request.answered_at is None:
            continue
        # The answer is the run's first message of the person's after the question (input_answer).
        later = [m for m in answers.get(request.run_id, []) if m.seq > request.seq]
        if later:
            message = min(later, key=lambda m: m.seq)
            if message.seq + 1 > after_seq:
                replay.append(events.input_answered_event(request, message.id, message.seq + 1))
    return replay


def waiting_conversation_ids(conversation_ids) -> set:
    """Which of these conversations have a run waiting for the person."""
    waiting = Run.objects.filter(conversation_id__in=list(conversation_ids), status=Run.Status.WAITING)
    return set(waiting.values_list("conversation_id", flat=True))


def waiting_annotation():
    """`Exists(...)` for a conversation queryset: a run of it waits for the person."""
    return Exists(Run.objects.filter(conversation=OuterRef("pk"), status=Run.Status.WAITING))


def open_request_for_conversation(*, conversation: Conversation) -> InputRequest | None:
    return (
        InputRequest.objects.filter(conversation=conversation, answered_at__isnull=True, run__status=Run.Status.WAITING)
        .order_by("-seq")
        .first()
    )


def split_runs_at_answers(items: list, run_entries: dict, conversation: Conversation) -> list:
    """The chat page's history (selectors.conversation_transcript) with each run that asked the person cut
    where the person answered: the part before (with `question`, the input.request it ended with), the
    person's answer, then the rest (`continued: True`), so a reloaded page reads in the order it happened."""
    asked = InputRequest.objects.filter(conversation=conversation, run_id__in=list(run_entries)).order_by("seq")
    by_run: dict = {}
    for request in asked:
        by_run.setdefault(request.run_id, []).append(request)
    if not by_run:
        return items
    person_seqs: dict = {}
    for seq, entry in items:
        message = entry.get("message") if entry["kind"] == "message" else None
        if message and message["role"] == "user" and message["run_id"]:
            person_seqs.setdefault(message["run_id"], []).append(seq)
    for run_id, requests in by_run.items():
        entry = run_entries[run_id]
        answers = sorted(person_seqs.get(str(run_id), []))
        cuts = [next((seq for seq in answers if seq > request.seq), None) for request in requests]
        parts = [entry] + [{**entry, "steps": [], "answers": [], "continued": True} for cut in cuts if cut is not None]
        for index, request in enumerate(requests):
            if index < len(parts):
                parts[index]["question"] = events.input_request_event(request)
        steps, answered = entry["steps"], entry["answers"]
        entry["steps"], entry["answers"] = [], []
        bounds = [cut for cut in cuts if cut is not None]
        for kind, found in (("steps", steps), ("answers", answered)):
            for step in found:
                seq = step.get("seq")
                part = sum(1 for cut in bounds if seq is not None and seq > cut)
                parts[part][kind].append(step)
        items += [(cut + 0.5, part) for cut, part in zip(bounds, parts[1:], strict=True)]
    return items
