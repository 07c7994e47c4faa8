"""Single-process mode: with no Redis, the agent worker lives inside the web server.

The in-memory channel layer only works within one event loop, so the worker must run on the web server's
loop. Daphne has no lifespan events, so the worker starts with the first connection the server handles.
"""

import asyncio
import logging

from channels.layers import get_channel_layer

from agents_app.realtime.announce import AGENT_RUNS_CHANNEL
from agents_app.worker.agent import agent_worker

logger = logging.getLogger(__name__)


class EmbeddedWorkerStarter:
    def __init__(self, app):
        self.app = app
        self._listener: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self._listening_here():
            self._listener = asyncio.create_task(self._listen())
            agent_worker().ensure_started()
            logger.info("embedded agent worker listening on %s", AGENT_RUNS_CHANNEL)
        return await self.app(scope, receive, send)

    def _listening_here(self) -> bool:
        # Tests run each case on a new event loop; a listener on a finished loop is restarted.
        listener = self._listener
        return listener is not None and not listener.done() and listener.get_loop() is asyncio.get_running_loop()

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
