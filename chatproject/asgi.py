"""ASGI entry point: HTTP through Django, chat WebSockets through Channels, and the `agent-runs` worker channel."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
# Django must be set up before anything imports models (consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from agents_app.embedded import EmbeddedWorkerStarter  # noqa: E402
from agents_app.health import OpsEndpoints  # noqa: E402
from agents_app.middleware import OriginValidator  # noqa: E402
from agents_app.routing import FrameSendMiddleware, websocket_urlpatterns  # noqa: E402
from agents_app.services import AGENT_RUNS_CHANNEL  # noqa: E402
from agents_app.tokens import BearerTokenRouter  # noqa: E402
from agents_app.worker import AgentRunConsumer, tune_gc  # noqa: E402

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.CHORUS_SERVE_STATIC else django_asgi_app
# /healthz, /readyz and /metrics are answered before Django: no host check, no HTTPS redirect (agents_app/health.py).
http_app = OpsEndpoints(http_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        # The Origin must be this site (scheme, host and port) or one of CSRF_TRUSTED_ORIGINS, as Django's CSRF
        # check requires of a POST: another page, or this host on another port, cannot use the person's cookies.
        # A program's handshake with `Authorization: Bearer <token>` uses no cookie: the token is all it needs.
        "websocket": BearerTokenRouter(
            cookie_app=OriginValidator(FrameSendMiddleware(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))),
            bearer_app=FrameSendMiddleware(URLRouter(websocket_urlpatterns)),
        ),
        # `manage.py runworker agent-runs` serves this; the web server never sees it.
        "channel": ChannelNameRouter({AGENT_RUNS_CHANNEL: AgentRunConsumer.as_asgi()}),
    }
)

if settings.CHORUS_EMBEDDED_WORKER:
    application = EmbeddedWorkerStarter(application)

tune_gc()
