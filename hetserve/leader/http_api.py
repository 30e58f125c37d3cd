"""OpenAI-compatible HTTP on the leader (`--http`), and Prometheus `/metrics`.

aiohttp serves it on the leader's own event loop (a well-kept asyncio HTTP server with streaming
responses; a hand-written HTTP/1.1 + SSE server would be more code to get right). Requests are
translated into the line protocol's fields and validated by the same `wire.client.parse_object`,
so both front ends accept and refuse exactly the same things.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` as
server-sent events), GET /metrics, GET /health. Errors use OpenAI's JSON shape:
400 invalid request, 404 unknown model or path, 429 overloaded, 503 no capacity, 500 internal.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import MAX_LINE_BYTES
from ..wire.client import GenerateRequest, ProtocolError, parse_object
from .frontend import token_matches
from .metrics import render_metrics

if TYPE_CHECKING:
    from .daemon import Leader

log = logging.getLogger(__name__)

STATUS_OF = {"bad_request": 400, "too_long": 400, "unauthorized": 401, "not_found": 404, "overloaded": 429,
             "unavailable": 503, "internal": 500}
TYPE_OF = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
           405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
           500: "server_error"}
OPEN_PATHS = {"/health"}  # answered without a token (load balancers' probes)
# Accepted and ignored when at their neutral value (None, or one of these); anything else is refused
# as unsupported.
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0), "top_logprobs": (0,),
           "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
           "tools": ([],), "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},),
           "parallel_tool_calls": (False, True)}
IGNORED = {"user", "stream_options", "metadata", "store", "service_tier"}
MAPPED = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
INPUT = {True: "messages", False: "prompt"}  # the one input field of chat / completions
_serial = itertools.count(1)


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": TYPE_OF.get(status, "server_error"), "param": param, "code": code}}
    return web.json_response(body, status=status)


def translate(body, chat: bool, model_name: str, request_id: str) -> GenerateRequest:
    """An OpenAI request body -> a validated GenerateRequest (ProtocolError when invalid)."""
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "the request body must be a JSON object")
    unknown = set(body) - MAPPED - IGNORED - set(NEUTRAL) - {INPUT[chat]}
    if unknown:
        raise ProtocolError("bad_request", f"unrecognized request arguments: {', '.join(sorted(unknown))}")
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if not (value is None or any(_same(value, v) for v in neutral)):
            raise ProtocolError("bad_request", f"'{name}' is not supported by this server")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ProtocolError("bad_request", "'stream' must be true or false")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ProtocolError("bad_request", "'stream_options' must be an object")
    if body.get("model") is None:
        raise ProtocolError("bad_request", "you must provide a model parameter ('model')")
    if body.get("model") != model_name:
        raise ProtocolError("not_found", f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}")
    obj: dict = {"id": request_id}
    if chat:
        messages = body.get("messages")
        if isinstance(messages, list):
            messages = [_flatten_message(m) for m in messages]
        obj["messages"] = messages
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        obj["prompt"] = prompt
    limit = body.get("max_completion_tokens")  # the newer name wins; a null one leaves max_tokens
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        obj["max_tokens"] = limit
    obj["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's default
    for name in ("top_p", "top_k", "seed", "stop"):
        if body.get(name) is not None:
            obj[name] = body[name]
    return parse_object(obj)


def _same(value, neutral) -> bool:
    """value == neutral, but a bool only equals a bool: `True == 1` must not pass for n, nor
    `0 == False` for echo (0 and 0.0 are one number)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def _flatten_message(message):
    """OpenAI content may be a list of parts; text parts are joined, others refused."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise ProtocolError("bad_request", "only text content parts are supported")
        message = {**message, "content": "".join(p["text"] for p in parts)}
    if isinstance(message, dict):  # "name" and other OpenAI extras carry nothing the template uses
        message = {k: message[k] for k in ("role", "content") if k in message}
    return message


class OpenAIServer:
    def __init__(self, leader: "Leader"):
        self.leader = leader
        self.model_name = leader.settings.model
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_LINE_BYTES, middlewares=[self._openai_errors, self._authenticate])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _openai_errors(self, request: web.Request, handler):
        """aiohttp's own refusals (no such path, wrong method, a body past MAX_LINE_BYTES) in the
        OpenAI error shape clients parse, like every other error here."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(exc.status, f"{exc.reason}: {request.method} {request.path}",
                                      exc.reason.lower().replace(" ", "_"))
            if "Allow" in exc.headers:  # 405: the methods the path takes
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        """With --token-file, every path but OPEN_PATHS needs `Authorization: Bearer <token>`."""
        expected = self.leader.settings.token
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if expected is None or request.path in OPEN_PATHS or (
                scheme.lower() == "bearer" and token_matches(given.strip(), expected)):
            return await handler(request)
        return error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "unauthorized")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "hetserve"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self.leader.status()), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

    async def health(self, request: web.Request) -> web.Response:
        serving = self.leader.state == "serving"
        return web.json_response({"state": self.leader.state}, status=200 if serving else 503)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{next(_serial)}"
        try:
            try:
                body = json.loads((await request.read()).decode("utf-8"))  # JSON is UTF-8, whatever charset is named
            except (ValueError, RecursionError):  # bad JSON or UTF-8, an integer past 4300 digits, deep nesting
                raise ProtocolError("bad_request", "the request body is not valid JSON") from None
            req = translate(body, chat, self.model_name, request_id)
            events: asyncio.Queue = asyncio.Queue()
            engine_request = await self.leader.admit(req, events.put_nowait, stream=True)
        except ProtocolError as exc:
            status = STATUS_OF[exc.code]
            code = "context_length_exceeded" if exc.code == "too_long" else (
                "model_not_found" if exc.code == "not_found" else exc.code)
            return error_response(status, exc.message, code)
        reply = Reply(request_id, self.model_name, chat)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            if stream:
                return await self._stream(request, reply, events, include_usage)
            return await self._collect(reply, events)
        finally:
            if not engine_request.done:  # the client went away: free the slot at once
                self.leader.engine.cancel(engine_request.key)

    async def _collect(self, reply: "Reply", events: asyncio.Queue) -> web.Response:
        while True:
            event = await events.get()
            if event["event"] == "done":
                return web.json_response(reply.complete(event))
            if event["event"] == "error":
                return error_response(500, event["error"]["message"], event["error"]["code"])

    async def _stream(self, request: web.Request, reply: "Reply", events: asyncio.Queue,
                      include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if reply.chat:
            await _sse(response, reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
        while True:
            event = await events.get()
            if event["event"] == "token":
                if event["text"]:
                    await _sse(response, reply.chunk(reply.piece(event["text"]), None, include_usage))
            elif event["event"] == "done":
                await _sse(response, reply.chunk({} if reply.chat else "", reply.finish(event), include_usage))
                if include_usage:
                    await _sse(response, {**reply.chunk({} if reply.chat else "", None), "choices": [],
                                          "usage": reply.usage(event)})
                break
            else:
                await _sse(response, {"error": {"message": event["error"]["message"], "type": "server_error",
                                                "param": None, "code": event["error"]["code"]}})
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _sse(response: web.StreamResponse, payload: dict) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


class Reply:
    """Builds OpenAI response objects for one request."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def piece(self, text: str):
        return {"content": text} if self.chat else text

    @staticmethod
    def finish(done: dict) -> str:
        return "length" if done["finish_reason"] == "length" else "stop"

    @staticmethod
    def usage(done: dict) -> dict:
        u = done["usage"]
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def chunk(self, delta, finish_reason: str | None, usage_null: bool = False) -> dict:
        """usage_null: with stream_options.include_usage every chunk but the last carries
        `"usage": null`, as OpenAI's do (the last one, with no choices, carries the counts)."""
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        return {**out, "usage": None} if usage_null else out

    def complete(self, done: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": None,
                      "finish_reason": self.finish(done)}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": self.finish(done)}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(done)}
