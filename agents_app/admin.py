"""Admin: teams and budgets are edited here; conversations, runs, messages and tool calls are read-only
transcripts for review, with usage per person, team and day, and exports (docs/admin.md).

Staff with only the view permission see everything and change nothing; only superusers delete."""

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import BigIntegerField, Count, Exists, F, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.http import Http404, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html

from agents_app.domain import export, services, usage
from agents_app.domain.services import ChatError
from agents_app.domain.transcripts import RunBlock, admin_transcript
from agents_app.models import Conversation, Feedback, Message, PersonSettings, Run, Team, ToolCall

TEST_PROMPT = "Say hello and tell me in one sentence what this team does."


class ChorusAdmin(admin.ModelAdmin):
    """Only superusers delete, whatever permissions a staff member was given: a deleted transcript is gone."""

    def has_delete_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser


class ReadOnlyAdmin(ChorusAdmin):
    """Rows written by Chorus itself: reviewed here, never added or edited."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Team)
class TeamAdmin(ChorusAdmin):
    list_display = ("name", "slug", "kind", "enabled", "is_default", "final_speakers", "steps_display",
                    "daily_token_budget", "updated_at")  # fmt: skip
    list_filter = ("kind", "enabled", "steps_display")
    search_fields = ("name", "slug", "description")
    prepopulated_fields = {"slug": ("name",)}
    actions = ["test_team"]
    fieldsets = [
        (None, {"fields": ("name", "slug", "kind", "description", "enabled", "is_default")}),
        ("Answer and steps", {"fields": ("final_speakers", "steps_display")}),
        ("Budget", {"fields": ("daily_token_budget",), "description": "Tokens all of this team's runs may use "
                    "per UTC day, every person together (a router's: the runs it routes). Empty: no limit."}),
        ("Configuration", {"fields": ("config",), "description": "Validated on save: see docs/teams.md."}),
    ]  # fmt: skip

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "config":
            field.widget.attrs.update({"rows": 30, "cols": 110, "class": "vLargeTextField team-config"})
        return field

    @admin.action(description="Test this team: send one short prompt through an agent worker", permissions=["change"])
    def test_team(self, request, queryset):
        """Each team gets a conversation of the admin's own with one short prompt, answered by an agent worker
        like any other (the admin's request never runs a model): the page links to it, to watch it stream."""
        results = [(team, _trial(team, request.user)) for team in queryset[:3]]
        context = {**self.admin_site.each_context(request), "title": "Team test", "prompt": TEST_PROMPT,
                   "results": results, "opts": self.model._meta}  # fmt: skip
        return TemplateResponse(request, "admin/agents_app/team/test_results.html", context)


def _trial(team: Team, user) -> dict:
    if not team.enabled:
        return {"status": "skipped", "detail": "Enable the team first: a test is a conversation like any other."}
    try:
        conversation = services.conversation_create(owner=user, team=team, title=f"Team test: {team.name}")
        outcome = services.message_send(conversation=conversation, content=TEST_PROMPT)
    except ChatError as exc:
        return {"status": "refused", "detail": exc.detail}
    return {
        "status": outcome.run.status,
        "watch_url": reverse("conversation-detail", args=[conversation.id]),
        "transcript_url": reverse("admin:agents_app_conversation_change", args=[conversation.id]),
    }


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ("seq", "role", "source", "content", "is_final_answer", "incomplete", "completion_tokens", "created_at")
    readonly_fields = fields
    ordering = ("seq",)


class ToolCallInline(ReadOnlyInline):
    model = ToolCall
    fields = ("seq", "source", "name", "arguments", "result", "is_error", "duration_ms", "started_at")
    readonly_fields = fields
    ordering = ("seq",)


# Conversations ---------------------------------------------------------------------------------------------


def with_totals(conversations):
    """Each conversation with its message count, tokens and last run's status and error, as subqueries: a page
    of the list costs the same queries whatever its rows (none per row)."""
    messages = Message.objects.filter(conversation=OuterRef("pk")).order_by().values("conversation")
    runs = Run.objects.filter(conversation=OuterRef("pk")).order_by().values("conversation")
    last_run = Run.objects.filter(conversation=OuterRef("pk")).order_by("-created_at")
    return conversations.annotate(
        message_total=Coalesce(
            Subquery(messages.annotate(n=Count("id")).values("n")), Value(0), output_field=BigIntegerField()
        ),
        token_total=Coalesce(
            Subquery(runs.annotate(n=Sum(F("prompt_tokens") + F("completion_tokens"))).values("n")),
            Value(0),
            output_field=BigIntegerField(),
        ),
        last_run_status=Subquery(last_run.values("status")[:1]),
        last_run_error=Subquery(last_run.values("error_code")[:1]),
    )


class RunsFilter(admin.SimpleListFilter):
    title = "runs"
    parameter_name = "runs"

    def lookups(self, request, model_admin):
        return [("failed", "With a failed run"), ("last_failed", "Last run failed"), ("active", "Answering now"),
                ("none", "No runs")]  # fmt: skip

    def queryset(self, request, queryset):
        runs = Run.objects.filter(conversation=OuterRef("pk"))
        if self.value() == "failed":
            return queryset.filter(Exists(runs.filter(status=Run.Status.FAILED)))
        if self.value() == "last_failed":
            return queryset.filter(last_run_status=Run.Status.FAILED)
        if self.value() == "active":
            return queryset.filter(Exists(runs.filter(status__in=Run.ACTIVE_STATUSES)))
        if self.value() == "none":
            return queryset.filter(~Exists(runs))
        return queryset


class LastActivityFilter(admin.DateFieldListFilter):
    def __init__(self, field, request, params, model, model_admin, field_path):
        super().__init__(field, request, params, model, model_admin, field_path)
        self.title = "last activity"


def run_status_text(status: str | None, error_code: str | None) -> str:
    if not status:
        return "—"
    return f"{status} ({error_code})" if error_code else status


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "owner", "team", "message_count", "last_activity", "tokens", "last_run")
    list_filter = ("team", ("owner", admin.RelatedOnlyFieldListFilter), ("updated_at", LastActivityFilter),
                   RunsFilter)  # fmt: skip
    date_hierarchy = "created_at"
    search_fields = ("title", "owner__username", "messages__content")
    list_per_page = 100
    actions = ["export_transcripts", "export_transcripts_markdown"]
    fields = ("title", "owner", "team", "created_at", "last_activity", "message_count", "tokens", "last_run")
    readonly_fields = fields
    change_form_template = "admin/agents_app/conversation/change_form.html"

    def get_queryset(self, request):
        return with_totals(super().get_queryset(request).select_related("owner", "team"))

    @admin.display(description="messages", ordering="message_total")
    def message_count(self, obj):
        return obj.message_total

    @admin.display(description="last activity", ordering="updated_at")
    def last_activity(self, obj):
        return formats.localize(timezone.template_localtime(obj.updated_at))

    @admin.display(description="tokens", ordering="token_total")
    def tokens(self, obj):
        return f"{obj.token_total:,}"

    @admin.display(description="last run", ordering="last_run_status")
    def last_run(self, obj):
        return run_status_text(obj.last_run_status, obj.last_run_error)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["transcript"] = admin_transcript(obj)
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def get_urls(self):
        export_view = self.admin_site.admin_view(self.export_one)
        return [
            path("<uuid:object_id>/export/<str:kind>/", export_view, name="agents_app_conversation_export"),
            *super().get_urls(),
        ]

    def export_one(self, request, object_id, kind):
        """One conversation's export, from its transcript page (GET; the view permission is enough)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        conversations = Conversation.objects.filter(pk=object_id)
        if kind not in ("json", "markdown") or not conversations.exists():
            raise Http404("No such conversation or export format.")
        return _export_response(conversations, kind, f"chorus-conversation-{object_id}")

    @admin.action(description="Export the selected conversations (JSON, lossless)", permissions=["view"])
    def export_transcripts(self, request, queryset):
        return _export_response(queryset, "json", "chorus-conversations")

    @admin.action(description="Export the selected conversations (Markdown)", permissions=["view"])
    def export_transcripts_markdown(self, request, queryset):
        return _export_response(queryset, "markdown", "chorus-conversations")


def _export_response(queryset, kind: str, name: str) -> HttpResponse:
    if kind == "json":
        response = JsonResponse(export.export_json(queryset.order_by()),
                                json_dumps_params={"indent": 2, "ensure_ascii": False})  # fmt: skip
        filename = f"{name}.json"
    else:
        response = HttpResponse(
            export.export_markdown(queryset.order_by()), content_type="text/markdown; charset=utf-8"
        )
        filename = f"{name}.md"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# Runs, messages, tool calls --------------------------------------------------------------------------------


def _seconds(delta) -> str:
    return "—" if delta is None else f"{delta.total_seconds():.2f} s"


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation", "team", "status", "error_code", "duration_display",
                    "time_to_first_token", "prompt_tokens", "completion_tokens", "created_at")  # fmt: skip
    list_filter = ("status", "team", "error_code", ("created_at", admin.DateFieldListFilter))
    list_select_related = ("conversation", "team")
    date_hierarchy = "created_at"
    search_fields = ("id", "conversation__title", "error_detail", "worker_id")
    readonly_fields = ["transcript", *[f.name for f in Run._meta.fields], "duration_display", "time_to_first_token"]
    inlines = [ToolCallInline, MessageInline]

    @admin.display(description="duration")
    def duration_display(self, obj):
        return _seconds(obj.duration)

    @admin.display(description="time to first token")
    def time_to_first_token(self, obj):
        return _seconds(RunBlock(obj).time_to_first_token)

    @admin.display(description="transcript")
    def transcript(self, obj):
        url = reverse("admin:agents_app_conversation_change", args=[obj.conversation_id])
        return format_html('<a href="{}#run-{}">This run in its conversation’s transcript</a>', url, obj.id)

    def get_urls(self):
        return [
            path("usage/", self.admin_site.admin_view(self.usage_view), name="agents_app_usage"),
            *super().get_urls(),
        ]

    def usage_view(self, request):
        """Tokens per day, per person and per team over the last `?days=` days (UTC), with budgets."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "title": "Usage", "opts": self.model._meta,
                   "choices": (1, 7, 30, 90, 365)}  # fmt: skip
        try:
            days = usage.parse_days(request.GET.get("days"))
        except ValueError as exc:
            context["error"] = str(exc)
            return TemplateResponse(request, "admin/agents_app/usage.html", context, status=400)
        period = usage.Period.last(days)
        runs = period.runs()
        by_day = usage.usage_by_day(runs, period)
        context.update(
            period=period,
            days=days,
            by_day=list(reversed(by_day)),
            totals=usage.usage_totals(by_day),
            today=by_day[-1],
            chart=usage.bar_chart(by_day),
            people=usage.usage_by_person(runs, period),
            teams=usage.usage_by_team(runs, period),
            default_budget=settings.CHORUS_DAILY_TOKEN_BUDGET or None,
            reset_time=usage.reset_time(),
            purposes=usage.PURPOSES,
        )
        return TemplateResponse(request, "admin/agents_app/usage.html", context)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "conversation", "role", "source", "is_final_answer", "seq", "created_at")
    list_filter = ("role", "is_final_answer", "incomplete")
    list_select_related = ("conversation",)
    search_fields = ("content", "source")
    readonly_fields = [f.name for f in Message._meta.fields]


@admin.register(Feedback)
class FeedbackAdmin(ReadOnlyAdmin):
    """People's thumbs up and down on answers, with their comments: what to look at first when reviewing."""

    list_display = ("rating_shown", "answer", "comment", "user", "conversation_link", "updated_at")
    list_filter = ("rating", ("updated_at", admin.DateFieldListFilter))
    list_select_related = ("message__conversation", "user")
    search_fields = ("comment", "message__content", "user__username")
    readonly_fields = ("rating", "comment", "user", "message", "created_at", "updated_at")

    @admin.display(description="Rating", ordering="rating")
    def rating_shown(self, feedback):
        return "👍 up" if feedback.rating == Feedback.Rating.UP else "👎 down"

    @admin.display(description="Answer")
    def answer(self, feedback):
        return feedback.message.content[:120]

    @admin.display(description="Conversation")
    def conversation_link(self, feedback):
        conversation = feedback.message.conversation
        url = reverse("admin:agents_app_conversation_change", args=[conversation.id])
        return format_html('<a href="{}">{}</a>', url, conversation)


@admin.register(ToolCall)
class ToolCallAdmin(ReadOnlyAdmin):
    list_display = ("name", "source", "conversation", "is_error", "duration_ms", "started_at")
    list_filter = ("name", "is_error", ("started_at", admin.DateFieldListFilter))
    list_select_related = ("conversation",)
    search_fields = ("name", "arguments", "result", "call_id")
    date_hierarchy = "started_at"
    readonly_fields = [f.name for f in ToolCall._meta.fields]


# Budgets ---------------------------------------------------------------------------------------------------


@admin.register(PersonSettings)
class PersonSettingsAdmin(ChorusAdmin):
    list_display = ("user", "own_budget", "budget", "used_today")
    search_fields = ("user__username",)
    autocomplete_fields = ("user",)

    def get_queryset(self, request):
        spent = (
            Run.objects.filter(conversation__owner=OuterRef("user"), created_at__gte=usage.day_start())
            .order_by()
            .values("conversation__owner")
            .annotate(n=Sum(F("prompt_tokens") + F("completion_tokens")))
            .values("n")
        )
        return super().get_queryset(request).select_related("user").annotate(spent_today=Subquery(spent))

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "daily_token_budget":
            default = settings.CHORUS_DAILY_TOKEN_BUDGET
            field.help_text = (
                "Tokens this person's runs may use per UTC day, every model request counted. Empty: the default, "
                f"CHORUS_DAILY_TOKEN_BUDGET ({f'{default:,} tokens' if default else 'no limit'}). 0: no limit."
            )
        return field

    @admin.display(description="own budget", ordering="daily_token_budget")
    def own_budget(self, obj):
        return "default" if obj.daily_token_budget is None else f"{obj.daily_token_budget:,}"

    @admin.display(description="daily budget")
    def budget(self, obj):
        value = usage.effective_budget(obj.daily_token_budget)
        return "no limit" if value is None else f"{value:,}"

    @admin.display(description="used today (UTC)")
    def used_today(self, obj):
        return f"{obj.spent_today or 0:,}"
