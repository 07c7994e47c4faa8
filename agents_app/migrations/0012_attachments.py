"""Attachments: files people give the agents (issue 19). The shipped assistant's model now says it sees images
(model_info.vision), so the offline demo has a team that takes them."""

import agents_app.models
import django.db.models.deletion
import uuid
from django.db import migrations, models

from agents_app.teams import seed_builtin_teams


def refresh(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"), slugs=["assistant"])


class Migration(migrations.Migration):
    dependencies = [
        ("agents_app", "0011_admin_first_token_usage_indexes"),
    ]

    operations = [
        migrations.CreateModel(
            name="Attachment",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=255)),
                ("content_type", models.CharField(max_length=100)),
                (
                    "kind",
                    models.CharField(choices=[("image", "Image"), ("text", "Text"), ("pdf", "PDF")], max_length=10),
                ),
                ("size", models.PositiveBigIntegerField()),
                ("width", models.PositiveIntegerField(blank=True, null=True)),
                ("height", models.PositiveIntegerField(blank=True, null=True)),
                (
                    "file",
                    models.FileField(
                        max_length=200,
                        storage=agents_app.models._attachment_storage,
                        upload_to=agents_app.models._attachment_path,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "conversation",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="attachments",
                        to="agents_app.conversation",
                    ),
                ),
                (
                    "message",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="attachments",
                        to="agents_app.message",
                    ),
                ),
            ],
            options={
                "ordering": ["created_at", "id"],
                "indexes": [models.Index(fields=["conversation", "message"], name="attachment_conv_message")],
            },
        ),
        migrations.RunPython(refresh, migrations.RunPython.noop),
    ]
