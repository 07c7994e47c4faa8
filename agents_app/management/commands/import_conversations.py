"""Import conversations from a file export_conversations wrote (JSON): all of them or none."""

import json
import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from agents_app.domain import export


class DryRun(Exception):
    """Raised to roll back a --dry-run import once it has been checked and written."""


class Command(BaseCommand):
    help = "Import conversations from an export_conversations JSON file; nothing is written if any is refused."

    def add_arguments(self, parser):
        parser.add_argument("file", help="the JSON file ('-' for standard input)")
        existing = parser.add_mutually_exclusive_group()
        existing.add_argument("--skip-existing", action="store_true", help="leave conversations already stored")
        existing.add_argument("--replace", action="store_true", help="delete stored ones and import the file's")
        parser.add_argument("--create-users", action="store_true",
                            help="create missing owners (without a usable password) instead of refusing")  # fmt: skip
        parser.add_argument("--dry-run", action="store_true", help="check and import, then roll everything back")

    def handle(self, *args, file: str, skip_existing: bool, replace: bool, create_users: bool, dry_run: bool,
               **options):  # fmt: skip
        try:
            if file == "-":
                text = sys.stdin.read()
            else:
                with open(file, encoding="utf-8") as source:
                    text = source.read()
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}.") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text.") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"{file} is not JSON: {exc}.") from None
        on_existing = "skip" if skip_existing else "replace" if replace else "error"
        try:
            with transaction.atomic():
                report = export.import_json(data, on_existing=on_existing, create_users=create_users)
                if dry_run:
                    raise DryRun
        except DryRun:
            pass
        except export.ImportFailed as exc:
            raise CommandError("Nothing was imported:\n- " + "\n- ".join(exc.problems)) from None
        done = "Would import" if dry_run else "Imported"
        line = f"{done} {len(report.imported) + len(report.replaced)} conversations"
        line += f" ({len(report.replaced)} replaced, {len(report.skipped)} already stored and skipped)."
        if report.users_created:
            line += f" Created users without a password: {', '.join(report.users_created)}."
        self.stdout.write(line)
