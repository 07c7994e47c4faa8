"""How the domain tells the rest of Chorus that something happened, without knowing the transport.

The domain decides what to say: a protocol event for every socket of a conversation, a doorbell for the agent
workers, a Stop for the worker holding a run. The realtime part says it (agents_app/realtime/announce.py,
connected by AgentsAppConfig.ready). So services stay testable and free of Channels and Redis.
"""

from typing import Any, Protocol


class Notifier(Protocol):
    def publish(self, conversation_id, event: dict[str, Any], *more: dict[str, Any]) -> None:
        """Send a protocol event (it has a seq) to every socket of the conversation, and log it for resumes;
        `more` events of the same conversation go with it, in seq order."""

    def wake_workers(self, run_id) -> None:
        """Ring the agent workers' doorbell: a hint only, since workers also poll the Run table."""

    def stop_run(self, worker_channel: str, run_id) -> None:
        """Ask the worker process that holds a run to stop it."""


_notifier: Notifier | None = None


def connect(notifier: Notifier) -> None:
    global _notifier
    _notifier = notifier


def notifier() -> Notifier:
    if _notifier is None:
        raise RuntimeError("No notifier connected: AgentsAppConfig.ready() connects agents_app.realtime's")
    return _notifier
