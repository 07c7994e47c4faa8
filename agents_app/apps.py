"""App config for agents_app: where the parts are connected to each other (docs/architecture.md)."""

from django.apps import AppConfig


class AgentsAppConfig(AppConfig):
    name = "agents_app"
    verbose_name = "Chorus agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from agents_app.domain import notify
        from agents_app.domain import signals as domain_signals  # noqa: F401 - connects the receivers
        from agents_app.realtime.announce import ChannelNotifier
        from agents_app.web import signals as web_signals  # noqa: F401 - connects the receivers

        # The domain says what happened; the realtime part carries it (agents_app/domain/notify.py).
        notify.connect(ChannelNotifier())
