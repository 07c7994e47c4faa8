"""The worker process: `manage.py runworker agent-runs` and the channel consumer that hears doorbells."""

from __future__ import annotations

import asyncio
import logging
import signal

from channels.consumer import AsyncConsumer
from channels.routing import ChannelNameRouter
from channels.worker import Worker

from agents_app.ops import fastpaths, logs
from agents_app.ops.runtime import tune_gc
from agents_app.realtime.announce import AGENT_RUNS_CHANNEL
from agents_app.realtime.dispatch import DirectDispatch
from agents_app.worker.agent import agent_worker

logger = logging.getLogger(__name__)


class AgentRunConsumer(DirectDispatch, AsyncConsumer):
    """Listens on the `agent-runs` channel. Handlers return at once so doorbells are never queued behind a run
    (and without channels' database-thread hop per message: see DirectDispatch)."""

    async def run_queued(self, message) -> None:
        agent_worker().wake()


class ChorusWorker(Worker):
    """`manage.py runworker`'s loop, made fit for agent work: the agent worker starts with the process (so it
    polls and recovers runs before any doorbell rings), a listener survives a Redis restart instead of
    killing the process, and SIGTERM drains running turns, then exits 0.

    It serves its own application, not the web's (chatproject/asgi.py routes no channels), so that a web server
    never imports the worker, the runner or AutoGen."""

    def __init__(self, application, channels, channel_layer, **kwargs):
        super().__init__(ChannelNameRouter({AGENT_RUNS_CHANNEL: AgentRunConsumer.as_asgi()}), channels,
                         channel_layer, **kwargs)  # fmt: skip

    async def handle(self) -> None:
        tune_gc()
        worker = agent_worker()
        logs.bind(worker_id=worker.worker_id)  # on every line of this process from here on
        worker.ensure_started()
        fastpaths.log_summary()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.begin_drain)
        listening = asyncio.ensure_future(super().handle())
        await worker.stopped.wait()
        listening.cancel()
        logger.info("worker %s stopped", worker.worker_id)

    async def listener(self, channel) -> None:
        while True:
            try:
                await super().listener(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("listening on %s failed (is Redis down?); retrying", channel, exc_info=True)
                await asyncio.sleep(1)
