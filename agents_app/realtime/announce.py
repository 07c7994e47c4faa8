"""Saying what happened: protocol events through the fan-out, doorbells and Stop requests on the channel layer.

This is the domain's Notifier (agents_app/domain/notify.py) and what the worker publishes its runs' events with.
"""

import json
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from agents_app.realtime import fanout

# The channel agent workers listen on (`manage.py runworker agent-runs`); a message there is only a doorbell.
AGENT_RUNS_CHANNEL = "agent-runs"


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


async def publish(conversation_id, event: dict[str, Any]) -> None:
    """Send one event to every socket of the conversation, encoded once for all of them."""
    await fanout.backend().publish(conversation_id, event["seq"], encode(event))


def publish_from_sync(conversation_id, event: dict[str, Any], *more: dict[str, Any]) -> None:
    """One event, or several of one conversation in one round trip to Redis."""
    fanout.publish_from_sync(conversation_id, event["seq"], encode(event), *((e["seq"], encode(e)) for e in more))


class ChannelNotifier:
    """The domain's Notifier over the fan-out and the channel layer."""

    def publish(self, conversation_id, event: dict[str, Any], *more: dict[str, Any]) -> None:
        publish_from_sync(conversation_id, event, *more)

    def wake_workers(self, run_id) -> None:
        async_to_sync(get_channel_layer().send)(AGENT_RUNS_CHANNEL, {"type": "run.queued", "run_id": str(run_id)})

    def stop_run(self, worker_channel: str, run_id) -> None:
        async_to_sync(get_channel_layer().send)(worker_channel, {"type": "run.cancel", "run_id": str(run_id)})
