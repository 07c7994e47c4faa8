"""Single-process mode: with no Redis, the agent worker lives inside the web server.

The in-memory channel layer only works within one event loop, so the worker must run on the web server's
loop. Daphne has no lifespan events, so the worker starts with the first connection the server handles.
"""

import asyncio
import logging

from channels.layers import get_channel_layer

from agents_app.services import AGENT_RUNS_CHANNEL
from agents_app.worker import agent_worker

logger = logging.getLogger(__name__)


class EmbeddedWorkerStarter:
    def __init__(self, app):
        self.app = app
        self._listener: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if self._listener is None and scope["type"] in ("http", "websocket"):
            self._listener = asyncio.create_task(self._listen())
            agent_worker().ensure_started()
            logger.info("embedded agent worker listening on %s", AGENT_RUNS_CHANNEL)
        return await self.app(scope, receive, send)

    async def _listen(self) -> None:
        layer = get_channel_layer()
        while True:
            try:
                message = await layer.receive(AGENT_RUNS_CHANNEL)
                if message.get("type") == "run.queued":
                    agent_worker().wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("embedded worker listener failed; retrying")
                await asyncio.sleep(1)
