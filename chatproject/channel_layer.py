"""channels-redis's core layer, with `send` in one round trip to Redis instead of four.

Why: channels-redis 4.3's `send` awaits four commands one after another (drop expired messages, count them
against the capacity, add the message, renew the key's expiry). A web server sends one for every message a
person sends (the worker's doorbell on `agent-runs`), and a worker one for every Stop. One Lua script costs
the sender about a quarter of the CPU and of the wall time (docs/performance-history.md).

Everything else is channels-redis's own: the same keys, the same serialised messages in the same sorted
sets, the same capacity (`ChannelFull`) and expiry, the same choice of Redis host, so receivers, groups and
`group_send` are untouched, and a process on this layer talks to one on the stock layer. The script does
what the four commands did, in their order, atomically.
"""

import time

from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer as StockRedisChannelLayer

from agents_app.ops import fastpaths

_SEND = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisChannelLayer(StockRedisChannelLayer):
    async def send(self, channel, message):
        """Send a message onto a (general or specific) channel, as channels-redis does, in one round trip.
        With the fast path off (CHORUS_FAST_LAYER_SEND, or another channels-redis version), channels-redis's own."""
        if not fastpaths.enabled("layer_send"):
            return await super().send(channel, message)
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        channel_non_local_name = channel
        if "!" in channel:
            # A process-local channel: the full name travels in the message, the key is the process's.
            message = dict(message.items())
            message["__asgi_channel__"] = channel
            channel_non_local_name = self.non_local_name(channel)
        channel_key = self.prefix + channel_non_local_name
        # The same host as channels-redis picks: consistent for specific channels, in turn for general ones.
        index = self.consistent_hash(channel) if "!" in channel else next(self._send_index_generator)
        connection = self.connection(index)
        now = time.time()
        expiry = int(self.expiry)
        added = await connection.eval(
            _SEND, 1, channel_key,
            int(now) - expiry, self.get_capacity(channel), now, self.serialize(message), expiry,
        )  # fmt: skip
        if not added:
            raise ChannelFull()
