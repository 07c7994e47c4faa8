"""Chorus's tool registry: the only tools a team may use, named in team configs (never code in a config).

Each tool is a plain Python function wrapped as an AutoGen FunctionTool here, in code. Tools that read data
are built per run for the conversation's owner, so a tool can only ever see that person's own data.
"""

import ast
import copy
import operator
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from autogen_core.tools import BaseTool, FunctionTool
from django.db import close_old_connections, connection

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses) and return the result."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"Error: expressions are limited to {MAX_EXPRESSION_CHARS} characters."
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"Error: {exc or 'not an arithmetic expression'}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _evaluate(node: ast.AST) -> float | int:
    # An allow-list walk of the syntax tree: no names, calls or attributes, so nothing but arithmetic runs.
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents are limited to {MAX_EXPONENT}")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone such as 'Europe/Paris' (default UTC)."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"Error: unknown time zone {timezone!r}; use a name like 'Europe/Paris'."
    return datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def make_conversation_search(user_id: int):
    def search_my_conversations(query: str) -> str:
        """Search the person's own earlier conversations for a word or phrase; returns matching excerpts."""
        from agents_app.models import Message

        query = query.strip()[:100]
        if not query:
            return "Error: give a word or phrase to search for."
        # AutoGen runs sync tools in a thread of its own: give it a fresh connection and close it after.
        close_old_connections()
        try:
            hits = (
                Message.objects.filter(conversation__owner_id=user_id, content__icontains=query)
                .select_related("conversation")
                .order_by("-created_at")[:5]
            )
            lines = [
                f"- {m.conversation} ({m.source}, {m.created_at:%Y-%m-%d}): {_excerpt(m.content, query)}" for m in hits
            ]
        finally:
            connection.close()
        return "\n".join(lines) if lines else f"No earlier message mentions {query!r}."

    return search_my_conversations


def _excerpt(text: str, query: str, width: int = 80) -> str:
    at = max(text.lower().find(query.lower()), 0)
    start = max(at - width // 2, 0)
    return (
        ("…" if start else "")
        + text[start : start + width].replace("\n", " ")
        + ("…" if start + width < len(text) else "")
    )


TOOL_NAMES = frozenset({"calculator", "current_time", "search_my_conversations"})


@lru_cache(maxsize=1)
def _shared_tools() -> tuple[BaseTool, ...]:
    return (
        FunctionTool(calculator, description=calculator.__doc__),
        FunctionTool(current_time, description=current_time.__doc__),
    )


@lru_cache(maxsize=1)
def _conversation_search_template() -> FunctionTool:
    return FunctionTool(make_conversation_search(0), name="search_my_conversations",
                        description="Search the person's own earlier conversations for a word or phrase.")  # fmt: skip


def _conversation_search_tool(user_id: int) -> BaseTool:
    """The search tool bound to one person: a copy of the template with that person's function. Building a
    FunctionTool makes a pydantic model from the function's signature (0.4 ms of a worker's CPU per run,
    by the profile); every binding has the same signature, so the template's model serves them all."""
    tool = copy.copy(_conversation_search_template())
    tool._func = make_conversation_search(user_id)  # FunctionTool.run calls self._func with the checked args
    return tool


def build_tools(*, user_id: int) -> dict[str, BaseTool]:
    """The registry for one run, its data tools bound to the conversation's owner. Tools hold no state between
    calls: the shared ones are built once per process (a FunctionTool builds a pydantic model from its
    function's signature), a person's data tools are copies bound to that person."""
    registry = {tool.name: tool for tool in (*_shared_tools(), _conversation_search_tool(user_id))}
    assert set(registry) == TOOL_NAMES
    return registry
