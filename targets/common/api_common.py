"""What the Ollama and OpenAI handlers share: errors, field checks, the
served model's names and limits, and the step from prompt to queued job.

Standard library only (plus the engine contract): this ships to devices.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgeq_targets.common.engine import GenerationConfig
from edgeq_targets.common.worker import Job, QueueFull, Worker


@dataclass
class ServerConfig:
    """Settings of one server; `edgeq serve` and `run.py serve` fill them."""

    host: str = "127.0.0.1"
    port: int = 11434
    model_name: str | None = None  # an extra name clients may use
    queue_size: int = 8  # requests that may wait behind the running one
    max_tokens: int = 1024  # ceiling on generated tokens per request
    max_body_bytes: int = 1 << 20
    timeout_s: float = 60.0  # a silent client's connection is closed after this


class ApiError(Exception):
    """An HTTP error answer: status and a message saying what to change.

    Each API renders it in its own shape (Ollama: {"error": message};
    OpenAI: {"error": {"message", "type", "param", "code"}}).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


# -- checking request fields --------------------------------------------------


def get_bool(body: dict, key: str, default: bool) -> bool:
    """body[key] as a JSON boolean; `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false", param=key)
    return value


def get_number(
    body: dict,
    key: str,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    where: str = "",
) -> float | int | None:
    """body[key] as a number within [lo, hi]; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    name = f"{where}{key}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, not {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"'{name}' must be {bounds}, not {value}", param=name)
    return int(value) if integer else float(value)


def get_stop(value, name: str) -> list[str]:
    """A stop string or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ApiError(400, f"'{name}' must be a string or a list of strings", param=name)


def get_text(body: dict, key: str, default: str | None = None) -> str | None:
    """body[key] as a string; `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string", param=key)
    return value


def get_messages(value, text_of) -> list[dict]:
    """Chat messages as [{"role", "content"}] with string content.

    `text_of(content, index)` turns one message's content into a string
    (the two APIs allow different shapes) or raises ApiError.
    """
    if not isinstance(value, list):
        raise ApiError(400, "'messages' must be a list of messages", param="messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(
                400,
                f"messages[{i}] must be an object with a string 'role'",
                param=f"messages[{i}]",
            )
        messages.append({"role": m["role"], "content": text_of(m.get("content"), i)})
    return messages


# -- the served model -----------------------------------------------------------


def context_limit(engine) -> int | None:
    """Tokens of context the artifact can hold: the smallest of the engine's
    own limit, the plan's context_length and the model's positions."""
    plan = (engine.manifest or {}).get("plan") or {}
    found = [
        getattr(engine, "context_length", None),
        (plan.get("runtime") or {}).get("context_length"),
        ((plan.get("model") or {}).get("config") or {}).get("max_position_embeddings"),
    ]
    sizes = [int(v) for v in found if isinstance(v, (int, float)) and v > 0]
    return min(sizes) if sizes else None


def _human_count(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


class ModelInfo:
    """Names, limits and descriptive facts of the one model served."""

    def __init__(self, engine, alias: str | None = None):
        manifest = engine.manifest or {}
        model = manifest.get("model") or {}
        self.model_name = model.get("name") or Path(engine.artifact).name
        self.artifact_id = manifest.get("artifact_id") or ""
        self.name = alias or self.model_name  # the name listed to clients
        self.aliases = [n for n in (alias, self.model_name, self.artifact_id) if n]
        self._keys = {_name_key(n) for n in self.aliases}
        self.target = engine.name
        self.architecture = model.get("architecture") or ""
        self.parameter_size = _human_count(model.get("parameters"))
        plan = manifest.get("plan") or {}
        bits = (plan.get("defaults") or {}).get("bits")
        config = (plan.get("model") or {}).get("config") or {}
        self.vocab_size = config.get("vocab_size")
        self.quantization = f"Q{bits}" if bits and bits < 16 else "F16"
        self.context_length = context_limit(engine)
        files = manifest.get("files") or {}
        self.size_bytes = sum(int(f.get("size", 0)) for f in files.values())
        path = Path(engine.artifact) / "manifest.json"
        self.modified = path.stat().st_mtime if path.exists() else time.time()

    def resolve(self, requested) -> str:
        """The name to echo back; 400 when missing, 404 when not served."""
        if requested is None or requested == "":
            raise ApiError(
                400,
                f"'model' is required: this server serves '{self.name}'",
                param="model",
            )
        if not isinstance(requested, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if _name_key(requested) in self._keys:
            return requested
        accepted = ", ".join(f"'{n}'" for n in self.aliases)
        raise ApiError(
            404,
            f"model '{requested}' not found: this server serves {accepted} "
            "(a ':latest' tag is accepted too)",
            param="model",
            code="model_not_found",
        )


def _name_key(name: str) -> str:
    """Model names match case-insensitively, with or without ':latest'."""
    key = name.strip().lower()
    return key.removesuffix(":latest")


def iso_time(t: float | None = None) -> str:
    """RFC 3339 UTC time with microseconds, as Ollama writes created_at."""
    when = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- from prompt to job ----------------------------------------------------------


class App:
    """The engine, its worker and the limits, shared by every request."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.info = ModelInfo(engine, config.model_name)
        self.worker = Worker(engine, config.queue_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of messages rendered with the model's chat template."""
        if not self.has_chat_template:
            raise ApiError(
                400,
                f"model '{self.info.name}' has no chat template, so it cannot "
                "take chat messages: send a plain prompt to /api/generate or "
                "/v1/completions",
                param="messages",
            )
        import jinja2  # a model with a chat template needs it anyway

        try:
            return self.engine.encode_prompt(messages, chat=True)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ApiError(
                400,
                f"the model's chat template refused these messages: {e}",
                param="messages",
            ) from None

    def encode_text(self, prompt: str) -> list[int]:
        """Token ids of a prompt sent as is (no chat template)."""
        return self.engine.encode_prompt(prompt, chat=False)

    def generation_config(
        self, ids: list[int], max_tokens: int | None, param: str, **sampling
    ) -> GenerationConfig:
        """The engine settings for a request, with max_tokens clamped to the
        server's ceiling and to the context left after the prompt; `param`
        names the request field that held the prompt."""
        if not ids:
            raise ApiError(400, f"'{param}' is empty: send some text", param=param)
        vocab = self.info.vocab_size
        if vocab and not all(0 <= i < vocab for i in ids):
            raise ApiError(
                400,
                f"'{param}' holds token ids outside the vocabulary (0..{vocab - 1})",
                param=param,
            )
        limit = self.config.max_tokens
        ctx = self.info.context_length
        if ctx:
            if len(ids) >= ctx:
                raise ApiError(
                    400,
                    f"the prompt is {len(ids)} tokens, but model '{self.info.name}' "
                    f"has a context of {ctx} tokens for the prompt and the reply "
                    "together: shorten the prompt",
                    param=param,
                    code="context_length_exceeded",
                )
            limit = min(limit, ctx - len(ids))
        n = limit if max_tokens is None else min(max_tokens, limit)
        try:
            return GenerationConfig(max_tokens=n, **sampling)
        except ValueError as e:  # GenerationConfig names the field at fault
            raise ApiError(400, f"invalid sampling option: {e}") from None

    def submit(self, ids: list[int], cfg: GenerationConfig, received: float) -> Job:
        """Queue the generation; 503 with Retry-After when the queue is full."""
        try:
            return self.worker.submit(Job(ids, cfg, received))
        except QueueFull as e:
            raise ApiError(
                503,
                f"the server is busy ({e}): retry in a moment",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None

    def health(self) -> dict:
        """GET /health: the model, the queue and what the worker did."""
        w = self.worker
        return {
            "status": "ok",
            "model": self.info.name,
            "artifact_id": self.info.artifact_id,
            "target": self.info.target,
            "context_length": self.info.context_length,
            "busy": w.busy,
            "waiting": w.waiting(),
            "queue_size": w.jobs.maxsize,
            "served": w.served,
            "cancelled": w.cancelled,
            "last": _brief(w.last),
            "last_cancelled": _brief(w.last_cancelled),
        }


def _brief(result) -> dict | None:
    if result is None:
        return None
    return {
        "generated_tokens": result.generated_tokens,
        "finish_reason": result.finish_reason,
    }
