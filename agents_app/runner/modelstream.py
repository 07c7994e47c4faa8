"""Reads an OpenAI-compatible chat-completions stream itself: each text delta goes straight to a callback, and
AutoGen gets one CreateResult at the end. Knows nothing of Django.

Why: AutoGen 0.7.5's OpenAI client builds a pydantic object for every chunk (inside the openai SDK), wraps
every chunk read in a task of its own and links each one to the cancellation token: most of a worker's CPU per
streamed token (docs/performance-history.md). Here a chunk costs one `json.loads` and a few dict lookups.

What is kept from the SDK and from AutoGen: the request itself (AutoGen turns its messages and tools into the
OpenAI request; the SDK sends it with its auth, timeouts and retries of 429 and 5xx, and raises its own errors),
the result's shape (text or tool calls, usage, finish reason, a model's thoughts), the client's usage totals, and
cancellation through AutoGen's CancellationToken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import CreateResult, LLMMessage, RequestUsage
from autogen_ext.models._utils.normalize_stop_reason import normalize_stop_reason
from autogen_ext.models.openai import BaseOpenAIChatCompletionClient
from openai import NOT_GIVEN, APIConnectionError, APIError, APITimeoutError, AsyncStream, DefaultAioHttpClient
from openai._base_client import make_request_options
from openai._constants import RAW_RESPONSE_HEADER
from openai._httpx2 import request_exceptions, timeout_exceptions
from openai._response import AsyncResponseContextManager
from openai._types import NotGiven, Omit
from openai._vendor.httpx_aiohttp.transport import map_aiohttp_exceptions
from openai.types.chat import ChatCompletion, ChatCompletionChunk


class ModelStreamError(APIError):
    """The model server (a gateway such as LiteLLM, usually) broke off a stream with an error chunk,
    ``data: {"error": {...}}``, after answering 200: the SDK raises a plain APIError for it. A class of its
    own, so that Chorus can tell "the stream was cut with an error" from a bug (runner.classify_error)."""


def with_aiohttp_transport(client: Any) -> Any:
    """The same AutoGen client, its SDK client sending over aiohttp (the SDK's own `DefaultAioHttpClient`): the
    SDK still builds, sends and retries the request, but a streamed chunk is parsed by aiohttp's C parser rather
    than by h11 and anyio in Python. Call it on the event loop the client will be used on, and make its calls
    inside `unreachable_not_slow()`."""
    if isinstance(client, BaseOpenAIChatCompletionClient):
        client._client = client._client.copy(http_client=DefaultAioHttpClient())
    return client


@contextlib.contextmanager
def unreachable_not_slow() -> Iterator[None]:
    """Around calls of a client sent over aiohttp: "the model server is down" raised as APIConnectionError, as
    the SDK's own httpx transport raises it, not as APITimeoutError.

    The SDK's vendored aiohttp transport maps every aiohttp.ClientConnectionError, a refused connection or a
    server that hangs up included, to httpx's ConnectTimeout, so the SDK reports "did not answer in time".
    Correcting it here, rather than in the transport's module-wide map, leaves every other user of the SDK in
    the process as it was. aiohttp's real timeouts (ServerTimeoutError, SocketTimeoutError) stay timeouts."""
    try:
        yield
    except APITimeoutError as exc:
        cause = _aiohttp_cause(exc)
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            raise APIConnectionError(request=exc.request) from exc
        raise


def _aiohttp_cause(exc: BaseException) -> BaseException | None:
    seen = 0
    while exc is not None and seen < 10:  # the SDK's error, from httpx's, from aiohttp's
        if isinstance(exc, aiohttp.ClientError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def can_stream(client: Any, json_output: Any, extra_create_args: Mapping[str, Any]) -> bool:
    """Whether this module can read the stream for `client`: an OpenAI-compatible AutoGen client asked for text
    or JSON (structured output with a pydantic class goes through the SDK's own beta helper)."""
    if not isinstance(client, BaseOpenAIChatCompletionClient):
        return False
    if isinstance(json_output, type):
        return False
    return not isinstance(extra_create_args.get("response_format"), type)


async def stream_completion(
    client: BaseOpenAIChatCompletionClient,
    messages: Sequence[LLMMessage],
    on_delta: Callable[[str], None],
    *,
    tools: Sequence[Any] = (),
    tool_choice: Any = "auto",
    json_output: bool | None = None,
    extra_create_args: Mapping[str, Any] | None = None,
    cancellation_token: CancellationToken | None = None,
) -> AsyncGenerator[CreateResult, None]:
    """Stream one completion: `on_delta(text)` for each piece of the answer's text as it arrives, then yield the
    CreateResult (the only item this generator yields, so it can stand in for AutoGen's create_stream)."""
    params = client._process_create_args(messages, tools, tool_choice, json_output, extra_create_args or {})
    reader = _ChunkReader(on_delta)
    # One callback for the whole stream instead of one linked future per chunk: a Stop cancels the task that
    # is reading, at whatever it awaits (the request, or the next bytes).
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    streaming = True

    def cancel_if_streaming() -> None:
        if streaming and task is not None:
            task.cancel()

    def on_cancel() -> None:  # may be called from another thread
        loop.call_soon_threadsafe(cancel_if_streaming)

    if cancellation_token is not None:
        cancellation_token.add_callback(on_cancel)
    try:
        with unreachable_not_slow():
            result = await _read_stream(client, params, reader)
    finally:
        streaming = False
    client._total_usage = _add(client._total_usage, result.usage)
    client._actual_usage = _add(client._actual_usage, result.usage)
    yield result


async def _read_stream(client: BaseOpenAIChatCompletionClient, params: Any, reader: _ChunkReader) -> CreateResult:
    async with _post_streaming(client, params) as response:
        try:
            with map_aiohttp_exceptions():  # aiohttp's read errors as the httpx ones the SDK would raise
                async for data in _body(response):
                    reader.feed(data)
                    if reader.done:
                        break
        except timeout_exceptions() as exc:
            raise APITimeoutError(request=response.http_request) from exc
        except request_exceptions() as exc:
            raise APIConnectionError(request=response.http_request) from exc
    reader.finish()
    return reader.result(default_model=params.create_args.get("model", ""))


def _body(response: Any) -> AsyncIterator[bytes]:
    """The response body as it arrives: straight from aiohttp's reader when the SDK sent the request over its
    aiohttp transport and the body is not compressed, else through the SDK's own iterator.

    Why: each chunk would otherwise pass through six async generators (the SDK's, httpx's decoding and raw
    iterators, its bound stream, the transport's stream, aiohttp's chunked iterator), a few percent of a
    worker's CPU per token (docs/performance-history.md). The SDK still sent the request and checked the status; its
    response is still closed by the caller's `async with`. The link from httpx's response to aiohttp's is the
    transport's own (`openai._vendor.httpx_aiohttp`): where it is not found, nothing changes."""
    http_response = response.http_response
    encoding = http_response.headers.get("content-encoding", "identity").strip().lower()
    transport_stream = getattr(http_response.stream, "_stream", None)  # httpx binds the transport's stream
    raw = getattr(transport_stream, "_aiohttp_response", None)
    if encoding in ("", "identity") and isinstance(raw, aiohttp.ClientResponse):
        return raw.content.iter_any()
    return response.iter_bytes()


def _post_streaming(client: BaseOpenAIChatCompletionClient, params: Any) -> AsyncResponseContextManager:
    """POST the chat completion as the SDK's `chat.completions.with_streaming_response.create` would (same
    headers, auth, timeout, retries and errors), minus its per-request transform of the body.

    That transform walks every message against the SDK's TypedDicts to rename aliased keys and encode files
    and dates; chat-completion params have none of those, so for them it returns what it was given, at a third
    of the SDK's CPU for a run (docs/performance-history.md). The body here is the messages and tools
    AutoGen built, with its create args; `timeout` and `extra_body` are request options, as in the SDK."""
    args = dict(params.create_args)
    timeout = args.pop("timeout", NOT_GIVEN)
    extra_body = args.pop("extra_body", None)
    body = {"messages": params.messages, "stream": True, **args}
    if params.tools:
        body["tools"] = params.tools
    body = {key: value for key, value in body.items() if not isinstance(value, NotGiven | Omit)}
    options = make_request_options(
        extra_headers={RAW_RESPONSE_HEADER: "stream"},
        extra_body=extra_body,
        timeout=timeout,
        security={"bearer_auth": True},
    )
    return AsyncResponseContextManager(
        client._client.post(
            "/chat/completions",
            body=body,
            options=options,
            cast_to=ChatCompletion,
            stream=True,
            stream_cls=AsyncStream[ChatCompletionChunk],
        )
    )


def _add(a: RequestUsage, b: RequestUsage) -> RequestUsage:
    return RequestUsage(prompt_tokens=a.prompt_tokens + b.prompt_tokens,
                        completion_tokens=a.completion_tokens + b.completion_tokens)  # fmt: skip


class _ChunkReader:
    """Assembles `data:` lines of a chat-completions event stream into a result, passing text on as it comes."""

    def __init__(self, on_delta: Callable[[str], None]):
        self.on_delta = on_delta
        self.buffer = b""
        self.done = False
        self.text: list[str] = []
        self.thought: list[str] = []
        self.tool_calls: dict[int, FunctionCall] = {}
        self.finish_reason: str | None = None
        self.usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        self.model = ""

    def feed(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            self.line(line)
            if self.done:
                return

    def finish(self) -> None:
        if self.buffer.strip() and not self.done:
            self.line(self.buffer)
        self.buffer = b""

    def line(self, line: bytes) -> None:
        # Blank lines end events, ":" lines are comments, "event:"/"id:" lines carry nothing we use.
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)  # a malformed line raises JSONDecodeError: "the model sent an unreadable answer"
        if not isinstance(chunk, dict):
            raise json.JSONDecodeError("a stream chunk is not a JSON object", payload.decode(errors="replace"), 0)
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise ModelStreamError(message or "An error occurred during streaming", request=None, body=error)  # type: ignore[arg-type]
        self.model = chunk.get("model") or self.model
        usage = chunk.get("usage")
        if usage:
            self.usage = RequestUsage(prompt_tokens=usage.get("prompt_tokens") or 0,
                                      completion_tokens=usage.get("completion_tokens") or 0)  # fmt: skip
        choices = chunk.get("choices")
        if not choices:
            return
        choice = choices[0]
        if choice.get("finish_reason") and usage is None:
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if reasoning:
            self.thought.append(reasoning)  # a model's thinking is kept as the result's thought, not streamed
        content = delta.get("content")
        if content:
            self.text.append(content)
            self.on_delta(content)
        for call in delta.get("tool_calls") or ():
            full = self.tool_calls.setdefault(call.get("index", 0), FunctionCall(id="", arguments="", name=""))
            full.id += call.get("id") or ""
            function = call.get("function") or {}
            full.name += function.get("name") or ""
            full.arguments += function.get("arguments") or ""

    def result(self, default_model: str) -> CreateResult:
        if self.finish_reason == "function_call":
            raise ValueError("Function calls are not supported in this context")
        thought = "".join(self.thought) or None
        if self.tool_calls:
            content: str | list[FunctionCall] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            thought = "".join(self.text) or thought  # text written before deciding to call tools
        else:
            content = "".join(self.text)
        return CreateResult(finish_reason=normalize_stop_reason(self.finish_reason), content=content,
                            usage=self.usage, cached=False, logprobs=None, thought=thought)  # fmt: skip
