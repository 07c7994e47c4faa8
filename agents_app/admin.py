"""Admin: teams are edited here; conversations and runs are read-only transcripts for review."""

import time
from dataclasses import asdict

from django.contrib import admin
from django.http import JsonResponse
from django.template.response import TemplateResponse

from agents_app.models import Conversation, Message, Run, Team
from agents_app.runner import CompletedMessage, TeamTurn, TokenDelta, ToolCall, ToolResult, TurnRequest
from agents_app.tools import build_tools
from agents_app.worker import model_settings

TEST_PROMPT = "Say hello and tell me in one sentence what this team does."


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "kind", "enabled", "is_default", "final_speakers", "steps_display", "updated_at")
    list_filter = ("kind", "enabled", "steps_display")
    search_fields = ("name", "slug", "description")
    prepopulated_fields = {"slug": ("name",)}
    actions = ["test_team"]
    fieldsets = [
        (None, {"fields": ("name", "slug", "kind", "description", "enabled", "is_default")}),
        ("Answer and steps", {"fields": ("final_speakers", "steps_display")}),
        ("Configuration", {"fields": ("config",), "description": "Validated on save: see docs/teams.md."}),
    ]

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "config":
            field.widget.attrs.update({"rows": 30, "cols": 110, "class": "vLargeTextField team-config"})
        return field

    @admin.action(description="Test this team: run one short prompt and show the events")
    def test_team(self, request, queryset):
        results = [(team, self._trial(team, request.user.pk)) for team in queryset[:3]]
        context = {**self.admin_site.each_context(request), "title": "Team test", "prompt": TEST_PROMPT,
                   "results": results, "opts": self.model._meta}  # fmt: skip
        return TemplateResponse(request, "admin/agents_app/team/test_results.html", context)

    def _trial(self, team: Team, user_id: int) -> dict:
        """Run the prompt in this request's thread on a loop of its own; nothing is stored."""
        if team.kind == Team.Kind.ROUTER:
            return {"status": "skipped", "detail": "A router picks another team per message: test those teams.",
                    "events": []}  # fmt: skip
        events = []
        request = TurnRequest(
            team_config=team.config, task=TEST_PROMPT, final_speakers=frozenset(team.final_speakers or []),
            tools=build_tools(user_id=user_id),
        )  # fmt: skip
        started = time.monotonic()
        result = TeamTurn(request, model_settings(), events.append).run()
        return {
            "status": result.status,
            "detail": result.error_detail,
            "seconds": round(time.monotonic() - started, 2),
            "usage": (result.prompt_tokens, result.completion_tokens),
            "events": [_describe(event) for event in _merge_tokens(events)],
        }


def _merge_tokens(runner_events):
    """Consecutive tokens of one message shown as one line, as the page would show them."""
    merged = []
    for event in runner_events:
        previous = merged[-1] if merged else None
        if isinstance(event, TokenDelta) and isinstance(previous, TokenDelta) and previous.stream_id == event.stream_id:
            merged[-1] = TokenDelta(event.stream_id, event.source, previous.delta + event.delta)
        else:
            merged.append(event)
    return merged


def _describe(event) -> dict:
    kind = {TokenDelta: "tokens", CompletedMessage: "message", ToolCall: "tool.call", ToolResult: "tool.result"}
    fields = asdict(event)
    return {"kind": kind[type(event)], "fields": fields}


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ("seq", "role", "source", "content", "is_final_answer", "incomplete", "completion_tokens", "created_at")
    readonly_fields = fields
    ordering = ("seq",)


class RunInline(ReadOnlyInline):
    model = Run
    fields = ("id", "status", "worker_id", "started_at", "finished_at", "error_code", "prompt_tokens",
              "completion_tokens")  # fmt: skip
    readonly_fields = fields


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    actions = ["export_transcripts"]

    @admin.action(description="Export the selected transcripts (JSON)")
    def export_transcripts(self, request, queryset):
        conversations = queryset.select_related("owner", "team").prefetch_related("messages", "runs__team")
        data = [_transcript(conversation) for conversation in conversations]
        response = JsonResponse(data, safe=False, json_dumps_params={"indent": 2, "ensure_ascii": False})
        response["Content-Disposition"] = 'attachment; filename="chorus-transcripts.json"'
        return response

    list_display = ("__str__", "owner", "team", "updated_at", "created_at")
    list_filter = ("team",)
    search_fields = ("title", "owner__username", "messages__content")
    exclude = ("team_state",)
    readonly_fields = ("id", "owner", "team", "title", "last_seq", "created_at", "updated_at")
    inlines = [RunInline, MessageInline]


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation", "team", "status", "error_code", "duration", "prompt_tokens",
                    "completion_tokens", "created_at")  # fmt: skip
    list_filter = ("status", "team", "error_code")
    search_fields = ("id", "conversation__title", "error_detail", "worker_id")
    readonly_fields = [f.name for f in Run._meta.fields] + ["duration"]
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "conversation", "role", "source", "is_final_answer", "seq", "created_at")
    list_filter = ("role", "is_final_answer", "incomplete")
    search_fields = ("content", "source")
    readonly_fields = [f.name for f in Message._meta.fields]


def _transcript(conversation: Conversation) -> dict:
    """A conversation as an admin exports it: who said what, which agent, which run, how it ended."""
    return {
        "id": str(conversation.id),
        "title": conversation.title,
        "owner": conversation.owner.get_username(),
        "team": conversation.team.slug,
        "created_at": conversation.created_at.isoformat(),
        "runs": [
            {
                "id": str(run.id),
                "team": run.team.slug,
                "status": run.status,
                "error_code": run.error_code,
                "error_detail": run.error_detail,
                "started_at": run.started_at.isoformat() if run.started_at else None,
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "prompt_tokens": run.prompt_tokens,
                "completion_tokens": run.completion_tokens,
                "route_reason": run.route_reason,
            }
            for run in sorted(conversation.runs.all(), key=lambda r: r.created_at)
        ],
        "messages": [
            {
                "seq": m.seq,
                "run_id": str(m.run_id) if m.run_id else None,
                "role": m.role,
                "source": m.source,
                "content": m.content,
                "is_final_answer": m.is_final_answer,
                "incomplete": m.incomplete,
                "created_at": m.created_at.isoformat(),
            }
            for m in sorted(conversation.messages.all(), key=lambda m: m.seq)
        ],
    }
