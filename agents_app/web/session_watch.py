"""Sockets and event streams end with their session, however it ends: logout, expiry, the row deleted, the
password changed, the user deactivated.

Django checks the session on every HTTP request; a socket or a Server-Sent Events stream is one request that
lasts. So each process checks the sessions of its open sockets and streams every CHORUS_SESSION_CHECK_SECONDS
(default 5), all of them in one trip to the database thread (two queries with the database session engine),
and ends those whose session no longer logs its user in: a socket closes with 4401, a stream ends. A frame
that starts work checks first (consumers.py). Where Django sends a signal (signals.py), it is sooner: a logout
closes that session's sockets in every process at once, and its streams in this process; a change to a user
(a password, is_active) or their deletion has this process check at once.
"""

import asyncio
import logging
import threading
import weakref
from importlib import import_module
from typing import Any, NamedTuple, Protocol

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.utils import timezone
from django.utils.crypto import constant_time_compare

logger = logging.getLogger(__name__)

_DB_ENGINE = "django.contrib.sessions.backends.db"
_KEYS_PER_QUERY = 500


class SessionRef(NamedTuple):
    """A session, and the user it logged in when the socket or stream opened."""

    session_key: str | None
    user_id: str  # as Django stores it in the session: the pk's value_to_string()

    @classmethod
    def of(cls, session, user) -> "SessionRef":
        return cls(session.session_key, user._meta.pk.value_to_string(user))


class Member(Protocol):
    async def session_ended(self, message: Any = None) -> None: ...


def sessions_alive(refs) -> set[SessionRef]:
    """The refs whose session still logs in its user, as Django's `get_user()` would decide on a request: the
    session exists and has not expired, names this user and an enabled backend, the user exists and may log in
    (`is_active` for ModelBackend), and the session's auth hash matches the user's (a password change ends it).
    A stream or socket opened with an API token is alive while its token is (tokens.TokenRef)."""
    from agents_app.web.tokens import TokenRef, tokens_alive

    refs = set(refs)
    by_token = {ref for ref in refs if isinstance(ref, TokenRef)}
    if by_token:
        return tokens_alive(by_token) | sessions_alive(refs - by_token)
    sessions = _session_data({ref.session_key for ref in refs if ref.session_key})
    wanted = {ref.user_id for ref in refs if sessions.get(ref.session_key, {}).get(SESSION_KEY) == ref.user_id}
    user_model = get_user_model()
    users = {}
    if wanted:
        for user in user_model._default_manager.filter(pk__in=wanted):
            users[user._meta.pk.value_to_string(user)] = user
    return {ref for ref in refs if _logs_in(sessions.get(ref.session_key), users.get(ref.user_id), ref)}


def session_alive(ref: SessionRef) -> bool:
    return ref in sessions_alive([ref])


def _session_data(keys: set[str]) -> dict[str, dict]:
    """Each live session's data, by key. One query per 500 keys with the database engine (the default); other
    engines load each session as a request would."""
    store_class = import_module(settings.SESSION_ENGINE).SessionStore
    if settings.SESSION_ENGINE != _DB_ENGINE:
        return {key: data for key in keys if (data := store_class(key).load())}
    model, decoder, now, data = store_class.get_model_class(), store_class(), timezone.now(), {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), _KEYS_PER_QUERY):
        rows = model.objects.filter(session_key__in=ordered[start : start + _KEYS_PER_QUERY], expire_date__gt=now)
        for key, text in rows.values_list("session_key", "session_data"):
            data[key] = decoder.decode(text)
    return data


def _logs_in(session: dict | None, user, ref: SessionRef) -> bool:
    if not session or user is None or session.get(SESSION_KEY) != ref.user_id:
        return False
    backend_path = session.get(BACKEND_SESSION_KEY)
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return False
    backend = load_backend(backend_path)
    can_log_in = getattr(backend, "user_can_authenticate", None)
    if not (can_log_in(user) if can_log_in else getattr(user, "is_active", True)):
        return False
    if not hasattr(user, "get_session_auth_hash"):
        return True
    session_hash = session.get(HASH_SESSION_KEY)
    if not session_hash:
        return False
    if constant_time_compare(session_hash, user.get_session_auth_hash()):
        return True
    # Signed with a key of SECRET_KEY_FALLBACKS: Django still accepts it (and re-signs it on the next request).
    return any(constant_time_compare(session_hash, h) for h in user.get_session_auth_fallback_hash())


class SessionWatch:
    """The sockets and streams of one event loop, by session; a task checks them while there are any."""

    def __init__(self) -> None:
        self.members: dict[SessionRef, set[Member]] = {}
        self.task: asyncio.Task | None = None
        self.woken = asyncio.Event()
        self.checking = False
        self.endings: set[asyncio.Task] = set()

    def add(self, ref: SessionRef, member: Member) -> None:
        self.members.setdefault(ref, set()).add(member)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="chorus-session-watch")

    def discard(self, ref: SessionRef, member: Member) -> None:
        members = self.members.get(ref)
        if members is not None:
            members.discard(member)
            if not members:
                del self.members[ref]
        if not self.members and self.task is not None and not self.checking:
            self.task.cancel()  # nothing left to watch: no task waits out its tick (a check in progress ends it)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.members:
                try:
                    await asyncio.wait_for(self.woken.wait(), settings.CHORUS_SESSION_CHECK_SECONDS)
                except TimeoutError:
                    pass
                self.woken.clear()
                await self.check()
        finally:
            self.task = None
            with _watches_lock:  # nothing left to watch: a later socket starts afresh
                if _watches.get(loop) is self:
                    del _watches[loop]

    def wake(self) -> None:
        """Check now rather than at the next tick."""
        self.woken.set()

    def end_key(self, session_key: str) -> None:
        """This session is over (a logout): end its members without asking the database."""
        refs = [ref for ref in self.members if ref.session_key == session_key]
        members = [member for ref in refs for member in self.members.pop(ref)]
        if members:
            task = asyncio.get_running_loop().create_task(self._end(members))
            self.endings.add(task)
            task.add_done_callback(self.endings.discard)

    async def check(self) -> None:
        refs = list(self.members)
        if not refs:
            return
        self.checking = True
        try:
            alive = await database_sync_to_async(sessions_alive)(refs)
            await self._end([m for ref in refs if ref not in alive for m in self.members.pop(ref, ())])
        except Exception:  # the database is away: the next check tries again
            logger.warning("checking the sessions of %d sockets and streams failed", len(refs), exc_info=True)
        finally:
            self.checking = False

    @staticmethod
    async def _end(members: list[Member]) -> None:
        for member in members:
            try:
                await member.session_ended()
            except Exception:
                logger.warning("ending a socket or stream of an ended session failed", exc_info=True)


_watches: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SessionWatch]" = weakref.WeakKeyDictionary()
_watches_lock = threading.Lock()  # signals reach the watches from other threads


def _watch() -> SessionWatch:
    loop = asyncio.get_running_loop()
    with _watches_lock:
        watch = _watches.get(loop)
        if watch is None:
            watch = _watches[loop] = SessionWatch()
    return watch


def _in_every_loop(method: str, *args) -> None:
    with _watches_lock:
        watches = list(_watches.items())
    for loop, watch in watches:
        if watch.members:
            try:
                loop.call_soon_threadsafe(getattr(watch, method), *args)
            except RuntimeError:  # that loop is closed
                pass


def check_soon() -> None:
    """From any thread: this process checks the sessions of its sockets and streams now."""
    _in_every_loop("wake")


def end_soon(session_key: str) -> None:
    """From any thread: this process ends the sockets and streams of a session that is over, now."""
    _in_every_loop("end_key", session_key)


def watch(ref: SessionRef, member: Member) -> None:
    """Call `member.session_ended()` once, within about CHORUS_SESSION_CHECK_SECONDS of the session ending."""
    _watch().add(ref, member)


def unwatch(ref: SessionRef, member: Member) -> None:
    with _watches_lock:
        watch = _watches.get(asyncio.get_running_loop())
    if watch is not None:
        watch.discard(ref, member)
