"""Admin: teams are edited here; conversations and runs are read-only transcripts for review."""

from django.contrib import admin

from agents_app.models import Conversation, Message, Run, Team


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "enabled", "is_default", "steps_display", "updated_at")
    list_filter = ("enabled", "steps_display")
    search_fields = ("name", "slug", "description")
    prepopulated_fields = {"slug": ("name",)}


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
