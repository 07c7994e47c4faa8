"""Reading a model or gateway error into one of the protocol's error codes."""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

# Gateways say "unknown model" and "too long" in words, under many statuses (LiteLLM: 400 "Invalid model name";
# vLLM: 400 "maximum context length"; Ollama: 404 "model ... not found"), and sometimes inside a stream.
_CONTEXT_TOO_LONG_RE = re.compile(
    r"context[ _]?length|context[ _]?window|maximum context|prompt is too long|too many tokens", re.IGNORECASE
)
_UNKNOWN_MODEL_RE = re.compile(
    r"invalid model|model_not_found|unknown model|no such model|\bmodel\b[^\n]{0,120}?(not found|does not exist)",
    re.IGNORECASE,
)
_MODEL_NOT_FOUND = (
    "The model server does not know the configured model (OPENAI_MODEL, or the one the team's config names)."
)
_READ_BY_TEXT = {"BadRequestError", "NotFoundError", "UnprocessableEntityError", "ConflictError",
                 "InternalServerError", "APIStatusError", "APIError", "ModelStreamError"}  # fmt: skip
# Errors that, once some of the answer has streamed, mean "the stream was cut": what arrived is kept.
_STREAM_BREAKS = {
    "APIConnectionError": "The model server dropped the connection mid-answer; what arrived is kept.",
    "APIError": "The model server broke off the answer with an error ({error}); what arrived is kept.",
    "ModelStreamError": "The model server broke off the answer with an error ({error}); what arrived is kept.",
}


def _error_kind(exc: BaseException) -> tuple[str, str]:
    """The exception's type name and message. Inside a group chat AutoGen re-raises an agent's exception as
    RuntimeError("<Type>: <message>\nTraceback: ..."): the agent's type and message are read from it."""
    text = str(exc)
    kind = type(exc).__name__
    if isinstance(exc, RuntimeError) and ":" in text:
        kind, _, text = text.partition(":")
        text = text.split("\nTraceback:", 1)[0].strip()
    return kind, text


def classify_error(exc: BaseException) -> tuple[str, str]:
    """A stable error code and a sentence a person can read, for an exception raised during a turn."""
    kind, text = _error_kind(exc)
    if kind in _READ_BY_TEXT:
        if _CONTEXT_TOO_LONG_RE.search(text):
            return "context_too_long", "The conversation is too long for the model's context window."
        if _UNKNOWN_MODEL_RE.search(text):
            return "model_not_found", _MODEL_NOT_FOUND
    known = {
        "APIConnectionError": ("model_unreachable", "The model server could not be reached."),
        "APITimeoutError": ("model_timeout", "The model server did not answer in time."),
        "RateLimitError": ("model_rate_limited", "The model server is rate limiting requests; try again shortly."),
        "AuthenticationError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "PermissionDeniedError": ("model_auth_failed", "The model server refused Chorus's API key."),
        "InternalServerError": ("model_error", "The model server failed while answering."),
        "NotFoundError": ("model_not_found", _MODEL_NOT_FOUND),
    }
    if kind in known:
        return known[kind]
    if kind in ("BadRequestError", "UnprocessableEntityError"):
        return "model_bad_request", f"The model server refused the request: {text[:300]}"
    if kind in ("JSONDecodeError", "APIResponseValidationError"):
        return "model_bad_response", "The model server sent an answer Chorus could not read."
    if kind in ("APIError", "ModelStreamError"):
        return "model_error", f"The model server reported an error while answering: {text[:300]}"
    if kind in ("APIStatusError", "ConflictError"):
        return "model_error", f"The model server answered with an error: {text[:300]}"
    return "internal_error", f"The team failed: {kind}: {text[:300]}"
