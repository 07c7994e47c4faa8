"""Chorus's channel layer against a real Redis: `send` in one round trip, otherwise channels-redis's own, so
its messages, capacity and expiry are what the stock layer's receivers and senders expect."""

import asyncio
import uuid

import pytest
from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer as StockRedisChannelLayer

from chatproject.channel_layer import RedisChannelLayer

pytestmark = pytest.mark.asyncio


def layers(redis_url, **config):
    prefix = f"test-layer-{uuid.uuid4().hex}"
    return (RedisChannelLayer(hosts=[redis_url], prefix=prefix, **config),
            StockRedisChannelLayer(hosts=[redis_url], prefix=prefix, **config))  # fmt: skip


async def test_what_it_sends_the_stock_layer_receives_on_general_and_process_channels(redis_url):
    ours, stock = layers(redis_url)
    try:
        await ours.send("agent-runs", {"type": "run.queued", "run_id": "1"})
        await ours.send("agent-runs", {"type": "run.queued", "run_id": "2", "text": "é ✓"})
        assert await stock.receive("agent-runs") == {"type": "run.queued", "run_id": "1"}
        assert await stock.receive("agent-runs") == {"type": "run.queued", "run_id": "2", "text": "é ✓"}

        worker_channel = await stock.new_channel("agent-worker.")  # a worker's own channel ("...!...")
        await ours.send(worker_channel, {"type": "run.cancel", "run_id": "3"})
        assert await stock.receive(worker_channel) == {"type": "run.cancel", "run_id": "3"}
        # and the other way: the stock layer's sends still reach this one
        await stock.send("agent-runs", {"type": "run.queued", "run_id": "4"})
        assert await ours.receive("agent-runs") == {"type": "run.queued", "run_id": "4"}
    finally:
        await ours.flush()
        await stock.flush()


async def test_a_full_channel_refuses_and_expired_messages_make_room(redis_url):
    ours, stock = layers(redis_url, capacity=2, expiry=1)
    try:
        await ours.send("agent-runs", {"type": "a"})
        await ours.send("agent-runs", {"type": "b"})
        with pytest.raises(ChannelFull):
            await ours.send("agent-runs", {"type": "c"})
        await asyncio.sleep(2.1)  # older than the expiry: dropped by the next send, as channels-redis does
        await ours.send("agent-runs", {"type": "d"})
        assert await stock.receive("agent-runs") == {"type": "d"}
    finally:
        await ours.flush()
        await stock.flush()


@pytest.mark.parametrize("how", ["setting", "another-version"])
async def test_with_the_fast_path_off_it_sends_as_channels_redis_does(redis_url, settings, monkeypatch, caplog, how):
    """CHORUS_FAST_LAYER_SEND=0, or a channels-redis other than the one the script was written for: the stock
    send, with the same messages and the same refusal at capacity."""
    from agents_app.ops import fastpaths

    if how == "setting":
        settings.CHORUS_FAST_LAYER_SEND = False
    else:
        monkeypatch.setitem(fastpaths.PATHS["layer_send"].written_for, "channels-redis", "0.1")
    fastpaths.reset()
    stock_sends = []
    stock_send = StockRedisChannelLayer.send

    async def counted(self, channel, message):
        stock_sends.append(channel)
        return await stock_send(self, channel, message)

    monkeypatch.setattr(StockRedisChannelLayer, "send", counted)
    ours, stock = layers(redis_url, capacity=1)
    try:
        await ours.send("agent-runs", {"type": "run.queued", "run_id": "1"})
        with pytest.raises(ChannelFull):
            await ours.send("agent-runs", {"type": "run.queued", "run_id": "2"})
        assert await stock.receive("agent-runs") == {"type": "run.queued", "run_id": "1"}
    finally:
        await ours.flush()
        await stock.flush()
        fastpaths.reset()
    assert stock_sends == ["agent-runs", "agent-runs"], "channels-redis's own send, both times"
    if how == "another-version":
        assert "fast path layer_send is off: channels-redis 4.3.0 (written for 0.1)" in caplog.text
