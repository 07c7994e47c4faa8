"""WebSocket routes, and the middleware that gives sockets a cheap way to send their frames."""

import functools
import struct

from django.urls import path

from agents_app.ops import fastpaths
from agents_app.web.consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/conversations/<uuid:conversation_id>/", ChatConsumer.as_asgi()),
]

DIRECT_MAX_BYTES = 65535  # larger frames (a long stored answer) take daphne's own path


class FrameSendMiddleware:
    """Puts "chorus.send_text" in the scope: an async function that sends one text frame on the socket.

    A streamed token is a frame per socket, so this path is the web server's cost per token. By default it is
    the server's own `send`, beneath Channels' session wrapper (which reads the lazy session twice per frame).
    When daphne serves the socket over plain TCP, a frame is written straight to the connection instead (see
    `direct_text_writer`), unless CHORUS_FAST_FRAMES=0 or daphne, autobahn or Twisted are not the versions it
    was written against (agents_app/ops/fastpaths.py)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            scope = {**scope, "chorus.send_text": text_sender(send)}
        return await self.app(scope, receive, send)


def text_sender(send):
    direct = direct_text_writer(send) if fastpaths.enabled("frames") else None

    async def send_text(text: str) -> None:
        if direct is None or not direct(text):
            await send({"type": "websocket.send", "text": text})

    return send_text


def direct_text_writer(send):
    """For a socket daphne serves over plain TCP: a function that writes one text frame straight to the TCP
    connection and returns True, or returns False where daphne's own path must send it (the socket is not open
    yet or any more, or the frame is large). None for any other server or transport.

    Why: daphne hands each frame to autobahn, which builds it in Python, and to Twisted, which buffers it,
    registers the socket for writing, and writes it on the next turn of the loop, then unregisters it: two
    epoll changes and a loop turn per frame. Here an unmasked, unfragmented frame header (RFC 6455 5.2; no
    extension is negotiated: daphne accepts none) goes out with the payload in one send when Twisted's buffer
    is empty, and is appended to that buffer otherwise, so frames keep their order with whatever autobahn
    itself writes (pings, close)."""
    protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
    try:
        from autobahn.twisted.websocket import WebSocketServerProtocol
        from twisted.internet.tcp import Connection
    except ImportError:  # not under daphne
        return None
    if not isinstance(protocol, WebSocketServerProtocol) or not isinstance(protocol.transport, Connection):
        return None
    transport = protocol.transport
    limit = DIRECT_MAX_BYTES
    if protocol.maxMessagePayloadSize:
        limit = min(limit, protocol.maxMessagePayloadSize)

    def write(text: str) -> bool:
        if protocol.state != protocol.STATE_OPEN or protocol._perMessageCompress is not None:
            return False
        payload = text.encode()
        size = len(payload)
        if size > limit:
            return False
        frame = (bytes((0x81, size)) if size < 126 else struct.pack("!BBH", 0x81, 126, size)) + payload
        if transport.dataBuffer or transport._tempDataBuffer or not transport.connected:
            transport.write(frame)  # behind what is queued (or dropped by Twisted on a lost connection)
            return True
        sent = transport.writeSomeData(frame)
        if not isinstance(sent, int):
            transport.write(frame)  # the connection is lost: Twisted's own write path finds out and closes
        elif sent < len(frame):
            transport.write(frame[sent:])  # the socket's buffer is full: Twisted writes the rest when it drains
        return True

    return write
