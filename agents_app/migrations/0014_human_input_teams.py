"""Ship the two teams that ask the person mid-run: "Research desk with approval" and the Swarm "Travel desk"."""

from django.db import migrations

from agents_app.teams import seed_builtin_teams


def seed(apps, schema_editor):
    seed_builtin_teams(apps.get_model("agents_app", "Team"), slugs=["research-desk-approval", "travel-desk"])


def unseed(apps, schema_editor):
    apps.get_model("agents_app", "Team").objects.filter(
        slug__in=["research-desk-approval", "travel-desk"], conversations__isnull=True
    ).delete()


class Migration(migrations.Migration):
    dependencies = [("agents_app", "0013_input_requests_feedback_share_links")]
    operations = [migrations.RunPython(seed, unseed)]
