"""Server-rendered pages: sign-up, the conversation list, and the chat page with its full history."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from agents_app import selectors, services, usage
from agents_app.forms import ConversationCreateForm, SignUpForm


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
    conversations = selectors.conversation_list_for_user(user=request.user)
    return render(
        request,
        "agents_app/conversation_list.html",
        {"conversations": conversations, "form": ConversationCreateForm()},
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
    active_run = selectors.run_active_for_conversation(conversation_id=conversation.id)
    return render(
        request,
        "agents_app/conversation_detail.html",
        {
            "conversation": conversation,
            "history": history,
            "active_run": active_run,
            "max_chars": settings.CHORUS_MAX_MESSAGE_CHARS,
        },
    )


def healthz(request):
    """Under ASGI, /healthz (with /readyz and /metrics) is answered before Django by agents_app.health.OpsEndpoints,
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
