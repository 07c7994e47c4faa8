"""Seed the default team: one AssistantAgent on the deployment's OpenAI-compatible model."""

import json
from pathlib import Path

from django.db import migrations

CONFIG = Path(__file__).resolve().parent.parent / "teams" / "assistant.json"


def seed(apps, schema_editor):
    Team = apps.get_model("agents_app", "Team")
    Team.objects.update_or_create(
        slug="assistant",
        defaults={
            "name": "Assistant",
            "description": "One assistant agent that answers each message.",
            "config": json.loads(CONFIG.read_text()),
            "final_speakers": ["assistant"],
            "steps_display": "folded",
            "enabled": True,
            "is_default": True,
        },
    )


def unseed(apps, schema_editor):
    apps.get_model("agents_app", "Team").objects.filter(slug="assistant", conversations__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
