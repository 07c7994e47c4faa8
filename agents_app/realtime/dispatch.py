"""A consumer dispatch for Chorus's consumers, shared by the web tier's sockets and the worker's channel."""

from channels.consumer import get_handler_name

from agents_app.ops import fastpaths


class DirectDispatch:
    """Channels' dispatch, minus its `aclose_old_connections()` before every handler: a hop to the database
    thread and back for each message a consumer gets (each frame a socket sends or receives from the layer,
    each doorbell a worker hears). Every database call of Chorus's consumers goes through
    `database_sync_to_async`, which closes stale connections on that thread itself, before and after.

    With CHORUS_FAST_DISPATCH=0 (or another Channels version than the one this was written against) it is
    Channels' own dispatch. Put it before the Channels consumer class in the bases."""

    async def dispatch(self, message) -> None:
        if not fastpaths.enabled("dispatch"):
            return await super().dispatch(message)  # type: ignore[misc]
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
