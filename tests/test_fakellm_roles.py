"""The offline demo shows each shipped team's character: the offline model server with --demo-roles (as
`make run` starts it) answers every agent of the shipped teams in its role, run through the real teams.

The teams run with the runner and Chorus's real tools (the calculator and the clock; the conversation search,
which reads the database, is a stand-in that reports the query it was given), against a real model server
process. No directive is in any question: what each agent does comes from its role alone.
"""

import json

import pytest

from agents_app.runner import CompletedMessage, ModelSettings, ToolCall, ToolResult, TurnRequest, router, run_turn
from agents_app.runner.tools import build_tools
from agents_app.teams import HERE
from fakellm import roles
from tests.support import Process, free_port, python_args, wait_for_port

WRITER_CRITIC = json.loads((HERE / "writer_critic.json").read_text())
RESEARCH_DESK = json.loads((HERE / "research_desk.json").read_text())
ASSISTANT = json.loads((HERE / "assistant.json").read_text())
AUTOMATIC = json.loads((HERE / "automatic.json").read_text())


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The offline model server with --demo-roles (`make run` passes it), unpaced, as its own process."""
    port = free_port()
    args = python_args("-m", "fakellm", "--port", str(port), "--tps", "0", "--demo-roles")
    process = Process("fakellm-demo", args, None, tmp_path_factory.mktemp("fakellm-demo"))
    wait_for_port(port, process=process)
    yield ModelSettings(api_key="offline", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=10)
    process.stop()


async def run(config, task, model, final_speakers=frozenset()):
    searched = []

    def search(query: str) -> str:
        searched.append(query)
        return f"1 earlier message mentions {query!r}."

    events = []
    request = TurnRequest(team_config=config, task=task, final_speakers=final_speakers,
                          tools=build_tools(search_conversations=search))  # fmt: skip
    result = await run_turn(request, model, events.append)
    said = [(e.source, e.content) for e in events if isinstance(e, CompletedMessage)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    return result, said, calls, results


@pytest.mark.asyncio
async def test_the_critic_critiques_the_draft_then_approves_the_revision(demo_model):
    result, said, _, _ = await run(WRITER_CRITIC, "Write a haiku about rain on a tin roof.", demo_model,
                                   frozenset({"writer"}))  # fmt: skip

    assert result.status == "succeeded", result
    assert [source for source, _ in said] == ["writer", "critic", "writer", "critic"]
    draft, critique, revision, approval = (text for _, text in said)
    assert draft.startswith("**Draft: Write a haiku about rain on a tin roof.**")
    assert "1. **Opening**" in critique and "2. **Length**" in critique
    assert f"{len(draft.split())} words" in critique, "the critique is about the draft it read"
    assert "revised after the critic's two points" in revision and revision != draft
    assert approval == "APPROVED", "the team's termination word, so the run ends on the approval"


@pytest.mark.asyncio
async def test_the_research_desk_plans_calls_the_calculator_with_the_questions_expression_and_reports(demo_model):
    result, said, calls, results = await run(RESEARCH_DESK, "What is 17*23, roughly?", demo_model,
                                             frozenset({"reporter"}))  # fmt: skip

    assert result.status == "succeeded", result
    planner = dict(said)["planner"]
    assert "compute `17*23` with the calculator" in planner
    assert [(c.source, c.name, json.loads(c.arguments)) for c in calls] == [
        ("analyst", "calculator", {"expression": "17*23"})
    ]
    assert [r.content for r in results] == ["391"] and not results[0].is_error
    assert said[-1][0] == "reporter" and "**Answer** to “What is 17\\*23, roughly?”: 391" in said[-1][1]


@pytest.mark.asyncio
async def test_the_analyst_searches_the_conversations_for_a_word_of_the_question(demo_model):
    _, _, calls, results = await run(RESEARCH_DESK, "Did we discuss volcanoes earlier?", demo_model,
                                     frozenset({"reporter"}))  # fmt: skip

    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("search_my_conversations", {"query": "volcanoes"})]
    assert results[0].content == "1 earlier message mentions 'volcanoes'."


@pytest.mark.asyncio
async def test_the_router_explains_its_pick(demo_model):
    candidates = {
        "assistant": "One assistant agent answering each message.",
        "writer-critic": "A writer drafts, a critic reviews, the writer revises.",
        "research-desk": "A planner, a tool-using analyst and a reporter who writes the answer.",
    }
    # No keyword rule matches these: the model is asked, and says which team and why.
    picked = await router.route(AUTOMATIC, candidates, "I need an analyst with a good tool", demo_model)
    assert picked.team == "research-desk"
    assert (
        picked.reason
        == "the model chose it: research-desk: your message shares “analyst”, “tool” with what this team does."
    )
    plain = await router.route(AUTOMATIC, candidates, "Hello there", demo_model)
    assert (plain.team, plain.usage["routing"]["requests"]) == ("assistant", 1)
    assert "shares a word with your message, so the first one answers" in plain.reason


@pytest.mark.asyncio
async def test_the_assistant_shows_markdown_when_asked_else_the_default_reply_and_directives_win(demo_model):
    _, said, _, _ = await run(ASSISTANT, "hi", demo_model)
    assert said[0][1].startswith("Hello from **Chorus's offline model**! You asked: “hi” (turn 1")
    _, said, _, _ = await run(ASSISTANT, "Show me some Markdown", demo_model)
    assert said[0][1] == roles.SHOWCASE and "| Planet | Moons |" in said[0][1] and "$$" in said[0][1]
    _, said, _, _ = await run(WRITER_CRITIC, "A poem [[critic>reply:APPROVED]]", demo_model, frozenset({"writer"}))
    assert [source for source, _ in said] == ["writer", "critic"] and said[1][1] == "APPROVED"


@pytest.mark.parametrize(
    ("question", "tool", "arguments"),
    [
        ("What is (2 + 3) ** 2?", "calculator", {"expression": "(2 + 3) ** 2"}),
        ("How much is 12 × 4 - 1", "calculator", {"expression": "12 * 4 - 1"}),
        ("What time is it in Paris?", "current_time", {"timezone": "UTC"}),
        ("Find my notes about sourdough", "search_my_conversations", {"query": "sourdough"}),
        ("Search my conversations for haiku", "search_my_conversations", {"query": "haiku"}),
        ("Calculate 17*23 for me", "calculator", {"expression": "17*23"}),
        ("Is 2026 a leap year?", "search_my_conversations", {"query": "leap"}),  # a number alone is no sum
    ],
)
def test_the_analysts_tool_and_arguments_come_from_the_question(question, tool, arguments):
    assert roles.pick_tool(question) == (tool, arguments)


def test_the_role_is_read_from_the_first_system_message_only():
    def text(m):
        return m["content"]

    def system(content):
        return {"role": "system", "content": content}

    assert roles.role_of([system("You are the critic. Review.")], text) == "critic"
    assert roles.role_of([system("You are Chorus's assistant.")], text) == "assistant"
    assert roles.role_of([system("You are the editor.")], text) is None  # not a shipped team's: the default reply
    assert roles.role_of([system("You route a person's message to the team...")], text) == "router"
    assert roles.role_of([system("Be brief."), system("You are the critic.")], text) is None
    assert roles.role_of([{"role": "user", "content": "You are the critic."}], text) is None
