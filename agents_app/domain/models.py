"""Teams, conversations, their messages, and the runs that produce answers.

The `Run` row is the source of truth for a turn: channel-layer messages only ring a doorbell.
"""

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils.module_loading import import_string

__all__ = [
    "ApiToken",
    "Attachment",
    "Conversation",
    "Feedback",
    "InputRequest",
    "Message",
    "PersonSettings",
    "Run",
    "ShareLink",
    "Team",
    "ToolCall",
]


class Team(models.Model):
    class Kind(models.TextChoices):
        TEAM = "team", "AutoGen team"
        ROUTER = "router", "Router (picks a team per message)"

    class StepsDisplay(models.TextChoices):
        OPEN = "open", "Open"
        FOLDED = "folded", "Folded"
        HIDDEN = "hidden", "Hidden"

    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.TEAM)
    description = models.TextField(blank=True)
    config = models.JSONField(
        help_text="For a team: AutoGen's declarative component config (team.dump_component()), tools named from "
        "Chorus's registry, no API key. For a router: its teams, rules and fallback (docs/teams.md)."
    )
    final_speakers = models.JSONField(
        default=list,
        blank=True,
        help_text="Names of the agents whose messages are the answer; the others' are steps.",
    )
    steps_display = models.CharField(max_length=10, choices=StepsDisplay.choices, default=StepsDisplay.FOLDED)
    # Tokens all of this team's runs may use in a day (UTC), every person together; empty for no limit.
    daily_token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=Q(is_default=True), name="one_default_team"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # The runner's check (CHORUS_TEAM_CHECKER, agents_app/runner/checks.py), named by a setting so that the
        # domain imports no AutoGen: a process loads it only when a team is saved.
        check = import_string(settings.CHORUS_TEAM_CHECKER)
        slugs = Team.objects.filter(kind=self.Kind.TEAM).values_list("slug", flat=True)
        try:
            agent_names = check(self.kind, self.config, team_slugs=slugs, settings=settings)
        except ValueError as exc:
            raise ValidationError({"config": str(exc)}) from None
        if self.kind == self.Kind.ROUTER:
            return
        if not isinstance(self.final_speakers, list) or not all(isinstance(n, str) for n in self.final_speakers):
            raise ValidationError({"final_speakers": "A list of agent names."})
        unknown = sorted(set(self.final_speakers) - set(agent_names))
        if unknown:
            raise ValidationError(
                {"final_speakers": f"Not agents of this team: {', '.join(unknown)}. Agents: {', '.join(agent_names)}."}
            )

    def is_step(self, source: str) -> bool:
        """Whether an agent's words are a step (shown as the team says) rather than the answer."""
        return bool(self.final_speakers) and source not in self.final_speakers


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    team_state = models.JSONField(null=True, blank=True, help_text="AutoGen team.save_state() after the last run.")
    # Highest seq of a persisted event (a message, or a run starting or finishing).
    last_seq = models.BigIntegerField(default=0)
    # Highest seq handed out so far. Workers reserve blocks of seqs here so that no database write sits
    # on the per-token path, and a run recovered on another worker never reuses a seq a browser has seen.
    seq_reserved = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # team_state as it was before the last person's message was sent (its seq in state_before_seq): replacing
    # that turn (edit, regenerate, retry) restores it, so the team forgets the replaced turn.
    state_before = models.JSONField(null=True, blank=True)
    state_before_seq = models.BigIntegerField(null=True, blank=True)
    # The seq of the conversation.updated event of the last title change (named by the first message, renamed).
    title_seq = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or "New conversation"


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        # The team asked the person (an InputRequest) and saved its state; no worker holds the run.
        WAITING = "waiting_for_input", "Waiting for input"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)  # a worker holds it, or will: counted in the limits
    # The conversation's open run: active, or waiting for the person (no worker holds it). One per conversation.
    OPEN_STATUSES = (Status.QUEUED, Status.RUNNING, Status.WAITING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="runs")
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="runs")
    trigger_message = models.ForeignKey(
        "Message", on_delete=models.SET_NULL, null=True, blank=True, related_name="triggered_runs"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    worker_id = models.CharField(max_length=100, blank=True)
    # The channel-layer channel of the worker process holding the run: where a Stop request is sent.
    worker_channel = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    error_detail = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    started_seq = models.BigIntegerField(null=True, blank=True)
    # Set once the user's message has been published: a worker waits for it (or for a grace period, should the
    # web process have died in between), so run.started never overtakes the echo of the message it answers.
    announced = models.BooleanField(default=False)
    # Set when the conversation's team is a router: which router picked `team`, and why.
    routed_by = models.ForeignKey(Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="routed_runs")
    route_reason = models.CharField(max_length=300, blank=True)
    finished_seq = models.BigIntegerField(null=True, blank=True)
    # How many times a worker took the run over from one that stopped heartbeating; bounded, so a run whose
    # recovery keeps failing ends instead of being taken over forever.
    takeovers = models.PositiveSmallIntegerField(default=0)
    # When a person asked to stop the run: a worker that does not stop it within a grace period loses it, and
    # any other worker ends it as cancelled.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # The message that is the run's answer (the last one its final speakers completed), once it has ended.
    answer_message_id = models.UUIDField(null=True, blank=True)
    # Tokens by purpose: {"agent": {"prompt_tokens", "completion_tokens", "requests"}, "speaker_selection":
    # ..., "routing": ...}; prompt_tokens and completion_tokens are their sums.
    usage = models.JSONField(default=dict, blank=True)
    # When the run's first event (normally its model's first token) reached the worker; the time to first token
    # is this minus started_at. Written with the run's end, so it costs no write of its own.
    first_token_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One turn at a time per conversation: the team state is a single chain.
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(status__in=["queued", "running", "waiting_for_input"]),
                name="one_active_run_per_conversation",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            # Tokens of today's runs per person, per team and per day: budgets and usage (agents_app/domain/usage.py).
            models.Index(fields=["conversation", "created_at"], name="run_conversation_created"),
            models.Index(fields=["team", "created_at"], name="run_team_created"),
            models.Index(fields=["routed_by", "created_at"], name="run_routed_by_created"),
            models.Index(fields=["created_at"], name="run_created"),
        ]

    def __str__(self) -> str:
        return f"Run {self.id} ({self.status})"

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        TOOL = "tool", "Tool"

    # For agents' messages this is AutoGen's message id, which is also the stream_id of its tokens.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, null=True, blank=True, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    source = models.CharField(max_length=100)
    content = models.TextField()
    is_final_answer = models.BooleanField(default=False)
    # The model stopped before finishing it (the run failed or was stopped); content is what had arrived.
    incomplete = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    seq = models.BigIntegerField()
    client_id = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # A final speaker's message is announced as the answer when it completes; when a later one replaces it
    # (a writer's draft before its revision), the run's end sends `message.updated` at this seq.
    revised_seq = models.BigIntegerField(null=True, blank=True)
    # Set when the person replaced its turn (edited or regenerated it): the seq of the turn.replaced event. A
    # replaced turn is kept for review and usage but no longer shown to the person nor remembered by the team.
    replaced_seq = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["seq"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "seq"], name="unique_message_seq"),
            models.UniqueConstraint(
                fields=["conversation", "client_id"],
                condition=Q(client_id__isnull=False),
                name="unique_message_client_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source}: {self.content[:60]}"


class ToolCall(models.Model):
    """One tool call an agent made during a run: what it asked for, what it got back, and how long it took."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tool_calls")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="tool_calls")
    call_id = models.CharField(max_length=200)  # the model's id for the call; pairs it with its result
    source = models.CharField(max_length=100)  # the agent that called it
    name = models.CharField(max_length=100)
    arguments = models.TextField(blank=True)  # the JSON text the model wrote
    result = models.TextField(blank=True)
    is_error = models.BooleanField(default=False)
    seq = models.BigIntegerField(null=True, blank=True)  # the tool.call event's seq
    result_seq = models.BigIntegerField(null=True, blank=True)  # the tool.result event's seq
    started_at = models.DateTimeField(auto_now_add=True)
    duration_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["seq"]
        constraints = [models.UniqueConstraint(fields=["run", "call_id"], name="unique_tool_call_per_run")]

    def __str__(self) -> str:
        return f"{self.source}: {self.name}"


class PersonSettings(models.Model):
    """What an admin sets for one person beyond Django's user: their daily token budget."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chorus_settings")
    # Tokens this person's runs may use in a day (UTC); empty for the default (CHORUS_DAILY_TOKEN_BUDGET).
    daily_token_budget = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "person settings"

    def __str__(self) -> str:
        return f"Settings of {self.user}"


class ApiToken(models.Model):
    """A personal API token: shown once when created, stored only as its SHA-256 hash."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)  # the token's first characters, to tell tokens apart in lists
    token_hash = models.CharField(max_length=64, unique=True)
    read_only = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


def _attachment_storage():
    from django.core.files.storage import storages

    return storages["attachments"]


def _attachment_path(attachment: "Attachment", filename: str) -> str:
    # The stored name never comes from the person: their name is kept in `name`, for display only.
    return f"{attachment.conversation_id}/{attachment.id}"


class Attachment(models.Model):
    """A file a person gave the agents: uploaded into one conversation, then sent with one message."""

    class Kind(models.TextChoices):
        IMAGE = "image", "Image"
        TEXT = "text", "Text"
        PDF = "pdf", "PDF"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="attachments")
    # Null until a message carries it; a message's attachments are shown with it.
    message = models.ForeignKey(Message, on_delete=models.CASCADE, null=True, blank=True, related_name="attachments")
    name = models.CharField(max_length=255)
    # Decided by sniffing the bytes, never by the name or by what the client said.
    content_type = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    size = models.PositiveBigIntegerField()
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    file = models.FileField(upload_to=_attachment_path, storage=_attachment_storage, max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "message"], name="attachment_conv_message")]

    def __str__(self) -> str:
        return self.name

    @property
    def url(self) -> str:
        return f"/api/conversations/{self.conversation_id}/attachments/{self.id}/"

    def payload(self) -> dict:
        return {
            "id": str(self.id),
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "url": self.url,
        }


class InputRequest(models.Model):
    """A question a run asks the person mid-run (a user proxy's turn, a Swarm handoff to the user, a tool call
    that needs approval), and the person's answer. Its id is the protocol's `request_id`."""

    class Kind(models.TextChoices):
        USER_PROXY = "user_proxy", "User proxy"
        HANDOFF = "handoff", "Handoff to the user"
        APPROVAL = "approval", "Approval"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="input_requests")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="input_requests")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    source = models.CharField(max_length=100, help_text="The agent that asks.")
    prompt = models.TextField()
    options = models.JSONField(default=list, blank=True, help_text="Buttons for a closed question, e.g. Approve.")
    seq = models.BigIntegerField(help_text="The seq of its input.request event.")
    created_at = models.DateTimeField(auto_now_add=True)
    answer = models.TextField(blank=True)
    answered_at = models.DateTimeField(null=True, blank=True)
    answered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["run"], condition=Q(answered_at__isnull=True), name="one_open_input_request_per_run"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source} asks: {self.prompt[:60]}"


class Feedback(models.Model):
    """A person's thumbs up or down on an answer, with an optional comment; one per person and message."""

    class Rating(models.IntegerChoices):
        UP = 1, "Thumbs up"
        DOWN = -1, "Thumbs down"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    rating = models.SmallIntegerField(choices=Rating.choices)
    comment = models.TextField(blank=True, max_length=2000)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="one_feedback_per_person")]

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on {self.message_id}"


class ShareLink(models.Model):
    """A read-only link to a conversation that its owner can revoke. The link's secret is derived from its id
    and the deployment's SECRET_KEY, so the database holds no secret."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="share_links")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Share link {self.id} of {self.conversation_id}"
