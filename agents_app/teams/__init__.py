"""The teams Chorus ships with: their component configs live beside this file as JSON."""

import json
from collections.abc import Iterable
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
    {
        "slug": "writer-critic",
        "name": "Writer and critic",
        "description": "A writer drafts, a critic reviews, the writer revises: for texts, poems, emails and the like.",
        "config_file": "writer_critic.json",
        "final_speakers": ["writer"],
        "steps_display": "folded",
    },
    {
        "slug": "research-desk",
        "name": "Research desk",
        "description": "A planner, an analyst with tools (calculator, clock, search of your past conversations) "
        "and a reporter who writes the answer: for questions that need facts or figures.",
        "config_file": "research_desk.json",
        "final_speakers": ["reporter"],
        "steps_display": "folded",
    },
    {
        "slug": "research-desk-approval",
        "name": "Research desk with approval",
        "description": "An analyst who asks your approval before each tool call (calculator, clock, search of your "
        "past conversations), and a reporter who writes the answer.",
        "config_file": "research_desk_approval.json",
        "final_speakers": ["reporter"],
        "steps_display": "open",
    },
    {
        "slug": "travel-desk",
        "name": "Travel desk",
        "description": "A concierge who asks you for the missing details of a trip, then a planner who writes it up.",
        "config_file": "travel_desk.json",
        "final_speakers": ["planner"],
        "steps_display": "folded",
    },
    {
        "slug": "automatic",
        "name": "Automatic",
        "description": "Routes each message to the team that fits it best, and says which and why.",
        "config_file": "automatic.json",
        "kind": "router",
        "final_speakers": [],
        "steps_display": "folded",
    },
]


def seed_builtin_teams(team_model, slugs: Iterable[str] | None = None) -> None:
    """Create or refresh the shipped teams (or those of `slugs`). Takes the model class, so a migration can pass
    its historical one: fields that model does not have yet are left out."""
    fields = {field.name for field in team_model._meta.get_fields()}
    for spec in BUILTIN_TEAMS:
        if slugs is not None and spec["slug"] not in slugs:
            continue
        values = {key: value for key, value in spec.items() if key in fields and key != "slug"}
        values["config"] = json.loads((HERE / spec["config_file"]).read_text())
        values["enabled"] = True
        team_model.objects.update_or_create(slug=spec["slug"], defaults=values)
