"""Questions a team asks the person mid-run, and going on from the person's answer.

A team asks in three ways: a Swarm agent hands off to the user (AutoGen's `HandoffMessage` with target
"user"), an agent calls a tool that needs the person's approval (a registry tool named with
`"needs_approval": true`), or a user-proxy agent's turn comes (`PersonProxyAgent`). Either way the turn stops
after that turn (AutoGen's documented way to wait for a person: a termination condition, then run the team
again with the answer), its state is saved with a marker saying what it waits for (`WAITING_KEY`), and the
turn's result carries an `InputAsk`. The next turn loaded from that state takes its task as the answer: a
Swarm gets a `HandoffMessage` from the user back to the agent that asked; a user proxy's turn is the person's
words as its message; an approved call is run here and its result given to the team as the asking agent's
summary of it; a rejected one is not run, and the team is told so.

Plain Python and AutoGen: no Django.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.agents import UserProxyAgent
from autogen_agentchat.agents._user_proxy_agent import UserProxyAgentConfig
from autogen_agentchat.conditions import ExternalTermination, HandoffTermination
from autogen_agentchat.messages import HandoffMessage, TextMessage, ToolCallSummaryMessage
from autogen_agentchat.teams import BaseGroupChat, Swarm
from autogen_core import CancellationToken, Component, FunctionCall
from autogen_core.models import FunctionExecutionResult
from autogen_core.tools import BaseTool

logger = logging.getLogger(__name__)

USER = "user"  # the name AutoGen gives the person (a Swarm's handoff target)
WAITING_KEY = "chorus_waiting"  # added to a saved team state: what the team waits for
APPROVE, REJECT = "Approve", "Reject"
HANDOFF, APPROVAL, USER_PROXY = "handoff", "approval", "user_proxy"
PENDING = "This call needs the person's approval; it has not run yet. Wait for their answer."
REJECTED = "The person rejected this call; it did not run."


@dataclass(frozen=True)
class InputAsk:
    """What the team asks the person; `calls` are the tool calls an approval is about ({call_id, source,
    name, arguments})."""

    kind: str
    source: str
    prompt: str
    options: tuple[str, ...] = ()
    calls: tuple[dict[str, str], ...] = ()

    def marker(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "calls": list(self.calls)}


@dataclass
class ApprovalLedger:
    """The tool calls of one turn that wait for approval. Gated tools report here; the turn stops the team
    after the asking agent's turn (`stop`)."""

    gated: set[str] = field(default_factory=set)  # tool names that need approval
    stop: ExternalTermination = field(default_factory=ExternalTermination)
    asked: bool = False
    proxies: set[str] = field(default_factory=set)  # the team's user-proxy agents
    proxy_asked: str | None = None  # the proxy whose turn came: the person's turn

    def pause(self) -> None:
        self.asked = True
        self.stop.set()


_ledger: contextvars.ContextVar[ApprovalLedger | None] = contextvars.ContextVar("chorus_ledger", default=None)


def set_ledger(ledger: ApprovalLedger | None) -> contextvars.Token:
    return _ledger.set(ledger)


def reset_ledger(token: contextvars.Token) -> None:
    _ledger.reset(token)


class ApprovalGate(BaseTool):
    """A registry tool that never runs inside the team: it tells the model its call waits for approval and
    asks the turn to stop. The approved call is run by `resume_task`, outside the team."""

    def __init__(self, inner: BaseTool, ledger: ApprovalLedger | None):
        super().__init__(inner.args_type(), str, inner.name, inner.description)
        self.inner = inner
        self._ledger = ledger
        if ledger is not None:
            ledger.gated.add(inner.name)

    async def run(self, args: Any, cancellation_token: CancellationToken) -> str:
        if self._ledger is not None:
            self._ledger.pause()
        return PENDING


PROXY_WAITING = "(waiting for the person's answer)"


class PersonProxyAgent(UserProxyAgent, Component[UserProxyAgentConfig]):
    """AutoGen's UserProxyAgent as Chorus runs it: a stored config names `UserProxyAgent`, and loading gives
    this. When its turn comes it does not wait for a person inside the turn (a worker would be held for as
    long as they take): it says it waits, the team stops, and the person's answer comes back as this agent's
    message when the run goes on (`resume_task`)."""

    component_provider_override = "agents_app.runner.PersonProxyAgent"

    def __init__(self, name: str, *, description: str = "A human user", input_func: Any = None):
        super().__init__(name, description=description, input_func=self._ask_person)
        self._ledger = _ledger.get()
        if self._ledger is not None:
            self._ledger.proxies.add(name)

    async def _ask_person(self, prompt: str, cancellation_token: CancellationToken | None = None) -> str:
        if self._ledger is not None:
            self._ledger.proxy_asked = self.name
            self._ledger.stop.set()
        return PROXY_WAITING

    @classmethod
    def _from_config(cls, config: UserProxyAgentConfig) -> PersonProxyAgent:
        return cls(config.name, description=config.description)


def gate(tool: BaseTool) -> BaseTool:
    """The tool behind an approval gate, reporting to the ledger of the turn being loaded."""
    return ApprovalGate(tool, _ledger.get())


def prepare_for_people(team: BaseGroupChat, ledger: ApprovalLedger) -> None:
    """Make the team stop where a person must answer: after a turn whose tool calls wait for approval, and
    (a Swarm) at a handoff to the user, even when its config forgot the HandoffTermination. Must run before
    the team is first used (AutoGen builds its manager with the condition then)."""
    stops = [ledger.stop]
    if isinstance(team, Swarm):
        stops.append(HandoffTermination(target=USER))
    condition = team._termination_condition
    for stop in stops:
        condition = stop if condition is None else condition | stop
    team._termination_condition = condition


def split_state(state: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A saved state without Chorus's marker, and the marker (None when the team waits for nobody)."""
    if not state:
        return None, None
    state = dict(state)
    return state, state.pop(WAITING_KEY, None)


def with_marker(state: Mapping[str, Any] | None, ask: InputAsk) -> dict[str, Any] | None:
    if state is None:
        return None
    if ask.kind == USER_PROXY:
        state = _without_placeholder(state, ask.source)
    return {**state, WAITING_KEY: ask.marker()}


def _without_placeholder(state: Mapping[str, Any], proxy: str) -> dict[str, Any]:
    """The saved state without the message a proxy said when its turn came (PROXY_WAITING): the group chat's
    thread and the other agents' unread messages keep only the person's answer, which comes next."""

    def kept(messages: list) -> list:
        return [m for m in messages if not (m.get("source") == proxy and m.get("content") == PROXY_WAITING)]

    agents = {}
    for name, agent_state in (state.get("agent_states") or {}).items():
        agent_state = dict(agent_state)
        for key in ("message_buffer", "message_thread"):
            if isinstance(agent_state.get(key), list):
                agent_state[key] = kept(agent_state[key])
        agents[name] = agent_state
    return {**state, "agent_states": agents}


def is_approval(answer: str) -> bool:
    return answer.strip().rstrip(".!").lower() in ("approve", "approved", "yes")


async def resume_task(
    marker: Mapping[str, Any], answer: str, tools: Mapping[str, BaseTool], emit_result: Callable[[str, str, bool], None]
) -> Any:
    """The task that gives the team the person's answer to what it asked (see the module's docstring).
    `emit_result(call_id, content, is_error)` reports the outcome of each call an approval was about. A marker
    marked `closed` (the question was stopped or expired) can no longer approve anything."""
    if marker.get("kind") == HANDOFF:
        return HandoffMessage(source=USER, target=marker["source"], content=answer)
    if marker.get("kind") == USER_PROXY:
        return TextMessage(source=marker["source"], content=answer)  # the proxy's turn, the person's words
    if marker.get("kind") != APPROVAL:
        return answer
    calls = marker.get("calls") or []
    approved = is_approval(answer) and not marker.get("closed")
    results = []
    for call in calls:
        content, is_error = await _run_approved(call, tools) if approved else (REJECTED, True)
        emit_result(call["call_id"], content, is_error)
        results.append(FunctionExecutionResult(call_id=call["call_id"], content=content, is_error=is_error,
                                               name=call["name"]))  # fmt: skip
    if approved:
        summary = "\n".join(result.content for result in results)
    else:
        names = ", ".join(f"{call['name']} with {call['arguments']}" for call in calls)
        said = "" if answer.strip().lower() == REJECT.lower() else f" They said: {answer}"
        summary = f"The person rejected the call to {names}; it did not run.{said}"
    # The asking agent's own summary of its calls, as AutoGen writes one when a tool runs inside the turn.
    return ToolCallSummaryMessage(
        source=marker["source"], content=summary, results=results,
        tool_calls=[FunctionCall(id=c["call_id"], name=c["name"], arguments=c["arguments"]) for c in calls],
    )  # fmt: skip


async def _run_approved(call: Mapping[str, str], tools: Mapping[str, BaseTool]) -> tuple[str, bool]:
    tool = tools.get(call["name"])
    if tool is None:
        return f"The tool {call['name']} is not available any more.", True
    try:
        arguments = json.loads(call["arguments"] or "{}")
        value = await tool.run_json(arguments, CancellationToken(), call_id=call["call_id"])
        return tool.return_value_as_string(value), False
    except Exception as exc:
        logger.warning("an approved tool call failed: %s", exc.__class__.__name__)
        return f"Error: {exc}", True


def approval_prompt(calls: list[dict[str, str]]) -> str:
    asks = "; ".join(f"{call['source']} wants to run {call['name']} with {call['arguments']}" for call in calls)
    return f"{asks}. Approve?"
