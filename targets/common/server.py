"""An Ollama- and OpenAI-compatible HTTP server for one loaded engine.

    server = make_server(engine, ServerConfig(port=11434))
    server.serve_forever()

Endpoints (ollama_api.py, openai_api.py): POST /api/generate, /api/chat,
/api/show; GET /api/tags, /api/ps, /api/version; POST /v1/chat/completions,
/v1/completions; GET /v1/models[/ID]; GET / and /health.

HTTP/1.1 with keep-alive: fixed answers carry Content-Length, streams use
chunked transfer coding (NDJSON for Ollama, server-sent events for OpenAI).
Requests are read on their own threads; generation runs on one worker
thread (worker.py). It ships to devices: standard library and the engine
contract only.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from edgeq_targets.common import ollama_api, openai_api
from edgeq_targets.common.api_common import ApiError, App, ServerConfig
from edgeq_targets.common.worker import ClientGone, Job

logger = logging.getLogger(__name__)

# A too-large body up to this size is read and dropped before the 413.
_DISCARD_MAX_BYTES = 64 << 20

__all__ = ["EdgeqHTTPServer", "ServeError", "ServerConfig", "make_server", "run"]


class ServeError(Exception):
    """The server cannot start (for example, the port is taken)."""


class StreamWriter:
    """Writes one streamed answer; a failed write cancels the job."""

    def __init__(self, handler: Handler, job: Job, chunked: bool):
        self.handler = handler
        self.job = job
        self.chunked = chunked

    def write(self, data: bytes) -> None:
        """Send `data` as one chunk; ClientGone when the client left."""
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        self._send(data)

    def close(self) -> None:
        """End the stream (the zero-length last chunk)."""
        if self.chunked:
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> None:
        # A closed peer often still accepts one write, so ask first.
        if not self.handler.connected():
            self._gone()
        try:
            self.handler.wfile.write(data)
        except OSError:
            self._gone()

    def _gone(self):
        self.job.cancelled.set()
        raise ClientGone


class Handler(BaseHTTPRequestHandler):
    """One client connection; routes each request to an API module."""

    protocol_version = "HTTP/1.1"
    server_version = "edgeq"
    server: EdgeqHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.app.config.timeout_s
        super().setup()

    @property
    def app(self) -> App:
        return self.server.app

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        self.received = time.perf_counter()
        self.head_only = method == "HEAD"
        self.responded = False  # headers sent: no error answer possible now
        self.body_unread = "Content-Length" in self.headers or (
            "Transfer-Encoding" in self.headers
        )
        path = urlsplit(self.path).path
        try:
            route = _route(method, path)
            body = self.read_json() if method == "POST" else {}
            route(self, body)
            if self.body_unread:  # a GET with a body: it must not linger
                self.close_connection = True
        except ClientGone:
            logger.info("%s %s: client disconnected", method, path)
            self.close_connection = True
        except ApiError as e:
            self._fail(path, e)
        except Exception as e:  # a bug: answer 500 rather than drop the client
            logger.exception("%s %s failed", method, path)
            self._fail(path, ApiError(500, f"internal error: {e}"))

    def _fail(self, path: str, e: ApiError) -> None:
        # An unread body would be parsed as the next request: close after.
        if self.body_unread:
            self.close_connection = True
        if self.responded:  # mid-stream: all that is left is to hang up
            self.close_connection = True
            return
        self.send_error_json(_api_for(path), e)

    # -- reading -------------------------------------------------------------

    def read_json(self) -> dict:
        """The request body as a JSON object (400, 411 or 413 otherwise)."""
        raw = self._read_body()
        self.body_unread = False
        if not raw.strip():
            raise ApiError(400, "the request body is empty: send a JSON object")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _read_body(self) -> bytes:
        limit = self.app.config.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self._content_length()
        if length is None:
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length header")
        if length > limit:
            raise self._too_large(length, discard=length)
        return self.rfile.read(length)

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length header: {value!r}")
        return length

    def _read_chunked(self, limit: int) -> bytes:
        """A body sent with Transfer-Encoding: chunked (RFC 9112, 7.1)."""
        data = bytearray()
        while True:
            line = self.rfile.readline(1 << 16)
            digits = line.split(b";")[0].strip()
            try:
                # int(x, 16) takes "-1" and "+1"; a chunk size is hex digits only.
                if not digits or digits.lstrip(b"0123456789abcdefABCDEF"):
                    raise ValueError(digits)
                size = int(digits, 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1 << 16).strip():
                    pass  # trailer fields: not used
                return bytes(data)
            if len(data) + size > limit:
                raise self._too_large(len(data) + size)
            data += self.rfile.read(size)
            self.rfile.readline(1 << 16)  # the CRLF after each chunk

    def _too_large(self, size: int, discard: int = 0) -> ApiError:
        """The 413 error. A body of a sane size is read and dropped first:
        most clients send the whole body before they read the answer, and
        would see a broken pipe instead of the 413. Otherwise the
        connection closes (the unread rest would parse as a request)."""
        if 0 < discard <= _DISCARD_MAX_BYTES:
            self._discard(discard)
            self.body_unread = False
        else:
            self.close_connection = True
        limit = self.app.config.max_body_bytes
        return ApiError(
            413,
            f"the request body is {size} bytes or more; this server takes at most "
            f"{limit} bytes (--max-body-bytes)",
        )

    def _discard(self, n: int) -> None:
        while n > 0:
            block = self.rfile.read(min(n, 1 << 16))
            if not block:
                self.close_connection = True
                return
            n -= len(block)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        try:
            length = self._content_length()
            if length is not None and length > self.app.config.max_body_bytes:
                raise self._too_large(length)  # not sent yet: nothing to drop
        except ApiError as e:
            self.head_only = False
            self.close_connection = True  # the client may send the body anyway
            self.send_error_json(_api_for(urlsplit(self.path).path), e)
            return False
        return super().handle_expect_100()

    def connected(self) -> bool:
        """False once the client has closed its end of the connection.

        Peeks without blocking: a readable socket with no data means the
        peer sent FIN. (A client that half-closes while still reading is
        taken as gone; HTTP clients do not do that.)
        """
        sock = self.connection
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0.0)
            return sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass

    # -- writing -------------------------------------------------------------

    def send_body(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        """A complete answer with Content-Length (no body for HEAD)."""
        self.responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not getattr(self, "head_only", False):
            self.wfile.write(body)

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_body(status, body, "application/json; charset=utf-8", headers)

    def send_text(self, status: int, text: str) -> None:
        self.send_body(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def send_error_json(self, api, e: ApiError) -> None:
        """`e` in the shape of `api` (ollama_api or openai_api)."""
        if e.status >= 500:
            logger.warning("%s: %s", self.path, e.message)
        self.send_json(e.status, api.error_body(e), e.headers)

    def start_stream(self, job: Job, content_type: str) -> StreamWriter:
        """Send the headers of a streamed 200 answer; HTTP/1.0 clients get
        the body unframed, ended by closing the connection."""
        chunked = self.request_version != "HTTP/1.0"
        self.responded = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        return StreamWriter(self, job, chunked)

    def log_message(self, format: str, *args) -> None:
        """One line per request, to logging rather than bare stderr."""
        logger.info("%s %s", self.address_string(), format % args)


def _api_for(path: str):
    """Errors under /v1 take OpenAI's shape, the rest Ollama's."""
    return openai_api if path.startswith("/v1/") or path == "/v1" else ollama_api


def _root(handler: Handler, body: dict) -> None:
    handler.send_text(200, "edgeq is running")


def _health(handler: Handler, body: dict) -> None:
    handler.send_json(200, handler.app.health())


_OWN_ROUTES = {"/": {"GET": _root}, "/health": {"GET": _health}}


def _route(method: str, path: str):
    """The function for `method path`; 404 or 405 with a message."""
    methods = (
        _OWN_ROUTES.get(path) or ollama_api.routes(path) or openai_api.routes(path)
    )
    if not methods:
        raise ApiError(
            404,
            f"no endpoint {path}: see /api/tags, /v1/models and /health",
            code="not_found",
        )
    if method == "HEAD" and "GET" in methods:
        return methods["GET"]
    if method not in methods:
        allowed = ", ".join(sorted(methods))
        raise ApiError(
            405,
            f"{path} takes {allowed}, not {method}",
            headers={"Allow": allowed},
            code="method_not_allowed",
        )
    return methods[method]


class EdgeqHTTPServer(ThreadingHTTPServer):
    """A thread per connection; generation itself is serialized by app.worker."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: bursts of clients wait to connect

    def __init__(self, address, app: App):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving (from another thread than serve_forever's)."""
        self.app.worker.close()
        self.shutdown()
        self.server_close()


def make_server(engine, config: ServerConfig | None = None) -> EdgeqHTTPServer:
    """Bind the server for `engine` (port 0 picks a free port)."""
    config = config or ServerConfig()
    for flag, value in (
        ("--queue-size", config.queue_size),
        ("--max-tokens", config.max_tokens),
        ("--max-body-bytes", config.max_body_bytes),
    ):
        if value < 1:
            raise ServeError(f"{flag} must be at least 1, not {value}")
    try:
        return EdgeqHTTPServer((config.host, config.port), App(engine, config))
    except OSError as e:
        raise ServeError(
            f"cannot listen on {config.host}:{config.port}: {e.strerror or e} "
            "(is Ollama or another server using the port? pass --port)"
        ) from None


def run(server: EdgeqHTTPServer) -> None:
    """Serve until Ctrl-C."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.app.worker.close()
        server.server_close()
