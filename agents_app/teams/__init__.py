"""The teams Chorus ships with: their component configs live beside this file as JSON."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

BUILTIN_TEAMS = [
    {
        "slug": "assistant",
        "name": "Assistant",
        "description": "One assistant agent that answers each message.",
        "config_file": "assistant.json",
        "final_speakers": ["assistant"],
        "steps_display": "folded",
        "is_default": True,
    },
]


def seed_builtin_teams(team_model) -> None:
    """Create or refresh the shipped teams. Takes the model class, so migrations can pass their historical one."""
    for spec in BUILTIN_TEAMS:
        spec = dict(spec)
        config = json.loads((HERE / spec.pop("config_file")).read_text())
        slug = spec.pop("slug")
        team_model.objects.update_or_create(slug=slug, defaults={**spec, "config": config, "enabled": True})
