"""Passing a turn's events from the agent loop's thread to the worker's loop, and pacing the start of turns."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

_DONE = object()
# A start slot is given back when the run's team sends its first request to the model, or after this long
# (a team that spends long before asking the model must not hold back the runs queued behind it).
START_SLOT_MAX_SECONDS = 0.5


class TurnBridge:
    """Carries runner events from the turns' thread (the agent loop) to the worker's loop.

    Each turn has a Mailbox; one wake-up of the worker's loop serves every mailbox that got events meanwhile,
    so under load a single call_soon_threadsafe carries many tokens of many turns."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._ready: deque[Mailbox] = deque()
        self._wake_pending = False

    def notify(self, mailbox: Mailbox) -> None:  # any thread
        self._ready.append(mailbox)
        # Benign race: a put that sees a wake-up pending is served by it, since _deliver clears the flag
        # before it drains (and deque operations are atomic).
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._wake_pending = False
        while self._ready:
            self._ready.popleft().wake()


class Mailbox:
    """One turn's events, put from any thread and taken in order on the worker's loop."""

    def __init__(self, bridge: TurnBridge):
        self.bridge = bridge
        self.items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:  # any thread
        self.items.append(item)
        self.bridge.notify(self)

    def wake(self) -> None:  # the worker's loop
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until there are items (or someone calls wake)."""
        if self.items:
            return
        self._waiter = self.bridge.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class StartSlot:
    """One of a worker's start slots, held by a run while its team is being set up: from just before the team
    is built until it sends its first request to the model.

    Why: when many messages arrive at once, setting up every run's team at the same time shares the core
    among all of them, and that burst of set-ups delays the tokens of the runs already streaming. With a few
    slots, teams are set up in the order their messages came, each reaching the model as soon as it can
    (the measurements are in docs/performance-history.md)."""

    def __init__(self, slots: asyncio.Semaphore):
        self.slots = slots
        self.held = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None

    async def acquire(self) -> None:
        await self.slots.acquire()
        self.held = True
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.call_later(START_SLOT_MAX_SECONDS, self.release)

    def release(self) -> None:  # the worker's loop; more than once is fine
        if self.held:
            self.held = False
            self._deadline.cancel()
            self.slots.release()

    def release_from_thread(self) -> None:  # the turn's thread, as its team asks the model
        self._loop.call_soon_threadsafe(self.release)
