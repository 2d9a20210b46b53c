"""Ollama's API: /api/generate, /api/chat, /api/tags, /api/show, /api/ps,
/api/version, with the field names and statistics Ollama clients read.

Streaming answers are NDJSON, one object per text piece, ending with an
object that has "done": true, "done_reason" and the statistics (durations
in nanoseconds). Sampling defaults are Ollama's (temperature 0.8, top_k 40,
top_p 0.9); options a device engine has no use for (num_ctx, num_thread,
repeat_penalty, ...) are accepted and ignored, and so are "format",
"template", "think", "keep_alive", "images" and "tools": the reply is plain
text from the model's own template.
"""

from __future__ import annotations

import json
import time

from edgeq_targets.common.api_common import (
    ApiError,
    get_bool,
    get_messages,
    get_number,
    get_stop,
    get_text,
    iso_time,
)

# The Ollama API level these endpoints follow; clients compare it.
OLLAMA_API_VERSION = "0.6.0"
NDJSON = "application/x-ndjson"


def error_body(e: ApiError) -> dict:
    """Ollama's error shape."""
    return {"error": e.message}


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# -- sampling options ----------------------------------------------------------


def _options(body: dict) -> tuple[int | None, dict]:
    """(max tokens or None for "as many as allowed", sampling settings)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'options' must be an object", param="options")
    w = "options."
    temperature = get_number(opts, "temperature", lo=0, where=w)
    top_k = get_number(opts, "top_k", integer=True, lo=0, where=w)
    top_p = get_number(opts, "top_p", lo=0, hi=1, where=w)
    predict = get_number(opts, "num_predict", integer=True, where=w)
    sampling = {
        "temperature": 0.8 if temperature is None else temperature,
        "top_k": 40 if top_k is None else top_k,
        "top_p": 0.9 if top_p is None else top_p,
        "seed": get_number(opts, "seed", integer=True, where=w),
        "stop": get_stop(opts.get("stop"), "options.stop"),
    }
    # Ollama: -1 = until the end of text, -2 = until the context is full;
    # both mean "as many as the server allows" here.
    return (None if predict is None or predict < 0 else predict), sampling


def _stats(job, t_end: float) -> dict:
    """Ollama's closing statistics; load_duration is the time the request
    waited for the engine (the model stays loaded)."""
    r = job.result
    return {
        "total_duration": _ns(t_end - job.received),
        "load_duration": _ns(r.started - job.received),
        "prompt_eval_count": r.prompt_tokens,
        "prompt_eval_duration": _ns(r.first_token - r.started),
        "eval_count": r.generated_tokens,
        "eval_duration": _ns(r.end - r.first_token),
    }


def _done_reason(job) -> str:
    return job.result.finish_reason if job.result.finish_reason == "stop" else "length"


# -- answering -----------------------------------------------------------------


def _answer(req, job, stream: bool, piece_body, final_body) -> None:
    """Stream NDJSON objects, or send one object with the whole text.

    `piece_body(text)` shapes a streamed piece; `final_body(text)` the
    closing object, to which the statistics are added.
    """
    if not stream:
        text = job.text(req.connected)
        if job.error:
            raise ApiError(500, job.error)
        final = final_body(text) | _stats(job, time.perf_counter())
        req.send_json(200, final)
        return
    out = req.start_stream(job, NDJSON)
    for text in job.pieces(req.connected):
        out.write(_line(piece_body(text)))
    if job.error:
        out.write(_line({"error": job.error}))
    else:
        out.write(_line(final_body("") | _stats(job, time.perf_counter())))
    out.close()


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def _loaded(req, model: str, key: str, value) -> None:
    """What Ollama answers to an empty prompt: the model is loaded."""
    req.send_json(
        200,
        {
            "model": model,
            "created_at": iso_time(),
            key: value,
            "done": True,
            "done_reason": "load",
        },
    )


# -- endpoints -----------------------------------------------------------------


def generate(req, body: dict) -> None:
    """POST /api/generate: complete a prompt (templated unless "raw")."""
    app = req.app
    model = app.info.resolve(body.get("model"))
    prompt = get_text(body, "prompt", "")
    system = get_text(body, "system")
    stream = get_bool(body, "stream", True)
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(i, int) for i in context):
        raise ApiError(400, "'context' must be a list of token ids", param="context")
    if not prompt and not context:
        return _loaded(req, model, "response", "")
    max_tokens, sampling = _options(body)

    if get_bool(body, "raw", False) or not app.has_chat_template:
        # Without a template Ollama's default is "{{ .Prompt }}": no system.
        ids = app.encode_text(prompt)
    else:
        messages = [{"role": "system", "content": system}] if system else []
        ids = app.encode_chat(messages + [{"role": "user", "content": prompt}])
    ids = context + ids
    cfg = app.generation_config(ids, max_tokens, "prompt", **sampling)
    job = app.submit(ids, cfg, req.received)

    def piece(text):
        return {
            "model": model,
            "created_at": iso_time(),
            "response": text,
            "done": False,
        }

    def final(text):
        return {
            "model": model,
            "created_at": iso_time(),
            "response": text,
            "done": True,
            "done_reason": _done_reason(job),
            "context": ids + job.result.output_ids,
        }

    _answer(req, job, stream, piece, final)


def _ollama_content(content, i: int) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
    return content


def chat(req, body: dict) -> None:
    """POST /api/chat: the next assistant message of a conversation."""
    app = req.app
    model = app.info.resolve(body.get("model"))
    stream = get_bool(body, "stream", True)
    messages = get_messages(body.get("messages") or [], _ollama_content)
    if not messages:
        return _loaded(req, model, "message", {"role": "assistant", "content": ""})
    max_tokens, sampling = _options(body)
    ids = app.encode_chat(messages)
    cfg = app.generation_config(ids, max_tokens, "messages", **sampling)
    job = app.submit(ids, cfg, req.received)

    def piece(text):
        return {
            "model": model,
            "created_at": iso_time(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    def final(text):
        return {
            "model": model,
            "created_at": iso_time(),
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": _done_reason(job),
        }

    _answer(req, job, stream, piece, final)


def _model_entry(info) -> dict:
    name = info.name if ":" in info.name else f"{info.name}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": iso_time(info.modified),
        "size": info.size_bytes,
        "digest": info.artifact_id,
        "details": _details(info),
    }


def _details(info) -> dict:
    return {
        "parent_model": "",
        "format": info.target,
        "family": info.architecture,
        "families": [info.architecture] if info.architecture else None,
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization,
    }


def tags(req, body: dict) -> None:
    """GET /api/tags: the one model served."""
    req.send_json(200, {"models": [_model_entry(req.app.info)]})


def ps(req, body: dict) -> None:
    """GET /api/ps: the model is always loaded."""
    entry = _model_entry(req.app.info) | {"expires_at": None, "size_vram": 0}
    req.send_json(200, {"models": [entry]})


def show(req, body: dict) -> None:
    """POST /api/show: template, details and context length."""
    app = req.app
    info = app.info
    info.resolve(body.get("model") or body.get("name"))
    arch = info.architecture or "unknown"
    caps = ["completion"]
    req.send_json(
        200,
        {
            "modelfile": f"# edgeq artifact {info.artifact_id} ({info.target})",
            "parameters": "",
            "template": app.engine.tokenizer.chat_template or "{{ .Prompt }}",
            "details": _details(info),
            "model_info": {
                "general.architecture": arch,
                f"{arch}.context_length": info.context_length,
            },
            "capabilities": caps,
            "modified_at": iso_time(info.modified),
        },
    )


def version(req, body: dict) -> None:
    """GET /api/version."""
    req.send_json(200, {"version": OLLAMA_API_VERSION})


_ROUTES = {
    "/api/generate": {"POST": generate},
    "/api/chat": {"POST": chat},
    "/api/tags": {"GET": tags},
    "/api/ps": {"GET": ps},
    "/api/show": {"POST": show},
    "/api/version": {"GET": version},
}


def routes(path: str) -> dict | None:
    """{method: function} for `path`, or None."""
    return _ROUTES.get(path)
