from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents_app", "0014_human_input_teams"),  # no overlap: after it only so the graph has one leaf
    ]

    operations = [
        migrations.AddField(
            model_name="conversation",
            name="state_before",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="conversation",
            name="state_before_seq",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="conversation",
            name="title_seq",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="message",
            name="replaced_seq",
            field=models.BigIntegerField(blank=True, null=True),
        ),
    ]
