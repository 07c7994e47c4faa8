# Issue 20: a run's time to first token, and the indexes that keep budgets and usage one cheap query each.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('agents_app', '0010_tool_calls_budgets_api_tokens'),
    ]

    operations = [
        migrations.AddField(
            model_name='run',
            name='first_token_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['conversation', 'created_at'], name='run_conversation_created'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['team', 'created_at'], name='run_team_created'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['routed_by', 'created_at'], name='run_routed_by_created'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['created_at'], name='run_created'),
        ),
    ]
