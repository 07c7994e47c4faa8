"""Chorus's tool registry: the only tools a team may use, named in team configs (never code in a config).

Each tool is a plain synchronous Python function wrapped here, in code, as a `BoundedTool`: AutoGen's
FunctionTool, except that the function runs on Chorus's tool threads (never on the agent loop) and a call that
outlives its time limit (LIMITS, the worker's CHORUS_TOOL_TIMEOUT_SECONDS) gives the model an "Error: ..."
result instead of holding up the run.
Tools that read data are built per run for the conversation's owner, so a tool can only ever see that
person's own data. The rules for writing a tool are in docs/teams.md ("Writing a tool").
"""

import ast
import asyncio
import copy
import functools
import logging
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from autogen_core import CancellationToken
from autogen_core.tools import BaseTool, FunctionTool
from pydantic import BaseModel

logger = logging.getLogger(__name__)


@dataclass
class ToolLimits:
    """How long a tool call may take, and how many tool threads a process has. The worker sets them from its
    settings when it starts (configure); the runner itself reads no settings."""

    timeout_seconds: float = 10.0
    threads: int = 256


LIMITS = ToolLimits()


def configure(*, timeout_seconds: float, threads: int) -> None:
    LIMITS.timeout_seconds = timeout_seconds
    LIMITS.threads = threads


# The calculator. Big-int arithmetic is one C call that holds the GIL for as long as it takes, so no thread
# or timeout can keep a huge `**` from freezing the whole worker: `(((9**99)**99)**99)**25` took 31 s of CPU.
# So every number (literal, intermediate, result) is kept within MAX_MAGNITUDE, and an operation whose result
# would certainly be larger is refused before it is computed. Each accepted operation then works on numbers
# of at most about 2000 bits (microseconds), and a 200-character expression holds under 100 of them: the worst
# accepted expression takes well under a millisecond (tests/test_tools.py measures it). That is why the
# calculator runs on a tool thread like the other tools, not in a process of its own: a process hop would cost
# more than the worst evaluation, and a fork of a worker (threads, database and Redis connections) is unsafe.
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**300
_MAX_BITS = MAX_MAGNITUDE.bit_length()  # 997: MAX_MAGNITUDE < 2**997
_MAX_FLOAT = float(MAX_MAGNITUDE)  # 1e300, a hair above 10**300 as floats go
_TOO_BIG = "numbers are limited to 10**300 in size, and this calculation goes beyond that"
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


class _Refused(ValueError):
    pass


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses) and return the result."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"Error: expressions are limited to {MAX_EXPRESSION_CHARS} characters."
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        return str(value)  # at most 301 digits: far below Python's 4300-digit limit for int -> str
    except ZeroDivisionError:
        return "Error: division by zero"
    except OverflowError:  # float arithmetic that leaves the float range, such as 2.0 ** 5000
        return f"Error: {_TOO_BIG}."
    except SyntaxError as exc:
        return f"Error: not an arithmetic expression ({exc.msg or 'invalid syntax'})."
    except ValueError as exc:  # _Refused is one
        return f"Error: {exc}."
    except Exception as exc:  # RecursionError, MemoryError...: the model gets a string, never an exception
        return f"Error: could not evaluate that expression ({type(exc).__name__})."


def _evaluate(node: ast.AST) -> float | int:
    # An allow-list walk of the syntax tree: no names, calls or attributes, so nothing but arithmetic runs.
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in (ast.USub, ast.UAdd):
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if type(left) is int and type(right) is int:  # float arithmetic is O(1): only ints can grow without end
            if isinstance(node.op, ast.Mult) and left.bit_length() + right.bit_length() - 1 > _MAX_BITS:
                raise _Refused(_TOO_BIG)  # the product has at least that many bits
            if isinstance(node.op, ast.Pow) and right > 0:
                if abs(left) <= 1:
                    right = 2 - right % 2  # 0, 1 and -1 repeat: the same result with an exponent of 1 or 2
                elif (left.bit_length() - 1) * right > _MAX_BITS:
                    raise _Refused(_TOO_BIG)  # left**right >= 2**((bits - 1) * right)
        return _bounded(_OPERATORS[type(node.op)](left, right))
    raise _Refused("only numbers and + - * / // % ** ( ) are allowed")


def _bounded(value: Any) -> float | int:
    if isinstance(value, complex):  # a negative number to a fractional power
        raise _Refused("the result is not a real number")
    if type(value) is int:
        if abs(value) > MAX_MAGNITUDE:
            raise _Refused(_TOO_BIG)
    elif not abs(value) <= _MAX_FLOAT:  # also inf and nan
        raise _Refused(_TOO_BIG)
    return value


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone such as 'Europe/Paris' (default UTC)."""
    try:
        if len(timezone) > 64:
            raise ValueError
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"Error: unknown time zone {timezone[:64]!r}; use a name like 'Europe/Paris'."
    return datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def search_my_conversations(query: str) -> str:
    """Search the person's own earlier conversations for a word or phrase; returns matching excerpts."""
    raise RuntimeError("bound to one person per run by build_tools")


@lru_cache(maxsize=1)
def _tool_threads() -> ThreadPoolExecutor:
    """The threads every tool call of this process runs on: Chorus's own, so that tools can never use up the
    event loop's default executor (which asyncio and libraries use too). A call waiting for a free thread
    counts against its time limit like any other."""
    return ThreadPoolExecutor(max_workers=max(4, LIMITS.threads), thread_name_prefix="chorus-tool")


class BoundedTool(FunctionTool):
    """A FunctionTool for a synchronous function that runs it on the tool threads, within the time limit.

    AutoGen's FunctionTool already runs a sync function in a thread (the loop's default executor) but waits for
    it for as long as it takes. This one waits at most LIMITS.timeout_seconds, read at each call, then
    answers the model with an error. A thread cannot be killed: a function given up on runs on to its end, which
    is why every tool must bound its own work as well. Cancelling the run (the CancellationToken) stops the
    wait at once, as FunctionTool does.
    """

    def __init__(self, func, description: str, name: str | None = None) -> None:
        if asyncio.iscoroutinefunction(func):
            raise TypeError("Chorus tools are synchronous functions: they run on the tool threads")
        super().__init__(func, description=description, name=name)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        kwargs = {name: getattr(args, name) for name in self._signature.parameters if hasattr(args, name)}
        future = asyncio.get_running_loop().run_in_executor(_tool_threads(), functools.partial(self._func, **kwargs))
        cancellation_token.link_future(future)
        timeout = LIMITS.timeout_seconds
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            logger.warning("tool %s gave no result within %g s; the model was told so", self.name, timeout)
            return f"Error: the {self.name} tool did not finish within {timeout:g} seconds; its result was dropped."


TOOL_NAMES = frozenset({"calculator", "current_time", "search_my_conversations"})


@lru_cache(maxsize=1)
def _shared_tools() -> tuple[BaseTool, ...]:
    return (
        BoundedTool(calculator, description=calculator.__doc__),
        BoundedTool(current_time, description=current_time.__doc__),
    )


@lru_cache(maxsize=1)
def _conversation_search_template() -> BoundedTool:
    return BoundedTool(search_my_conversations, name="search_my_conversations",
                       description="Search the person's own earlier conversations for a word or phrase.")  # fmt: skip


def _conversation_search_tool(search: Callable[[str], str]) -> BaseTool:
    """The search tool bound to one person: a copy of the template with that person's search function. Building
    a FunctionTool makes a pydantic model from the function's signature, which showed in a worker's profile;
    every binding has the same signature, so the template's model serves them all."""
    tool = copy.copy(_conversation_search_template())
    tool._func = search  # BoundedTool.run calls self._func with the checked args
    return tool


def build_tools(*, search_conversations: Callable[[str], str]) -> dict[str, BaseTool]:
    """The registry for one run, its data tools bound to the conversation's owner: `search_conversations(query)`
    searches that person's messages (the worker passes agents_app.domain.search.for_person(owner_id)). Tools
    hold no state between calls: the shared ones are built once per process (a FunctionTool builds a pydantic
    model from its function's signature), a person's data tools are copies bound to that person."""
    registry = {tool.name: tool for tool in (*_shared_tools(), _conversation_search_tool(search_conversations))}
    assert set(registry) == TOOL_NAMES
    return registry
