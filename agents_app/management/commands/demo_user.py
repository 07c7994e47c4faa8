"""Create the demo login on first run and print its password once; later runs say it exists."""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo user (printing its password once) unless it exists."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")

    def handle(self, *args, username: str, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            self.stdout.write(
                f"Demo login: {username} (exists; its password was printed when it was created. "
                f"Reset it with: python manage.py changepassword {username})"
            )
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_user(username=username, password=password)
        self.stdout.write(self.style.SUCCESS(f"Demo login created: username {username}, password {password}"))
        self.stdout.write("This password is shown only now; the database keeps only its hash.")
