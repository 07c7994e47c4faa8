"""Which fast paths this process takes: each is on unless its setting turns it off or the libraries it leans on
are not the versions it was written against.

A fast path reaches into a library's private parts to save CPU on the path of every token; beside each one
the library's own (stock) path does the same job. Each has a setting (CHORUS_FAST_WIRE, CHORUS_FAST_FRAMES,
CHORUS_FAST_DISPATCH, CHORUS_FAST_MODEL_STREAM, CHORUS_FAST_LAYER_SEND; CHORUS_FAST_PATHS=0 turns them all
off) and the versions below, those of requirements.txt when the path was written. On any other version the
stock path is taken and one warning says why: a private detail that changed would otherwise fail in production,
not in a review. docs/performance.md says what each path saves and what it relies on.

The selector's fallback speaker (agents_app.runner.FallbackSelectorGroupChat) leans on AutoGen's private
group chat manager; it has no setting, only the version guard (see `fallback_selector`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import metadata

from django.conf import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPath:
    name: str
    setting: str | None  # the Django setting that turns it off (None: only the version guard)
    written_for: dict[str, str]  # distribution -> the version the path was written against
    what: str  # what the path replaces, for the log line


PATHS = {
    path.name: path
    for path in (
        FastPath(
            "wire",
            "CHORUS_FAST_WIRE",
            {"hiredis": "3.5.0", "redis": "8.1.0"},
            "the fan-out's hand-written Redis connections (stock: redis-py's asyncio connections)",
        ),
        FastPath(
            "frames",
            "CHORUS_FAST_FRAMES",
            {"daphne": "4.2.3", "autobahn": "26.11.1", "Twisted": "26.10.0"},
            "WebSocket frames written straight to daphne's TCP connection (stock: daphne's own send)",
        ),
        FastPath(
            "dispatch",
            "CHORUS_FAST_DISPATCH",
            {"channels": "4.3.2"},
            "consumers' dispatch without a database-thread hop per message (stock: Channels' dispatch)",
        ),
        FastPath(
            "model_stream",
            "CHORUS_FAST_MODEL_STREAM",
            {"openai": "3.54.0", "autogen-ext": "0.7.5", "autogen-core": "0.7.5", "aiohttp": "3.14.5"},
            "the model's stream read by Chorus over aiohttp (stock: AutoGen's OpenAIChatCompletionClient)",
        ),
        FastPath(
            "layer_send",
            "CHORUS_FAST_LAYER_SEND",
            {"channels-redis": "4.3.0"},
            "the channel layer's send as one Lua script (stock: channels-redis's four commands)",
        ),
        FastPath(
            "fallback_selector",
            None,
            {"autogen-agentchat": "0.7.5"},
            "the selector's fallback speaker (stock: AutoGen's SelectorGroupChat, which repeats the last speaker)",
        ),
    )
}


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_mismatches(path: FastPath) -> list[str]:
    """`name installed (written for wanted)` for each library whose installed version is not the one the path
    was written against."""
    found = []
    for distribution, wanted in path.written_for.items():
        installed = installed_version(distribution)
        if installed != wanted:
            found.append(f"{distribution} {installed or 'missing'} (written for {wanted})")
    return found


def switched_on(path: FastPath) -> bool:
    """The settings' word alone: CHORUS_FAST_PATHS and the path's own setting."""
    if not getattr(settings, "CHORUS_FAST_PATHS", True):
        return False
    return path.setting is None or bool(getattr(settings, path.setting, True))


@cache
def _versions_fit(name: str) -> bool:
    """Checked once per process; a mismatch is logged once, here."""
    path = PATHS[name]
    mismatches = version_mismatches(path)
    if mismatches:
        logger.warning(
            "fast path %s is off: %s; taking the stock path instead of %s", name, ", ".join(mismatches), path.what
        )
    return not mismatches


def enabled(name: str) -> bool:
    """Whether this process takes the fast path `name` (a key of PATHS)."""
    path = PATHS[name]
    return switched_on(path) and _versions_fit(name)


def fallback_selector() -> bool:
    """Whether team configs naming FallbackSelectorGroupChat get its fallback speaker. Not a setting: a team
    that names a fallback speaker wants it. On other AutoGen versions, the team still runs as AutoGen's own
    SelectorGroupChat (a turn nobody was named for goes to the previous speaker again): a team that may end
    without an answer beats a worker that refuses to start."""
    return _versions_fit("fallback_selector")


@cache
def log_summary() -> None:
    """One line at a process's start: which fast paths it takes (and a warning for each the versions turn off).
    Once per process, whichever entry point calls it first."""
    states = {name: enabled(name) for name, path in PATHS.items() if path.setting is not None}
    states["fallback_selector"] = fallback_selector()
    logger.info("fast paths: %s", ", ".join(f"{name} {'on' if on else 'off'}" for name, on in states.items()))


def reset() -> None:
    """Forget the version checks (tests change the versions they see)."""
    _versions_fit.cache_clear()
    log_summary.cache_clear()
