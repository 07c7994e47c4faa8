"""Bench users, conversations and session cookies, written with Chorus's own ORM models.

Call django_setup() once, after the environment names the bench database; then everything here is plain
synchronous ORM code, run between the asyncio phases of the benchmark (never inside one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


def django_setup(env: dict[str, str]) -> None:
    """Configure Django in this process with the same settings environment as the stack's processes."""
    for key in ("DJANGO_SETTINGS_MODULE", "DEBUG", "DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"):
        os.environ[key] = env[key]
    os.environ.setdefault("CHORUS_EMBEDDED_WORKER", "0")
    import django

    django.setup()


@dataclass(frozen=True)
class Login:
    """One bench user's session cookie value and the user's primary key."""

    user_id: int
    cookie: str


def create_logins(count: int, prefix: str) -> list[Login]:
    """`count` users with unusable passwords (no hashing cost) and a logged-in session each."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    user_model = get_user_model()
    users = user_model.objects.bulk_create(
        [user_model(username=f"{prefix}{i}", password=make_password(None)) for i in range(count)], batch_size=1000
    )
    if any(u.pk is None for u in users):  # a backend that returns no ids from bulk inserts
        users = list(user_model.objects.filter(username__startswith=prefix).order_by("id"))
    store = SessionStore()
    expire = timezone.now() + timedelta(seconds=settings.SESSION_COOKIE_AGE)
    logins, sessions = [], []
    for user in users:
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        key = get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")
        sessions.append(Session(session_key=key, session_data=store.encode(data), expire_date=expire))
        logins.append(Login(user.pk, key))
    Session.objects.bulk_create(sessions, batch_size=1000)
    return logins


def create_conversations(logins: list[Login]) -> list[str]:
    """One new conversation with the default team for each login; their ids as strings, in order."""
    from agents_app.domain.selectors import team_default
    from agents_app.models import Conversation

    team = team_default()
    if team is None:
        raise RuntimeError("no default team: did the migrations seed the built-in teams?")
    conversations = Conversation.objects.bulk_create(
        [Conversation(owner_id=login.user_id, team=team) for login in logins], batch_size=1000
    )
    return [str(c.id) for c in conversations]


def close_connections() -> None:
    from django.db import connections

    connections.close_all()
