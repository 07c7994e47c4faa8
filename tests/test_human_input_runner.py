"""The runner's side of human in the loop, with the offline model and no Django: a Swarm's handoff to the user
and its round trip, a saved Swarm state that old Chorus left at a handoff to the user, and tool calls that wait
for the person's approval."""

import json

import pytest
from autogen_core.tools import FunctionTool

from agents_app.runner import (
    CompletedMessage,
    ModelSettings,
    ToolCall,
    ToolResult,
    TurnRequest,
    run_turn,
    validate_team_config,
)
from agents_app.runner.human import WAITING_KEY
from agents_app.runner.tools import build_tools
from agents_app.teams import HERE

TRAVEL = json.loads((HERE / "travel_desk.json").read_text())
APPROVAL = json.loads((HERE / "research_desk_approval.json").read_text())
TO_USER = "[[concierge>tool:transfer_to_user]]"
UNUSED_MODEL = ModelSettings(api_key="unused")


@pytest.fixture
def offline(fakellm_url):
    return ModelSettings(api_key="offline", base_url=fakellm_url)


async def turn(model, config, task, state=None, final=("planner",), tools=None):
    events = []
    request = TurnRequest(team_config=config, task=task, team_state=state, final_speakers=frozenset(final),
                          tools=tools or {})  # fmt: skip
    result = await run_turn(request, model, events.append)
    return events, result


def travel_without_handoff_termination() -> dict:
    """The Travel desk as teams were written before Chorus waited for people: it stops at a handoff to the
    user only because the config says so."""
    config = json.loads(json.dumps(TRAVEL))
    config["config"]["termination_condition"]["config"]["conditions"] = [
        c
        for c in config["config"]["termination_condition"]["config"]["conditions"]
        if c["provider"] != "autogen_agentchat.conditions.OrTerminationCondition"
    ]
    return config


@pytest.mark.asyncio
async def test_a_swarm_handoff_to_the_user_waits_with_the_agents_question(offline):
    events, result = await turn(offline, TRAVEL, f"Plan a weekend in Lyon. {TO_USER}")

    assert result.status == "waiting", result.error_detail
    ask = result.input_ask
    assert (ask.kind, ask.source, ask.options) == ("handoff", "concierge", ())
    assert "Which dates" in ask.prompt
    assert result.team_state[WAITING_KEY] == {"kind": "handoff", "source": "concierge", "calls": []}
    assert any(isinstance(e, ToolCall) and e.name == "transfer_to_user" for e in events)


@pytest.mark.asyncio
async def test_the_answer_goes_back_to_the_agent_that_asked_and_reaches_the_team(offline):
    _events, asked = await turn(offline, TRAVEL, f"Plan a weekend in Lyon. {TO_USER}")

    events, result = await turn(
        offline, TRAVEL, "Friday to Sunday, from Paris [[concierge>tool:transfer_to_planner]]", asked.team_state
    )

    assert result.status == "succeeded", result.error_detail
    answers = [e for e in events if getattr(e, "is_final_answer", False)]
    assert answers and answers[-1].source == "planner"
    assert "Friday to Sunday, from Paris" in answers[-1].content  # the person's answer is in the team's memory
    assert WAITING_KEY not in result.team_state


@pytest.mark.asyncio
async def test_a_swarm_state_left_at_a_handoff_to_the_user_no_longer_breaks_later_turns(offline):
    # What Chorus kept before: a turn whose agent answered, then handed off to the user, saved as is.
    _events, asked = await turn(offline, TRAVEL, f"Plan a weekend in Lyon. {TO_USER}")
    old_state = {key: value for key, value in asked.team_state.items() if key != WAITING_KEY}

    for text in ("Friday, from Paris [[concierge>tool:transfer_to_planner]]", "And a museum, please?"):
        events, result = await turn(offline, TRAVEL, text, old_state)
        assert result.status == "succeeded", result.error_detail
        assert "not one of the participants" not in result.error_detail
        old_state = result.team_state


def calculator_spy():
    calls = []

    def calculator(expression: str) -> str:
        calls.append(expression)
        return str(eval(expression, {"__builtins__": {}}))  # noqa: S307 - the test's own arithmetic

    tools = build_tools(search_conversations=lambda query: "")
    return {**tools, "calculator": FunctionTool(calculator, description="Arithmetic.")}, calls


ASK_CALC = 'What is 6*7? [[analyst>tool:calculator {"expression": "6*7"}]]'


@pytest.mark.asyncio
async def test_a_tool_that_needs_approval_does_not_run_and_the_team_asks_naming_it(offline):
    tool, calls = calculator_spy()

    events, result = await turn(offline, APPROVAL, ASK_CALC, final=("reporter",), tools=tool)

    assert result.status == "waiting", result.error_detail
    assert calls == []
    ask = result.input_ask
    assert (ask.kind, ask.source, ask.options) == ("approval", "analyst", ("Approve", "Reject"))
    assert "calculator" in ask.prompt and "6*7" in ask.prompt
    assert not [e for e in events if isinstance(e, ToolResult)], "no result until the person answers"


@pytest.mark.asyncio
async def test_an_approved_call_runs_once_and_its_result_reaches_the_reporter(offline):
    tool, calls = calculator_spy()
    _events, asked = await turn(offline, APPROVAL, ASK_CALC, final=("reporter",), tools=tool)

    events, result = await turn(offline, APPROVAL, "Approve", asked.team_state, ("reporter",), tool)

    assert result.status == "succeeded", result.error_detail
    assert calls == ["6*7"]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.content, r.is_error) for r in results] == [("42", False)]
    assert results[0].call_id == asked.input_ask.calls[0]["call_id"]
    summary = [e for e in events if isinstance(e, CompletedMessage) and e.role == "tool"]
    assert [(m.source, m.content) for m in summary] == [("analyst", "42")]  # the analyst's finding, for the team
    assert [e for e in events if getattr(e, "is_final_answer", False)][-1].source == "reporter"


@pytest.mark.asyncio
async def test_a_rejected_call_never_runs_and_the_team_is_told(offline):
    tool, calls = calculator_spy()
    _events, asked = await turn(offline, APPROVAL, ASK_CALC, final=("reporter",), tools=tool)

    events, result = await turn(offline, APPROVAL, "Reject", asked.team_state, ("reporter",), tool)

    assert result.status == "succeeded", result.error_detail
    assert calls == []
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(results) == 1 and results[0].is_error and "rejected" in results[0].content
    summary = [e.content for e in events if isinstance(e, CompletedMessage) and e.role == "tool"]
    assert len(summary) == 1 and summary[0].startswith("The person rejected the call to calculator")


@pytest.mark.asyncio
async def test_a_stopped_approval_cannot_be_approved_by_a_later_message(offline):
    tool, calls = calculator_spy()
    _events, asked = await turn(offline, APPROVAL, ASK_CALC, final=("reporter",), tools=tool)
    state = {**asked.team_state, WAITING_KEY: {**asked.team_state[WAITING_KEY], "closed": True}}

    _events, result = await turn(offline, APPROVAL, "Approve", state, ("reporter",), tool)

    assert result.status == "succeeded" and calls == []


def with_user_proxy() -> dict:
    """The assistant team with AutoGen's UserProxyAgent taking every other turn, as a config stores it."""
    config = json.loads((HERE / "assistant.json").read_text())
    proxy = {"provider": "autogen_agentchat.agents.UserProxyAgent", "component_type": "agent", "version": 1,
             "component_version": 1, "config": {"name": "user", "description": "The person."}}  # fmt: skip
    config["config"]["participants"].append(proxy)
    config["config"]["max_turns"] = 2
    return config


def test_validation_accepts_a_user_proxy():
    assert validate_team_config(with_user_proxy(), frozenset(), UNUSED_MODEL) == ["assistant", "user"]


@pytest.mark.asyncio
async def test_a_user_proxys_turn_waits_for_the_person_and_their_words_reach_the_team(offline):
    events, asked = await turn(offline, with_user_proxy(), "Help me plan my week.", final=("assistant",))

    assert asked.status == "waiting", asked.error_detail
    first = [e for e in events if isinstance(e, CompletedMessage)]
    assert [m.source for m in first] == ["assistant"], "the proxy's placeholder is never a message"
    assert (asked.input_ask.kind, asked.input_ask.source) == ("user_proxy", "user")
    assert asked.input_ask.prompt == first[0].content  # what the person answers

    events, again = await turn(offline, with_user_proxy(), "Tuesday is free", asked.team_state, ("assistant",))

    replies = [e for e in events if isinstance(e, CompletedMessage)]
    assert [m.source for m in replies] == ["assistant"]
    assert "Tuesday is free" in replies[0].content and "turn 2" in replies[0].content  # memory kept
    assert again.status == "waiting" and again.input_ask.kind == "user_proxy"  # the proxy's next turn
