"""Seed the default team: one AssistantAgent on the deployment's OpenAI-compatible model."""

from django.db import migrations

from agents_app.teams import seed_builtin_teams


def seed(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"), slugs=["assistant"])


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
