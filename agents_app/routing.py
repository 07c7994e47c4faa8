"""WebSocket routes, and the middleware that hands sockets the server's own send."""

from django.urls import path

from agents_app.consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/conversations/<uuid:conversation_id>/", ChatConsumer.as_asgi()),
]


class FrameSendMiddleware:
    """Puts the server's own `send` in the scope as "chorus.send", for a socket's outgoing frames.

    Channels' session middleware wraps `send` to save sessions on HTTP responses; for every WebSocket frame
    the wrapper still reads the lazy session twice. A streamed token is a frame per socket, so sockets send
    their frames beneath it (accept and close still go through it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        return await self.app({**scope, "chorus.send": send}, receive, send)
