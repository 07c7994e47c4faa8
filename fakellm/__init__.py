"""Chorus's offline, OpenAI-compatible model server ("fakellm").

It answers chat completions deterministically, with no network and no API key, for the tests, the demo
mode and the benchmarks. Run it with ``python -m fakellm --port 8001`` (no Django needed) or
``python manage.py fakellm --port 8001``; point any OpenAI client at ``http://127.0.0.1:8001/v1``.
Directives, the script format and the wire details are documented in ``fakellm.server``.
"""

from fakellm.server import FakeLLMConfig, build_app, parse_stamp, serve

__all__ = ["FakeLLMConfig", "build_app", "parse_stamp", "serve"]
