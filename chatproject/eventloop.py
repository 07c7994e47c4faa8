"""The event loop Chorus's processes run on: uvloop (libuv, written in C) unless CHORUS_UVLOOP=0.

Every streamed token wakes a worker's loops and a web server's loop several times; uvloop does each wake-up,
socket read and callback for a fraction of the CPU of asyncio's own loop (docs/performance-history.md). Set
CHORUS_UVLOOP=0 to fall back to asyncio's loop, for example to rule uvloop out while chasing a bug.
"""

import asyncio

from chatproject.env import env_bool


def install() -> str:
    """Make the event loops created from now on uvloop's (unless CHORUS_UVLOOP=0); return which kind they are.
    Call it before anything creates a loop: daphne makes its loop when it is imported."""
    if not env_bool("CHORUS_UVLOOP", True):
        return "asyncio"
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
