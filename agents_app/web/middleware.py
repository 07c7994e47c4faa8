"""Middleware: JSON errors everywhere under /api/ (HTTP), and the Origin check of the chat socket (ASGI)."""

import re
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.http.request import RawPostDataException, split_domain_port, validate_host
from django.utils.http import is_same_domain

API_PREFIX = "/api/"
UPLOAD_PATH = re.compile(r"^/api/conversations/[0-9a-f-]{36}/attachments/$")
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # a multipart body's boundaries and headers around the file
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_BY_STATUS = {
    400: ("bad_request", "The request could not be read."),
    403: ("forbidden", "Not allowed."),
    404: ("not_found", "No such API route."),
    405: ("method_not_allowed", "This route does not take that method."),
    413: ("body_too_large", "The body is too large."),
    500: ("internal_error", "The server failed. Try again."),
}


def api_error(code: str, detail: str, status: int) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status)


class SyncAndAsyncMiddleware:
    """Django middleware that runs either way, as the stack it sits in does: `__call__` for a sync stack,
    `_acall` (a coroutine) for an async one, so an async request never pays a hop to a thread for it."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)


class JsonApiErrorsMiddleware(SyncAndAsyncMiddleware):
    """Under /api/, every answer is JSON, as docs/protocol.md promises, including what Django answers itself
    before or instead of a view: a body over DATA_UPLOAD_MAX_MEMORY_SIZE (413 `body_too_large`), a form or
    multipart body (400 `invalid_json`: the API reads JSON only, and a multipart body read by the CSRF check
    could no longer be read by the view), a path that is no route, such as a bad UUID (404 `not_found`), a
    server error (500 `internal_error`)."""

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        return self._refused(request) or self._as_json(request, self.get_response(request))

    async def _acall(self, request):
        if not request.path.startswith(API_PREFIX):
            return await self.get_response(request)
        return self._refused(request) or self._as_json(request, await self.get_response(request))

    def _refused(self, request) -> JsonResponse | None:
        if request.method == "POST" and UPLOAD_PATH.match(request.path):
            return self._refused_upload(request)
        try:
            # Read (and kept) here, before anything parses it as a form: the view reads it as JSON.
            body = request.body
        except RequestDataTooBig:
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            return api_error("body_too_large", f"Bodies are limited to {limit} bytes.", status=413)
        except RawPostDataException:
            return api_error("invalid_json", "The body is not valid JSON.", status=400)
        if body and request.content_type in _FORM_TYPES:
            return api_error("invalid_json", "The body must be JSON (Content-Type: application/json).", status=400)
        return None

    def _refused_upload(self, request) -> JsonResponse | None:
        """An attachment upload is the API's one multipart body (api.attachment_upload): left unread here, so
        Django streams its file to disk; one far over the file limit is refused before a byte is read."""
        if request.content_type != "multipart/form-data":
            return api_error("invalid_body", "Upload the file as multipart/form-data, in the field `file`.", 400)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.CHORUS_ATTACHMENT_MAX_BYTES
        if length > limit + UPLOAD_OVERHEAD_BYTES:
            return api_error("file_too_large", f"Files are limited to {limit} bytes.", status=413)
        return None

    def _as_json(self, request, response):
        if response.status_code < 400 or response.get("Content-Type", "").startswith("application/json"):
            return response
        code, detail = _BY_STATUS.get(response.status_code, ("error", response.reason_phrase))
        if code == "not_found" and request.path.startswith(f"{API_PREFIX}conversations/"):
            detail = "No such conversation."
        replacement = api_error(code, detail, status=response.status_code)
        if response.has_header("Allow"):
            replacement["Allow"] = response["Allow"]
        return replacement


def _header(scope, name: bytes) -> str | None:
    value = None
    for key, raw in scope.get("headers", ()):
        if key == name:
            value = raw.decode("latin1")
    return value


def _request_scheme(scope) -> str:
    """http or https, as Django's `request.scheme` says for the same request (SECURE_PROXY_SSL_HEADER)."""
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "ws"), scope.get("scheme", "http"))
    if settings.SECURE_PROXY_SSL_HEADER:
        header, secure_value = settings.SECURE_PROXY_SSL_HEADER
        value = _header(scope, header.removeprefix("HTTP_").lower().replace("_", "-").encode())
        if value is not None:
            scheme = "https" if value.split(",", 1)[0].strip() == secure_value else "http"
    return scheme


def _allowed_hosts() -> list[str]:
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # as Django's get_host()
    return allowed


def _request_host(scope) -> str | None:
    """The host the handshake was sent to, as Django's `request.get_host()` finds it, if ALLOWED_HOSTS allows it;
    else None."""
    host = _header(scope, b"x-forwarded-host") if settings.USE_X_FORWARDED_HOST else None
    host = host or _header(scope, b"host")
    if host is None and scope.get("server"):
        name, port = scope["server"][:2]
        default = 443 if scope.get("scheme") == "wss" else 80
        host = name if port in (None, default) else f"{name}:{port}"
    if not host:
        return None
    domain, _port = split_domain_port(host)
    return host if domain and validate_host(domain, _allowed_hosts()) else None


def origin_allowed(scope) -> bool:
    """Django's CSRF Origin check (CsrfViewMiddleware._origin_verified), for a WebSocket handshake: the Origin must
    be this request's own scheme, host and port, or one of CSRF_TRUSTED_ORIGINS (exactly, or a `*.` pattern).
    A missing Origin is refused: every browser sends one."""
    origin = _header(scope, b"origin")
    if not origin or origin == "null":
        return False
    scheme = _request_scheme(scope)
    host = _request_host(scope)
    if host is not None and origin == f"{scheme}://{host}":
        return True
    if host is None and _header(scope, b"host") is None and not scope.get("server"):
        # No Host at all: only an in-process client (channels' WebsocketCommunicator) builds such a handshake
        # (a WebSocket handshake is HTTP/1.1, which requires Host). It is taken to be addressed to the Origin's
        # host, which must be allowed, on this scheme's default port.
        parsed = _split(origin)
        if parsed is not None and parsed.scheme == scheme:
            domain, port = split_domain_port(parsed.netloc)
            if domain and not port and validate_host(domain, _allowed_hosts()):
                return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    parsed = _split(origin)
    if parsed is None:
        return False
    for pattern in trusted:
        if "*" in pattern:
            allowed = urlsplit(pattern)
            if allowed.scheme == parsed.scheme and is_same_domain(parsed.netloc, allowed.netloc.lstrip("*")):
                return True
    return False


def _split(origin: str):
    try:
        parsed = urlsplit(origin)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return None
    return parsed


class OriginValidator:
    """Refuses a WebSocket handshake (HTTP 403) whose Origin fails the check of `origin_allowed`, so another
    site's page, or this site on another scheme or port, cannot open a socket with the person's cookies."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)
