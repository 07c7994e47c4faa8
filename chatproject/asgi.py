"""ASGI entry point: HTTP through Django and chat WebSockets through Channels.

Agent workers (`manage.py runworker agent-runs`) serve an application of their own (agents_app/worker/process.py):
nothing here imports the worker, the runner or AutoGen, unless the worker is embedded (no Redis configured).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
# Django must be set up before anything imports models (consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from agents_app.ops import fastpaths  # noqa: E402
from agents_app.ops.health import OpsEndpoints  # noqa: E402
from agents_app.ops.runtime import tune_gc  # noqa: E402
from agents_app.web.middleware import OriginValidator  # noqa: E402
from agents_app.web.routing import FrameSendMiddleware, websocket_urlpatterns  # noqa: E402
from agents_app.web.tokens import BearerTokenRouter  # noqa: E402

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.CHORUS_SERVE_STATIC else django_asgi_app
# /healthz, /readyz and /metrics are answered before Django (agents_app/ops/health.py): no host check, no
# HTTPS redirect.
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
    }
)

if settings.CHORUS_EMBEDDED_WORKER:
    # Single-process mode: the agent worker runs on this server's loop (the in-memory layer needs it there).
    from agents_app.worker.embedded import EmbeddedWorkerStarter

    application = EmbeddedWorkerStarter(application)

fastpaths.log_summary()
tune_gc()
