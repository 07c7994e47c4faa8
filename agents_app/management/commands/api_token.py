"""Personal API tokens from the command line: create one (its secret printed once), list them, revoke one."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from agents_app.web import tokens


class Command(BaseCommand):
    help = "Create, list or revoke a person's API tokens (docs/api.md)."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
        create = actions.add_parser("create", help="Create a token and print it (only this once).")
        create.add_argument("username")
        create.add_argument("--name", required=True, help="What uses the token, e.g. 'nightly export'.")
        create.add_argument("--read-only", action="store_true", help="It reads; it cannot send, stop or delete.")
        listing = actions.add_parser("list", help="List a person's tokens (never their secrets).")
        listing.add_argument("username")
        revoke = actions.add_parser("revoke", help="Revoke a token: every program using it is refused at once.")
        revoke.add_argument("username")
        revoke.add_argument("token_id", help="The token's id, as `list` prints it.")

    def handle(self, *args, action: str, username: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        if action == "create":
            token, secret = tokens.token_create(user=user, name=options["name"], read_only=options["read_only"])
            # The secret alone on stdout, so that `TOKEN=$(manage.py api_token create ...)` works; the rest to stderr.
            self.stdout.write(secret)
            access = "read-only" if token.read_only else "read and write"
            self.stderr.write(f"Token {token.id} “{token.name}” ({access}) for {username}: shown only now.")
        elif action == "list":
            for token in tokens.token_list_for_user(user=user):
                state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
                used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
                access = "read-only" if token.read_only else "read-write"
                self.stdout.write(
                    f"{token.id}  {token.prefix}…  {access:10}  {state:24}  last used {used}  {token.name}"
                )
        else:
            try:
                token = tokens.token_revoke(user=user, token_id=options["token_id"])
            except ValidationError as exc:  # not a UUID
                raise CommandError(f"No token {options['token_id']!r} of {username}.") from exc
            if token is None:
                raise CommandError(f"No token {options['token_id']!r} of {username}.")
            self.stdout.write(f"Revoked {token.id} “{token.name}”.")
