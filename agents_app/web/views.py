"""Server-rendered pages: sign-up, the chat page (a new conversation, or one with its full history, beside the
person's conversations), and a shared conversation's read-only page."""

import json

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from agents_app.domain import events, feedback, human_input, selectors, services, sharing, usage
from agents_app.web.forms import ConversationCreateForm, SignUpForm


@require_http_methods(["GET", "POST"])
def signup(request):
    if not settings.CHORUS_SIGNUP_ENABLED:
        raise Http404("Sign-up is turned off.")
    if request.user.is_authenticated:
        return redirect("conversation-list")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("conversation-list")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def conversation_list(request):
    """A new conversation, not stored until its first message is sent (the page creates it then), beside the
    person's conversations (the sidebar, filled by the page from the API)."""
    return render(
        request,
        "agents_app/conversation_detail.html",
        {
            "conversation": None,
            "history": [],
            "teams": selectors.team_list_enabled(),
            "max_chars": settings.CHORUS_MAX_MESSAGE_CHARS,
        },
    )


@login_required
@require_POST
def conversation_create(request):
    form = ConversationCreateForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick one of the listed teams.")
        return redirect("conversation-list")
    try:
        conversation = services.conversation_create(owner=request.user, team=form.cleaned_data["team"])
    except services.ChatError as exc:
        messages.error(request, exc.detail)
        return redirect("conversation-list")
    return redirect("conversation-detail", conversation_id=conversation.id)


@login_required
def conversation_detail(request, conversation_id):
    conversation = selectors.conversation_for_user(user=request.user, conversation_id=conversation_id)
    if conversation is None:
        raise Http404("No such conversation.")
    history = selectors.conversation_transcript(conversation=conversation)
    ratings = feedback.feedback_by_message(user=request.user, conversation=conversation)
    for entry in history:
        for message in entry.get("answers", ()):
            message["feedback"] = ratings.get(message["id"])
    active_run = selectors.run_active_for_conversation(conversation_id=conversation.id)
    # The question a waiting run asked, as its input.request event: the page shows it after a reload.
    asked = human_input.open_request_for_conversation(conversation=conversation) if active_run else None
    return render(
        request,
        "agents_app/conversation_detail.html",
        {
            "conversation": conversation,
            "history": history,
            "active_run": active_run,
            "waiting_for_input": asked is not None,
            # As JSON in a data attribute: the page's script draws its card (no inline script).
            "input_request": json.dumps(events.input_request_event(asked)) if asked else "",
            "max_chars": settings.CHORUS_MAX_MESSAGE_CHARS,
        },
    )


def shared_conversation(request, link_id, secret):
    """A conversation shared by its owner: read-only, no login, nothing else of the owner's (no socket, no
    API, no files, no other conversation). A revoked or wrong link is a 404 like any unknown page."""
    conversation = sharing.shared_conversation(link_id=link_id, secret=secret)
    if conversation is None:
        raise Http404("No such shared conversation.")
    history = selectors.conversation_transcript(conversation=conversation)
    for entry in history:  # the owner's files stay theirs: a shared page names them but does not serve them
        if entry["kind"] == "message":
            entry["message"]["attachments"] = []
    response = render(request, "agents_app/shared_conversation.html", {"conversation": conversation,
                      "history": history, "read_only": True})  # fmt: skip
    response["X-Robots-Tag"] = "noindex"
    response["Referrer-Policy"] = "no-referrer"
    return response


def healthz(request):
    """Under ASGI, /healthz (with /readyz and /metrics) is answered before Django by agents_app.ops.health.OpsEndpoints,
    whatever the Host; this view answers the same for Django's own test client."""
    return HttpResponse("ok", content_type="text/plain")


@login_required
def settings_usage(request):
    """The person's own usage: today's tokens against their daily budget, and each day of the last `?days=`."""
    context = {"settings_section": "usage", "choices": (7, 30, 90, 365)}
    try:
        days = usage.parse_days(request.GET.get("days"))
    except ValueError as exc:
        return render(request, "agents_app/settings_usage.html", {**context, "error": str(exc)}, status=400)
    report = usage.person_usage(request.user, usage.Period.last(days))
    return render(request, "agents_app/settings_usage.html", {**context, **report, "days": days})
