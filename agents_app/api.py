"""JSON API with session authentication (and CSRF on writes, as for any session-authenticated form)."""

import json

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse, StreamingHttpResponse
from django.http.request import RawPostDataException

from agents_app import selectors, services, sse
from agents_app.events import message_payload
from agents_app.models import Conversation, Team
from agents_app.session_watch import SessionRef
from agents_app.validation import parse_seq, storable


def api_login_required(view):
    """Like login_required, but a 401 JSON answer instead of a redirect to the login page."""

    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": {"code": "not_authenticated", "detail": "Log in first."}}, status=401)
        return view(request, *args, **kwargs)

    wrapped.__name__ = view.__name__
    return wrapped


def _error(code: str, detail: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status)


def NOT_FOUND() -> JsonResponse:  # noqa: N802 - reads as the answer it is
    # The same answer whether the conversation is someone else's or does not exist.
    return _error("not_found", "No such conversation.", status=404)


def _json_body(request) -> tuple[object, JsonResponse | None]:
    """The request's JSON body (an empty body is `{}`), or the error answer."""
    try:
        raw = request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return None, _error("body_too_large", f"Bodies are limited to {limit} bytes.", status=413)
    except RawPostDataException:  # read as a form already (middleware.py answers these first)
        return None, _error("invalid_json", "The body is not valid JSON.")
    try:
        return json.loads(raw or b"{}"), None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None, _error("invalid_json", "The body is not valid JSON.")


def _not_allowed(methods: list[str]) -> JsonResponse:
    response = _error("method_not_allowed", f"Use {' or '.join(methods)}.", status=405)
    response["Allow"] = ", ".join(methods)
    return response


def csrf_failure(request, reason: str = ""):
    """CSRF failures: JSON for the API, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return _error("csrf_failed", "Send the csrftoken cookie's value in an X-CSRFToken header.", status=403)
    from django.views.csrf import csrf_failure as django_csrf_failure

    return django_csrf_failure(request, reason=reason)


def conversation_payload(conversation: Conversation) -> dict:
    return {
        "id": str(conversation.id),
        "title": conversation.title,
        "team": conversation.team.slug,
        "last_seq": conversation.last_seq,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def team_payload(team: Team) -> dict:
    return {"slug": team.slug, "name": team.name, "description": team.description, "is_default": team.is_default}


@api_login_required
def conversations(request):
    if request.method == "GET":
        items = selectors.conversation_list_for_user(user=request.user)[:200]
        return JsonResponse([conversation_payload(c) for c in items], safe=False)
    if request.method != "POST":
        return _not_allowed(["GET", "POST"])
    body, error = _json_body(request)
    if error is not None:
        return error
    if not isinstance(body, dict):
        return _error("invalid_body", "The body must be a JSON object.")
    title = body.get("title", "")
    if not isinstance(title, str):
        return _error("invalid_body", '"title" must be a string.')
    if not storable(title):
        return _error("invalid_text", "The title contains a NUL or an unpaired surrogate, which cannot be stored.")
    team = None
    if body.get("team") is not None:
        slug = str(body["team"])
        team = selectors.team_list_enabled().filter(slug=slug).first() if storable(slug) else None
        if team is None:
            return _error("unknown_team", "No enabled team has that slug; GET /api/teams/ lists them.")
    try:
        conversation = services.conversation_create(owner=request.user, team=team, title=title)
    except services.ChatError as exc:
        return _error(exc.code, exc.detail, status=409)
    return JsonResponse(conversation_payload(conversation), status=201)


async def conversation_messages(request, conversation_id):
    """GET: the messages, in seq order. POST {"content", "client_id"?}: send one; answers 201 with the stored
    message, or, with `Accept: text/event-stream`, streams the events from its echo to its run's end."""
    user = await request.auser()
    if not user.is_authenticated:
        return _error("not_authenticated", "Log in first.", status=401)
    if request.method not in ("GET", "POST"):
        return _not_allowed(["GET", "POST"])
    conversation = await sync_to_async(selectors.conversation_for_user)(user=user, conversation_id=conversation_id)
    if conversation is None:
        return NOT_FOUND()
    if request.method == "GET":
        items = await sync_to_async(list)(selectors.message_list_for_conversation(conversation=conversation))
        return JsonResponse([message_payload(m) for m in items], safe=False)
    body, error = _json_body(request)
    if error is not None:
        return error
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        return _error("invalid_body", 'The body must be a JSON object with a "content" string.')
    try:
        outcome = await sync_to_async(services.message_send)(
            conversation=conversation, content=body["content"], client_id=body.get("client_id")
        )
    except services.ChatError as exc:
        return _error(exc.code, exc.detail, status=429 if exc.code in ("rate_limited", "too_many_runs") else 400)
    if "text/event-stream" in request.headers.get("Accept", ""):
        run_id = str(outcome.run.id) if outcome.run else None
        session = SessionRef.of(request.session, user)
        return _event_stream(sse.stream(conversation, outcome.message.seq - 1, session, until_run_id=run_id))
    payload = {"message": message_payload(outcome.message), "run_id": str(outcome.run.id) if outcome.run else None}
    return JsonResponse(payload, status=201 if outcome.created else 200)


async def conversation_events(request, conversation_id):
    """GET: Server-Sent Events of the conversation, from `Last-Event-ID` (or `?after_seq=`), then live."""
    user = await request.auser()
    if not user.is_authenticated:
        return _error("not_authenticated", "Log in first.", status=401)
    if request.method != "GET":
        return _not_allowed(["GET"])
    conversation = await sync_to_async(selectors.conversation_for_user)(user=user, conversation_id=conversation_id)
    if conversation is None:
        return NOT_FOUND()
    after_seq = parse_seq(request.headers.get("Last-Event-ID") or request.GET.get("after_seq") or "0")
    if after_seq is None:
        return _error("invalid_after_seq", "Last-Event-ID and after_seq are whole numbers from 0 to 2**63 - 1.")
    return _event_stream(sse.stream(conversation, after_seq, SessionRef.of(request.session, user)))


def _event_stream(chunks) -> StreamingHttpResponse:
    response = StreamingHttpResponse(chunks, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy must not hold frames back
    return response


@api_login_required
def teams(request):
    if request.method != "GET":
        return _not_allowed(["GET"])
    return JsonResponse([team_payload(t) for t in selectors.team_list_enabled()], safe=False)
