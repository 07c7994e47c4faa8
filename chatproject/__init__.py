"""Chorus: multi-agent AutoGen chat, streamed to the browser over Django Channels."""
