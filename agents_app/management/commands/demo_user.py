"""Create the demo login on first run and print its password once; later runs say how to get a new one."""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo user (printing its password once) unless it exists; --reset gives it a new password."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--reset", action="store_true", help="give the existing demo user a new password")

    def handle(self, *args, username: str, reset: bool, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is not None and not reset:
            # A make target, so it runs as printed from the project folder: the virtualenv's python, and the
            # development mode (DEBUG=1) that `make run` uses, whatever the terminal's environment holds.
            how = (
                "make demo-password"
                if username == "demo"
                else f".venv/bin/python manage.py demo_user --reset --username {username}"
            )
            self.stdout.write(
                f"Demo login: {username} (exists; its password was shown when it was created). "
                f"Forgot it? A new one: {how}"
            )
            return
        password = secrets.token_urlsafe(12)
        if user is None:
            User.objects.create_user(username=username, password=password)
            self.stdout.write(self.style.SUCCESS(f"Demo login created: username {username}, password {password}"))
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
            self.stdout.write(self.style.SUCCESS(f"Demo login reset: username {username}, password {password}"))
        self.stdout.write("This password is shown only now; the database keeps only its hash.")
