"""JSON API with session authentication (and CSRF on writes, as for any session-authenticated form)."""

import json

from django.http import Http404, HttpResponseNotAllowed, JsonResponse

from agents_app import selectors, services
from agents_app.events import message_payload
from agents_app.models import Conversation, Team


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
        return HttpResponseNotAllowed(["GET", "POST"])
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return _error("invalid_json", "The body is not valid JSON.")
    if not isinstance(body, dict):
        return _error("invalid_body", "The body must be a JSON object.")
    team = None
    if body.get("team") is not None:
        team = selectors.team_list_enabled().filter(slug=str(body["team"])).first()
        if team is None:
            return _error("unknown_team", "No enabled team has that slug; GET /api/teams/ lists them.")
    title = body.get("title", "")
    if not isinstance(title, str):
        return _error("invalid_body", '"title" must be a string.')
    try:
        conversation = services.conversation_create(owner=request.user, team=team, title=title)
    except services.ChatError as exc:
        return _error(exc.code, exc.detail, status=409)
    return JsonResponse(conversation_payload(conversation), status=201)


@api_login_required
def conversation_messages(request, conversation_id):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    conversation = selectors.conversation_for_user(user=request.user, conversation_id=conversation_id)
    if conversation is None:
        raise Http404("No such conversation.")
    items = selectors.message_list_for_conversation(conversation=conversation)
    return JsonResponse([message_payload(m) for m in items], safe=False)


@api_login_required
def teams(request):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    return JsonResponse([team_payload(t) for t in selectors.team_list_enabled()], safe=False)
