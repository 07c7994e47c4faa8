"""What a stored team config may contain, and how it is connected to the deployment's model endpoints.

Plain data in, plain data out: nothing here loads AutoGen classes except to refuse tools defined inline.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from autogen_core.tools import BaseTool, FunctionTool

logger = logging.getLogger(__name__)


# Providers a stored team config may name. Anything else (arbitrary classes, FunctionTool with source code
# that executes on load, code executors) is refused: a config is data, never code.
ALLOWED_PROVIDERS = {
    "team": {
        "autogen_agentchat.teams.RoundRobinGroupChat",
        "autogen_agentchat.teams.SelectorGroupChat",
        "autogen_agentchat.teams.Swarm",
        "agents_app.runner.FallbackSelectorGroupChat",
    },
    # A UserProxyAgent loads as agents_app.runner.PersonProxyAgent: the person's turn never holds a worker.
    "agent": {"autogen_agentchat.agents.AssistantAgent", "autogen_agentchat.agents.UserProxyAgent"},
    "model": {
        "autogen_ext.models.openai.OpenAIChatCompletionClient",
        "autogen_ext.models.openai.AzureOpenAIChatCompletionClient",
    },
    "termination": {
        "autogen_agentchat.conditions.MaxMessageTermination",
        "autogen_agentchat.conditions.TextMentionTermination",
        "autogen_agentchat.conditions.StopMessageTermination",
        "autogen_agentchat.conditions.TokenUsageTermination",
        "autogen_agentchat.conditions.HandoffTermination",
        "autogen_agentchat.conditions.TimeoutTermination",
        "autogen_agentchat.conditions.SourceMatchTermination",
        "autogen_agentchat.conditions.TextMessageTermination",
        "autogen_agentchat.base.OrTerminationCondition",
        "autogen_agentchat.base.AndTerminationCondition",
        "agents_app.runner.TextFromSourcesTermination",
    },
    "chat_completion_context": {
        "autogen_core.model_context.UnboundedChatCompletionContext",
        "autogen_core.model_context.BufferedChatCompletionContext",
        "autogen_core.model_context.HeadAndTailChatCompletionContext",
    },
    "workbench": {"autogen_core.tools.StaticStreamWorkbench", "autogen_core.tools.StaticWorkbench"},
    "tool": {"agents_app.runner.RegistryTool"},
}
DEFAULT_MODEL = "default"  # a config's model name that means "the deployment's OPENAI_MODEL"
MASKED_KEY = "**********"  # what dump_component() writes for a key (docs/architecture.md, trap 5)
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the deployment's endpoint when OPENAI_BASE_URL is empty
AZURE_PROVIDER = "autogen_ext.models.openai.AzureOpenAIChatCompletionClient"
USER_PROXY, PERSON_PROXY = "autogen_agentchat.agents.UserProxyAgent", "agents_app.runner.PersonProxyAgent"
# The key sent to an endpoint that needs none (a local Ollama). Never empty: given no key, the openai SDK
# would read OPENAI_API_KEY from the environment, the deployment's key, and send it there.
NO_KEY = "no-key"
# Model request purposes, the keys of TurnResult.usage (router.Route.usage has "routing").
AGENT, SPEAKER_SELECTION = "agent", "speaker_selection"


class TeamConfigError(ValueError):
    """A team config that Chorus refuses to load; the message says why, for the admin who wrote it."""


@dataclass(frozen=True)
class ModelEndpoint:
    """A model server other than the deployment's, named in CHORUS_MODEL_ENDPOINTS, with a key of its own."""

    base_url: str
    api_key: str = ""  # "" when it needs none
    model: str = ""  # what a config's "default" model means there ("": OPENAI_MODEL)


@dataclass(frozen=True)
class FastPaths:
    """Which of the runner's fast paths to take; the worker decides, from its settings and the installed versions
    (agents_app/ops/fastpaths.py). `model_stream`: read the model's HTTP stream here, over aiohttp
    (modelstream.py), rather than through AutoGen's OpenAI client. `fallback_selector`: FallbackSelectorGroupChat's
    own manager, a subclass of AutoGen's private one, rather than AutoGen's (which ignores the fallback speaker)."""

    model_stream: bool = True
    fallback_selector: bool = True


@dataclass(frozen=True)
class ModelSettings:
    """Where model clients connect. Keys come only from here (the environment), never from a config.

    `api_key` is the deployment's key: it goes only to the deployment's endpoint, `base_url` (OpenAI's own API
    when None). Other endpoints are the `endpoints` a config may name, each with its own key."""

    api_key: str
    base_url: str | None = None
    model: str = "chorus-offline"  # used where a config names its model "default"
    timeout: float = 60.0
    max_retries: int = 2
    endpoints: Mapping[str, ModelEndpoint] = field(default_factory=dict, hash=False)
    fast_paths: FastPaths = FastPaths()

    @classmethod
    def from_settings(
        cls, settings: Any, environ: Mapping[str, str] = os.environ, fast_paths: FastPaths | None = None
    ) -> ModelSettings:
        """The deployment's settings, from Django's settings object (read as plain attributes)."""
        return cls(
            fast_paths=fast_paths or FastPaths(),
            api_key=settings.OPENAI_API_KEY or "offline",
            base_url=settings.OPENAI_BASE_URL or None,
            model=settings.OPENAI_MODEL,
            timeout=settings.CHORUS_MODEL_TIMEOUT,
            max_retries=settings.CHORUS_MODEL_MAX_RETRIES,
            endpoints=model_endpoints(getattr(settings, "CHORUS_MODEL_ENDPOINTS", None) or {}, environ),
        )


def model_endpoints(raw: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, ModelEndpoint]:
    """CHORUS_MODEL_ENDPOINTS (`{"NAME": {"base_url": ..., "api_key_env": ..., "model": ...}}`) with each key
    read from the environment variable it names. Raises ValueError for a malformed entry."""
    endpoints = {}
    for name, spec in raw.items():
        url = spec.get("base_url") if isinstance(spec, Mapping) else None
        key_env, default_model = (spec.get("api_key_env") or "", spec.get("model") or "") if url else ("", "")
        if (
            not isinstance(url, str)
            or not url.strip()
            or not isinstance(key_env, str)
            or not isinstance(default_model, str)
        ):
            raise ValueError(
                f'CHORUS_MODEL_ENDPOINTS["{name}"] must be {{"base_url": "...", "api_key_env": "...", "model": "..."}} '
                "(api_key_env and model optional)."
            )
        endpoints[str(name)] = ModelEndpoint(url.strip(), environ.get(key_env, "") if key_env else "", default_model)
    return endpoints


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """Every component dict (one with a provider and a component_type) inside a config, depth first."""
    if isinstance(node, dict):
        if "provider" in node and "component_type" in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def check_providers(config: Any) -> None:
    """Refuse any class outside the allow-list, inline tool code and stored keys; runs again at every load,
    so a config that reached the database some other way than the admin still cannot run code."""
    if not isinstance(config, dict) or config.get("component_type") != "team":
        raise TeamConfigError("The config must be an AutoGen team component (component_type 'team').")
    for component in _components(config):
        kind, provider = component.get("component_type"), component.get("provider")
        if kind == "tool" and provider != "agents_app.runner.RegistryTool":
            raise TeamConfigError(
                f"Tools cannot be defined in a config ({provider}): name them from Chorus's tool registry."
            )
        allowed = ALLOWED_PROVIDERS.get(kind)
        if allowed is None or provider not in allowed:
            raise TeamConfigError(f"Provider {provider!r} ({kind}) is not allowed in a Chorus team.")
        if kind == "model":
            key = component.get("config", {}).get("api_key")
            if key not in (None, "", MASKED_KEY):
                raise TeamConfigError("API keys are not stored in team configs: they come from the environment.")


def _placeholder_tool(name: str) -> BaseTool:
    def placeholder() -> str:
        return ""

    return FunctionTool(placeholder, name=name, description=f"placeholder for {name}")


def prepare_team_config(config: dict[str, Any], model: ModelSettings) -> dict[str, Any]:
    """A copy of the config ready to load: endpoints and keys from the settings, every agent streaming, usage
    reported. Raises TeamConfigError for a model client that names an endpoint the settings do not know."""
    config = copy.deepcopy(config)
    for component in _components(config):
        inner = component.setdefault("config", {})
        if component.get("component_type") == "model":
            _connect_model_client(component.get("provider"), inner, model)
            inner.setdefault("timeout", model.timeout)
            inner.setdefault("max_retries", model.max_retries)
            # Without it a streamed completion reports zero tokens (docs/architecture.md, trap 4).
            inner["stream_options"] = {"include_usage": True}
        elif component.get("component_type") == "agent" and component.get("provider") == USER_PROXY:
            component["provider"] = PERSON_PROXY
        elif component.get("component_type") == "agent":
            # Every agent streams, whatever the stored config says: the page shows words as they come.
            inner["model_client_stream"] = True
    return config


def _connect_model_client(provider: Any, inner: dict[str, Any], model: ModelSettings) -> None:
    """Set where a model client connects, and with which key, in its (copied) config.

    The deployment's key goes only to the deployment's endpoint. A config that names another server, by
    `"endpoint": "NAME"` or by a `base_url` (an AutoGen export pointing at a local Ollama), gets that server's
    own key from CHORUS_MODEL_ENDPOINTS, or is refused if the settings do not name that server."""
    name = inner.pop("endpoint", None)  # Chorus's own key, never AutoGen's
    url_key = "azure_endpoint" if provider == AZURE_PROVIDER else "base_url"
    urls = [inner[key] for key in ("base_url", "azure_endpoint") if isinstance(inner.get(key), str) and inner[key]]
    deployment_url = model.base_url or OPENAI_DEFAULT_BASE_URL
    known = ", ".join(sorted(model.endpoints)) or "none"
    endpoint: ModelEndpoint | None = None
    if name is not None:
        endpoint = model.endpoints.get(name) if isinstance(name, str) else None
        if endpoint is None:
            raise TeamConfigError(f"Unknown model endpoint {name!r}: CHORUS_MODEL_ENDPOINTS names {known}.")
        stray = [url for url in urls if not _same_endpoint(url, endpoint.base_url)]
        if stray:
            raise TeamConfigError(
                f"A model client names the endpoint {name!r} ({endpoint.base_url}) and also the URL {stray[0]}: "
                "leave the URL out."
            )
    elif urls:
        for url in urls:
            here = next((e for e in model.endpoints.values() if _same_endpoint(url, e.base_url)), None)
            if here is None and not _same_endpoint(url, deployment_url):
                raise TeamConfigError(
                    f"A model client connects to {url}, which is neither Chorus's model endpoint ({deployment_url}) "
                    f"nor one of CHORUS_MODEL_ENDPOINTS ({known}). Chorus sends its API key only to its own "
                    'endpoint: name the server in CHORUS_MODEL_ENDPOINTS, with its own key, and write "endpoint": '
                    '"NAME" in the model client\'s config instead of the URL.'
                )
            if endpoint is not None and here is not endpoint:
                raise TeamConfigError(f"A model client names two different endpoints: {', '.join(urls)}.")
            endpoint = here
    if endpoint is None:  # the deployment's endpoint, with the deployment's key
        if url_key == "base_url" and not urls:
            inner["base_url"] = deployment_url
        elif model.base_url and not urls:
            inner["base_url"] = model.base_url
        inner["api_key"] = model.api_key
        default_model = model.model
    else:
        if not urls:
            inner[url_key] = endpoint.base_url
        inner["api_key"] = endpoint.api_key or NO_KEY
        default_model = endpoint.model or model.model
    if inner.get("model") in (None, "", DEFAULT_MODEL):
        inner["model"] = default_model


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two URLs are the same endpoint (scheme, host, port and path; case and a trailing "/" aside)."""

    def key(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:  # a port that is not a number
        return False
