"""Writes: every change to conversations, messages and runs goes through these functions."""

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, Value, prefetch_related_objects
from django.db.models.functions import Greatest
from django.utils import timezone

from agents_app.domain import events, notify, sql, usage
from agents_app.domain.selectors import team_default
from agents_app.domain.validation import made_storable, storable
from agents_app.models import Attachment, Conversation, Message, Run, Team, ToolCall

logger = logging.getLogger(__name__)

UNANNOUNCED_GRACE_SECONDS = 5
SEQ_BLOCK = 1000  # seqs a run reserves per database write; a run rarely needs more than one block
ROUTED_TRANSCRIPT_MESSAGES = 12  # earlier messages a routed turn sees (its team has no saved state)


ACCOUNT_INACTIVE = "account_inactive"


class RunOutcome(Protocol):
    """How a turn ended, as run_finish stores it (the worker passes the runner's TurnResult)."""

    status: str
    team_state: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    usage: dict[str, dict[str, int]]
    error_code: str
    error_detail: str


class ChatError(Exception):
    """A request Chorus refuses; `code` is stable for clients, `detail` is for the person."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class SendOutcome:
    message: Message
    run: Run | None
    created: bool  # False when the client_id had been sent before: nothing new was stored


def conversation_create(*, owner, team: Team | None = None, title: str = "", conversation_id=None) -> Conversation:
    """A new conversation; `conversation_id` names it (an AG-UI client's threadId), else a random one."""
    team = team or team_default()
    if team is None or not team.enabled:
        raise ChatError("no_team", "No enabled team can answer; an admin must enable one.")
    return Conversation.objects.create(
        id=conversation_id or uuid.uuid4(), owner=owner, team=team, title=title.strip()[:200]
    )


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    """Give the conversation a title (trimmed, at most 200 characters; empty: unnamed). Its place in the list,
    by last activity, does not change. Its open pages hear of it (conversation.updated)."""
    conversation.title = title.strip()[:200]
    with transaction.atomic():
        conversation.title_seq = seq_reserve(conversation_id=conversation.id)
        Conversation.objects.filter(id=conversation.id).update(
            title=conversation.title,
            title_seq=conversation.title_seq,
            last_seq=Greatest(F("last_seq"), Value(conversation.title_seq)),
        )
        transaction.on_commit(
            lambda: notify.notifier().publish(conversation.id, events.conversation_updated_event(conversation))
        )
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete the conversation with its messages and runs. Refused while it is answering: the worker holding
    the run would write into a conversation that no longer exists. Stop the answer first."""
    with transaction.atomic():
        # The row lock orders this with a send (which updates the row as it takes its seq): no run slips in.
        Conversation.objects.select_for_update().filter(id=conversation.id).values_list("id").first()
        if Run.objects.filter(conversation_id=conversation.id, status__in=Run.ACTIVE_STATUSES).exists():
            raise ChatError("run_in_progress", "This conversation is still answering: stop the answer first.")
        # Its attachments' files go once the rows are gone (signals.delete_attachment_files).
        Conversation.objects.filter(id=conversation.id).delete()


def attachment_files_delete(names: list[str]) -> None:
    """Delete stored files whose rows are gone (a deleted conversation's). A file that cannot be deleted is
    logged, not raised: its rows are already gone."""
    storage = Attachment._meta.get_field("file").storage
    for name in names:
        try:
            storage.delete(name)
        except Exception:
            logger.warning("could not delete the attachment file %s", name, exc_info=True)


def seq_reserve(*, conversation_id, count: int = 1) -> int:
    """Reserve `count` consecutive seqs of a conversation and return the first."""
    return seqs_take([conversation_id], count)[conversation_id]


def seqs_take(
    conversation_ids: list,
    count: int,
    *,
    record_first: bool = False,
    title: str | None = None,
    snapshot: bool = False,
    named: dict | None = None,
) -> dict:
    """Reserve `count` consecutive seqs in each of these conversations, in ONE statement; return each one's
    first seq, by conversation id (as given).

    With `record_first`, the first seq is also noted as persisted (last_seq, updated_at): for a message or a
    run start written in the same transaction. With `title`, an untitled conversation is named, and the second
    seq of the block is its conversation.updated event's (title_seq). With `snapshot`, the team's memory before
    this (a person's message) is kept, so that the turn can be replaced (agents_app/domain/turns.py). `named`, if
    given, receives (title, title_seq) for each conversation this statement named."""
    # PostgreSQL and SQLite >= 3.35 both have RETURNING; the row locks make it atomic. In SET, every column
    # reads its value from before the UPDATE, so `seq_reserved + 1` is the first seq of the new block.
    table = connection.ops.quote_name(Conversation._meta.db_table)
    sets, params = ["seq_reserved = seq_reserved + %s"], [count]
    if record_first:
        sets += [f"last_seq = {_greatest()}(last_seq, seq_reserved + 1)", "updated_at = %s"]
        params.append(Conversation._meta.get_field("updated_at").get_db_prep_value(timezone.now(), connection))
    if title is not None:
        sets.append("title = CASE WHEN title = '' THEN %s ELSE title END")
        params.append(title)
        if count > 1:
            sets.append("title_seq = CASE WHEN title = '' THEN seq_reserved + 2 ELSE title_seq END")
    if snapshot:
        sets += ["state_before = team_state", "state_before_seq = seq_reserved + 1"]
    pk = Conversation._meta.pk
    by_key = {uuid.UUID(str(cid)): cid for cid in conversation_ids}
    params += [pk.get_db_prep_value(cid, connection) for cid in by_key]
    where = ", ".join(["%s"] * len(by_key))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {', '.join(sets)} WHERE id IN ({where}) "  # noqa: S608
            "RETURNING id, seq_reserved, title, title_seq",
            params,
        )
        rows = cursor.fetchall()
    firsts = {by_key[uuid.UUID(str(cid))]: reserved - count + 1 for cid, reserved, _title, _title_seq in rows}
    if named is not None:
        for cid, reserved, new_title, title_seq in rows:
            if count > 1 and title_seq == reserved - count + 2:
                named[by_key[uuid.UUID(str(cid))]] = (new_title, title_seq)
    missing = [cid for cid in conversation_ids if cid not in firsts]
    if missing:
        raise Conversation.DoesNotExist(missing[0])
    return firsts


def seq_record(conversation_id, seq: int, **fields) -> None:
    """Note a persisted event's seq on its conversation (and any other `fields` in the same write)."""
    sql.update(Conversation, {"id": conversation_id}, {"updated_at": timezone.now(), **fields},
                raw_sets={f"last_seq = {_greatest()}(last_seq, %s)": seq})  # fmt: skip


def _greatest() -> str:
    """SQL's two-argument maximum: GREATEST on PostgreSQL, MAX on SQLite."""
    return "MAX" if connection.vendor == "sqlite" else "GREATEST"


def message_send(
    *, conversation: Conversation, content: str, client_id: str | None = None, attachments: list | None = None
) -> SendOutcome:
    """Store the user's message and queue a run to answer it, in one transaction.

    After the commit the message is echoed to every socket of the conversation and a worker is woken. A
    client_id sent before returns what it stored then (created=False), whatever the limits say now.
    `attachments` are ids of files uploaded into this conversation (attachment_create) and not sent yet; a
    message with attachments may have no text.
    """
    content = (content or "").strip() if isinstance(content, str) else None
    attachment_ids = _attachment_ids(attachments)
    if content is None or (not content and not attachment_ids):
        raise ChatError("empty_message", "The message is empty.")
    if len(content) > settings.CHORUS_MAX_MESSAGE_CHARS:
        raise ChatError("message_too_long", f"Messages are limited to {settings.CHORUS_MAX_MESSAGE_CHARS} characters.")
    if not storable(content):
        raise ChatError("invalid_text", "The message contains a NUL or an unpaired surrogate, which cannot be stored.")
    if client_id is not None and (
        not isinstance(client_id, str) or not 0 < len(client_id) <= 64 or not storable(client_id)
    ):
        raise ChatError("invalid_client_id", "client_id must be a string of at most 64 characters.")
    try:
        if not conversation.team.enabled:
            raise ChatError("team_disabled", "This conversation's team has been disabled by an admin.")
        with transaction.atomic():
            run_id = uuid.uuid4()
            # One UPDATE takes the message's seq, notes it on the conversation and names a new conversation
            # after its first message. The message and its run point at each other: foreign keys are checked
            # at commit (Django makes them deferrable), so each row is written once.
            files = _attachments_for_send(conversation, attachment_ids)
            title = content[:60] or ", ".join(f.name for f in files)[:60]
            # An untitled conversation takes a second seq: its conversation.updated event, once named.
            naming, named = not conversation.title, {}
            firsts = seqs_take(
                [conversation.id], 2 if naming else 1, record_first=True, title=title, snapshot=True, named=named
            )
            seq = firsts[conversation.id]
            title_event = named.get(conversation.id)  # (title, seq) when this message named the conversation
            conversation.title = conversation.title or title  # the next send from this object names nothing
            # The limits are counted inside the transaction, with the person's row locked (PostgreSQL; SQLite's
            # IMMEDIATE transactions write one at a time): sends fired at once are counted one after another,
            # so none can slip past a limit the others are filling.
            _lock_user(conversation.owner_id)
            _check_user_limits(conversation.owner_id)
            _check_budgets(conversation)
            message = Message.objects.create(
                conversation=conversation,
                run_id=run_id,
                role=Message.Role.USER,
                source="user",
                content=content,
                client_id=client_id,
                seq=seq,
            )
            run = Run.objects.create(
                id=run_id, conversation=conversation, team=conversation.team, trigger_message=message
            )
            if files:
                Attachment.objects.filter(id__in=[f.id for f in files]).update(message=message)
            transaction.on_commit(lambda: _announce(message, run, title_event=title_event))
    except (ChatError, IntegrityError) as exc:
        # Looked up only when something refused the message: a resend of a client_id (its unique constraint,
        # or limits it counts itself in) gets what was stored the first time.
        previous = _previous_send(conversation, client_id)
        if previous is not None:
            return previous
        if isinstance(exc, ChatError):
            raise
        # The partial unique constraint on active runs: this conversation is still answering, or a run of it
        # waits for the person, and then this message is the answer.
        from agents_app.domain.human_input import answer_waiting_run

        answered = answer_waiting_run(conversation=conversation, content=content, client_id=client_id)
        if answered is not None:
            return answered
        raise ChatError("run_in_progress", "Wait for the current answer to finish (or stop it) first.") from None
    # Its files are read here, where queries may run: the HTTP send builds its answer in async code.
    prefetch_related_objects([message], "attachments")
    return SendOutcome(message=message, run=run, created=True)


def _attachment_ids(attachments) -> list[uuid.UUID]:
    if attachments is None:
        return []
    if not isinstance(attachments, list) or not all(isinstance(a, str) for a in attachments):
        raise ChatError("invalid_attachments", "attachments must be a list of attachment ids (strings).")
    limit = settings.CHORUS_ATTACHMENTS_MAX_PER_MESSAGE
    if len(attachments) > limit:
        raise ChatError("too_many_attachments", f"A message carries at most {limit} attachments.")
    try:
        ids = [uuid.UUID(a) for a in attachments]
    except ValueError:
        raise ChatError("unknown_attachment", "No such attachment in this conversation.") from None
    if len(set(ids)) != len(ids):
        raise ChatError("invalid_attachments", "An attachment is listed twice.")
    return ids


def _attachments_for_send(conversation: Conversation, ids: list[uuid.UUID]) -> list[Attachment]:
    """The files a message carries, locked so that two sends cannot both take one; in the order given."""
    if not ids:
        return []
    found = {
        a.id: a
        for a in Attachment.objects.select_for_update().filter(
            conversation_id=conversation.id, id__in=ids, message__isnull=True
        )
    }
    if len(found) != len(ids):
        raise ChatError("unknown_attachment", "No such attachment in this conversation, or it was sent already.")
    files = [found[i] for i in ids]
    budget = settings.CHORUS_ATTACHMENTS_MAX_BYTES_PER_MESSAGE
    if sum(f.size for f in files) > budget:
        raise ChatError("attachments_too_large", f"A message's attachments are limited to {budget} bytes together.")
    if any(f.kind == Attachment.Kind.IMAGE for f in files) and not team_sees_images(conversation.team):
        raise ChatError(
            "vision_not_supported",
            f"The team {conversation.team.name} cannot see images: its model has no vision. "
            "Start a conversation with a team that can (the Assistant), or send text files only.",
        )
    return files


def team_sees_images(team: Team) -> bool:
    """Every model of the team says it takes images (model_info.vision): each agent that reads the message
    sends it to its model, and a model without vision would fail the run."""
    infos = list(_model_infos(team.config))
    return bool(infos) and all(info.get("vision") is True for info in infos)


def _model_infos(node):
    if isinstance(node, dict):
        if node.get("component_type") == "model":
            yield (node.get("config") or {}).get("model_info") or {}
        for value in node.values():
            yield from _model_infos(value)
    elif isinstance(node, list):
        for value in node:
            yield from _model_infos(value)


def attachment_create(*, conversation: Conversation, upload) -> Attachment:
    """Check an uploaded file (its size, its type by its content, an image's dimensions) and store it.
    A file that fails a check is refused (ChatError) before anything is stored."""
    from agents_app.domain import attachments

    limit = settings.CHORUS_ATTACHMENT_MAX_BYTES
    if upload.size > limit:
        raise ChatError("file_too_large", f"Files are limited to {limit} bytes; this one has {upload.size}.")
    if upload.size == 0:
        raise ChatError("empty_file", "The file is empty.")
    unsent = settings.CHORUS_ATTACHMENTS_MAX_UNSENT
    if Attachment.objects.filter(conversation_id=conversation.id, message__isnull=True).count() >= unsent:
        raise ChatError(
            "too_many_unsent_attachments",
            f"This conversation already holds {unsent} files not sent yet: send or remove some first.",
        )
    name = attachments.clean_name(upload.name)
    upload.seek(0)
    head = upload.read(attachments.TEXT_SNIFF_BYTES)
    try:
        sniffed = attachments.sniff(head, upload, name)
    except attachments.AttachmentRefused as exc:
        raise ChatError(exc.code, exc.detail) from None
    upload.seek(0)
    attachment = Attachment(
        conversation=conversation,
        name=name,
        content_type=sniffed.content_type,
        kind=sniffed.kind,
        size=upload.size,
        width=sniffed.width,
        height=sniffed.height,
    )
    attachment.file.save(attachment.id.hex, upload, save=False)
    try:
        attachment.save()
    except Exception:
        attachment.file.delete(save=False)
        raise
    return attachment


def attachment_delete(*, attachment: Attachment) -> None:
    """Remove a file not sent yet (the page's chip was removed); a sent one stays with its message."""
    if Attachment.objects.filter(id=attachment.id, message__isnull=True).delete()[0] == 0:
        raise ChatError("attachment_sent", "This file was sent with a message: it stays with it.")


def _previous_send(conversation: Conversation, client_id: str | None) -> SendOutcome | None:
    if client_id is None:
        return None
    previous = Message.objects.filter(conversation=conversation, client_id=client_id).first()
    if previous is None:
        return None
    prefetch_related_objects([previous], "attachments")
    return SendOutcome(message=previous, run=previous.triggered_runs.first(), created=False)


def _check_user_limits(user_id) -> None:
    """Per-user flood control; counted in the database, so it holds across every web process. One query:
    every message a person sends creates one run with it, so runs created in the last minute are the
    messages sent in it."""
    recent, active = _user_run_counts(user_id, since=timezone.now() - timedelta(minutes=1))
    if recent >= settings.CHORUS_RATE_LIMIT_PER_MINUTE:
        raise ChatError("rate_limited", "You are sending messages too fast; wait a minute and try again.")
    if active >= settings.CHORUS_MAX_ACTIVE_RUNS_PER_USER:
        raise ChatError(
            "too_many_runs", f"You already have {active} answers in progress; wait for one to finish or stop it."
        )


def _check_budgets(conversation: Conversation) -> None:
    """The person's daily token budget and their conversation's team's (agents_app/domain/usage.py): a message that
    would start a run once either is spent is refused before any model request. One indexed query."""
    refusal = usage.budget_refusal(owner_id=conversation.owner_id, team=conversation.team)
    if refusal is not None:
        raise ChatError("budget_exceeded", refusal)


def _lock_user(user_id) -> None:
    """Hold the person's row until the transaction ends, so their sends are counted one at a time; and refuse
    the message of a person deactivated meanwhile (ACCOUNT_INACTIVE), in the same query."""
    users = get_user_model()._default_manager.filter(pk=user_id)
    if connection.features.has_select_for_update:
        users = users.select_for_update()
    if not any(active for (active,) in users.values_list("is_active")):
        raise ChatError(ACCOUNT_INACTIVE, "This account is not active any more; log in again.")


def _user_run_counts(user_id, *, since) -> tuple[int, int]:
    """How many runs of this user's conversations were created since `since`, and how many are active.

    Written in SQL: it runs for every message, and the same query built by the ORM (two filtered counts
    over a join) costs a web server more than a millisecond to compile each time."""
    runs, conversations = Run._meta.db_table, Conversation._meta.db_table
    active = ", ".join(["%s"] * len(Run.ACTIVE_STATUSES))
    created = Run._meta.get_field("created_at").get_db_prep_value(since, connection)
    query = f"""
        SELECT COALESCE(SUM(CASE WHEN r.created_at >= %s THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN r.status IN ({active}) THEN 1 ELSE 0 END), 0)
        FROM {runs} r JOIN {conversations} c ON c.id = r.conversation_id
        WHERE c.owner_id = %s AND (r.created_at >= %s OR r.status IN ({active}))
    """  # noqa: S608 - table names from the models, values as parameters
    statuses = [str(status) for status in Run.ACTIVE_STATUSES]
    with connection.cursor() as cursor:
        cursor.execute(query, [created, *statuses, user_id, created, *statuses])
        recent, running = cursor.fetchone()
    return int(recent), int(running)


def _announce(message: Message, run: Run, *, title_event: tuple[str, int] | None = None) -> None:
    try:
        said = [events.message_event(message)]
        if title_event is not None:
            title, title_seq = title_event
            said.append(events.conversation_updated_event(Conversation(title=title, title_seq=title_seq)))
        notify.notifier().publish(message.conversation_id, *said)  # one round trip for both
        sql.update(Run, {"id": run.id}, {"announced": True})
        run_ring_doorbell(run_id=run.id)
    except Exception:
        # The rows are committed: a worker's poll finds the run even if this doorbell is lost.
        logger.exception("could not announce run %s", run.id)


def run_ring_doorbell(*, run_id) -> None:
    """Wake an agent worker. Only a hint (channel layers deliver at most once): the Run row is the job."""
    notify.notifier().wake_workers(run_id)


def run_claim_batch(*, worker_id: str, worker_channel: str = "", limit: int, start: bool = False) -> list[Run]:
    """Claim up to `limit` of the oldest queued runs for this worker, in a few statements whatever their
    number (a burst of messages is claimed at once, not one round trip after another).

    With `start`, each claimed run that needs no routing is also started: its first block of seqs is reserved
    (run.started_seq is the first) in the same few statements. A router's runs are started after routing."""
    claimed = _claim_queued(worker_id, worker_channel, limit)
    if not claimed:
        return []
    # Read with their conversation, team and message in SQL: compiling this join through select_related cost
    # more than the claim itself (sql.py). A run stopped in between is no longer running: it is left out.
    runs = [
        run
        for run in sql.select_with_related(Run, claimed, ("conversation", "team", "trigger_message"), "created_at")
        if run.status == Run.Status.RUNNING and run.worker_id == worker_id
    ]
    for run in runs:
        run.resuming = run.started_seq is not None  # it waited for the person, and goes on now
    if start:
        # A run that waited for the person was started before it asked: it goes on, with no second start.
        _start_runs([run for run in runs if run.team.kind != Team.Kind.ROUTER and run.started_seq is None])
    return runs


def _claim_queued(worker_id: str, worker_channel: str, limit: int) -> list:
    """Mark up to `limit` of the oldest queued runs as this worker's, in ONE statement; return their ids.

    A run whose message is not announced yet waits (see Run.announced), unless its web process died. Workers
    claiming at once never take the same run: on PostgreSQL each skips the rows another has locked (and the
    outer `status` check holds whatever happens); SQLite has one writer at a time. Written in SQL: a claim
    comes with nearly every run, and the ORM's version (a SELECT, then a conditional UPDATE; the seqs noted
    with a Case/When) cost about a third more CPU per claim on PostgreSQL (docs/performance-history.md)."""
    fields, now = Run._meta, timezone.now()
    table = connection.ops.quote_name(fields.db_table)

    def column(name: str) -> str:
        return sql.column(Run, name)

    def value(name: str, python_value):
        return fields.get_field(name).get_db_prep_value(python_value, connection)

    status, queued = column("status"), str(Run.Status.QUEUED)
    oldest = f"""
        SELECT {column("id")} FROM {table}
        WHERE {status} = %s AND ({column("announced")} = %s OR {column("created_at")} < %s)
        ORDER BY {column("created_at")} LIMIT %s
    """  # noqa: S608 - names from the model, values as parameters
    if connection.vendor == "postgresql":
        # ARRAY(...) runs the subquery once: as `IN (...)` PostgreSQL may run it again per row, and take more
        # than `limit` rows (the ones it updated no longer match).
        picked = f"= ANY(ARRAY({oldest} FOR UPDATE SKIP LOCKED))"
    else:
        picked = f"IN ({oldest})"
    query = f"""
        UPDATE {table}
        SET {status} = %s, {column("worker_id")} = %s, {column("worker_channel")} = %s,
            {column("started_at")} = %s, {column("heartbeat_at")} = %s
        WHERE {status} = %s AND {column("id")} {picked}
        RETURNING {column("id")}
    """  # noqa: S608
    grace = now - timedelta(seconds=UNANNOUNCED_GRACE_SECONDS)
    params = [str(Run.Status.RUNNING), worker_id, worker_channel, value("started_at", now),
              value("heartbeat_at", now), queued, queued, value("announced", True), value("created_at", grace),
              limit]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return [row[0] for row in cursor.fetchall()]


def _start_runs(runs: list[Run]) -> None:
    """Reserve each run's first block of seqs on its conversation and mark the run started with the first."""
    if not runs:
        return
    # One statement for every conversation (each has one active run at most), one for every run.
    with transaction.atomic():
        firsts = seqs_take([run.conversation_id for run in runs], SEQ_BLOCK, record_first=True)
        for run in runs:
            run.started_seq = firsts[run.conversation_id]
        keys = [Run._meta.pk.get_db_prep_value(run.id, connection) for run in runs]
        table = connection.ops.quote_name(Run._meta.db_table)
        pk, started_seq = sql.column(Run, "id"), sql.column(Run, "started_seq")
        cases = " ".join(["WHEN %s THEN %s"] * len(runs))
        params = [item for key, run in zip(keys, runs, strict=True) for item in (key, run.started_seq)] + keys
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET {started_seq} = CASE {pk} {cases} END "  # noqa: S608
                f"WHERE {pk} IN ({', '.join(['%s'] * len(runs))})",
                params,
            )


def run_take_over_stale(*, worker_id: str) -> tuple[list[Run], list[Run]]:
    """Runs to be closed on another worker's behalf, now held by `worker_id`: ones whose worker stopped
    heartbeating (killed, frozen, cut off), and ones whose Stop was not carried out within
    CHORUS_CANCEL_GRACE_SECONDS (a lost request, or a worker too busy to act on it). Each carries
    `takeover_reason` ("stale" or "cancel").

    Returns (to_recover, ended): a run already taken over CHORUS_RUN_MAX_TAKEOVERS times (its recovery keeps
    failing) is not recovered again but ended here as failed (`recovery_failed`), to be announced."""
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.CHORUS_RUN_STALE_SECONDS)
    cancel_before = now - timedelta(seconds=settings.CHORUS_CANCEL_GRACE_SECONDS)
    due = Q(heartbeat_at__lt=stale_before) | Q(cancel_requested_at__lt=cancel_before)
    candidates = Run.objects.filter(due, status=Run.Status.RUNNING).values_list("id", "worker_id")
    to_recover, ended = [], []
    for run_id, old_worker in candidates[:20]:
        # Conditional update: several workers may see the same run; the one whose UPDATE matches (still due,
        # still the old worker's) takes it.
        taken = Run.objects.filter(due, id=run_id, status=Run.Status.RUNNING, worker_id=old_worker).update(
            worker_id=worker_id, heartbeat_at=now, takeovers=F("takeovers") + 1
        )
        if not taken:
            continue
        run = Run.objects.select_related("conversation", "team").get(id=run_id)
        cancel_due = run.cancel_requested_at is not None and run.cancel_requested_at < cancel_before
        run.takeover_reason = "cancel" if cancel_due else "stale"
        if run.takeovers > settings.CHORUS_RUN_MAX_TAKEOVERS:
            detail = "This answer could not be recovered after its worker stopped; what had arrived is kept."
            if run_end_abandoned(run=run, worker_id=worker_id, code="recovery_failed", detail=detail):
                ended.append(run)
            continue
        run.worker_id = old_worker  # for the log line: whose run this was
        to_recover.append(run)
    return to_recover, ended


def run_end_abandoned(*, run: Run, worker_id: str, code: str, detail: str) -> bool:
    """End a run held by `worker_id` as failed, writing nothing else (no partial answer, no team state): the
    last resort when closing it properly failed. False when `worker_id` no longer holds it."""
    seq = seq_reserve(conversation_id=run.conversation_id)
    ending = {"status": Run.Status.FAILED, "error_code": code, "error_detail": detail,
              "finished_at": timezone.now(), "finished_seq": seq}  # fmt: skip
    with transaction.atomic():
        if not Run.objects.filter(id=run.id, status=Run.Status.RUNNING, worker_id=worker_id).update(**ending):
            return False
        seq_record(run.conversation_id, seq)
    for name, value in ending.items():
        setattr(run, name, value)
    return True


def run_cancel(*, conversation: Conversation, run_id=None) -> Run:
    """A person's Stop. A queued run ends here; a running one is stopped by the worker holding it, which
    keeps the partial answer and the team's memory. The request is noted on the run: a worker that has not
    carried it out within CHORUS_CANCEL_GRACE_SECONDS loses the run, and another worker ends it."""
    run = Run.objects.filter(conversation=conversation, status__in=Run.OPEN_STATUSES).first()
    if run is None or (run_id is not None and str(run.id) != str(run_id)):
        raise ChatError("no_active_run", "There is no answer in progress to stop.")
    if run.status == Run.Status.WAITING:
        from agents_app.domain.human_input import run_cancel_waiting

        if run_cancel_waiting(run=run):
            return run
        run.refresh_from_db()  # answered meanwhile: queued again, stopped as such below
    if run.status == Run.Status.QUEUED:
        seq = seq_reserve(conversation_id=conversation.id)
        if Run.objects.filter(id=run.id, status=Run.Status.QUEUED).update(
            status=Run.Status.CANCELLED, finished_at=timezone.now(), finished_seq=seq
        ):
            run.refresh_from_db()
            seq_record(conversation.id, seq)
            notify.notifier().publish(conversation.id, events.run_finished_event(run))
            return run
        run.refresh_from_db()  # a worker claimed it meanwhile: stop it there
    if run.status == Run.Status.RUNNING:
        Run.objects.filter(id=run.id, cancel_requested_at__isnull=True).update(cancel_requested_at=timezone.now())
        if run.worker_channel:
            notify.notifier().stop_run(run.worker_channel, run.id)
    return run


def route_context(*, run: Run) -> tuple[dict[str, str], str]:
    """For a router's turn: the enabled candidate teams (slug -> description) and the conversation so far."""
    slugs = run.team.config.get("teams", [])
    teams = Team.objects.filter(slug__in=slugs, enabled=True, kind=Team.Kind.TEAM)
    candidates = {team.slug: team.description for team in sorted(teams, key=lambda t: slugs.index(t.slug))}
    if not candidates:
        raise ChatError("no_team", "None of the router's teams is enabled.")
    earlier = (
        Message.objects.filter(conversation_id=run.conversation_id, seq__lt=run.trigger_message.seq)
        .filter(replaced_seq__isnull=True)
        .filter(Q(role=Message.Role.USER) | Q(is_final_answer=True))
        .order_by("-seq")[:ROUTED_TRANSCRIPT_MESSAGES]
    )
    lines = [f"{'Person' if m.role == Message.Role.USER else 'Assistant'}: {m.content}" for m in reversed(earlier)]
    return candidates, "\n".join(lines)


def run_set_route(*, run: Run, router: Team, slug: str, reason: str) -> None:
    run.team = Team.objects.get(slug=slug)
    run.routed_by = router
    run.route_reason = reason[:300]
    run.save(update_fields=["team", "routed_by", "route_reason"])


def run_start(*, run: Run) -> int:
    """Start a claimed run that was not started when claimed (a router's, once routed): reserve its first
    block of seqs and return the first, which is its run.started seq."""
    _start_runs([run])
    return run.started_seq


def run_heartbeat(*, run_ids: list, worker_id: str) -> tuple[set[str], set[str]]:
    """Note that `worker_id` is alive and still running these runs. Returns (lost, cancel_requested): the ids
    it no longer holds (ended, or taken over by another worker while it was frozen: it must stop them and
    write nothing more), and the ids whose Stop was asked for (in case the request itself was lost)."""
    held = Run.objects.filter(id__in=run_ids, status=Run.Status.RUNNING, worker_id=worker_id)
    rows = {str(run_id): cancel_at for run_id, cancel_at in held.values_list("id", "cancel_requested_at")}
    if rows:
        Run.objects.filter(id__in=list(rows), worker_id=worker_id).update(heartbeat_at=timezone.now())
    lost = {str(run_id) for run_id in run_ids} - set(rows)
    return lost, {run_id for run_id, cancel_at in rows.items() if cancel_at is not None}


def message_ids_for_run(*, run: Run) -> set[str]:
    """The ids of every message a run has stored (a recovering worker must not store them again)."""
    return {str(message_id) for message_id in Message.objects.filter(run=run).values_list("id", flat=True)}


def message_store_agent(
    *,
    run: Run,
    message_id: str,
    role: str,
    source: str,
    content: str,
    is_final_answer: bool,
    seq: int,
    incomplete: bool = False,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> Message:
    """Persist a message an agent completed (or left incomplete) during a run."""
    with transaction.atomic():
        message = Message.objects.create(
            id=uuid.UUID(message_id),
            conversation_id=run.conversation_id,
            run=run,
            role=role,
            source=source,
            content=content,
            is_final_answer=is_final_answer,
            incomplete=incomplete,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            seq=seq,
        )
        seq_record(run.conversation_id, seq)
    return message


def tool_call_store(
    *, run: Run, tool_call_id: uuid.UUID, call_id: str, source: str, name: str, arguments: str, seq: int | None
) -> None:
    """Keep a tool call an agent made during a run (its result follows: tool_call_store_result). Model text
    that no database stores (a NUL, a lone surrogate) is kept with U+FFFD in its place."""
    ToolCall.objects.create(
        id=tool_call_id,
        run_id=run.id,
        conversation_id=run.conversation_id,
        call_id=made_storable(call_id)[:200],
        source=made_storable(source)[:100],
        name=made_storable(name)[:100],
        arguments=made_storable(arguments),
        seq=seq,
    )


def tool_call_store_result(
    *, tool_call_id: uuid.UUID, result: str, is_error: bool, seq: int | None, duration_ms: float
) -> None:
    """Add a tool's result to its stored call, with how long it took (from the call's event to the result's)."""
    ToolCall.objects.filter(id=tool_call_id).update(
        result=made_storable(result), is_error=is_error, result_seq=seq, duration_ms=duration_ms
    )


def run_answer_ids(*, run: Run) -> list[str]:
    """The messages a run stored as its answer, in order (for a run recovered from a dead worker)."""
    answers = Message.objects.filter(run=run, is_final_answer=True).order_by("seq").values_list("id", flat=True)
    return [str(message_id) for message_id in answers]


def run_finish(
    *,
    run: Run,
    result: RunOutcome,
    seq: int,
    worker_id: str,
    answer_ids: list[str],
    revised_seqs: dict[str, int],
    first_token_at=None,
) -> list[Message] | None:
    """Close a run with its outcome and keep the team's memory for the next turn. None when `worker_id` no
    longer holds the run (another worker took it over as stale): then nothing is written.

    `answer_ids`: the messages stored as the answer, in order; only the last one is the run's answer (a
    writer's final version, not its first draft). `revised_seqs`: for each of the others, the seq of the
    `message.updated` event that says so. `first_token_at`: when the run's first event reached the worker
    (unknown for a run recovered from a dead worker). Returns those messages as now stored, in order."""
    ending = {
        "status": result.status,
        "error_code": result.error_code,
        "error_detail": result.error_detail,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "usage": result.usage,
        "answer_message_id": answer_ids[-1] if answer_ids else None,
        "finished_at": timezone.now(),
        "finished_seq": seq,
        **({"first_token_at": first_token_at} if first_token_at is not None else {}),
    }
    with transaction.atomic():
        # Conditional update: a worker that stalled past CHORUS_RUN_STALE_SECONDS lost the run to another one,
        # and must not record a second ending.
        if not sql.update(Run, {"id": run.id, "status": Run.Status.RUNNING, "worker_id": worker_id}, ending):
            return None
        for name, value in ending.items():
            setattr(run, name, value)
        for message_id, revised_seq in revised_seqs.items():
            Message.objects.filter(id=message_id, run=run).update(is_final_answer=False, revised_seq=revised_seq)
        # A failed or stopped turn has no state: the next turn starts from the last good one. Routed turns
        # keep none either: each gets the conversation in its task.
        keep_state = result.team_state is not None and run.routed_by_id is None
        last_seq = max(seq, *revised_seqs.values()) if revised_seqs else seq
        seq_record(run.conversation_id, last_seq, **({"team_state": result.team_state} if keep_state else {}))
    if not revised_seqs:
        return []
    return list(Message.objects.filter(id__in=list(revised_seqs), run=run).order_by("seq"))
