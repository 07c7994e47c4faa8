"""The JSON API (docs/api.md): conversations, their messages and events, teams, and AG-UI (agui.py).

Described by django-ninja, which builds the OpenAPI 3.1 document at /api/schema/ (and the browsable docs at
/api/docs/) from these operations and their schemas. A program authenticates with `Authorization: Bearer
<token>` (tokens.py), the page with its session cookie and a CSRF token. Every error is one JSON shape,
`{"error": {"code", "detail"}}`, with the protocol's codes (docs/protocol.md); the error handlers below turn
ninja's own errors (validation, authentication, a body that is not JSON) into that shape.
"""

import json
from typing import Annotated, Literal
from urllib.parse import urlencode
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from ninja import Field, File, NinjaAPI, Query, Schema, Status, UploadedFile
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.openapi.docs import Swagger
from ninja.parser import Parser
from ninja.security import APIKeyCookie, HttpBearer
from pydantic import BaseModel, ConfigDict

from agents_app.domain import human_input, selectors, services
from agents_app.domain.events import message_payload
from agents_app.domain.validation import parse_seq, storable
from agents_app.models import Attachment, Conversation, Team
from agents_app.web import sse, tokens
from agents_app.web.middleware import _BY_STATUS as ERRORS_BY_STATUS

THROTTLED = ("rate_limited", "too_many_runs", "budget_exceeded")
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # attachments.IMAGE_TYPES
SSE_MEDIA_TYPE = "text/event-stream"


# --- Errors -------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A refused request: answered as {"error": {"code", "detail"}} with `status`."""

    def __init__(self, code: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status


class InvalidJson(Exception):
    pass


def _error(code: str, detail: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status)


def NOT_FOUND() -> ApiError:  # noqa: N802 - reads as the answer it is
    # The same answer whether the conversation is someone else's or does not exist.
    return ApiError("not_found", "No such conversation.", status=404)


def csrf_failure(request, reason: str = ""):
    """CSRF failures: JSON for the API, Django's page elsewhere (settings.CSRF_FAILURE_VIEW)."""
    if request.path.startswith("/api/"):
        return _error("csrf_failed", "Send the csrftoken cookie's value in an X-CSRFToken header.", status=403)
    from django.views.csrf import csrf_failure as django_csrf_failure

    return django_csrf_failure(request, reason=reason)


class ErrorBody(Schema):
    code: str = Field(description="Stable, for programs: the table in docs/api.md lists them.")
    detail: str = Field(description="A sentence for the person.")


class Error(Schema):
    error: ErrorBody


def errors(*statuses: int) -> dict:
    """The error answers an operation may give, for its `response=`."""
    return dict.fromkeys((401, 500, *statuses), Error)


# --- Authentication -----------------------------------------------------------------------------------------


class BearerToken(HttpBearer):
    """`Authorization: Bearer <token>`: a personal API token (tokens.ApiTokenMiddleware has checked it)."""

    openapi_description = "A personal API token: make one on /settings/ or with `manage.py api_token create`."

    def __call__(self, request: HttpRequest):
        token = getattr(request, "api_token", None)
        return token.user if token is not None else None

    def authenticate(self, request, token):  # the middleware did it
        return None


class SessionCookie(APIKeyCookie):
    """The page's session cookie; a request that changes anything also needs the CSRF token (X-CSRFToken)."""

    param_name = settings.SESSION_COOKIE_NAME
    openapi_description = "The session of the login form. Writes also need X-CSRFToken: the csrftoken cookie's value."

    def __call__(self, request: HttpRequest):
        if getattr(request, "api_token", None) is not None or not request.user.is_authenticated:
            return None
        # ninja's views are exempt from the CSRF middleware: the check is made here, for sessions only.
        rejected = CsrfViewMiddleware(lambda r: None).process_view(request, lambda r: None, (), {})
        if rejected is not None:
            raise ApiError("csrf_failed", "Send the csrftoken cookie's value in an X-CSRFToken header.", status=403)
        return request.user

    def authenticate(self, request, key):  # __call__ does it
        return None


class JsonBodies(Parser):
    """JSON only (the middleware answers form bodies first); too deep a nesting is not JSON either."""

    def parse_body(self, request):
        try:
            return json.loads(request.body)
        except (ValueError, RecursionError) as exc:
            raise InvalidJson from exc


api = NinjaAPI(
    title="Chorus API",
    version="1",
    description=(
        "Chat with AutoGen multi-agent teams from a program. Authenticate with `Authorization: Bearer <token>` "
        "(make a token on /settings/ or with `manage.py api_token create`). Streams are Server-Sent Events; "
        "their events are those of the WebSocket protocol v1. docs/api.md has examples."
    ),
    urls_namespace="api",
    openapi_url="/schema/",
    docs_url="/docs/",
    docs=Swagger(settings={"persistAuthorization": False, "tryItOutEnabled": False}),
    auth=[BearerToken(), SessionCookie()],
    parser=JsonBodies(),
)


@api.exception_handler(ApiError)
def _api_error(request, exc: ApiError):
    response = _error(exc.code, exc.detail, status=exc.status)
    if exc.status == 401:
        response["WWW-Authenticate"] = "Bearer"
    if exc.code == "budget_exceeded":  # a daily budget is spent: say when it resets (00:00 UTC)
        from agents_app.domain.usage import seconds_until_reset

        response["Retry-After"] = str(seconds_until_reset())
    return response


@api.exception_handler(AuthenticationError)
def _not_authenticated(request, exc):
    response = _error("not_authenticated", "Log in first, or send Authorization: Bearer <token>.", status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


# A field whose bad value has a code of its own, as the socket names it; any other field is `invalid_body`
# (`invalid_query` for a query parameter).
_FIELD_CODES = {"team": "unknown_team", "client_id": "invalid_client_id"}


@api.exception_handler(NinjaValidationError)
def _invalid(request, exc: NinjaValidationError):
    first = exc.errors[0] if exc.errors else {}
    loc = [str(part) for part in first.get("loc", ())]
    where = loc[0] if loc else "body"
    field = next((part for part in loc[1:] if part in _FIELD_CODES), None)
    if field is not None:
        code = _FIELD_CODES[field]
    else:
        code = "invalid_query" if where == "query" else "invalid_body"
    name = ".".join(part for part in loc[1:] if part not in ("payload", "body")) or "the body"
    message = str(first.get("msg", "is not valid"))[:200]
    return _error(code, f"{name}: {message}")


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, InvalidJson):
        return _error("invalid_json", "The body is not valid JSON.")
    code, detail = ERRORS_BY_STATUS.get(exc.status_code, ("error", str(exc)))
    return _error(code, detail, status=exc.status_code)


def _writer(request) -> None:
    if tokens.is_read_only(request):
        raise ApiError("read_only_token", "This API token is read-only: it cannot change anything.", status=403)


def _own_conversation(request, conversation_id) -> Conversation:
    conversation = selectors.conversation_for_user(user=request.auth, conversation_id=conversation_id)
    if conversation is None:
        raise NOT_FOUND()
    return conversation


def _status_of(code: str) -> int:
    return 429 if code in THROTTLED else 400


# --- Schemas ------------------------------------------------------------------------------------------------
# Bodies are plain pydantic models: a ninja Schema reads attributes off any object (for ORM rows), so it would take
# `[]` for a body whose fields all have defaults.

DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class TeamOut(Schema):
    slug: str
    name: str
    description: str
    is_default: bool


class ConversationOut(Schema):
    id: UUID
    title: str = Field(description="Empty until named: the first message's first 60 characters name it.")
    team: str = Field(description="The slug of its team, which never changes.")
    last_seq: int = Field(description="The highest seq of a stored event.")
    created_at: DateTime
    updated_at: DateTime = Field(description="The last activity (a message, a run starting or ending).")
    waiting_for_input: bool = Field(
        False, description="A run of it waits for your answer to a question (POST .../input/ answers it)."
    )


class ConversationIn(BaseModel):
    team: str | None = Field(None, description="A team's slug (GET /api/teams/); default: the default team.")
    title: str = Field("", description="Trimmed and cut to 200 characters; default: named by its first message.")


class ConversationPatch(BaseModel):
    title: str = Field(description="The new title: trimmed and cut to 200 characters; empty: unnamed.")


class AttachmentOut(Schema):
    """A file given to the agents (POST .../attachments/), as a `message` event lists it."""

    id: UUID
    name: str = Field(description="The file's name as uploaded (for display only).")
    content_type: str = Field(description="Decided from the file's content, not its name.")
    size: int
    url: str = Field(description="Where its owner downloads it (GET, with the same authentication).")


class MessageOut(Schema):
    """A stored message, as the `message` event carries it (docs/protocol.md)."""

    model_config = ConfigDict(extra="allow")  # what later versions add reaches clients, as on the socket

    id: UUID
    run_id: UUID | None
    role: Literal["user", "assistant", "tool"]
    source: str
    content: str
    html: str = Field(description="`content` rendered as Markdown on the server, sanitised: safe to insert.")
    is_final_answer: bool
    incomplete: bool
    seq: int
    created_at: DateTime
    attachments: list[AttachmentOut] = Field(description="The files a person's message carries (an agent's: none).")


class MessageIn(BaseModel):
    content: str = Field(
        description="The text; trimmed, up to CHORUS_MAX_MESSAGE_CHARS (8000) characters; empty only with attachments."
    )
    attachments: list[str] | None = Field(
        None,
        description="Ids of files uploaded into this conversation (POST .../attachments/) and not sent yet: at most "
        "CHORUS_ATTACHMENTS_MAX_PER_MESSAGE (5).",
    )
    client_id: str | None = Field(
        None, description="An idempotency key (1 to 64 characters), unique per conversation: a resend changes nothing."
    )


class SendOut(Schema):
    message: MessageOut
    run_id: UUID | None = Field(description="The run that answers it.")


class InputIn(BaseModel):
    request_id: str = Field(description="The question's id: the `request_id` of its `input.request` event.")
    content: str = Field(description="The answer: an option's label (`Approve`) or any text, checked as a message.")


class InputOut(Schema):
    request_id: UUID
    run_id: UUID = Field(description="The run that asked; it goes on with the answer, its events on the streams.")
    message: MessageOut = Field(description="The answer, stored as your message in the run.")


class CancelIn(BaseModel):
    run_id: str | None = Field(None, description="The run to stop; default: the active run.")


class CancelOut(Schema):
    run_id: UUID
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="`cancelled` when it was queued; `running` while its worker stops it: its run.finished follows."
    )


NO_FIELDS = ConversationIn()  # an empty body: the defaults
NO_RUN_ID = CancelIn()


def conversation_payload(conversation: Conversation) -> dict:
    return {
        "id": str(conversation.id),
        "title": conversation.title,
        "team": conversation.team.slug,
        "last_seq": conversation.last_seq,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "waiting_for_input": _waiting_for_input(conversation),
    }


def _waiting_for_input(conversation: Conversation) -> bool:
    waiting = getattr(conversation, "waiting_for_input", None)  # annotated by the list's query
    if waiting is None:
        waiting = conversation.id in human_input.waiting_conversation_ids([conversation.id])
    return bool(waiting)


def team_payload(team: Team) -> dict:
    return {"slug": team.slug, "name": team.name, "description": team.description, "is_default": team.is_default}


# One Server-Sent Event of a stream, as OpenAPI 3.2 describes a stream's items: its `data` is a JSON event.
SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event. `data`: the event, as JSON; `id`: its seq (for Last-Event-ID).",
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}


def sse_response(description: str) -> dict:
    """openapi_extra for an operation whose 200 is a stream of Server-Sent Events."""
    return {"responses": {200: {"description": description, "content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT}}}}}


# --- Teams and conversations --------------------------------------------------------------------------------


@api.get("/teams/", response={200: list[TeamOut], **errors()}, tags=["teams"], summary="List the enabled teams")
def teams(request):
    return [team_payload(team) for team in selectors.team_list_enabled()]


@api.get(
    "/conversations/",
    response={200: list[ConversationOut], **errors(400)},
    tags=["conversations"],
    summary="List your conversations",
)
def conversations(
    request,
    response: HttpResponse,
    q: str = Query("", max_length=200, description="Only those whose title or a message contains this."),
    limit: int = Query(200, ge=1, le=200, description="At most this many."),
    offset: int = Query(
        0, ge=0, le=10**9, description="Skip this many (the `Link: rel=next` header has the next page)."
    ),
):
    """Your conversations, most recently active first. With `q`, only those whose title or a message you can
    see contains `q` (case-insensitive). A `Link` header with `rel="next"` names the next page."""
    query = q.strip()
    if not storable(query):
        raise ApiError("invalid_text", "q contains a NUL or an unpaired surrogate.")
    items = list(selectors.conversation_list_for_user(user=request.auth, query=query)[offset : offset + limit + 1])
    if len(items) > limit:
        items = items[:limit]
        params = {"limit": limit, "offset": offset + limit, **({"q": query} if query else {})}
        response["Link"] = f'<{request.path}?{urlencode(params)}>; rel="next"'
    return [conversation_payload(conversation) for conversation in items]


@api.post(
    "/conversations/",
    response={201: ConversationOut, **errors(400, 403, 409, 413)},
    tags=["conversations"],
    summary="Start a conversation",
)
def conversation_create(request, payload: ConversationIn = NO_FIELDS):
    """A new conversation with `team` (default: the default team). Without `title`, its first message names
    it."""
    _writer(request)
    if not storable(payload.title):
        raise ApiError("invalid_text", "The title contains a NUL or an unpaired surrogate, which cannot be stored.")
    team = None
    if payload.team is not None:
        slug = payload.team
        team = selectors.team_list_enabled().filter(slug=slug).first() if storable(slug) else None
        if team is None:
            raise ApiError("unknown_team", "No enabled team has that slug; GET /api/teams/ lists them.")
    try:
        conversation = services.conversation_create(owner=request.auth, team=team, title=payload.title)
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=409) from None
    return Status(201, conversation_payload(conversation))


@api.get(
    "/conversations/{uuid:conversation_id}/",
    response={200: ConversationOut, **errors(404)},
    tags=["conversations"],
    summary="Get a conversation",
)
def conversation_detail(request, conversation_id: UUID):
    return conversation_payload(_own_conversation(request, conversation_id))


@api.patch(
    "/conversations/{uuid:conversation_id}/",
    response={200: ConversationOut, **errors(400, 403, 404, 413)},
    tags=["conversations"],
    summary="Rename a conversation",
)
def conversation_rename(request, conversation_id: UUID, payload: ConversationPatch):
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    if not storable(payload.title):
        raise ApiError("invalid_text", "The title contains a NUL or an unpaired surrogate, which cannot be stored.")
    services.conversation_rename(conversation=conversation, title=payload.title)
    return conversation_payload(conversation)


@api.delete(
    "/conversations/{uuid:conversation_id}/",
    response={204: None, **errors(403, 404, 409)},
    tags=["conversations"],
    summary="Delete a conversation",
)
def conversation_delete(request, conversation_id: UUID):
    """Deletes the conversation, its messages and runs. Refused (409 `run_in_progress`) while it answers: stop
    the answer first (POST .../cancel/)."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    try:
        services.conversation_delete(conversation=conversation)
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=409) from None
    return Status(204, None)


# --- Messages, events, cancel -------------------------------------------------------------------------------


@api.get(
    "/conversations/{uuid:conversation_id}/messages/",
    response={200: list[MessageOut], **errors(404)},
    tags=["messages"],
    summary="List a conversation's messages",
)
def conversation_messages(request, conversation_id: UUID):
    """The messages, in seq order, as the `message` event shows them (a team's hidden steps left out)."""
    conversation = _own_conversation(request, conversation_id)
    return [message_payload(m) for m in selectors.message_list_for_conversation(conversation=conversation)]


@api.post(
    "/conversations/{uuid:conversation_id}/messages/",
    response={200: SendOut, 201: SendOut, **errors(400, 403, 404, 413, 429)},
    tags=["messages"],
    summary="Send a message",
    openapi_extra={
        "responses": {
            200: {
                "description": "With `Accept: text/event-stream`: the events from the echo of your message to its "
                "run's `run.finished`, as Server-Sent Events (`id:` seq, `event:` type, `data:` the event). "
                "Otherwise: the message stored earlier under this `client_id` (nothing new was stored).",
                "content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT}},
            },
            201: {"description": "Stored; its run is queued. Follow it with GET .../events/."},
        }
    },
)
async def conversation_send(request, conversation_id: UUID, payload: MessageIn):
    """Stores the message and queues an answer from the conversation's team: checked exactly as the socket's
    `send` is. Answers 201 (a program that wants the answer follows GET .../events/), or streams the answer
    with `Accept: text/event-stream`."""
    user = request.auth
    conversation = await sync_to_async(_own_conversation)(request, conversation_id)
    _writer(request)
    try:
        outcome = await sync_to_async(services.message_send)(
            conversation=conversation,
            content=payload.content,
            client_id=payload.client_id,
            attachments=payload.attachments,
        )
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=_status_of(exc.code)) from None
    if SSE_MEDIA_TYPE in request.headers.get("Accept", ""):
        run_id = str(outcome.run.id) if outcome.run else None
        ref = tokens.auth_ref(request, user)
        return event_stream(sse.stream(conversation, outcome.message.seq - 1, ref, until_run_id=run_id))
    body = {"message": message_payload(outcome.message), "run_id": str(outcome.run.id) if outcome.run else None}
    return Status(201 if outcome.created else 200, body)


@api.get(
    "/conversations/{uuid:conversation_id}/events/",
    response={200: None, **errors(400, 404)},
    tags=["messages"],
    summary="Follow a conversation's events",
    openapi_extra=sse_response(
        "Every event after `Last-Event-ID` (or `after_seq`), then live ones, as Server-Sent Events: `id:` the "
        "seq, `event:` the type, `data:` the event's JSON, as on the WebSocket. It never ends on its own."
    ),
)
async def conversation_events(
    request,
    conversation_id: UUID,
    after_seq: str | None = Query(None, description="Replay the events after this seq (0: from the start)."),
):
    """Server-Sent Events of the conversation from `Last-Event-ID` (a header, as EventSource sends it when it
    reconnects; it wins) or `?after_seq=`, then live. A line `: keep-alive` comes after 15 s of quiet."""
    conversation = await sync_to_async(_own_conversation)(request, conversation_id)
    given = request.headers.get("Last-Event-ID") or after_seq or "0"
    seq = parse_seq(given)
    if seq is None:
        raise ApiError("invalid_after_seq", "Last-Event-ID and after_seq are whole numbers from 0 to 2**63 - 1.")
    return event_stream(sse.stream(conversation, seq, tokens.auth_ref(request, request.auth)))


@api.post(
    "/conversations/{uuid:conversation_id}/input/",
    response={200: InputOut, **errors(400, 403, 404, 409, 413, 429)},
    tags=["messages"],
    summary="Answer a team's question",
)
def conversation_input(request, conversation_id: UUID, payload: InputIn):
    """Answers the question a waiting run asked (its `input.request` event), as the socket's `input.response`
    does: the answer is stored as your message and the run goes on, with the same run id, on the
    conversation's streams. 404 `input_not_found` (no such question here), 409 `input_already_answered`,
    409 `input_not_waiting` (the run was stopped or expired)."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    try:
        outcome = human_input.input_answer(
            conversation=conversation, user=request.auth, request_id=payload.request_id, content=payload.content
        )
    except services.ChatError as exc:
        status = INPUT_ERROR_STATUS.get(exc.code) or _status_of(exc.code)
        raise ApiError(exc.code, exc.detail, status=status) from None
    body = {
        "request_id": payload.request_id,
        "run_id": str(outcome.run.id),
        "message": message_payload(outcome.message),
    }
    return Status(200, body)


INPUT_ERROR_STATUS = {"input_not_found": 404, "input_already_answered": 409, "input_not_waiting": 409}


@api.post(
    "/conversations/{uuid:conversation_id}/cancel/",
    response={202: CancelOut, **errors(400, 403, 404, 409, 413)},
    tags=["messages"],
    summary="Stop the answer in progress",
)
def conversation_cancel(request, conversation_id: UUID, payload: CancelIn = NO_RUN_ID):
    """Stops the active run (or the one `run_id` names, if it is the active one), as the socket's `cancel`
    does: a queued run ends at once; a running one is stopped by its worker, and its `run.finished` (status
    `cancelled`) follows on the conversation's streams. 409 `no_active_run` when nothing is answering."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    run_id = payload.run_id
    try:
        run = services.run_cancel(conversation=conversation, run_id=run_id)
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=409) from None
    return Status(202, {"run_id": str(run.id), "status": run.status})


# --- Attachments --------------------------------------------------------------------------------------------


@api.post(
    "/conversations/{uuid:conversation_id}/attachments/",
    response={201: AttachmentOut, **errors(400, 403, 404, 409, 413)},
    tags=["attachments"],
    summary="Upload a file for the agents",
)
def attachment_upload(request, conversation_id: UUID, file: File[UploadedFile]):
    """Stores one file (multipart/form-data, field `file`) in the conversation; send it with a message by
    listing its `id` in the message's `attachments`. Its type is decided from its content: images (PNG, JPEG,
    GIF, WebP), PDFs and text files (plain text, Markdown, CSV, JSON, code); anything else is refused, as is a
    file over the size or image-dimension limits (docs/api.md), before it is stored."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    try:
        attachment = services.attachment_create(conversation=conversation, upload=file)
    except services.ChatError as exc:
        status = {"file_too_large": 413, "image_too_large": 413, "too_many_unsent_attachments": 409}.get(exc.code, 400)
        raise ApiError(exc.code, exc.detail, status=status) from None
    return Status(201, attachment.payload())


@api.get(
    "/conversations/{uuid:conversation_id}/attachments/{uuid:attachment_id}/",
    response={200: None, **errors(404)},
    tags=["attachments"],
    summary="Download an attachment",
    openapi_extra={
        "responses": {
            200: {
                "description": "The file: an image as itself, anything else as a download (application/octet-stream).",
                "content": {media: {"schema": {}} for media in (*IMAGE_MEDIA_TYPES, "application/octet-stream")},
            }
        }
    },
)
def attachment_download(request, conversation_id: UUID, attachment_id: UUID):
    """The file, to its conversation's owner (and staff, on the admin's transcripts). Images are shown inline;
    anything else downloads (`Content-Disposition: attachment`), and nothing is sniffed by the browser."""
    attachment = _attachment_for(request, conversation_id, attachment_id)
    inline = attachment.kind == Attachment.Kind.IMAGE
    # Anything not an image is served as bytes to save, whatever it is: a browser renders none of it.
    served_as = attachment.content_type if inline else "application/octet-stream"
    try:
        handle = attachment.file.open("rb")
    except (FileNotFoundError, OSError):
        raise ApiError("not_found", "No such attachment.", status=404) from None
    response = FileResponse(handle, as_attachment=not inline, filename=attachment.name, content_type=served_as)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = "private, max-age=3600"
    return response


@api.delete(
    "/conversations/{uuid:conversation_id}/attachments/{uuid:attachment_id}/",
    response={204: None, **errors(403, 404, 409)},
    tags=["attachments"],
    summary="Remove a file not sent yet",
)
def attachment_remove(request, conversation_id: UUID, attachment_id: UUID):
    """Deletes an uploaded file that no message carries yet. 409 `attachment_sent` once a message carries it:
    it stays with its message (deleting the conversation deletes it)."""
    conversation = _own_conversation(request, conversation_id)
    _writer(request)
    attachment = Attachment.objects.filter(id=attachment_id, conversation=conversation).first()
    if attachment is None:
        raise ApiError("not_found", "No such attachment.", status=404)
    try:
        services.attachment_delete(attachment=attachment)
    except services.ChatError as exc:
        raise ApiError(exc.code, exc.detail, status=409) from None
    return Status(204, None)


def _attachment_for(request, conversation_id, attachment_id) -> Attachment:
    user = request.auth
    found = Attachment.objects.filter(id=attachment_id, conversation_id=conversation_id)
    if not user.is_staff:  # staff read any transcript in the admin, attachments included
        found = found.filter(conversation__owner=user)
    attachment = found.first()
    if attachment is None:
        raise ApiError("not_found", "No such attachment.", status=404)
    return attachment


def event_stream(chunks) -> StreamingHttpResponse:
    response = StreamingHttpResponse(chunks, content_type=SSE_MEDIA_TYPE)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy must not hold frames back
    return response


# These modules add their operations to `api` when imported: AG-UI's, and the chat page's.
from agents_app.web import agui, api_page  # noqa: E402

__all__ = ["api", "agui", "api_page", "csrf_failure"]
