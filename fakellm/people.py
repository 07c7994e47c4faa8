"""The offline model's part in teams that ask the person mid-run (the shipped "Travel desk"): with
``--demo-roles``, a request from the travel desk's concierge (its system message opens "You are the concierge")
that offers the handoff tools hands off to the user for the trip's details, and once the person has answered
(their last message follows the concierge's handoff to the user), hands off to the planner.

This module must not import Django (the server runs as ``python -m fakellm``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

CONCIERGE_RE = re.compile(r"^\s*You are the concierge\b", re.IGNORECASE)
TO_USER, TO_PLANNER = "transfer_to_user", "transfer_to_planner"


def concierge_handoff(messages: list[Mapping[str, Any]], offered: set[str], system: str) -> str | None:
    """The handoff tool the concierge calls now, or None when the request is not the concierge's."""
    if not CONCIERGE_RE.match(system) or not {TO_USER, TO_PLANNER} <= offered:
        return None
    return TO_PLANNER if _answered_a_handoff(messages) else TO_USER


def _answered_a_handoff(messages: list[Mapping[str, Any]]) -> bool:
    """Whether the person's last message answers the concierge's handoff to the user."""
    for message in reversed(messages[:-1] if messages and messages[-1].get("role") == "user" else messages):
        if message.get("role") == "user":
            return False
        for call in message.get("tool_calls") or []:
            if (call.get("function") or {}).get("name") == TO_USER:
                return True
    return False
