"""Conversations out and back in: JSON that loses nothing (the conversation, its messages, runs and tool calls,
every stored field), Markdown for people to read, and an import that reads the JSON back.

The JSON is deterministic: the same rows always give the same text (no export time in it), so an export, a
wipe, an import and a second export give identical files. Owners are named by username and teams by slug, so a
file moves between databases whose users and teams have those names.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction

from agents_app.models import Attachment, Conversation, InputRequest, Message, Run, Team, ToolCall

FORMAT = "chorus-conversations"
VERSION = 1
ON_EXISTING = ("error", "skip", "replace")


class ImportFailed(Exception):
    """The file cannot be imported; `problems` says why, one sentence each. Nothing was written."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def conversations_for_export(queryset=None):
    """The conversations, oldest first, with everything an export reads fetched in six queries in all (the
    conversations with their owners and teams, runs, messages, their files, tool calls, questions)."""
    queryset = Conversation.objects.all() if queryset is None else queryset
    return (
        queryset.select_related("owner", "team")
        .prefetch_related(
            models.Prefetch("runs", Run.objects.select_related("team", "routed_by").order_by("created_at", "id")),
            models.Prefetch("messages", Message.objects.order_by("seq").prefetch_related("attachments")),
            # A call whose seq is unknown last, on every database (SQLite would put NULL first).
            models.Prefetch(
                "tool_calls", ToolCall.objects.order_by(models.F("seq").asc(nulls_last=True), "started_at", "id")
            ),
            models.Prefetch("input_requests", InputRequest.objects.select_related("answered_by").order_by("seq")),
        )
        .order_by("created_at", "id")
    )


# JSON ------------------------------------------------------------------------------------------------------

# Foreign keys written as a name instead of an id, and the ones left out (a conversation's rows sit inside it).
_BY_NAME = {"owner": "username", "team": "slug", "routed_by": "slug"}
_PARENT = "conversation"


def _fields(model) -> list[models.Field]:
    return [f for f in model._meta.concrete_fields if f.name != _PARENT]


def _dump_value(obj, f: models.Field):
    if f.is_relation:
        if f.name in _BY_NAME:
            related = getattr(obj, f.name)
            return None if related is None else getattr(related, _by_name_field(f))
        value = getattr(obj, f.attname)
        return None if value is None else str(value)
    value = getattr(obj, f.attname)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _by_name_field(f: models.Field) -> str:
    return get_user_model().USERNAME_FIELD if f.name == "owner" else _BY_NAME[f.name]


def _row(obj, model) -> dict[str, Any]:
    return {f.name: _dump_value(obj, f) for f in _fields(model)}


def conversation_to_dict(conversation: Conversation) -> dict[str, Any]:
    """Every stored field of the conversation and of its runs, messages and tool calls."""
    data = _row(conversation, Conversation)
    data["runs"] = [_row(run, Run) for run in conversation.runs.all()]
    data["messages"] = [_message_row(message) for message in conversation.messages.all()]
    data["tool_calls"] = [_row(call, ToolCall) for call in conversation.tool_calls.all()]
    return data


def _message_row(message: Message) -> dict[str, Any]:
    row = _row(message, Message)
    # The files' metadata only (not their bytes, which stay in the attachment storage); an import ignores it.
    files = message.attachments.all()
    if files:
        row["attachments"] = [_attachment_meta(a) for a in files]
    return row


def _attachment_meta(attachment: Attachment) -> dict[str, Any]:
    fields = ("name", "content_type", "kind", "size", "width", "height")
    return {"id": str(attachment.id), **{f: getattr(attachment, f) for f in fields}, "url": attachment.url}


def export_json(queryset=None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "conversations": [conversation_to_dict(c) for c in conversations_for_export(queryset)],
    }


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    users_created: list[str] = field(default_factory=list)


def import_json(data: Any, *, on_existing: str = "error", create_users: bool = False) -> ImportReport:
    """Store the conversations of an export_json() file, all or nothing (one transaction).

    `on_existing`: what to do with a conversation whose id is already stored: "error" (the default: nothing is
    imported), "skip" it, or "replace" it (the stored one and its rows are deleted first). `create_users`:
    create a missing owner as a user with no usable password (an admin sets one), instead of refusing."""
    if on_existing not in ON_EXISTING:
        raise ValueError(f"on_existing must be one of {', '.join(ON_EXISTING)}")
    items = _check_shape(data)
    report = ImportReport()
    problems: list[str] = []
    User = get_user_model()
    username_field = User.USERNAME_FIELD
    owners = {item.get("owner") for item in items}
    users = {getattr(u, username_field): u for u in User.objects.filter(**{f"{username_field}__in": owners})}
    missing = sorted(str(name) for name in owners - set(users))
    if missing and not create_users:
        problems.append(f"No user is named {', '.join(missing)}: create them first, or import with --create-users.")
    slugs = {item.get("team") for item in items}
    for item in items:
        slugs.update(run.get("team") for run in item.get("runs") or [] if isinstance(run, dict))
        slugs.update(run.get("routed_by") for run in item.get("runs") or [] if isinstance(run, dict))
    slugs.discard(None)
    teams = {team.slug: team for team in Team.objects.filter(slug__in=[s for s in slugs if isinstance(s, str)])}
    unknown = sorted(str(slug) for slug in slugs - set(teams))
    if unknown:
        problems.append(f"No team has the slug {', '.join(unknown)}: create those teams first.")
    ids = [item.get("id") for item in items]
    stored = Conversation.objects.filter(id__in=[i for i in ids if _is_uuid(i)]).values_list("id", flat=True)
    existing = {str(pk) for pk in stored}
    if existing and on_existing == "error":
        problems.append(
            f"{len(existing)} of these conversations are already stored ({', '.join(sorted(existing)[:5])}"
            f"{'…' if len(existing) > 5 else ''}): import with --skip-existing or --replace."
        )
    if problems:
        raise ImportFailed(problems)

    with transaction.atomic():
        for name in missing:
            user = User(**{username_field: name})
            user.set_unusable_password()
            user.save()
            users[name] = user
            report.users_created.append(name)
        rows: dict[type, list] = {Conversation: [], Run: [], Message: [], ToolCall: []}
        for number, item in enumerate(items, start=1):
            where = f"conversation {number} ({item.get('id')})"
            if str(item.get("id")) in existing:
                if on_existing == "skip":
                    report.skipped.append(str(item["id"]))
                    continue
                Conversation.objects.filter(id=item["id"]).delete()
                report.replaced.append(str(item["id"]))
            else:
                report.imported.append(str(item.get("id")))
            try:
                _build(item, users, teams, rows)
            except (ValidationError, ValueError, TypeError, KeyError) as exc:
                problems.append(f"{where}: {_reason(exc)}")
        if problems:
            transaction.set_rollback(True)
            raise ImportFailed(problems)
        try:
            for model, objects in rows.items():
                model.objects.bulk_create(objects, batch_size=500)
                # bulk_create stamps auto_now(_add) fields with the time of the import: write the file's back.
                stamped = [f.name for f in model._meta.concrete_fields if getattr(f, "auto_now", False)
                           or getattr(f, "auto_now_add", False)]  # fmt: skip
                if stamped and objects:
                    for obj in objects:
                        for name, value in obj._imported_times.items():
                            setattr(obj, name, value)
                    model.objects.bulk_update(objects, stamped, batch_size=500)
        except IntegrityError as exc:
            transaction.set_rollback(True)
            raise ImportFailed(
                [f"The database refused a row of the file (an id or a seq used twice, a negative count...): "
                 f"{str(exc).strip()[:300]}"]
            ) from None  # fmt: skip
    return report


def _check_shape(data: Any) -> list[dict]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ImportFailed([f'Not a Chorus export: the file must be a JSON object with "format": "{FORMAT}".'])
    if data.get("version") != VERSION:
        raise ImportFailed([f"This Chorus reads version {VERSION} of the export format, not {data.get('version')!r}."])
    items = data.get("conversations")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ImportFailed(['"conversations" must be a list of objects.'])
    return items


def _is_uuid(value) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(exc.messages)
    if isinstance(exc, KeyError):
        return f"the field {exc.args[0]!r} is missing"
    return str(exc)


def _build(item: dict, users: dict, teams: dict, rows: dict) -> None:
    conversation = _load(Conversation, item, users, teams, "the conversation")
    conversation.owner = users[item["owner"]]
    rows[Conversation].append(conversation)
    for key, model in (("runs", Run), ("messages", Message), ("tool_calls", ToolCall)):
        children = item.get(key)
        if not isinstance(children, list):
            raise ValueError(f'"{key}" must be a list')
        for index, child in enumerate(children, start=1):
            if not isinstance(child, dict):
                raise ValueError(f"{key}[{index}] must be an object")
            obj = _load(model, child, users, teams, f"{key}[{index}]")
            obj.conversation_id = conversation.id
            if model is Run and obj.status in Run.OPEN_STATUSES:  # a waiting run: its question is not exported
                raise ValueError(
                    f"run {obj.id} is {obj.status}: a worker would take it up. Export the conversation again once "
                    "its run has ended."
                )
            rows[model].append(obj)


def _load(model, data: dict, users: dict, teams: dict, where: str):
    """A model instance from its exported row, each value checked by its field (`to_python`)."""
    obj = model()
    times = {}
    for f in _fields(model):
        if f.name not in data:
            if not (f.null or f.has_default()):
                raise ValueError(f"{where}: the field {f.name!r} is missing")
            continue  # a field this file's Chorus did not have yet: its default
        value = data[f.name]
        try:
            if f.is_relation and f.name == "owner":
                continue  # set by the caller, from the users looked up once
            if f.is_relation and f.name in _BY_NAME:
                setattr(obj, f.attname, None if value is None else teams[value].pk)
                continue
            if f.is_relation:
                value = None if value is None else f.target_field.to_python(value)
            elif value is not None:
                value = f.to_python(value)
                if f.choices and value not in {choice for choice, _label in f.flatchoices}:
                    raise ValidationError(f"{value!r} is not one of {', '.join(c for c, _l in f.flatchoices)}")
                f.run_validators(value)  # lengths, and the ranges of integer columns
            if value is None and not f.null:
                raise ValidationError("it cannot be null")
        except ValidationError as exc:
            raise ValidationError(f"{where}, field {f.name!r}: {'; '.join(exc.messages)}") from None
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValidationError(f"{where}, field {f.name!r}: a time must say its UTC offset")
        setattr(obj, f.attname, value)
        if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
            times[f.name] = value
    obj._imported_times = times
    return obj


# Markdown --------------------------------------------------------------------------------------------------


def _fence(text: str, language: str = "") -> str:
    """`text` in a fenced block whose fence is longer than any run of backticks inside it."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines()) or ">"


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment else "—"


def _seconds(delta) -> str:
    return "—" if delta is None else f"{delta.total_seconds():.2f} s"


def conversation_to_markdown(conversation: Conversation) -> str:
    """A conversation for people to read: the person's words and the answers quoted, steps and tool calls
    labelled, each run with its status, error, timings and tokens."""
    from agents_app.domain.transcripts import admin_transcript

    runs = list(conversation.runs.all())
    tokens = sum(run.prompt_tokens + run.completion_tokens for run in runs)
    lines = [
        f"## {conversation.title or 'Untitled conversation'}",
        "",
        f"- Conversation: `{conversation.id}`",
        f"- Owner: {conversation.owner.get_username()} · Team: {conversation.team.name} (`{conversation.team.slug}`)",
        f"- Started: {_when(conversation.created_at)} · Last activity: {_when(conversation.updated_at)}",
        f"- Tokens: {tokens:,} in {len(runs)} run{'s' if len(runs) != 1 else ''}",
        "",
    ]
    for entry in admin_transcript(conversation, prefetched=True):
        if entry["kind"] == "message":
            message = entry["message"]
            lines += [f"### {message.source} · {_when(message.created_at)}", "", _quote(message.content), ""]
            files = message.attachments.all()
            if files:
                lines += [f"- Attached: {a.name} ({a.content_type}, {a.size} bytes)" for a in files] + [""]
            continue
        block = entry["block"]
        run = block.run
        lines += [f"### Run `{run.id}` · {run.team.name} · {run.status}", ""]
        if run.routed_by_id:
            lines.append(f"- Picked by {run.routed_by.name}: {run.route_reason}")
        lines.append(
            f"- Started {_when(run.started_at)} · finished {_when(run.finished_at)} · took {_seconds(block.duration)}"
            f" · time to first token {_seconds(block.time_to_first_token)}"
        )
        lines.append(
            f"- Tokens: {run.prompt_tokens:,} prompt, {run.completion_tokens:,} completion"
            + "".join(f"; {purpose}: {part.get('requests', 0)} requests" for purpose, part in block.usage)
        )
        if run.error_code:
            lines.append(f"- Error `{run.error_code}`: {run.error_detail}")
        lines.append("")
        for item in block.items:
            if item["kind"] == "tool_call":
                call = item["call"]
                result = call.result if item["has_result"] else "(none)"
                lines += [f"#### Tool call `{call.name}` by {call.source} · {_seconds(item['duration'])}", "",
                          "Arguments:", "", _fence(call.arguments, "json"), "",
                          "Error:" if call.is_error else "Result:", "", _fence(result), ""]  # fmt: skip
                continue
            if item["kind"] == "question":
                lines += _question_lines(item["question"])
                continue
            message = item["message"]
            label = "answer" if item["answer"] else ("replaced draft" if item["draft"] else "step")
            flags = " · incomplete" if message.incomplete else ""
            tokens_part = f" · {item['tokens']:,} tokens" if item["tokens"] else ""
            lines += [f"#### {message.source} · {label}{flags} · {_when(message.created_at)}{tokens_part}", "",
                      _quote(message.content), ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _question_lines(question) -> list[str]:
    """A question the run asked the person, and their answer (who, when), for the Markdown export."""
    kind = question.get_kind_display().lower()
    lines = [f"#### Question from {question.source} ({kind}) · {_when(question.created_at)}", "",
             _quote(question.prompt), ""]  # fmt: skip
    if question.options:
        lines += [f"Options: {', '.join(question.options)}", ""]
    if question.answered_at is None:
        return lines + ["Not answered.", ""]
    who = question.answered_by.get_username() if question.answered_by else "a deleted user"
    return lines + [f"Answered by {who} · {_when(question.answered_at)}:", "", _quote(question.answer), ""]


def export_markdown(queryset=None) -> str:
    conversations = list(conversations_for_export(queryset))
    parts = [f"# Chorus conversations ({len(conversations)})", ""]
    parts += [conversation_to_markdown(conversation) for conversation in conversations]
    return "\n".join(parts).rstrip() + "\n"
