"""What a client sends that the database, Redis or a socket could not take as it is: numbers and text."""

import re

# The highest seq a client may name: PostgreSQL's and SQLite's largest integer. A Redis stream ID is 64-bit
# unsigned, so `after_seq + 1` still makes a valid one (fanout.RedisBackend.read_after).
MAX_SEQ = 2**63 - 1
_MAX_SEQ_DIGITS = len(str(MAX_SEQ))
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def parse_seq(value) -> int | None:
    """A seq as a client names it (`?after_seq=`, `Last-Event-ID`, a resume frame's `after_seq`): an integer,
    or a string of ASCII digits, from 0 to MAX_SEQ. None for anything else: `-1`, `1.0`, ` 1`, `²` (a digit to
    `str.isdigit()`, not to `int()`), `10**30`, True."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_SEQ else None
    if isinstance(value, str) and 0 < len(value) <= _MAX_SEQ_DIGITS and value.isascii() and value.isdigit():
        number = int(value)
        return number if number <= MAX_SEQ else None
    return None


def storable(text: str) -> bool:
    """False for text that cannot be stored as it is: a NUL (PostgreSQL refuses it in text) or a lone
    surrogate (`"\\ud800"` in JSON: no UTF-8 encoding exists for it, so no database, Redis or socket takes it)."""
    return _UNSTORABLE.search(text) is None


def made_storable(text: str) -> str:
    """Text from outside (a model's words, a tool's result) as a database takes it: a NUL becomes U+FFFD, a lone
    surrogate "?". What a person sends is refused instead (`storable`), so they can fix it."""
    if storable(text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
