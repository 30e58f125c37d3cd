"""The client line protocol: one JSON object per `\\n`-terminated UTF-8 line, both ways.

Parsing and validation are pure: `parse_line` turns one line into a typed request or command, or
raises `ProtocolError` carrying the error line to send back. Nothing invalid gets further.
The protocol is specified in README.md ("Line protocol"); keep the two in step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_ID_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOKEN_CHARS = 4096
MAX_TOP_K = (1 << 31) - 1  # past any vocabulary; bounded so that it fits the wire's integers
ROLES = ("system", "user", "assistant", "tool")


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def event(self) -> dict:
        return error_event(self.request_id, self.code, self.message)


@dataclass(frozen=True)
class GenerateRequest:
    id: str
    prompt: str | None  # raw text, tokenized as is
    messages: tuple[tuple[str, str], ...] | None  # (role, content), rendered by the chat template
    max_tokens: int | None  # None = the server's default
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None = a random seed
    stop: tuple[str, ...]
    stream: bool


@dataclass(frozen=True)
class StatusCommand:
    id: str


@dataclass(frozen=True)
class CancelCommand:
    id: str
    target: str


@dataclass(frozen=True)
class AuthCommand:
    id: str
    token: str


GENERATE_FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}


def parse_line(line: bytes) -> GenerateRequest | StatusCommand | CancelCommand:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad_request", "line is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_request", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # an integer past Python's 4300 digits, nesting past the stack
        raise ProtocolError("bad_request", f"invalid JSON: {str(exc)[:200]}") from None
    return parse_object(obj)


def parse_object(obj) -> GenerateRequest | StatusCommand | CancelCommand | AuthCommand:
    """Validate one decoded JSON value (also used by the HTTP API after renaming its fields)."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a line must be a JSON object")
    request_id = obj.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise ProtocolError("bad_request", f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters")
    _check_unicode(obj, request_id)
    if "cmd" in obj:
        return _parse_command(obj, request_id)
    unknown = set(obj) - GENERATE_FIELDS
    if unknown:
        raise ProtocolError("bad_request", f"unknown fields: {', '.join(sorted(unknown))}", request_id)
    return _parse_generate(obj, request_id)


def _check_unicode(obj: dict, request_id: str) -> None:
    """JSON can spell an unpaired surrogate (\\ud800) that no UTF-8 can carry: let one through and
    every reply naming it (its id, a prompt's echoed text) fails to encode, taking down what shares
    the connection or the step with it. Refused here, with the id where the id itself is sound."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        reply_id: str | None = request_id
        try:
            request_id.encode("utf-8")
        except UnicodeEncodeError:
            reply_id = None
        raise ProtocolError("bad_request", "strings must be valid Unicode (no unpaired surrogates such as \\ud800)",
                            reply_id) from None


def _parse_command(obj: dict, request_id: str) -> StatusCommand | CancelCommand | AuthCommand:
    cmd = obj["cmd"]
    if cmd == "status":
        _only(obj, {"id", "cmd"}, request_id)
        return StatusCommand(request_id)
    if cmd == "cancel":
        _only(obj, {"id", "cmd", "target"}, request_id)
        target = obj.get("target")
        if not isinstance(target, str) or not target:
            raise ProtocolError("bad_request", "'target' must be the id of a request", request_id)
        return CancelCommand(request_id, target)
    if cmd == "auth":
        _only(obj, {"id", "cmd", "token"}, request_id)
        token = obj.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise ProtocolError("bad_request", "'token' must be a non-empty string", request_id)
        return AuthCommand(request_id, token)
    raise ProtocolError("bad_request", "'cmd' must be 'status', 'cancel' or 'auth'", request_id)


def _only(obj: dict, allowed: set[str], request_id: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise ProtocolError("bad_request", f"unknown fields: {', '.join(sorted(unknown))}", request_id)


def _parse_generate(obj: dict, rid: str) -> GenerateRequest:
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ProtocolError("bad_request", "give exactly one of 'prompt' or 'messages'", rid)
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        # Tokenizers that add a BOS token would turn "" into a prompt of one token.
        raise ProtocolError("bad_request", "'prompt' must be a non-empty string", rid)
    parsed_messages = None
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ProtocolError("bad_request", "'messages' must be a non-empty list", rid)
        parsed = []
        for m in messages:
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ProtocolError("bad_request", "each message must be {\"role\": ..., \"content\": ...}", rid)
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise ProtocolError("bad_request", f"a message's role must be one of {ROLES} and its content a string", rid)
            parsed.append((m["role"], m["content"]))
        parsed_messages = tuple(parsed)
    max_tokens = _int(obj, "max_tokens", None, 1, None, rid)
    temperature = _number(obj, "temperature", 0.0, 0.0, 100.0, rid)
    top_p = _number(obj, "top_p", 1.0, 0.0, 1.0, rid)
    if top_p <= 0.0:
        raise ProtocolError("bad_request", "'top_p' must be in (0, 1]", rid)
    top_k = _int(obj, "top_k", 0, 0, MAX_TOP_K, rid)
    seed = _int(obj, "seed", None, 0, (1 << 63) - 1, rid)
    stop = obj.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise ProtocolError("bad_request", f"'stop' must be a list of at most {MAX_STOP_STRINGS} "
                            f"non-empty strings of at most {MAX_STOP_CHARS} characters", rid)
    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise ProtocolError("bad_request", "'stream' must be true or false", rid)
    return GenerateRequest(rid, prompt, parsed_messages, max_tokens, temperature, top_p, top_k, seed,
                           tuple(stop), stream)


def _int(obj, name, default, low, high, rid):
    value = obj.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ProtocolError("bad_request", f"'{name}' must be an integer {bound}", rid)
    return value


def _number(obj, name, default, low, high, rid):
    value = obj.get(name, default)
    # low <= value <= high before isfinite: an int past float's range (JSON allows any) overflows it
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value):
        raise ProtocolError("bad_request", f"'{name}' must be a number between {low} and {high}", rid)
    return float(value)


# ---- replies

def token_event(request_id: str, text: str, token_id: int) -> dict:
    return {"id": request_id, "event": "token", "text": text, "token_id": token_id}


def done_event(request_id: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": request_id, "event": "done", "text": text, "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


def error_event(request_id: str | None, code: str, message: str) -> dict:
    return {"id": request_id, "event": "error", "error": {"code": code, "message": message}}


def encode_event(event: dict) -> bytes:
    return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
