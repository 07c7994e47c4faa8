"""The offline demo's characters: what the agents of Chorus's shipped teams say when the offline model server runs
with ``--demo-roles`` (``make run`` does) and no script rule, tool result or directive decided the answer.

Which agent is asking is read from the request, deterministically, and nothing else:
    - the first ``system`` message opening with "You are the NAME" (or "You are NAME", "You are Chorus's NAME"),
      NAME being one of ROLES: assistant, writer, critic, planner, analyst, reporter, the shipped teams' agents;
    - a ``system`` message starting "You route a person's message" is the automatic router's question.
Any other request (a team of your own) gets the server's default reply.

What each says (the person's question is their last message; "this turn" is what follows it):
    assistant   when the question says "markdown": a showcase (a table, code, a quote, maths); else the
                server's default reply.
    writer      a short draft on the question's subject; once it has spoken this turn, the revised version.
    critic      two numbered points on the writer's latest text; once it has spoken this turn, the team's
                termination word alone (read from its system message: "reply with APPROVED", else APPROVED).
    planner     a numbered plan naming the tool the analyst will use and with what.
    analyst     calls a tool, with arguments from the question: the calculator with the first arithmetic
                expression in it ("17*23", "(2+3)**2"), the clock when it asks for the time or date, else
                the conversation search with the word after "about", "for" or "mention" (else the longest
                word); once it has called one this turn, or when the tool is not offered, a sentence saying
                what it found or would have called.
    reporter    the answer, built from the analyst's finding (the last message named "analyst" this turn).
    router      the team whose description shares the most words with the question (ties: the first
                listed), then one sentence saying which words decided it.
This module must not import Django (the server runs as ``python -m fakellm``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("assistant", "writer", "critic", "planner", "analyst", "reporter")
ROLE_RE = re.compile(r"^\s*You are (?:the |Chorus's )?([\w-]+)", re.IGNORECASE)
ROUTER_RE = re.compile(r"^\s*You route a person's message", re.IGNORECASE)
TEAM_LINE_RE = re.compile(r"^- ([\w-]+): (.*)$", re.MULTILINE)
APPROVAL_RE = re.compile(r"reply with ([A-Z][A-Z_-]+)")
# Numbers joined by arithmetic operators, with parentheses: the calculator's language.
EXPRESSION_RE = re.compile(r"[(\s]*-?\d+(?:\.\d+)?[)\s]*(?:(?:\*\*|//|[-+*/%×÷^])[(\s]*-?\d+(?:\.\d+)?[)\s]*)+")
TIME_RE = re.compile(r"\b(time|date|clock|today)\b", re.IGNORECASE)
WORD_RE = re.compile(r"[^\W\d_][\w']*")
TOPIC_RE = re.compile(r"\b(?:about|for|mentions?|mentioned)\s+[\"“']?([^\W\d_][\w']*)", re.IGNORECASE)
STOPWORDS = frozenset(
    "about above after again against also because been before being between could does doing during each from "
    "have having here into itself just more most other over please same should some such than that their them "
    "then there these they this those through under until very what when where which while whom will with "
    "would your yours".split()
)


SHOWCASE = r"""Here is what an answer can hold, formatted while it streams:

| Planet | Moons | Day (hours) |
| --- | ---: | ---: |
| Earth | 1 | 24 |
| Mars | 2 | 24.6 |

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"  # a comment
```

> A quote stands out with a bar beside it.

Maths inline, $e^{i\pi} + 1 = 0$, and on its own line:

$$\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$$

**Bold**, _italic_ and `inline code`."""


@dataclass(frozen=True)
class RoleReply:
    """A role's answer: a text, or (when tool_name is set) one tool call with JSON arguments."""

    text: str = ""
    tool_name: str | None = None
    tool_arguments: str = "{}"


def role_of(messages: list[dict[str, Any]], text_of) -> str | None:
    """The shipped-team role the request is for, or None."""
    system = next((text_of(m) for m in messages if m.get("role") == "system"), "")
    if ROUTER_RE.match(system):
        return "router"
    match = ROLE_RE.match(system)
    return match.group(1).lower() if match and match.group(1).lower() in ROLES else None


def role_reply(
    messages: list[dict[str, Any]], question: str, turn: int, offered: set[str], text_of, quote
) -> RoleReply | None:
    """The answer of the role the request is for (None if it is for none). ``text_of`` reads a message's text
    and ``quote`` makes a question safe to repeat (both from the server, which owns those rules)."""
    role = role_of(messages, text_of)
    if role is None:
        return None
    system = next(text_of(m) for m in messages if m.get("role") == "system")
    since = this_turn(messages)
    subject = keep_stars(question, lambda text: quote(text, 50))
    spoke = sum(1 for m in since if m.get("role") == "assistant")
    if role == "router":
        return RoleReply(route(system, question))
    if role == "assistant":
        return RoleReply(SHOWCASE) if "markdown" in question.lower() else None
    if role == "writer":
        return RoleReply(revision(subject, turn) if spoke else draft(subject, turn))
    if role == "critic":
        if spoke:
            match = APPROVAL_RE.search(system)
            return RoleReply(match.group(1) if match else "APPROVED")
        latest = next((text_of(m) for m in reversed(since) if m.get("name") == "writer"), "")
        return RoleReply(critique(latest))
    tool, arguments = pick_tool(question)
    if role == "planner":
        return RoleReply(plan(subject, tool, arguments))
    if role == "analyst":
        called = any(m.get("tool_calls") for m in since)
        if not called and tool in offered:
            return RoleReply(tool_name=tool, tool_arguments=json.dumps(arguments))
        if called:
            return RoleReply("I have what the planner asked for: the tool's result is above, for the reporter.")
        return RoleReply(f"I would call `{tool}` with {json.dumps(arguments)}, but this request offers no such tool.")
    finding = next((text_of(m) for m in reversed(since) if m.get("name") == "analyst" and text_of(m)), "")
    return RoleReply(report(subject, finding, turn))


def this_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages after the person's last one (AutoGen names the person's "user"; other agents' messages
    come as user messages named after their agents, this agent's own as assistant messages)."""
    last = -1
    for index, m in enumerate(messages):
        if m.get("role") == "user" and m.get("name") in (None, "", "user"):
            last = index
    return messages[last + 1 :]


def keep_stars(text: str, quote) -> str:
    """The server's quote of text, but with `*` and `_` escaped rather than dropped: "17*23" stays "17*23"."""
    kept = {"*": "\ue000", "_": "\ue001"}
    for char, stand_in in kept.items():
        text = text.replace(char, stand_in)
    quoted = quote(text)
    for char, stand_in in kept.items():
        quoted = quoted.replace(stand_in, "\\" + char)
    return quoted


def pick_tool(question: str) -> tuple[str, dict[str, str]]:
    """The research desk's tool for a question, with its arguments taken from the question."""
    match = EXPRESSION_RE.search(question)
    if match and re.search(r"\d[)\s]*(?:\*\*|//|[-+*/%×÷^])", match.group(0)):
        expression = " ".join(match.group(0).split()).replace("×", "*").replace("÷", "/").replace("^", "**")
        return "calculator", {"expression": expression}
    if TIME_RE.search(question):
        return "current_time", {"timezone": "UTC"}
    return "search_my_conversations", {"query": key_word(question)}


def key_word(text: str) -> str:
    """What a question asks to search for: the last word after "about", "for" or "mention(ed)" that is not a
    common one, else its longest word that is not (the first of equal length); "chorus" if none."""
    topics = [w for w in TOPIC_RE.findall(text) if w.lower() not in STOPWORDS | {"me", "you", "us", "them"}]
    if topics:
        return topics[-1].lower()
    words = [w for w in WORD_RE.findall(text) if len(w) > 3 and w.lower() not in STOPWORDS]
    return max(words, key=len, default="chorus").strip("'-").lower()


def draft(subject: str, turn: int) -> str:
    return (
        f"**Draft: {subject}**\n\n"
        f"It starts with a question, “{subject}”,\n"
        "and a page that waits for the first good line,\n"
        "then words that lean toward an answer.\n\n"
        f"_(first draft, turn {turn} of this conversation)_"
    )


def revision(subject: str, turn: int) -> str:
    return (
        f"**{subject}**\n\n"
        "A question, and a page that listens;\n"
        "the words lean in, and answer.\n\n"
        f"_(revised after the critic's two points: a sharper opening, one line fewer; turn {turn} of this "
        "conversation)_"
    )


def critique(latest: str) -> str:
    words = len(latest.split())
    lines = len([line for line in latest.splitlines() if line.strip()])
    return (
        "Two points on this draft:\n\n"
        "1. **Opening**: it names the request instead of showing it; start with the image itself.\n"
        f"2. **Length**: {words} words over {lines} lines; cut the line that only repeats the question.\n\n"
        "Revise it and I will approve."
    )


def plan(subject: str, tool: str, arguments: Mapping[str, str]) -> str:
    steps = {
        "calculator": f"compute `{arguments.get('expression', '')}` with the calculator",
        "current_time": "read the current time (UTC) from the clock",
        "search_my_conversations": f"search your earlier conversations for “{arguments.get('query', '')}”",
    }
    return (
        f"**Plan** for “{subject}”:\n\n"
        f"1. Analyst: {steps[tool]}.\n"
        "2. Reporter: turn that result into a short answer.\n\n"
        "I only plan; I do not answer it myself."
    )


def report(subject: str, finding: str, turn: int) -> str:
    said = " ".join(finding.split())[:300] or "nothing yet"
    return (
        f"**Answer** to “{subject}”: {said}\n\n"
        f"The planner split the question, the analyst used a tool and found the result above; I wrote it up "
        f"(turn {turn} of this conversation)."
    )


def route(system: str, question: str) -> str:
    """The router's pick among the teams listed in its system message, and why."""
    teams = TEAM_LINE_RE.findall(system)
    if not teams:
        return "I was given no teams to choose from."
    asked = {stem(w) for w in WORD_RE.findall(question) if len(w) > 3 and w.lower() not in STOPWORDS}
    scored = [(len(asked & {stem(w) for w in WORD_RE.findall(description)}), index) for index, (_, description) in
              enumerate(teams)]  # fmt: skip
    best, index = max(scored, key=lambda pair: (pair[0], -pair[1]))
    slug, description = teams[index]
    if not best:
        return f"{slug}: none of the teams' descriptions shares a word with your message, so the first one answers."
    shared = sorted(asked & {stem(w) for w in WORD_RE.findall(description)})
    return f"{slug}: your message shares “{'”, “'.join(shared)}” with what this team does."


def stem(word: str) -> str:
    """A crude stem, enough to match "tools" with "tool" and "searching" with "search"."""
    word = word.lower()
    for suffix in ("ing", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word
