"""Constants and HTTP helpers for the server tests (test_serve_*.py); the
fixtures that build and serve artifacts are in serve_fixtures.py."""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgeq_targets.common.engine import GenerationConfig
from edgeq_targets.common.server import EdgeqHTTPServer, ServerConfig, make_server

STORY_PROMPT = "Once upon a time"
STORY_TOKENS = 12
# The servers' ceiling on tokens per request: requests that ask for more
# (or for nothing, like the Java client) stay short on a busy 2-core box.
SERVER_MAX_TOKENS = 48
ALIAS = "tiny-story"
# A short system message replaces SmolLM2's default one (~20 tokens), and
# every prompt token costs ~0.4 s on this CPU.
SMOL_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]
SMOL_TOKENS = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CHAT_MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@dataclass
class Served:
    """A running server and what the tests compare its answers with."""

    name: str
    folder: Path
    engine: object
    server: EdgeqHTTPServer
    refs: dict = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return self.server.url


def greedy(engine, prompt, max_tokens: int, chat=None) -> str:
    """What engine.generate gives directly, greedily."""
    ids = engine.encode_prompt(prompt, chat=chat)
    cfg = GenerationConfig(max_tokens=max_tokens, temperature=0.0)
    return "".join(t.text for t in engine.generate(ids, cfg))


def start_server(engine, **config) -> EdgeqHTTPServer:
    """The real server on a free port, serving from a daemon thread."""
    server = make_server(engine, ServerConfig(port=0, **config))
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    thread.start()
    return server


# -- HTTP helpers ------------------------------------------------------------


def request(url: str, method: str, path: str, body=None, headers=None, timeout=120):
    """(status, headers, body bytes) of one request; never raises on 4xx."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body)
    hdrs = {"Content-Type": "application/json"} | (headers or {})
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(url: str, path: str, body, **kw):
    return request(url, "POST", path, body, **kw)


def get(url: str, path: str, **kw):
    return request(url, "GET", path, **kw)


def ndjson(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def sse(raw: bytes) -> list:
    """The data of each server-sent event; "[DONE]" stays a string."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def read_response(f) -> tuple[str, dict, list[bytes]]:
    """Parse one HTTP/1.1 response from a socket file, strictly: status
    line, CRLF-terminated headers, then a chunked or Content-Length body.
    Returns (status line, headers lower-cased, body chunks)."""
    status = f.readline()
    assert status.endswith(b"\r\n"), status
    headers = {}
    while (line := f.readline()) != b"\r\n":
        assert line.endswith(b"\r\n"), line
        key, value = line.decode("latin-1")[:-2].split(":", 1)
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        assert "content-length" not in headers
        chunks = []
        while True:
            size_line = f.readline()
            assert size_line.endswith(b"\r\n"), size_line
            size = int(size_line, 16)
            data = f.read(size)
            assert len(data) == size and f.read(2) == b"\r\n"
            if size == 0:
                return status.decode()[:-2], headers, chunks
            chunks.append(data)
    body = f.read(int(headers["content-length"]))
    return status.decode()[:-2], headers, [body]
