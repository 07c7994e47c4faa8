"""Personal API tokens: how a program (a script, a service, an AG-UI front-end) proves who it is.

`Authorization: Bearer <token>` authenticates every route under /api/ (ApiTokenMiddleware), the Server-Sent
Events streams, and the chat WebSocket (BearerTokenRouter, by the handshake's header). A token is shown once,
when it is made; only the SHA-256 hash of it is stored. The secret is 256 random bits, so a fast hash is
enough (there is nothing to guess), and finding a token by its hash through the unique index is what keeps
the comparison constant in time: timing the lookup tells an attacker about hashes, not about the secret.

A token request carries no cookie a browser could attach on its own, so it needs no CSRF token; a request
that logs in by session keeps Django's CSRF protection. A revoked token is refused by the next request, the
next frame of a socket, and its open streams and sockets end within CHORUS_SESSION_CHECK_SECONDS (at once in
the process that revoked it, and at once for sockets everywhere: session_watch.py, consumers.py).
"""

import hashlib
import logging
import secrets
from datetime import timedelta
from typing import NamedTuple

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.security.websocket import WebsocketDenier
from django.db import transaction
from django.http import JsonResponse
from django.utils import timezone

from agents_app.models import ApiToken
from agents_app.web.middleware import API_PREFIX, SyncAndAsyncMiddleware, api_error

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "chorus_"  # noqa: S105 - not a secret: what every token starts with, so scanners can find leaks
SHOWN_CHARS = 12  # "chorus_" and five characters of the secret: enough to tell a person's tokens apart
LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per token


class TokenRef(NamedTuple):
    """A stream or socket opened with a token, watched as session_watch.py watches a session's."""

    token_id: str
    user_id: str
    session_key: None = None  # a token has no session: a logout elsewhere does not end it


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def token_create(*, user, name: str, read_only: bool = False) -> tuple[ApiToken, str]:
    """A new token of `user`, and its secret: the only time the secret exists outside the caller's hands."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name.strip()[:100], prefix=raw[:SHOWN_CHARS], token_hash=hash_token(raw), read_only=read_only
    )
    return token, raw


def token_list_for_user(*, user):
    return ApiToken.objects.filter(user=user).order_by("-created_at")


def token_revoke(*, user, token_id) -> ApiToken | None:
    """Revoke one of `user`'s tokens (a token already revoked stays as it was). None if it is not theirs."""
    token = ApiToken.objects.filter(user=user, id=token_id).first()
    if token is None:
        return None
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        ApiToken.objects.filter(id=token.id, revoked_at__isnull=True).update(revoked_at=token.revoked_at)
        transaction.on_commit(lambda: _end_streams_of(token))
    return token


def _end_streams_of(token: ApiToken) -> None:
    from agents_app.web import session_watch

    session_watch.check_soon()  # this process's streams and sockets of the token end now
    try:  # and its sockets in every other process (their streams end at their next check)
        async_to_sync(get_channel_layer().group_send)(token_group(token.id), {"type": "session.ended"})
    except Exception:  # the revocation holds anyway: every request and frame checks the row
        logger.warning("could not close the sockets of revoked token %s", token.id, exc_info=True)


def token_group(token_id) -> str:
    return f"apitoken.{token_id}"


def token_authenticate(raw: str) -> ApiToken | None:
    """The live token whose secret is `raw` (with its user), or None: unknown, revoked, or its user may not log
    in. Notes the use, at most once a minute per token, so a busy program costs no write per request."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(raw)).first()
    if token is None or token.revoked_at is not None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY:
        ApiToken.objects.filter(id=token.id).update(last_used_at=now)
        token.last_used_at = now
    return token


def tokens_alive(refs) -> set[TokenRef]:
    """The refs whose token is still live (not revoked, its user active), in one query."""
    refs = set(refs)
    if not refs:
        return set()
    live = ApiToken.objects.filter(
        id__in={ref.token_id for ref in refs}, revoked_at__isnull=True, user__is_active=True
    ).values_list("id", "user_id")
    pairs = {(str(token_id), str(user_id)) for token_id, user_id in live}
    return {ref for ref in refs if (ref.token_id, ref.user_id) in pairs}


def token_ref(token: ApiToken) -> TokenRef:
    return TokenRef(str(token.id), str(token.user_id))


def bearer_secret(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for no header or another scheme."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def auth_ref(request, user):
    """What a stream of this request (by `user`) is watched by: its token, or its session."""
    from agents_app.web.session_watch import SessionRef

    token = getattr(request, "api_token", None)
    if token is not None:
        return token_ref(token)
    return SessionRef.of(request.session, user)


def is_read_only(request) -> bool:
    token = getattr(request, "api_token", None)
    return token is not None and token.read_only


def _refusal(detail: str) -> JsonResponse:
    response = api_error("invalid_token", detail, 401)
    response["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


class ApiTokenMiddleware(SyncAndAsyncMiddleware):
    """Under /api/, a request with `Authorization: Bearer <token>` is that token's person: `request.user` and
    `request.auser()` are theirs, `request.api_token` is the token, and Django's CSRF check is off for it (no
    cookie is involved). A token that is unknown, revoked or whose person may not log in gets 401
    `invalid_token` at once. Requests without the header are left to the session, as before. Goes after
    AuthenticationMiddleware. Async-capable: a request without a token costs no hop to a thread."""

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        raw = self._secret(request)
        if raw is None:
            return self.get_response(request)
        return self._apply(request, token_authenticate(raw)) or self.get_response(request)

    async def _acall(self, request):
        raw = self._secret(request)
        if raw is None:
            return await self.get_response(request)
        token = await sync_to_async(token_authenticate)(raw)
        return self._apply(request, token) or await self.get_response(request)

    @staticmethod
    def _secret(request) -> str | None:
        if not request.path.startswith(API_PREFIX):
            return None  # pages log in with the form; a token is for the API
        return bearer_secret(request.headers.get("Authorization"))

    @staticmethod
    def _apply(request, token: ApiToken | None) -> JsonResponse | None:
        if token is None:
            return _refusal("This API token is unknown or revoked.")
        user = token.user

        async def auser():
            return user

        request.user = user
        request.auser = auser
        request.api_token = token
        request._dont_enforce_csrf_checks = True  # a header no other site can make a browser send
        return None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin1")
    return None


class BearerTokenRouter:
    """The chat socket's authentication, for programs: a handshake with `Authorization: Bearer <token>` goes to
    `bearer_app` as that token's person (scope["user"], scope["chorus.api_token"]); any other to `cookie_app`
    (the session cookie and the Origin check). A browser cannot put a header on a WebSocket handshake, so a
    Bearer handshake is a program's: no cookie is used, and no Origin is needed. A bad token is refused (403)."""

    def __init__(self, cookie_app, bearer_app):
        self.cookie_app = cookie_app
        self.bearer_app = bearer_app

    async def __call__(self, scope, receive, send):
        raw = bearer_secret(_header(scope, b"authorization")) if scope["type"] == "websocket" else None
        if raw is None:
            return await self.cookie_app(scope, receive, send)
        token = await sync_to_async(token_authenticate)(raw)
        if token is None:
            return await WebsocketDenier()(scope, receive, send)
        scope = {**scope, "user": token.user, "chorus.api_token": token}
        return await self.bearer_app(scope, receive, send)
