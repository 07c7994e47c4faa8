"""Export conversations (messages, runs, tool calls) as JSON that loses nothing, or as Markdown to read."""

import json
import sys
from datetime import UTC, datetime

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from agents_app.domain import export
from agents_app.models import Conversation, Team


def parse_since(raw: str) -> datetime:
    """`--since`: a date (2026-12-01, meaning 00:00 UTC) or an ISO 8601 time (UTC unless it says otherwise)."""
    moment = parse_datetime(raw)
    if moment is None:
        day = parse_date(raw)
        if day is None:
            raise CommandError(f"--since takes a date (2026-12-01) or an ISO 8601 time, not {raw!r}.")
        moment = datetime(day.year, day.month, day.day)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Export conversations as JSON (import_conversations reads it back) or Markdown."

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=["json", "markdown"], default="json")
        parser.add_argument("--user", action="append", default=[], help="only this owner's (username; repeatable)")
        parser.add_argument("--team", action="append", default=[], help="only this team's (slug; repeatable)")
        parser.add_argument("--since", help="only conversations active since then: a date (UTC) or an ISO time")
        parser.add_argument("--output", default="-", help="the file to write (default: standard output)")

    def handle(self, *args, format: str, user: list, team: list, since: str | None, output: str, **options):
        conversations = Conversation.objects.all()
        if user:
            field = get_user_model().USERNAME_FIELD
            found = set(get_user_model().objects.filter(**{f"{field}__in": user}).values_list(field, flat=True))
            if missing := sorted(set(user) - found):
                raise CommandError(f"No user is named {', '.join(missing)}.")
            conversations = conversations.filter(**{f"owner__{field}__in": user})
        if team:
            if missing := sorted(set(team) - set(Team.objects.filter(slug__in=team).values_list("slug", flat=True))):
                raise CommandError(f"No team has the slug {', '.join(missing)}.")
            conversations = conversations.filter(team__slug__in=team)
        if since:
            conversations = conversations.filter(updated_at__gte=parse_since(since))
        if format == "json":
            text = json.dumps(export.export_json(conversations), indent=2, ensure_ascii=False) + "\n"
        else:
            text = export.export_markdown(conversations)
        if output == "-":
            sys.stdout.write(text)
            return
        try:
            with open(output, "w", encoding="utf-8") as file:
                file.write(text)
        except OSError as exc:
            raise CommandError(f"Cannot write {output}: {exc.strerror}.") from None
        count = conversations.count()
        self.stderr.write(f"Exported {count} conversation{'s' if count != 1 else ''} to {output}.")
