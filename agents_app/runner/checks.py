"""The check a stored team config passes before it is saved: the one place the domain asks the runner.

The domain calls `check_stored_team` through the CHORUS_TEAM_CHECKER setting (a dotted path, resolved when a
team is saved), never by importing it: AutoGen is the only judge of an AutoGen config, and loading it costs a
web process only when an admin saves a team, not at start.
"""

from collections.abc import Iterable
from typing import Any

from agents_app.runner.config import ModelSettings
from agents_app.runner.router import validate_router_config
from agents_app.runner.teams import validate_team_config
from agents_app.runner.tools import TOOL_NAMES


def check_stored_team(kind: str, config: Any, *, team_slugs: Iterable[str], settings: Any) -> list[str]:
    """The agents' names of a team config ([] for a router); raises a ValueError that says what is wrong.
    `settings` are the deployment's (a model client may connect only to the endpoints they name)."""
    if kind == "router":
        validate_router_config(config, team_slugs)
        return []
    return validate_team_config(config, TOOL_NAMES, ModelSettings.from_settings(settings))
