"""Intent routing: pick the team that answers one message, and say why. Knows nothing of Django.

A router's config (a Team of kind "router") names candidate teams, keyword rules, a fallback, and whether to
ask the model when no rule matches. The model call goes through the same OpenAI-compatible client the teams use.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autogen_core.models import SystemMessage, UserMessage
from autogen_ext.models.openai import OpenAIChatCompletionClient

from agents_app.runner.config import ModelSettings
from agents_app.runner.errors import classify_error
from agents_app.runner.teams import UsageMeter

ROUTING = "routing"  # the purpose of the router's model request, in Route.usage

MODEL_INFO = {"vision": False, "function_calling": False, "json_output": False, "family": "unknown",
              "structured_output": False}  # fmt: skip


class RouterConfigError(ValueError):
    """A router config Chorus refuses; the message says why."""


@dataclass(frozen=True)
class Route:
    team: str
    reason: str
    # The model requests routing made, as in runner.TurnResult.usage: {"routing": {"prompt_tokens",
    # "completion_tokens", "requests"}} when the model was asked (a failed request counts), else {}.
    usage: dict[str, dict[str, int]] = field(default_factory=dict)


def validate_router_config(config: Any, team_slugs: Iterable[str]) -> None:
    known = set(team_slugs)
    if not isinstance(config, dict) or config.get("component_type") != "chorus.router":
        raise RouterConfigError('A router config is a JSON object with "component_type": "chorus.router".')
    teams = config.get("teams")
    if not isinstance(teams, list) or not teams or not all(isinstance(t, str) for t in teams):
        raise RouterConfigError('"teams" must be a non-empty list of team slugs.')
    unknown = sorted(set(teams) - known)
    if unknown:
        raise RouterConfigError(f"Unknown teams (or routers, which cannot be routed to): {', '.join(unknown)}.")
    if config.get("fallback") not in teams:
        raise RouterConfigError('"fallback" must be one of "teams".')
    for rule in config.get("rules", []):
        keywords = rule.get("keywords") if isinstance(rule, dict) else None
        if (
            rule.get("team") not in teams
            or not isinstance(keywords, list)
            or not all(isinstance(k, str) and k.strip() for k in keywords)
        ):
            raise RouterConfigError('Each rule is {"team": <one of "teams">, "keywords": [non-empty strings]}.')
    if not isinstance(config.get("use_model", False), bool):
        raise RouterConfigError('"use_model" must be true or false.')


async def route(config: Mapping[str, Any], candidates: Mapping[str, str], text: str, model: ModelSettings) -> Route:
    """Choose among `candidates` (slug -> description, the enabled teams of the config) for `text`."""
    fallback = config["fallback"] if config["fallback"] in candidates else next(iter(candidates))
    lowered = text.lower()
    for rule in config.get("rules", []):
        if rule["team"] not in candidates:
            continue
        for keyword in rule["keywords"]:
            if keyword.lower() in lowered:
                return Route(rule["team"], f"the message mentions “{keyword}”")
    if not config.get("use_model"):
        return Route(fallback, "no rule matched; the router's fallback")
    meter = UsageMeter()
    try:
        reply = await _ask_model(candidates, text, model, meter)
    except Exception as exc:
        code, _detail = classify_error(exc)
        return Route(fallback, f"the routing model failed ({code}); the router's fallback", meter.usage)
    reply_lowered = reply.lower()
    for slug in sorted(candidates, key=len, reverse=True):
        if slug in reply_lowered:
            return Route(slug, f"the model chose it: {reply.strip()[:150]}", meter.usage)
    return Route(fallback, "the model named no team; the router's fallback", meter.usage)


async def _ask_model(candidates: Mapping[str, str], text: str, model: ModelSettings, meter: UsageMeter) -> str:
    teams = "\n".join(f"- {slug}: {description}" for slug, description in candidates.items())
    system = (
        "You route a person's message to the team best able to answer it. The teams:\n"
        f"{teams}\n\nReply with the team's name, then one short sentence saying why."
    )
    client = OpenAIChatCompletionClient(
        model=model.model, api_key=model.api_key, base_url=model.base_url, timeout=model.timeout,
        max_retries=model.max_retries, model_info=MODEL_INFO,
    )  # fmt: skip
    entry = meter.request(ROUTING)
    try:
        result = await client.create([SystemMessage(content=system), UserMessage(content=text, source="user")])
    finally:
        await client.close()
    meter.add(entry, result.usage)
    return result.content if isinstance(result.content, str) else ""
