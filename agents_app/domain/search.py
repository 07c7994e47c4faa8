"""Searching a person's own messages: the data behind the agents' `search_my_conversations` tool.

The runner's tool registry takes a plain function `search(query) -> str`; the worker binds this module's to
the conversation's owner with `for_person`, so a tool can only ever see that person's data.
"""

import functools
import logging
from collections.abc import Callable

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from agents_app.domain.models import Message

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 100
MAX_HITS = 5


def for_person(user_id: int) -> Callable[[str], str]:
    """The search function of one person, as the tool registry takes it."""
    return functools.partial(search_for_model, user_id)


def search_for_model(user_id: int, query: str) -> str:
    """Excerpts of the person's messages that mention `query`, as text for a model. Runs on a tool thread,
    with a database connection of its own: a fresh one per call, closed after."""
    query = query.strip()[:MAX_QUERY_CHARS]
    if not query:
        return "Error: give a word or phrase to search for."
    close_old_connections()
    try:
        if connection.vendor == "postgresql":
            # Bounded work: the query ends with the tool's time limit, so its thread is not held after the
            # call has been given up on. Session-wide, but the connection is closed below.
            timeout_ms = max(int(settings.CHORUS_TOOL_TIMEOUT_SECONDS * 1000), 1)
            with connection.cursor() as cursor:
                cursor.execute(f"SET statement_timeout = {timeout_ms}")
        hits = (
            Message.objects.filter(conversation__owner_id=user_id, content__icontains=query, replaced_seq=None)
            .select_related("conversation")
            .order_by("-created_at")[:MAX_HITS]
        )
        lines = [
            f"- {m.conversation} ({m.source}, {m.created_at:%Y-%m-%d}): {_excerpt(m.content, query)}" for m in hits
        ]
    except DatabaseError:
        logger.warning("search_my_conversations failed for user %s", user_id, exc_info=True)
        return "Error: the search could not be completed; try a shorter or more specific phrase."
    finally:
        connection.close()
    return "\n".join(lines) if lines else f"No earlier message mentions {query!r}."


def _excerpt(text: str, query: str, width: int = 80) -> str:
    at = max(text.lower().find(query.lower()), 0)
    start = max(at - width // 2, 0)
    return (
        ("…" if start else "")
        + text[start : start + width].replace("\n", " ")
        + ("…" if start + width < len(text) else "")
    )
