"""AutoGen-facing code: team configs, Chorus's own AutoGen components, tools, the model stream, the router and
one turn of a team. Plain Python and AutoGen: nothing here imports Django or Channels (.importlinter).

This package's names are its public API. Stored team configs name four classes by this package's path
(`agents_app.runner.TappedModelClient`, `RegistryTool`, `FallbackSelectorGroupChat`,
`TextFromSourcesTermination`): they must stay importable from here, or existing rows and exports stop loading.
"""

from agents_app.runner.config import (
    NO_KEY,
    FastPaths,
    ModelEndpoint,
    ModelSettings,
    TeamConfigError,
    model_endpoints,
    prepare_team_config,
)
from agents_app.runner.errors import classify_error
from agents_app.runner.human import PersonProxyAgent
from agents_app.runner.teams import (
    FallbackSelectorGroupChat,
    RegistryTool,
    TappedModelClient,
    TextFromSourcesTermination,
    UsageMeter,
    load_team,
    registry_tool_config,
    validate_team_config,
)
from agents_app.runner.turn import (
    AgentLoop,
    CompletedMessage,
    RunnerEvent,
    TeamTurn,
    TokenDelta,
    ToolCall,
    ToolResult,
    TurnFile,
    TurnRequest,
    TurnResult,
    run_turn,
    turn_task,
)

__all__ = [
    "NO_KEY",
    "AgentLoop",
    "CompletedMessage",
    "FastPaths",
    "FallbackSelectorGroupChat",
    "ModelEndpoint",
    "ModelSettings",
    "PersonProxyAgent",
    "RegistryTool",
    "RunnerEvent",
    "TappedModelClient",
    "TeamConfigError",
    "TeamTurn",
    "TextFromSourcesTermination",
    "TokenDelta",
    "ToolCall",
    "ToolResult",
    "TurnFile",
    "TurnRequest",
    "TurnResult",
    "UsageMeter",
    "classify_error",
    "load_team",
    "model_endpoints",
    "prepare_team_config",
    "registry_tool_config",
    "run_turn",
    "turn_task",
    "validate_team_config",
]
