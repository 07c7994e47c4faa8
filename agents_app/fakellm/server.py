"""fakellm: Chorus's offline, OpenAI-compatible chat-completions server.

It stands in for a real LLM wherever one is unwanted or unavailable: the test suite, the demo mode (no API
key) and the benchmarks. Any OpenAI client (``openai.AsyncOpenAI``, AutoGen's
``OpenAIChatCompletionClient``) talks to it unchanged with ``base_url="http://HOST:PORT/v1"`` and any
api_key. Answers are deterministic: the same request gets the same bytes, except ids and timestamps.
This module must not import Django, so the server also runs as ``python -m agents_app.fakellm``.

Routes
    POST /v1/chat/completions   streaming (SSE) and non-streaming, tools, usage
    GET  /v1/models             lists "chorus-offline" (any model name is accepted and echoed back)
    GET  /healthz               200 "ok"

What the answer says (the first that applies wins)
    1. Script rules (``--script FILE``): the first rule whose ``match`` occurs in the last user message.
    2. After a tool round trip (the last message is a ``tool`` message): "The tool said: <content>".
    3. Directives in the last user message: ``[[tool:...]]``, then ``[[reply:...]]``, then ``[[tokens:N]]``.
    4. The default reply: a short Markdown answer that quotes the question and reports the turn number
       (the number of user messages in the request), so tests can prove conversation memory reaches
       the model. Example: "Hello from **Chorus's offline model**! You asked: “hi” (turn 2 of this
       conversation)." and a few more lines.
The other directives (``tps``, ``stamp``, ``fault``) apply whichever way the answer was chosen.

Script format (a JSON list; ``match`` is a case-insensitive substring, "" matches everything)::

    [
      {"match": "weather", "when_tool_result": true, "reply": "It is {tool_result} today."},
      {"match": "weather", "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
      {"match": "hello", "reply": "Hi! I am the offline model."}
    ]

A rule with ``"when_tool_result": true`` applies only when the last message is a ``tool`` message (the
answer after a tool round trip); other rules apply only when it is not, so a tool-calling rule never
loops. ``{tool_result}`` in a reply is replaced by the tool results' content.

Directives, written anywhere in the last user message, steer one request without restarting the server
(so tests and benchmarks can drive a server running in another process). Values cannot contain "]]".

    [[reply:TEXT]]          reply exactly TEXT
    [[tokens:N]]            reply with exactly N tokens: "tok1 tok2 ... tokN" (N at most 100000)
    [[tps:N]]               N tokens per second for this request (0 = as fast as possible)
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
        hang                accept the request, never answer; the handler ends when the client goes away
        cut                 send a few tokens, then drop the connection (no ``[DONE]``, truncated body)
        malformed           send a few tokens, then the line ``data: {not json``
        slow-first[:S]      wait S seconds (default ``--first-token-delay``) before the first byte

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
import asyncio
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

MODEL_NAME = "chorus-offline"
CUT_AFTER = 3  # pieces sent before the "cut" and "malformed" faults strike
ARG_FRAGMENT = 8  # characters of tool-call arguments per streamed chunk
MAX_TOKENS_DIRECTIVE = 100_000

DIRECTIVE_RE = re.compile(r"\[\[([a-z0-9-]+)(?::(.*?))?\]\]", re.IGNORECASE | re.DOTALL)
TOKEN_RE = re.compile(r"\S+\s*|\s+")  # a word and the whitespace after it (leading space: its own token)
STAMP_RE = re.compile(r"⟦(\d+):(\d+)⟧")
HTML_TAG_RE = re.compile(r"<[^>]*>")
MARKUP_RE = re.compile(r"[`*_~\[\]<>#|\\]")  # Markdown/HTML syntax kept out of the quoted question

# fault kind -> (status, error type, error code, message, extra headers)
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
}
OTHER_FAULTS = ("hang", "cut", "malformed", "slow-first")


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


def parse_directives(text: str) -> dict[str, str]:
    """``[[name:value]]`` directives in text; the first of each name wins. ``[[stamp]]`` has value ""."""
    found: dict[str, str] = {}
    for name, value in DIRECTIVE_RE.findall(text):
        found.setdefault(name.lower(), value.strip())
    return found


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


def choose_answer(body: Mapping[str, Any], rules: tuple[Rule, ...], question: str, directives) -> Answer:
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
    return Answer(default_reply(question, turn=sum(m.get("role") == "user" for m in messages)))


def make_plan(body: Any, config: FakeLLMConfig) -> Plan:
    """Validate the request body and decide the whole answer (raises RequestError for a 400)."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", "invalid_json")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list.", "missing_required_parameter")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise RequestError("Each message must be an object with a 'role'.", "invalid_type")

    question = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    directives = parse_directives(question)
    fault, _, fault_seconds = directives.get("fault", "").partition(":")
    if fault and fault not in ERROR_FAULTS and fault not in OTHER_FAULTS:
        kinds = ", ".join([*ERROR_FAULTS, *OTHER_FAULTS])
        raise RequestError(f"Unknown fault {fault!r}; use one of {kinds}.", "invalid_directive")
    first_delay = config.latency_ms / 1000
    if fault == "slow-first" and fault_seconds:
        first_delay += directive_number("fault", fault_seconds, float)
    elif fault == "slow-first":
        first_delay += config.first_token_delay
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return Plan(
        answer=choose_answer(body, config.rules, question, directives),
        model=str(body.get("model") or MODEL_NAME),
        stream=bool(body.get("stream")),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        max_tokens=max_tokens if type(max_tokens) is int and max_tokens > 0 else None,
        prompt_tokens=count_words(messages),
        tps=directive_number("tps", directives["tps"], float) if "tps" in directives else config.tps,
        first_delay=first_delay,
        fault=fault or None,
        stamp="stamp" in directives,
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
        if i == CUT_AFTER and plan.fault in ("cut", "malformed"):
            break
        await pace(start, i, plan.tps)
        await response.write(chunk(delta(plan, i, piece, call_id)))
    if not parts:  # an empty reply still names its speaker
        await response.write(chunk({"role": "assistant", "content": ""}))
    if plan.fault == "cut":
        request.transport.abort()  # no terminating chunk: the client sees a truncated body
    elif plan.fault == "malformed":
        await response.write(b"data: {not json\n\n")
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
        return error_response(status, message, code, type_, headers=headers)
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
    """The command-line options, shared by ``python -m agents_app.fakellm`` and ``manage.py fakellm``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on, 0 = any (default 8001)")
    parser.add_argument("--tps", type=float, default=30.0, help="tokens per second, 0 = unpaced (default 30)")
    parser.add_argument("--script", help="JSON file of reply rules (format: see agents_app.fakellm.server)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer, in ms")
    parser.add_argument(
        "--first-token-delay", type=float, default=2.0, help="seconds for [[fault:slow-first]] (default 2)"
    )


def config_from_options(options: Mapping[str, Any]) -> FakeLLMConfig:
    """A config from parsed options; raises OSError or ValueError for a missing or invalid script."""
    return FakeLLMConfig(
        tps=options["tps"],
        rules=load_script(options["script"]) if options.get("script") else (),
        latency_ms=options["latency_ms"],
        first_token_delay=options["first_token_delay"],
    )
