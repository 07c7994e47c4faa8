r"""fakellm: Chorus's offline, OpenAI-compatible chat-completions server.

It stands in for a real LLM wherever one is unwanted or unavailable: the test suite, the demo mode (no API
key) and the benchmarks. Any OpenAI client (``openai.AsyncOpenAI``, AutoGen's
``OpenAIChatCompletionClient``) talks to it unchanged with ``base_url="http://HOST:PORT/v1"`` and any
api_key. Answers are deterministic: the same request gets the same bytes, except ids and timestamps.
This module must not import Django, so the server also runs as ``python -m fakellm``.

Routes
    POST /v1/chat/completions   streaming (SSE) and non-streaming, tools, usage
    GET  /v1/models             lists "chorus-offline" (any model name is accepted and echoed back)
    GET  /healthz               200 "ok"

The question: the person's last message, i.e. the last ``user`` message whose ``name`` is absent or
"user". In a group chat AutoGen sends the other agents' messages as ``user`` messages too, named after
their agents ("planner", "analyst"...), and the person's as ``name: "user"``; reading the person's message
lets a person's directives reach every agent. With no such message, the question is the last ``user``
message whatever its name.

What the answer says (the first that applies wins)
    0. Speaker selection (see below): exactly one role name. Nothing else on this list applies, and no
       directive does either (the prompt quotes the whole conversation, directives included).
    1. Script rules (``--script FILE``): the first rule whose ``match`` occurs in the question.
    2. After a tool round trip (the last message is a ``tool`` message): "The tool said: <content>",
       whatever ``[[reply:...]]`` directives (scoped or not) say.
    3. Directives in the question: ``[[tool:...]]``, then ``[[reply:...]]``, then ``[[tokens:N]]``.
    4. With ``--demo-roles`` (``make run`` uses it): the answer in character of the shipped teams' agent the
       request is for (writer, critic, planner, analyst, reporter, the router); see ``fakellm/roles.py``.
    5. The default reply: a short Markdown answer that quotes the question and reports the turn number
       (the number of the person's messages in the request, or of all user messages if there is none
       of the person's), so tests can prove conversation memory reaches the model. Example: "Hello from
       **Chorus's offline model**! You asked: “hi” (turn 2 of this conversation)." and a few more lines.
    The default reply starts with what the person's last message carried: "I see an image of 12×8 pixels,
    mostly red (#c81e1e)." for each ``image_url`` part (a ``data:`` URL, decoded with Pillow), and "I read the
    attached `notes.md`." for each ``Attached file NAME (TYPE):`` in its text (Chorus's attachments).
The other directives (``tps``, ``stamp``, ``fault``) apply whichever way the answer was chosen (except 0).
The ``empty`` and ``blank`` faults replace the answer (a tool call included) by an empty or a whitespace-only
text.

Script format (a JSON list; ``match`` is a case-insensitive substring, "" matches everything)::

    [
      {"match": "weather", "when_tool_result": true, "reply": "It is {tool_result} today."},
      {"match": "weather", "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
      {"match": "hello", "reply": "Hi! I am the offline model."}
    ]

A rule with ``"when_tool_result": true`` applies only when the last message is a ``tool`` message (the
answer after a tool round trip); other rules apply only when it is not, so a tool-calling rule never
loops. ``{tool_result}`` in a reply is replaced by the tool results' content.

Directives, written anywhere in the question, steer one request without restarting the server (so tests
and benchmarks can drive a server running in another process). Values cannot contain "]]". The first
directive of each kind wins.

    [[reply:TEXT]]          reply exactly TEXT
    [[tokens:N]]            reply with exactly N tokens: "tok1 tok2 ... tokN" (N at most 100000)
    [[tps:N]]               N tokens per second for this request (0 = as fast as possible)
    [[select:TEXT]]         every speaker-selection request answers exactly TEXT (see below): a model that
                            never names a valid speaker ([[select:Nobody.]]) or names two of them
    [[tool:NAME {json}]]    call tool NAME with these arguments (``{}`` if omitted), if the request offers
                            a tool of that name and tool_choice is not "none"; otherwise a text reply says
                            that the tool is not available
    [[stamp]]               replace each token's text by ``⟦SEQ:UNIX_TIME_NS⟧ `` (SEQ counts from 1, the
                            time is ``time.time_ns()`` just before the chunk is written, then one space);
                            ``parse_stamp()`` reads them back, so a client can measure delivery latency.
                            Tool calls are not stamped.
    [[fault:KIND]]          misbehave, KIND being one of
        429                 status 429, header ``Retry-After: 1``, code rate_limit_exceeded
        500                 status 500, type server_error
        401                 status 401, code invalid_api_key
        400-context         status 400, code context_length_exceeded
        400-context-text    status 400 saying only "maximum context length" in vLLM's body shape (a top-level
                            ``message``, no ``error`` object, no OpenAI error code)
        400-model           status 400, LiteLLM's answer for a model it does not serve ("Invalid model
                            name passed in model=...", code "400")
        hang                accept the request, never answer; the handler ends when the client goes away
        cut                 send a few tokens, then drop the connection (no ``[DONE]``, truncated body)
        malformed           send a few tokens, then the line ``data: {not json``
        stream-error[:N]    send N tokens (default 3), then a gateway's error chunk ``data: {"error": {...}}``
                            and end the body (no finish chunk, no ``[DONE]``), as LiteLLM does when the
                            upstream model fails mid-answer; not streamed, a status 500
        empty               answer an empty text (a streamed answer sends only the chunk naming its role)
        blank               answer a whitespace-only text
        slow-first[:S]      wait S seconds (default ``--first-token-delay``) before the first byte

Agent-scoped directives, ``[[NAME>DIRECTIVE]]``, steer one agent of a team: for example
``[[analyst>tool:calculator {"expression": "6*7"}]]``, ``[[writer>reply:Final draft.]]``,
``[[critic>tokens:5]]`` or ``[[writer>fault:500]]``. One applies only to a request whose first ``system``
message matches ``\bYou are (the )?NAME\b`` (case-insensitive), which is how the shipped teams' system
messages begin ("You are the analyst. ..."); a request without a system message gets none. Where a scoped
and an unscoped directive of the same kind both apply, the scoped one wins. A directive is checked (and a
bad one answered with a 400) only in the requests it applies to.

Speaker selection: AutoGen's SelectorGroupChat asks the model which participant speaks next, with a prompt
(sent as a ``system`` message for OpenAI model families, as a ``user`` message for others) that says
"select the next role from ['planner', 'analyst', 'reporter']" and quotes the conversation as entries
``source: content`` separated by blank lines, the person's entries having source ``user``. When any system
or user message contains that phrase followed by a Python list of names, the answer is exactly one of
those names (see ``next_role()``): the first, in list order, that has not spoken since the person's last
entry, or the list's last name if all have. The history is read between the first and the last mention
of the phrase (to the end of the text if it appears once); an entry starts at a line ``NAME:`` that opens
the history or follows a blank line. A ``[[select:TEXT]]`` in the person's last entry makes the answer TEXT
instead, whatever it is: a small local model that answers the selection prompt with anything but a name.
The answer is paced, streamed and counted in usage like any other.

Streams send one SSE chunk per token (a word plus the whitespace after it, so the deltas concatenate to
exactly the reply); the first chunk's delta carries ``"role": "assistant"``. Then a chunk with
finish_reason "stop" ("tool_calls" for a tool call, "length" when ``max_tokens`` cut the text), a usage
chunk with ``"choices": []`` if ``stream_options.include_usage`` is true, and ``data: [DONE]``. Tool calls
stream the way OpenAI's do: a first delta with id, type, name and empty arguments, then argument
fragments. Usage: prompt_tokens counts the words in all messages; completion_tokens counts the chunks of
the answer (text tokens, or the tool call's first chunk plus its argument fragments).

Other request fields: ``max_tokens`` / ``max_completion_tokens`` cut a text answer (finish_reason
"length"); ``tool_choice: "none"`` hides the tools; the ``model`` is echoed back; unknown fields are
ignored. Malformed JSON or missing ``messages`` get a 400 with an OpenAI-shaped body
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``, as does a bad directive.

Pacing: piece i (from 0) is sent at ``start + i / tps`` (``--tps``, default 30, or ``[[tps:N]]``), with
asyncio sleeps measured from the start (no drift, no thread per stream), so hundreds of concurrent streams
are cheap. A non-streamed answer is sent when its last piece would have been. ``--latency-ms`` delays
every completion before its first byte. A client that goes away just ends its handler.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import binascii
import io
import json
import re
import signal
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from fakellm.people import concierge_handoff
from fakellm.roles import role_reply

MODEL_NAME = "chorus-offline"
CUT_AFTER = 3  # pieces sent before the "cut", "malformed" and "stream-error" faults strike (by default)
ARG_FRAGMENT = 8  # characters of tool-call arguments per streamed chunk
MAX_TOKENS_DIRECTIVE = 100_000

# [[scope>name:value]], scope and value optional
DIRECTIVE_RE = re.compile(r"\[\[(?:([\w-]+)>)?([a-z0-9-]+)(?::(.*?))?\]\]", re.IGNORECASE | re.DOTALL)
SELECT_RE = re.compile(r"select the next role from\s*(\[[^\[\]\n]*\])", re.IGNORECASE)
ENTRY_RE = re.compile(r"([\w-]+):(?:\s|$)")  # "source: content", the start of a selector history entry
PERSON = "user"  # the source (message name) AutoGen gives the person's messages
TOKEN_RE = re.compile(r"\S+\s*|\s+")  # a word and the whitespace after it (leading space: its own token)
STAMP_RE = re.compile(r"⟦(\d+):(\d+)⟧")
HTML_TAG_RE = re.compile(r"<[^>]*>")
MARKUP_RE = re.compile(r"[`*_~\[\]<>#|\\]")  # Markdown/HTML syntax kept out of the quoted question

# fault kind -> (status, error type, error code, message, extra headers); "%(model)s" in a message: the request's model
ERROR_FAULTS: dict[str, tuple[int, str, str, str, dict[str, str]]] = {
    "429": (429, "requests", "rate_limit_exceeded", "Rate limit reached (simulated).", {"Retry-After": "1"}),
    "500": (500, "server_error", "server_error", "The server had an error (simulated).", {}),
    "401": (401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated).", {}),
    "400-context": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length was exceeded (simulated).",
        {},
    ),
    # LiteLLM's proxy, asked for a model it does not serve (its error object, stringly typed).
    "400-model": (
        400,
        "None",
        "400",
        "{'error': '/chat/completions: Invalid model name passed in model=%(model)s. Call `/v1/models` to view "
        "available models for your key.'}",
        {},
    ),
}
# fault kind -> (status, whole body): gateways whose error bodies are not OpenAI's {"error": {...}}.
RAW_FAULTS: dict[str, tuple[int, dict[str, Any]]] = {
    "400-context-text": (
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens "
            "(5000 in the messages, 120 in the completion). Please reduce the length of the messages or "
            "completion. (simulated)",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ),
}
# What a gateway sends inside a stream when the upstream model fails mid-answer (LiteLLM's shape).
STREAM_ERROR = {
    "message": "litellm.APIConnectionError: the upstream model stopped responding (simulated).",
    "type": None,
    "param": None,
    "code": "500",
}
OTHER_FAULTS = ("hang", "cut", "malformed", "slow-first", "stream-error", "empty", "blank")
BLANK_TEXT = " \n\n  "  # what [[fault:blank]] answers


@dataclass(frozen=True)
class Rule:
    """One script rule; see the module docstring for the file format."""

    match: str
    reply: str | None = None
    tool_name: str | None = None
    tool_arguments: str = "{}"  # JSON text
    when_tool_result: bool = False


@dataclass(frozen=True)
class FakeLLMConfig:
    tps: float = 30.0  # default tokens per second; 0 = no pacing
    rules: tuple[Rule, ...] = ()  # from --script, see load_script()
    latency_ms: float = 0.0  # added before the first byte of every completion
    first_token_delay: float = 2.0  # seconds, for [[fault:slow-first]] without a value
    demo_roles: bool = False  # the shipped teams' agents answer in character (fakellm/roles.py)


@dataclass(frozen=True)
class Answer:
    """What the model says: a text, or (when tool_name is set) one tool call."""

    text: str = ""
    tool_name: str | None = None
    tool_arguments: str = "{}"  # JSON text


@dataclass(frozen=True)
class Plan:
    """Everything needed to answer one request, decided before the first byte is sent."""

    answer: Answer
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int
    tps: float
    first_delay: float  # seconds before the first byte
    fault: str | None
    stamp: bool
    cut_after: int = CUT_AFTER  # pieces sent before "cut", "malformed" or "stream-error" strike


class ScriptError(ValueError):
    """A script that is not a valid list of rules."""


class RequestError(ValueError):
    """A request (or a directive in it) that gets a 400 answer; args: message, code."""


# ---------------------------------------------------------------------------------------------- script


def parse_rules(data: Any) -> tuple[Rule, ...]:
    """Validate a decoded script (a list of rule objects) and return its rules."""
    if not isinstance(data, list):
        raise ScriptError("a fakellm script must be a JSON list of rules")
    rules = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("match"), str):
            raise ScriptError(f"script rule {i}: needs a string 'match'")
        call = item.get("tool_call")
        if isinstance(item.get("reply"), str) == isinstance(call, dict):
            raise ScriptError(f"script rule {i}: needs exactly one of 'reply' (text) or 'tool_call' (object)")
        if call is not None and not isinstance(call.get("name"), str):
            raise ScriptError(f"script rule {i}: 'tool_call' needs a string 'name'")
        rules.append(
            Rule(
                match=item["match"],
                reply=item.get("reply"),
                tool_name=call["name"] if call else None,
                tool_arguments=json.dumps(call.get("arguments", {})) if call else "{}",
                when_tool_result=bool(item.get("when_tool_result", False)),
            )
        )
    return tuple(rules)


def load_script(path: str | Path) -> tuple[Rule, ...]:
    return parse_rules(json.loads(Path(path).read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------- reading requests


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string, a list of parts, or null."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_words(messages: list[dict[str, Any]]) -> int:
    """The prompt's "token" count: words in every message, tool-call arguments included."""
    words = 0
    for m in messages:
        words += len(message_text(m).split())
        for call in m.get("tool_calls") or []:
            words += len(str(call.get("function", {}).get("arguments", "")).split())
    return words


def trailing_tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """Contents of the tool messages that end the conversation (none unless the last message is a tool's)."""
    results = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        results.insert(0, message_text(m))
    return results


def offered_tools(body: Mapping[str, Any]) -> set[str]:
    if body.get("tool_choice") == "none":
        return set()
    functions = [t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)]
    return {f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)}


def is_person(message: Mapping[str, Any]) -> bool:
    """A user message from the person: no ``name``, or the name AutoGen gives the person ("user")."""
    return message.get("role") == "user" and message.get("name") in (None, "", PERSON)


def question_and_turn(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The person's last message and how many the person has sent (all user messages if none is theirs)."""
    mine = [m for m in messages if is_person(m)] or [m for m in messages if m.get("role") == "user"]
    return (message_text(mine[-1]) if mine else ""), len(mine)


def system_prompt(messages: list[dict[str, Any]]) -> str:
    """The text of the first system message ("" if there is none)."""
    return next((message_text(m) for m in messages if m.get("role") == "system"), "")


def addresses(system: str, agent: str) -> bool:
    """Whether a system message is the given agent's ("You are the analyst...", "You are analyst...")."""
    return re.search(rf"\bYou are (the )?{re.escape(agent)}\b", system, re.IGNORECASE) is not None


def parse_directives(text: str, system: str = "") -> dict[str, str]:
    """The directives in text that apply to the agent whose system message is ``system``: unscoped ones,
    overridden by ``[[NAME>...]]`` ones whose NAME the system message addresses. The first of each kind
    wins within either group. ``[[stamp]]`` has value ""."""
    unscoped: dict[str, str] = {}
    scoped: dict[str, str] = {}
    for scope, name, value in DIRECTIVE_RE.findall(text):
        if not scope:
            unscoped.setdefault(name.lower(), value.strip())
        elif addresses(system, scope):
            scoped.setdefault(name.lower(), value.strip())
    return unscoped | scoped


def directive_number(name: str, value: str, kind: type[int | float]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if number < 0:
        raise RequestError(f"[[{name}:...]] needs a non-negative number, not {value!r}", "invalid_directive")
    return number


# ------------------------------------------------------------------------------------ choosing the answer


def safe_quote(text: str, limit: int = 60) -> str:
    """The question, stripped of directives and Markdown/HTML syntax, shortened on a word boundary."""
    text = HTML_TAG_RE.sub("", DIRECTIVE_RE.sub(" ", text))
    text = " ".join(MARKUP_RE.sub("", text).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + "…"
    return text or "nothing at all"


def default_reply(question: str, turn: int) -> str:
    # No directive syntax in here: AutoGen teams hand one agent's answer to the next as a user message.
    return (
        f"Hello from **Chorus's offline model**! You asked: “{safe_quote(question)}” "
        f"(turn {turn} of this conversation).\n\n"
        "I stand in for a real language model:\n\n"
        "- this reply was made locally, offline;\n"
        "- the same question gets the same reply;\n"
        "- your conversation reached me intact.\n\n"
        "Set `OPENAI_API_KEY` to get real answers."
    )


# ------------------------------------------------------------------------------------ images and files

# Names for an image's dominant colour: the nearest of these.
COLOUR_NAMES = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 150, 190),
    "brown": (120, 75, 40),
    "cyan": (40, 200, 220),
}
ATTACHED_FILE_RE = re.compile(r"^Attached file (.+?) \(", re.MULTILINE)


def describe_image(url: str) -> str:
    """An image part's size and dominant colour, computed from its data URL with Pillow."""
    from PIL import Image

    try:
        header, _, data = url.partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            return "an image I was given by link, which I do not fetch"
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            width, height = image.size
            small = image.convert("RGB")
            small.thumbnail((64, 64))
            count, rgb = max(small.getcolors(64 * 64) or [(0, (0, 0, 0))])
    except (ValueError, OSError, binascii.Error):
        return "an image I could not read"
    name = min(COLOUR_NAMES, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOUR_NAMES[n], rgb, strict=True)))
    return f"an image of {width}×{height} pixels, mostly {name} (#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x})"


def seen_attachments(messages: list[dict[str, Any]], question: str) -> str:
    """What the offline model says about the images and files of the person's last message ("" if none), so a
    test or the demo can see that they reached the model."""
    mine = [m for m in messages if is_person(m)]
    content = mine[-1].get("content") if mine else None
    images = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                images.append(describe_image(url if isinstance(url, str) else ""))
    names = ATTACHED_FILE_RE.findall(question)
    said = []
    if images:
        said.append("I see " + "; and ".join(images) + ".")
    if names:
        said.append("I read the attached " + ", ".join(f"`{safe_quote(n, 80)}`" for n in names) + ".")
    return " ".join(said) + "\n\n" if said else ""


# -------------------------------------------------------------------------------------- speaker selection


def role_candidates(text: str) -> list[str]:
    """The names in the first "select the next role from [...]" of text ([] if none, or not a name list)."""
    match = SELECT_RE.search(text)
    try:
        names = ast.literal_eval(match.group(1)) if match else []
    except (ValueError, SyntaxError):
        return []
    return names if isinstance(names, list) and all(isinstance(n, str) and n for n in names) else []


def history_entries(history: str) -> list[tuple[str, str]]:
    """A selector history's entries as (source, text), in order. An entry starts at a line ``NAME: ...`` that
    opens the history or follows a blank line, so multi-line contents rarely fake one."""
    entries: list[tuple[str, list[str]]] = []
    blank_before = True
    for line in history.splitlines():
        match = ENTRY_RE.match(line)
        if blank_before and match:
            entries.append((match.group(1), [line[match.end() :]]))
        elif entries:
            entries[-1][1].append(line)
        blank_before = not line.strip()
    return [(source, "\n".join(lines)) for source, lines in entries]


def selection_history(prompt_text: str) -> str:
    """The history quoted by a speaker-selection prompt: between the first and the last mention of the
    phrase (to the end of the text if it appears once)."""
    mentions = list(SELECT_RE.finditer(prompt_text))
    if not mentions:
        return ""
    end = mentions[-1].start() if len(mentions) > 1 else len(prompt_text)
    return prompt_text[mentions[0].end() : end]


def forced_selection(prompt_text: str) -> str | None:
    """The TEXT of a ``[[select:TEXT]]`` in the person's last entry of a selection prompt's history, if any."""
    mine = [text for source, text in history_entries(selection_history(prompt_text)) if source == PERSON]
    if not mine:
        return None
    for scope, name, value in DIRECTIVE_RE.findall(mine[-1]):
        if not scope and name.lower() == "select":
            return value.strip()
    return None


def next_role(prompt_text: str) -> str:
    """The role a speaker-selection prompt gets: the first candidate, in list order, that has not spoken
    since the person's last entry in the history; the list's last name if all have. Raises ValueError
    if prompt_text is not a selection prompt."""
    candidates = role_candidates(prompt_text)
    if not candidates:
        raise ValueError("not a speaker-selection prompt: no 'select the next role from [...]'")
    speakers = [source for source, _text in history_entries(selection_history(prompt_text))]
    if PERSON in speakers:
        speakers = speakers[len(speakers) - speakers[::-1].index(PERSON) :]
    return next((name for name in candidates if name not in speakers), candidates[-1])


def selection_prompt(messages: list[dict[str, Any]]) -> str | None:
    """The text of the first system or user message that asks for the next speaker, if any."""
    for m in messages:
        if m.get("role") in ("system", "user") and role_candidates(message_text(m)):
            return message_text(m)
    return None


def choose_answer(
    body: Mapping[str, Any],
    rules: tuple[Rule, ...],
    question: str,
    turn: int,
    directives: dict[str, str],
    demo_roles: bool = False,
) -> Answer:
    messages = body["messages"]
    tool_results = trailing_tool_results(messages)
    offered = offered_tools(body)

    def call(name: str, arguments: str) -> Answer:
        if name in offered:
            return Answer(tool_name=name, tool_arguments=arguments)
        return Answer(f"I cannot call `{name}`: this request offers no tool of that name.")

    for rule in rules:
        if rule.when_tool_result == bool(tool_results) and rule.match.lower() in question.lower():
            if rule.tool_name:
                return call(rule.tool_name, rule.tool_arguments)
            return Answer(rule.reply.replace("{tool_result}", "\n".join(tool_results)))
    if tool_results:
        return Answer("The tool said: " + "\n".join(tool_results))
    if "tool" in directives:
        name, _, arguments = directives["tool"].partition(" ")
        try:
            return call(name, json.dumps(json.loads(arguments or "{}")))
        except json.JSONDecodeError:
            raise RequestError("[[tool:NAME {json}]]: bad JSON arguments", "invalid_directive") from None
    if "reply" in directives:
        return Answer(directives["reply"])
    if "tokens" in directives:
        count = min(directive_number("tokens", directives["tokens"], int), MAX_TOKENS_DIRECTIVE)
        return Answer(" ".join(f"tok{i}" for i in range(1, count + 1)))
    if demo_roles:
        handoff = concierge_handoff(messages, offered, system_prompt(messages))
        if handoff is not None:
            return call(handoff, "{}")
        reply = role_reply(messages, question, turn, offered, message_text, safe_quote)
        if reply is not None:
            return Answer(reply.text, reply.tool_name, reply.tool_arguments)
    return Answer(seen_attachments(messages, question) + default_reply(question, turn))


def make_plan(body: Any, config: FakeLLMConfig) -> Plan:
    """Validate the request body and decide the whole answer (raises RequestError for a 400)."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", "invalid_json")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list.", "missing_required_parameter")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise RequestError("Each message must be an object with a 'role'.", "invalid_type")

    selection = selection_prompt(messages)
    question, turn = question_and_turn(messages)
    directives = {} if selection is not None else parse_directives(question, system_prompt(messages))
    fault, _, fault_value = directives.get("fault", "").partition(":")
    if fault and fault not in ERROR_FAULTS and fault not in RAW_FAULTS and fault not in OTHER_FAULTS:
        kinds = ", ".join([*ERROR_FAULTS, *RAW_FAULTS, *OTHER_FAULTS])
        raise RequestError(f"Unknown fault {fault!r}; use one of {kinds}.", "invalid_directive")
    first_delay = config.latency_ms / 1000
    if fault == "slow-first" and fault_value:
        first_delay += directive_number("fault", fault_value, float)
    elif fault == "slow-first":
        first_delay += config.first_token_delay
    cut_after = CUT_AFTER
    if fault == "stream-error" and fault_value:
        cut_after = directive_number("fault", fault_value, int)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if selection is not None:
        forced = forced_selection(selection)
        answer = Answer(next_role(selection) if forced is None else forced)
    elif fault in ("empty", "blank"):
        answer = Answer("" if fault == "empty" else BLANK_TEXT)
    else:
        answer = choose_answer(body, config.rules, question, turn, directives, config.demo_roles)
    return Plan(
        answer=answer,
        model=str(body.get("model") or MODEL_NAME),
        stream=bool(body.get("stream")),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        max_tokens=max_tokens if type(max_tokens) is int and max_tokens > 0 else None,
        prompt_tokens=count_words(messages),
        tps=directive_number("tps", directives["tps"], float) if "tps" in directives else config.tps,
        first_delay=first_delay,
        fault=fault or None,
        stamp="stamp" in directives,
        cut_after=cut_after,
    )


# ------------------------------------------------------------------------------------ sending the answer


def tokenize(text: str) -> list[str]:
    """Split text into tokens of a word plus its following whitespace; they concatenate to the text."""
    return TOKEN_RE.findall(text)


def stamp(seq: int) -> str:
    return f"⟦{seq}:{time.time_ns()}⟧ "


def parse_stamp(text: str) -> list[tuple[int, int]]:
    """The (seq, unix_time_ns) pairs of the ``⟦SEQ:UNIX_TIME_NS⟧`` stamps in text, in order."""
    return [(int(seq), int(ns)) for seq, ns in STAMP_RE.findall(text)]


def pieces(plan: Plan) -> tuple[list[str], str]:
    """The answer's paced pieces and its finish_reason. A text's pieces are its tokens; a tool call's are
    its name (the chunk that opens the call) and then fragments of its arguments."""
    answer = plan.answer
    if answer.tool_name:
        args = answer.tool_arguments
        fragments = [args[i : i + ARG_FRAGMENT] for i in range(0, len(args), ARG_FRAGMENT)]
        return [answer.tool_name, *fragments], "tool_calls"
    tokens = tokenize(answer.text)
    if plan.max_tokens is not None and len(tokens) > plan.max_tokens:
        return tokens[: plan.max_tokens], "length"
    return tokens, "stop"


def delta(plan: Plan, index: int, piece: str, call_id: str) -> dict[str, Any]:
    """The streamed delta for piece ``index``; the first one names the speaker (and opens a tool call)."""
    if plan.answer.tool_name and index == 0:
        call = {"index": 0, "id": call_id, "type": "function", "function": {"name": piece, "arguments": ""}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if plan.answer.tool_name:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
    content = stamp(index + 1) if plan.stamp else piece
    return {"role": "assistant", "content": content} if index == 0 else {"content": content}


def usage(plan: Plan, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": plan.prompt_tokens + completion_tokens,
    }


def envelope(plan: Plan, kind: str) -> dict[str, Any]:
    """The fields a completion or chunk starts with, in OpenAI's order."""
    ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    return {"id": ident, "object": kind, "created": int(time.time()), "model": plan.model}


def error_response(status: int, message: str, code: str, type_="invalid_request_error", **kw) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, **kw)


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def pace(start: float, index: int, tps: float) -> None:
    """Sleep until piece ``index`` is due; times are measured from ``start`` so delays never add up."""
    if tps > 0:
        delay = start + index / tps - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


async def wait_for_disconnect(request: web.Request) -> None:
    # aiohttp does not cancel a handler when its client goes away (handler_cancellation is off by default,
    # and build_app() must not depend on how it is served), so poll: cheap, and it ends the "hang" handler.
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def send_stream(request: web.Request, plan: Plan) -> web.StreamResponse:
    parts, finish = pieces(plan)
    head = envelope(plan, "chat.completion.chunk")  # the same id in every chunk
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    def chunk(delta_: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return sse(head | {"choices": [{"index": 0, "delta": delta_, "finish_reason": finish_reason}]})

    call_id = f"call_{uuid.uuid4().hex[:24]}"
    start = asyncio.get_running_loop().time()
    for i, piece in enumerate(parts):
        if i == plan.cut_after and plan.fault in ("cut", "malformed", "stream-error"):
            break
        await pace(start, i, plan.tps)
        await response.write(chunk(delta(plan, i, piece, call_id)))
    if not parts:  # an empty reply still names its speaker
        await response.write(chunk({"role": "assistant", "content": ""}))
    if plan.fault == "cut":
        request.transport.abort()  # no terminating chunk: the client sees a truncated body
    elif plan.fault == "malformed":
        await response.write(b"data: {not json\n\n")
    elif plan.fault == "stream-error":
        await response.write(sse({"error": STREAM_ERROR}))  # and the body ends: no finish, no [DONE]
    else:
        await response.write(chunk({}, finish))
        if plan.include_usage:
            await response.write(sse(head | {"choices": [], "usage": usage(plan, len(parts))}))
        await response.write(b"data: [DONE]\n\n")
    return response


async def send_whole(request: web.Request, plan: Plan) -> web.StreamResponse:
    parts, finish = pieces(plan)
    if parts:  # sent when its last piece would have been
        await pace(asyncio.get_running_loop().time(), len(parts) - 1, plan.tps)
    if plan.answer.tool_name:
        function = {"name": parts[0], "arguments": "".join(parts[1:])}
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
    else:
        text = "".join(stamp(i + 1) for i in range(len(parts))) if plan.stamp else "".join(parts)
        message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    completion = envelope(plan, "chat.completion") | {"choices": [choice], "usage": usage(plan, len(parts))}
    body = json.dumps(completion, ensure_ascii=False).encode()
    if plan.fault == "malformed":
        return web.Response(body=b"{not json", content_type="application/json")
    if plan.fault != "cut":
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)  # promise the whole body, send half, hang up
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    request.transport.abort()
    return response


# ------------------------------------------------------------------------------------------- the server

CONFIG = web.AppKey("fakellm_config", FakeLLMConfig)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "We could not parse the JSON body of your request.", "invalid_json")
    try:
        plan = make_plan(body, request.app[CONFIG])
    except RequestError as exc:
        return error_response(400, *exc.args)

    if plan.fault in ERROR_FAULTS:
        status, type_, code, message, headers = ERROR_FAULTS[plan.fault]
        return error_response(status, message % {"model": plan.model}, code, type_, headers=headers)
    if plan.fault in RAW_FAULTS:
        status, error_body = RAW_FAULTS[plan.fault]
        return web.json_response(error_body, status=status)
    if plan.fault == "stream-error" and not plan.stream:
        return error_response(500, STREAM_ERROR["message"], "500", "server_error")
    if plan.fault == "hang":
        await wait_for_disconnect(request)
        return web.Response(status=499)  # nobody is listening any more
    if plan.first_delay:
        await asyncio.sleep(plan.first_delay)
    try:
        return await (send_stream if plan.stream else send_whole)(request, plan)
    except ConnectionError:  # the client went away: stop writing, nothing worth a traceback
        return web.Response(status=499)


async def list_models(request: web.Request) -> web.Response:
    model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "chorus"}
    return web.json_response({"object": "list", "data": [model]})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app(config: FakeLLMConfig) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    return app


async def run_server(host: str, port: int, config: FakeLLMConfig) -> None:
    """Serve until SIGTERM or SIGINT, then stop at once: open streams get a quarter second, then are cut."""
    # aiohttp may wait shutdown_timeout twice: for handlers to finish, then again after signalling them.
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)  # benchmarks open hundreds of connections at once
    await site.start()
    bound_port = runner.addresses[0][1]  # differs from port when port is 0
    print(f"fakellm listening on http://{host}:{bound_port}/v1", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(host: str = "127.0.0.1", port: int = 8001, config: FakeLLMConfig | None = None) -> None:
    """Run the server in the foreground until SIGTERM/SIGINT (port 0 picks a free port)."""
    asyncio.run(run_server(host, port, config or FakeLLMConfig()))


# ----------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options, shared by ``python -m fakellm`` and ``manage.py fakellm``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on, 0 = any (default 8001)")
    parser.add_argument("--tps", type=float, default=30.0, help="tokens per second, 0 = unpaced (default 30)")
    parser.add_argument("--script", help="JSON file of reply rules (format: see fakellm.server)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer, in ms")
    parser.add_argument(
        "--first-token-delay", type=float, default=2.0, help="seconds for [[fault:slow-first]] (default 2)"
    )
    parser.add_argument(
        "--demo-roles", action="store_true", help="the shipped teams' agents answer in character (fakellm/roles.py)"
    )


def config_from_options(options: Mapping[str, Any]) -> FakeLLMConfig:
    """A config from parsed options; raises OSError or ValueError for a missing or invalid script."""
    return FakeLLMConfig(
        tps=options["tps"],
        rules=load_script(options["script"]) if options.get("script") else (),
        latency_ms=options["latency_ms"],
        first_token_delay=options["first_token_delay"],
        demo_roles=bool(options.get("demo_roles")),
    )
