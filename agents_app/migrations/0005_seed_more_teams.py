"""Seed the shipped multi-agent teams and the automatic router."""

from django.db import migrations

from agents_app.teams import seed_builtin_teams


def seed(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"))


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0004_team_kind_and_routing")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
