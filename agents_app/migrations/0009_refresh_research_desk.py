"""Refresh the shipped research desk: its selector now hands the turn to the reporter when its model names no
valid speaker (runner.FallbackSelectorGroupChat), instead of AutoGen's default of the previous speaker, which let
the planner speak until the turn cap and ended the run with no answer."""

from django.db import migrations

from agents_app.teams import seed_builtin_teams


def refresh(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"), slugs=["research-desk"])


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0008_run_recovery_answer_usage")]
    operations = [migrations.RunPython(refresh, migrations.RunPython.noop)]
