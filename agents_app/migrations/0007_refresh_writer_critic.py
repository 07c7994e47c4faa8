"""Refresh the shipped writer-critic team: its stop condition now listens to the critic only.

AutoGen drops TextMentionTermination's `sources` when dumping a config, so the first shipped version stopped as
soon as a person's message contained "APPROVED".
"""

from django.db import migrations

from agents_app.teams import seed_builtin_teams


def refresh(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"), slugs=["writer-critic"])


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0006_run_announced")]
    operations = [migrations.RunPython(refresh, migrations.RunPython.noop)]
