"""Structured logs: one JSON object a line (CHORUS_LOG_FORMAT=json, the default when DEBUG is off), or a line
a person reads at a terminal (text).

Every line about a run, a conversation or a person carries their ids: code that works on one binds them once
(`bind(run_id=..., conversation_id=..., user_id=...)`), in a context variable that follows the work into the
tasks it starts, the threads `database_sync_to_async` hands it to and the agent loop a turn runs on; and
`ContextFilter` puts them on every record logged meanwhile. Ids passed with `extra=` win over the bound ones.

This module is configured by settings.LOGGING before the apps load: it must not import models.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

CONTEXT_KEYS = ("run_id", "conversation_id", "user_id", "worker_id")
_EMPTY: dict[str, str] = {}  # never changed: bind() sets a new dict
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("chorus_log_context", default=_EMPTY)  # noqa: B039


def bind(**ids) -> contextvars.Token:
    """Add ids to the current context (this task, and the tasks and threads it starts from now on). Returns a
    token for `unbind`; a task that ends needs no unbind (its context goes with it)."""
    unknown = set(ids) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"not a log context key: {sorted(unknown)}")
    current = _context.get()
    return _context.set({**current, **{key: str(value) for key, value in ids.items() if value is not None}})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def context(**ids) -> Iterator[None]:
    token = bind(**ids)
    try:
        yield
    finally:
        unbind(token)


def current() -> dict[str, str]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (an id given with `extra=` is kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


class JsonFormatter(_JsonFormatter):
    """`{"time": "2026-12-06T21:10:04.123Z", "level": "INFO", "logger": "agents_app.worker", "message": "...",
    "pid": 4242, "run_id": "...", "conversation_id": "...", "user_id": "7", ...}`: every `extra=` field too, and
    `exc_info` with the traceback."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger", "process": "pid"})
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__("%(levelname)s %(name)s %(message)s %(process)d", *args, **kwargs)

    def add_fields(self, log_data, record, message_dict) -> None:
        # The time first, in UTC with milliseconds: what log stores sort and parse without a format string.
        log_data["time"] = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        )
        super().add_fields(log_data, record, message_dict)
        # color_message: uvicorn's and daphne's duplicate of the message with terminal colours.
        log_data.pop("color_message", None)


class TextFormatter(logging.Formatter):
    """`2026-12-06 21:10:04,123 INFO agents_app.worker run 7442db91-... succeeded [run=7442db91 conversation=...]`"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{key.removesuffix('_id')}={getattr(record, key)}" for key in CONTEXT_KEYS
               if getattr(record, key, None)]  # fmt: skip
        if not ids:
            return line
        head, newline, rest = line.partition("\n")  # a traceback goes after the ids
        return f"{head} [{' '.join(ids)}]{newline}{rest}"


def run_ids(run) -> dict[str, str]:
    """`extra=` for a line about a run logged outside its own task (a recovery, a poll)."""
    return {"run_id": str(run.id), "conversation_id": str(run.conversation_id)}
