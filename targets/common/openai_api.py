"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models.

Streaming answers are server-sent events (`data: {...}` blocks) ending with
`data: [DONE]`. Sampling defaults are OpenAI's (temperature 1, top_p 1).
One choice per request: n (or best_of) above 1 is refused, and so are
logprobs, echo and suffix, which would change what the reply means;
penalties, logit_bias, tools and response_format are accepted and ignored.
/v1/completions sends the prompt as is and generates 16 tokens unless told
otherwise (OpenAI's default); chat uses the model's chat template.
"""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import unquote, urlsplit

from edgeq_targets.common.api_common import (
    ApiError,
    get_bool,
    get_messages,
    get_number,
    get_stop,
)

SSE = "text/event-stream"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def error_body(e: ApiError) -> dict:
    """OpenAI's error shape."""
    kind = "server_error" if e.status >= 500 else "invalid_request_error"
    return {
        "error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}
    }


# -- request fields --------------------------------------------------------------


def _refuse_unsupported(body: dict) -> None:
    """400 for the options that would change what the answer means."""
    for key in ("n", "best_of"):
        n = get_number(body, key, integer=True, lo=1)
        if n not in (None, 1):
            raise ApiError(
                400,
                f"'{key}' must be 1: this server generates one choice per "
                "request; send several requests instead",
                param=key,
            )
    for key in ("logprobs", "echo", "suffix"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)


def _max_tokens(body: dict, default: int | None) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        n = get_number(body, key, integer=True, lo=1)
        if n is not None:
            return n
    return default


def _sampling(body: dict) -> dict:
    temperature = get_number(body, "temperature", lo=0, hi=2)
    top_p = get_number(body, "top_p", lo=0, hi=1)
    return {
        "temperature": 1.0 if temperature is None else temperature,
        "top_k": 0,
        "top_p": 1.0 if top_p is None else top_p,
        "seed": get_number(body, "seed", integer=True),
        "stop": get_stop(body.get("stop"), "stop"),
    }


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options") or {}
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _chat_content(content, i: int) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = (
                    part.get("type") if isinstance(part, dict) else type(part).__name__
                )
                raise ApiError(
                    400,
                    f"messages[{i}]: only text content is supported, not '{kind}'",
                    param="messages",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string", param="messages")


def _prompt_ids(app, prompt) -> list[int]:
    """/v1/completions' prompt: a string, token ids, or a list of one."""
    if isinstance(prompt, list) and len(prompt) == 1 and not _is_ids(prompt):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return app.encode_text(prompt)
    if _is_ids(prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(
            400,
            "send one prompt per request: this server answers one prompt at a time",
            param="prompt",
        )
    raise ApiError(
        400, "'prompt' must be a string or a list of token ids", param="prompt"
    )


def _is_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    )


# -- answering ---------------------------------------------------------------------


def _usage(job) -> dict:
    r = job.result
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generated_tokens,
        "total_tokens": r.prompt_tokens + r.generated_tokens,
    }


def _finish_reason(job) -> str:
    return "stop" if job.result.finish_reason == "stop" else "length"


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _answer(req, job, body: dict, shape) -> None:
    """Send the reply: one JSON object, or a stream of events.

    `shape` builds the objects: whole(text), chunk(text), last(), first()
    (None when the API has no opening chunk) and usage_chunk().
    """
    if not get_bool(body, "stream", False):
        text = job.text(req.connected)
        if job.error:
            raise ApiError(500, job.error)
        req.send_json(200, shape.whole(text))
        return
    out = req.start_stream(job, SSE)
    first = shape.first()
    if first:
        out.write(_event(first))
    for text in job.pieces(req.connected):
        out.write(_event(shape.chunk(text)))
    if job.error:
        out.write(_event(error_body(ApiError(500, job.error))))
    else:
        out.write(_event(shape.last()))
        if _include_usage(body):
            out.write(_event(shape.usage_chunk()))
    out.write(b"data: [DONE]\n\n")
    out.close()


class _Shape:
    """The fields every object of one reply shares."""

    def __init__(self, req, job, model: str, obj: str, prefix: str):
        self.job = job
        self.obj = obj
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": f"edgeq-{req.app.info.artifact_id}",
        }

    def reply(self, choice: dict | None, obj: str | None = None, **extra) -> dict:
        choices = [] if choice is None else [{"index": 0} | choice]
        return self.base | {"object": obj or self.obj, "choices": choices} | extra

    def first(self):
        return None

    def usage_chunk(self) -> dict:
        return self.reply(None, usage=_usage(self.job))


class _ChatShape(_Shape):
    def whole(self, text):
        message = {"role": "assistant", "content": text}
        choice = {
            "message": message,
            "logprobs": None,
            "finish_reason": _finish_reason(self.job),
        }
        return self.reply(choice, "chat.completion", usage=_usage(self.job))

    def first(self):
        delta = {"role": "assistant", "content": ""}
        return self.reply({"delta": delta, "logprobs": None, "finish_reason": None})

    def chunk(self, text):
        delta = {"content": text}
        return self.reply({"delta": delta, "logprobs": None, "finish_reason": None})

    def last(self):
        finish = _finish_reason(self.job)
        return self.reply({"delta": {}, "logprobs": None, "finish_reason": finish})


class _CompletionShape(_Shape):
    def whole(self, text):
        choice = {
            "text": text,
            "logprobs": None,
            "finish_reason": _finish_reason(self.job),
        }
        return self.reply(choice, usage=_usage(self.job))

    def chunk(self, text):
        return self.reply({"text": text, "logprobs": None, "finish_reason": None})

    def last(self):
        finish = _finish_reason(self.job)
        return self.reply({"text": "", "logprobs": None, "finish_reason": finish})


# -- endpoints -----------------------------------------------------------------------


def chat_completions(req, body: dict) -> None:
    """POST /v1/chat/completions."""
    app = req.app
    model = app.info.resolve(body.get("model"))
    _refuse_unsupported(body)
    if not body.get("messages"):
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = get_messages(body["messages"], _chat_content)
    for m in messages:  # OpenAI's newer name for the system role
        m["role"] = "system" if m["role"] == "developer" else m["role"]
    max_tokens = _max_tokens(body, None)
    sampling = _sampling(body)
    ids = app.encode_chat(messages)
    cfg = app.generation_config(ids, max_tokens, "messages", **sampling)
    job = app.submit(ids, cfg, req.received)
    _answer(
        req, job, body, _ChatShape(req, job, model, "chat.completion.chunk", "chatcmpl")
    )


def completions(req, body: dict) -> None:
    """POST /v1/completions: the prompt is sent as is."""
    app = req.app
    model = app.info.resolve(body.get("model"))
    _refuse_unsupported(body)
    if body.get("prompt") is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    ids = _prompt_ids(app, body["prompt"])
    max_tokens = _max_tokens(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    sampling = _sampling(body)
    cfg = app.generation_config(ids, max_tokens, "prompt", **sampling)
    job = app.submit(ids, cfg, req.received)
    _answer(
        req, job, body, _CompletionShape(req, job, model, "text_completion", "cmpl")
    )


def _model_object(info, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": int(info.modified),
        "owned_by": "edgeq",
    }


def models(req, body: dict) -> None:
    """GET /v1/models."""
    info = req.app.info
    req.send_json(200, {"object": "list", "data": [_model_object(info, info.name)]})


def model(req, body: dict) -> None:
    """GET /v1/models/ID."""
    info = req.app.info
    name = unquote(urlsplit(req.path).path[len("/v1/models/") :])
    req.send_json(200, _model_object(info, info.resolve(name)))


_ROUTES = {
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/completions": {"POST": completions},
    "/v1/models": {"GET": models},
}


def routes(path: str) -> dict | None:
    """{method: function} for `path`, or None."""
    if path.startswith("/v1/models/"):
        return {"GET": model}
    return _ROUTES.get(path)
