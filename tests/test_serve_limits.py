"""The server's limits and error answers: queueing and 503, clients that
leave mid-stream, body size, prompt length, bad requests, and how the
server starts (bind address, runner and `edgeq serve` entry points)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgeq_targets.common.engine import GenerationStats, load_engine, run_generation
from edgeq_targets.common.server import ServerConfig
from edgeq_targets.common.worker import StopFilter
from serve_helpers import STORY_PROMPT, get, post, read_response, start_server
from test_serve_api import JAVA11_DEFAULT, assert_final_stats
from typer.testing import CliRunner

from edgeq.cli import app as cli_app

pytest_plugins = ["serve_fixtures"]  # shared with test_serve_api.py

# -- a slow stand-in engine: deterministic timing for queue tests ----------------


class _Codec:
    chat_template = None

    def __init__(self):
        self.eos_ids: set[int] = set()

    def encode(self, text, add_special_tokens=True):
        return [1 + len(w) % 7 for w in text.split()] or [1]

    def decode(self, ids):
        return "".join(f"t{i} " for i in ids)


class SlowEngine:
    """Meets the engine contract; each token takes `delay` seconds."""

    name = "slow"
    artifact = Path("/nonexistent")
    load_seconds = 0.0

    def __init__(self, delay: float = 0.05):
        self.manifest = {"model": {"name": "slow"}, "artifact_id": "0123456789abcdef"}
        self.delay = delay
        self.tokenizer = _Codec()
        self.last_stats = GenerationStats()
        self.calls = 0

    def encode_prompt(self, prompt, chat=None):
        return self.tokenizer.encode(prompt)

    def generate(self, ids, cfg):
        self.calls += 1

        def step(new_ids, first):
            time.sleep(self.delay)
            return np.eye(8, dtype=np.float32)[len(new_ids) % 8]

        return run_generation(self, ids, cfg, step)


@pytest.fixture
def slow_server():
    server = start_server(SlowEngine(), queue_size=1, max_tokens=2000)
    yield server
    server.stop()


def _health(url) -> dict:
    return json.loads(get(url, "/health")[2])


def _wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def _open_stream(port: int, body: dict, path="/api/generate") -> socket.socket:
    """Start a streamed request on a raw socket; return once the first
    piece arrived (the job is running)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
    )
    received = b""
    while b"response" not in received and b"text" not in received:
        received += s.recv(4096)
    return s


def test_full_queue_gets_503_and_every_queued_request_is_answered(slow_server):
    url, port = slow_server.url, slow_server.server_address[1]
    running = _open_stream(
        port, {"model": "slow", "prompt": "a b", "options": {"num_predict": 2000}}
    )
    queued = {}
    body = {
        "model": "slow",
        "prompt": "a b",
        "stream": False,
        "options": {"num_predict": 3},
    }
    waiter = threading.Thread(
        target=lambda: queued.update(r=post(url, "/api/generate", body))
    )
    waiter.start()
    _wait_for(lambda: _health(url)["waiting"] == 1)

    status, headers, raw = post(url, "/api/generate", body)
    assert status == 503 and headers["retry-after"] == "1"
    assert "busy" in json.loads(raw)["error"]
    status, _, raw = post(url, "/v1/completions", {"model": "slow", "prompt": "a"})
    assert status == 503 and json.loads(raw)["error"]["code"] == "server_busy"

    running.close()  # frees the worker for the queued request
    waiter.join(timeout=10)
    status, _, raw = queued["r"]
    assert status == 200 and json.loads(raw)["eval_count"] == 3
    health = _health(url)
    assert health["cancelled"] == 1 and health["served"] == 1


def test_client_leaving_while_queued_is_skipped(slow_server):
    url, port = slow_server.url, slow_server.server_address[1]
    engine = slow_server.app.engine
    running = _open_stream(
        port, {"model": "slow", "prompt": "a", "options": {"num_predict": 2000}}
    )
    data = json.dumps({"model": "slow", "prompt": "b"}).encode()
    waiting = socket.create_connection(("127.0.0.1", port))
    waiting.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    _wait_for(lambda: _health(url)["waiting"] == 1)
    waiting.close()
    time.sleep(0.6)  # the request's thread notices within its 0.25 s poll
    running.close()
    _wait_for(lambda: _health(url)["cancelled"] == 2)
    assert engine.calls == 1  # the queued job never reached the engine


def test_disconnect_mid_stream_frees_the_worker(stories_mlx):
    """Close the socket after the first chunk: the long generation stops
    and the next request is served at once."""
    server = start_server(load_engine(stories_mlx.folder), max_tokens=1500)
    try:
        url, port = server.url, server.server_address[1]
        body = {
            "model": "stories260K",
            "prompt": STORY_PROMPT,
            "options": {"temperature": 0, "num_predict": 1500},
        }
        _open_stream(port, body).close()
        start = time.monotonic()
        small = body | {"stream": False, "options": {"num_predict": 4}}
        status, _, raw = post(url, "/api/generate", small)
        assert status == 200 and json.loads(raw)["eval_count"] == 4
        # 1500 tokens take ~20 s here; a few tokens well under one.
        assert time.monotonic() - start < 5
        health = _health(url)
        assert health["cancelled"] == 1
        assert health["last_cancelled"]["generated_tokens"] < 100
    finally:
        server.stop()


# -- bad requests -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
def test_malformed_json_is_400(mlx_server, path):
    for raw, words in [
        (b'{"model": "stories260K", "prompt": ', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "empty"),
    ]:
        status, _, body = post(mlx_server.url, path, raw)
        err = json.loads(body)["error"]
        message = err["message"] if isinstance(err, dict) else err
        assert status == 400 and words in message


def test_model_names(mlx_server):
    url = mlx_server.url
    ok = {"prompt": "a", "stream": False, "options": {"num_predict": 1}}
    artifact_id = mlx_server.server.app.info.artifact_id
    for name in ("stories260K", "Stories260K:latest", "tiny-story", artifact_id):
        assert post(url, "/api/generate", ok | {"model": name})[0] == 200, name
    status, _, raw = post(url, "/api/generate", ok | {"model": "llama3:8b"})
    assert status == 404 and "'llama3:8b' not found" in json.loads(raw)["error"]
    status, _, raw = post(url, "/v1/completions", {"prompt": "a"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "model"


def test_body_size_limit_413(mlx_server):
    big = {"model": "stories260K", "prompt": "x" * (1 << 20)}
    status, headers, raw = post(mlx_server.url, "/api/generate", big)
    assert status == 413 and "1048576 bytes" in json.loads(raw)["error"]
    assert "connection" not in headers  # the body was dropped; the socket lives on
    # With Expect: 100-continue the body is refused before it is sent.
    with socket.create_connection(("127.0.0.1", mlx_server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 99999999\r\nExpect: 100-continue\r\n\r\n"
        )
        status, _, chunks = read_response(s.makefile("rb"))
    assert status.startswith("HTTP/1.1 413")
    assert json.loads(chunks[0])["error"]["message"].startswith("the request body")


def test_prompt_longer_than_context_400(onnx_server):
    ids = [1] + [403] * 2100
    status, _, raw = post(
        onnx_server.url, "/v1/completions", {"model": "stories260K", "prompt": ids}
    )
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert "2101 tokens" in err["message"] and "2048" in err["message"]
    body = {"model": "stories260K", "prompt": "Once upon a time " * 600}
    status, _, raw = post(onnx_server.url, "/api/generate", body)
    assert status == 400 and "context of 2048 tokens" in json.loads(raw)["error"]


USER = [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(
    ("path", "extra", "words"),
    [
        ("/v1/completions", {"max_tokens": 0}, "'max_tokens' must be at least 1"),
        ("/v1/completions", {"max_tokens": "9"}, "'max_tokens' must be an integer"),
        ("/v1/completions", {"temperature": 3}, "'temperature' must be between"),
        ("/v1/completions", {"logprobs": 2}, "'logprobs' is not supported"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt per request"),
        ("/v1/completions", {"prompt": [1, 99999]}, "outside the vocabulary"),
        ("/v1/chat/completions", {"messages": USER, "n": 3}, "'n' must be 1"),
        ("/v1/chat/completions", {"messages": USER}, "no chat template"),
        ("/v1/chat/completions", {}, "'messages' must be a non-empty list"),
        ("/api/chat", {"messages": USER}, "no chat template"),
        ("/api/generate", {"options": {"top_p": 2}}, "'options.top_p' must be between"),
        ("/api/generate", {"stream": "yes"}, "'stream' must be true or false"),
    ],
)
def test_bad_fields_400(mlx_server, path, extra, words):
    body = {"model": "stories260K", "prompt": "a"} | extra
    status, _, raw = post(mlx_server.url, path, body)
    err = json.loads(raw)["error"]
    assert status == 400, raw
    assert words in (err["message"] if isinstance(err, dict) else err)


def test_unknown_path_and_method(mlx_server):
    status, headers, raw = post(mlx_server.url, "/api/pull", {"model": "x"})
    assert status == 404 and "no endpoint /api/pull" in json.loads(raw)["error"]
    assert headers["connection"] == "close"  # its body was not read
    status, headers, _ = get(mlx_server.url, "/api/generate")
    assert status == 405 and headers["allow"] == "POST"


def test_chunked_request_body_and_http10_stream(mlx_server):
    """A body sent chunked (Java's ofInputStream does); an HTTP/1.0 client
    gets the stream unframed, ended by closing the connection."""
    data = json.dumps(
        {
            "model": "stories260K",
            "prompt": "a",
            "stream": False,
            "options": {"num_predict": 2},
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", mlx_server.port), timeout=30) as s:
        s.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%X\r\n%s\r\n0\r\n\r\n"
            % (len(data), data)
        )
        status, _, chunks = read_response(s.makefile("rb"))
    assert status == "HTTP/1.1 200 OK" and json.loads(chunks[0])["eval_count"] == 2
    data = json.dumps(
        {"model": "stories260K", "prompt": "a", "options": {"num_predict": 2}}
    ).encode()
    with socket.create_connection(("127.0.0.1", mlx_server.port), timeout=30) as s:
        s.sendall(
            b"POST /api/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
            % (len(data), data)
        )
        raw = s.makefile("rb").read()  # to EOF: the server closes
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head
    assert json.loads(body.splitlines()[-1])["done"] is True


# -- pieces ------------------------------------------------------------------------


def test_stop_filter_holds_back_partial_stops():
    f = StopFilter(["END", "\n\n"])
    assert f.feed("hello E") == ("hello ", False)  # "E" may start "END"
    assert f.feed("N") == ("", False)
    assert f.feed("Dx") == ("", True)
    f = StopFilter(["END"])
    assert f.feed("xE") == ("x", False)
    assert f.feed("y") == ("Ey", False)  # not a stop after all
    assert f.feed("z") == ("z", False) and f.flush() == ""
    f = StopFilter(["bc", "ab"])
    assert f.feed("xabc") == ("x", True)  # the earliest stop wins
    assert StopFilter([]).feed("abc") == ("abc", False)


def test_binds_127_0_0_1_by_default():
    assert ServerConfig().host == "127.0.0.1"
    server = start_server(SlowEngine())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


# -- entry points ------------------------------------------------------------------


def _java_roundtrip(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(JAVA11_DEFAULT)
        status, _, chunks = read_response(s.makefile("rb"))
    assert status == "HTTP/1.1 200 OK"
    return json.loads(chunks[-1])


def _start(cmd: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    """Start a server process on port 0; return it and the port it took."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    proc.kill()
    raise AssertionError(f"{cmd} did not start: rc {proc.wait()}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=20)
    finally:
        proc.stderr.close()


def test_runner_serve_inside_the_artifact(stories_onnx_artifact):
    """`python ARTIFACT/runner/run.py serve`, as on the device: answers the
    Java client, stops on Ctrl-C, and leaves the artifact verifiable."""
    from edgeq.artifact import verify

    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": ""}
    run_py = str(stories_onnx_artifact / "runner" / "run.py")
    proc, port = _start(
        [sys.executable, run_py, "serve", "--port", "0", "--threads", "1"], env
    )
    try:
        assert_final_stats(_java_roundtrip(port))
    finally:
        assert _stop(proc) == 0
    verify(stories_onnx_artifact)


def test_edgeq_serve_command(stories_mlx):
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [
        sys.executable,
        "-c",
        "from edgeq.cli import main; main()",
        "serve",
        str(stories_mlx.folder),
        "--port",
        "0",
        "--max-tokens",
        "8",
    ]
    proc, port = _start(cmd, env)
    try:
        final = _java_roundtrip(port)
        assert_final_stats(final)
        assert final["eval_count"] <= 8
    finally:
        assert _stop(proc) == 0


def test_edgeq_serve_errors(tmp_path, stories_onnx_artifact):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"")
    result = runner.invoke(cli_app, ["serve", str(archive)])
    assert result.exit_code == 1 and "edgeq install" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = runner.invoke(
            cli_app, ["serve", str(stories_onnx_artifact), "--port", port]
        )
    assert result.exit_code == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}" in result.output
    result = runner.invoke(
        cli_app, ["serve", str(stories_onnx_artifact), "--max-tokens", "0"]
    )
    assert result.exit_code == 1
    assert "Error: --max-tokens must be at least 1, not 0" in result.output
