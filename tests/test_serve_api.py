"""The HTTP server with real clients: plain HTTP, the `ollama` and `openai`
packages, and a Java 11 HttpClient's request sent byte for byte, against
MLX and ONNX Runtime artifacts. Greedy answers must equal what the engine's
own `generate` gives for the same prompt."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import ollama
import openai
import pytest
from serve_helpers import (
    ALIAS,
    CHAT_MESSAGES,
    SERVER_MAX_TOKENS,
    SMOL_MESSAGES,
    SMOL_TOKENS,
    STORY_PROMPT,
    STORY_TOKENS,
    get,
    ndjson,
    post,
    read_response,
    request,
    sse,
)

# The fixtures are a plugin, so both server test modules share one
# instance of each session fixture (one build, one server per artifact).
pytest_plugins = ["serve_fixtures"]

GREEDY = {"temperature": 0, "num_predict": STORY_TOKENS}
STATS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


def assert_final_stats(final: dict, eval_count: int | None = None) -> None:
    """Ollama's closing object: done, a reason and integer statistics."""
    assert final["done"] is True
    assert final["done_reason"] in ("stop", "length")
    for key in STATS:
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert final["prompt_eval_count"] > 0
    if eval_count is not None:
        assert final["eval_count"] == eval_count


# -- plain HTTP ----------------------------------------------------------------


def test_info_endpoints(mlx_server):
    url = mlx_server.url
    status, headers, body = get(url, "/")
    assert (status, body) == (200, b"edgeq is running")
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = request(url, "HEAD", "/")
    assert (status, body, headers["content-length"]) == (200, b"", "16")
    health = json.loads(get(url, "/health")[2])
    assert health["status"] == "ok" and health["target"] == "mlx"
    assert health["context_length"] == 2048
    assert json.loads(get(url, "/api/version")[2])["version"]
    tags = json.loads(get(url, "/api/tags")[2])["models"]
    assert [t["name"] for t in tags] == [f"{ALIAS}:latest"]
    assert tags[0]["details"]["family"] == "llama"
    models = json.loads(get(url, "/v1/models")[2])
    assert models["object"] == "list" and models["data"][0]["id"] == ALIAS
    one = json.loads(get(url, "/v1/models/stories260K")[2])
    assert one["id"] == "stories260K"
    show = json.loads(post(url, "/api/show", {"model": "stories260K"})[2])
    assert show["model_info"]["llama.context_length"] == 2048
    # Ollama answers a request without a prompt by loading the model.
    loaded = json.loads(post(url, "/api/generate", {"model": "stories260K"})[2])
    assert loaded["done"] and loaded["done_reason"] == "load"


def test_ollama_generate_streams_ndjson(stories_server):
    """Default streaming: chunked NDJSON whose text equals engine.generate."""
    body = {"model": "stories260K", "prompt": STORY_PROMPT, "options": GREEDY}
    status, headers, raw = post(stories_server.url, "/api/generate", body)
    assert status == 200, raw
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "application/x-ndjson"
    objs = ndjson(raw)
    assert all(o["done"] is False for o in objs[:-1])
    assert all(o["model"] == "stories260K" and o["created_at"] for o in objs)
    text = "".join(o["response"] for o in objs)
    assert text == stories_server.refs["story"]
    assert_final_stats(objs[-1], STORY_TOKENS)
    assert objs[-1]["done_reason"] == "length"
    assert objs[-1]["prompt_eval_count"] == len(
        stories_server.engine.encode_prompt(STORY_PROMPT, chat=False)
    )


def test_ollama_generate_not_streamed(mlx_server):
    body = {
        "model": f"{ALIAS}:latest",
        "prompt": STORY_PROMPT,
        "stream": False,
        "options": GREEDY,
    }
    status, headers, raw = post(mlx_server.url, "/api/generate", body)
    assert status == 200 and "content-length" in headers
    reply = json.loads(raw)
    assert reply["response"] == mlx_server.refs["story"]
    assert reply["model"] == f"{ALIAS}:latest"
    assert_final_stats(reply, STORY_TOKENS)


def test_ollama_stop_string_across_tokens(mlx_server):
    """A stop string split over several tokens is cut out whole."""
    ref = mlx_server.refs["story"]
    stop = " little"
    assert stop in ref
    options = GREEDY | {"stop": [stop]}
    body = {"model": "stories260K", "prompt": STORY_PROMPT, "options": options}
    objs = ndjson(post(mlx_server.url, "/api/generate", body)[2])
    assert "".join(o["response"] for o in objs) == ref[: ref.index(stop)]
    assert objs[-1]["done_reason"] == "stop"


def test_openai_completions_sse(stories_server):
    body = {
        "model": "stories260K",
        "prompt": STORY_PROMPT,
        "max_tokens": STORY_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, raw = post(stories_server.url, "/v1/completions", body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse(raw)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]["usage"]
    assert (
        "".join(c["choices"][0]["text"] for c in chunks) == stories_server.refs["story"]
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == STORY_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + STORY_TOKENS


def test_max_tokens_clamped_to_server_ceiling(mlx_server):
    body = {
        "model": "stories260K",
        "prompt": STORY_PROMPT,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 500},
    }
    reply = json.loads(post(mlx_server.url, "/api/generate", body)[2])
    assert reply["eval_count"] == SERVER_MAX_TOKENS
    assert reply["done_reason"] == "length"


def test_max_tokens_clamped_to_context(onnx_server):
    """A 2040-token prompt leaves 8 tokens of the 2048 context."""
    ids = [1] + [403] * 2039
    body = {"model": "stories260K", "prompt": ids, "max_tokens": 40}
    reply = json.loads(post(onnx_server.url, "/v1/completions", body)[2])
    assert reply["usage"] == {
        "prompt_tokens": 2040,
        "completion_tokens": 8,
        "total_tokens": 2048,
    }
    assert reply["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_all_answered(mlx_server):
    """Six clients at once, both APIs, streamed and not: all get the
    greedy text (the worker serializes them)."""
    ref = mlx_server.refs["story"]
    url = mlx_server.url

    def ollama_call(stream):
        body = {
            "model": "stories260K",
            "prompt": STORY_PROMPT,
            "stream": stream,
            "options": GREEDY,
        }
        status, _, raw = post(url, "/api/generate", body)
        assert status == 200
        return "".join(o["response"] for o in ndjson(raw))

    def openai_call(stream):
        body = {
            "model": "stories260K",
            "prompt": STORY_PROMPT,
            "stream": stream,
            "max_tokens": STORY_TOKENS,
            "temperature": 0,
        }
        status, _, raw = post(url, "/v1/completions", body)
        assert status == 200
        if not stream:
            return json.loads(raw)["choices"][0]["text"]
        return "".join(e["choices"][0]["text"] for e in sse(raw)[:-1])

    calls = [
        (ollama_call, True),
        (ollama_call, False),
        (openai_call, True),
        (openai_call, False),
    ] * 2
    with ThreadPoolExecutor(len(calls)) as pool:
        texts = list(pool.map(lambda c: c[0](c[1]), calls))
    assert texts == [ref] * len(calls)


# -- the ollama and openai packages ------------------------------------------------


def test_ollama_package_generate(stories_server):
    client = ollama.Client(host=stories_server.url)
    ref = stories_server.refs["story"]
    reply = client.generate(model="stories260K", prompt=STORY_PROMPT, options=GREEDY)
    assert reply.response == ref and reply.done and reply.eval_count == STORY_TOKENS
    parts = list(
        client.generate(
            model="stories260K", prompt=STORY_PROMPT, options=GREEDY, stream=True
        )
    )
    assert "".join(p.response for p in parts) == ref
    assert parts[-1].done and parts[-1].done_reason == "length"
    listed = [m.model for m in client.list().models]
    assert listed == [f"{stories_server.server.app.info.name}:latest"]


def test_ollama_package_errors(mlx_server):
    client = ollama.Client(host=mlx_server.url)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3", prompt="hi")
    assert e.value.status_code == 404 and "llama3" in e.value.error


def test_ollama_package_chat(chat_server):
    client = ollama.Client(host=chat_server.url)
    ref = chat_server.refs["chat"]
    options = {"temperature": 0, "num_predict": STORY_TOKENS}
    reply = client.chat(model="stories260K", messages=CHAT_MESSAGES, options=options)
    assert reply.message.role == "assistant" and reply.message.content == ref
    parts = list(
        client.chat(
            model="stories260K", messages=CHAT_MESSAGES, options=options, stream=True
        )
    )
    assert "".join(p.message.content for p in parts) == ref
    assert parts[-1].done and parts[-1].eval_count == STORY_TOKENS


def test_openai_package_completions(stories_server):
    client = openai.OpenAI(base_url=f"{stories_server.url}/v1", api_key="x")
    ref = stories_server.refs["story"]
    kw = {
        "model": "stories260K",
        "prompt": STORY_PROMPT,
        "max_tokens": STORY_TOKENS,
        "temperature": 0,
    }
    reply = client.completions.create(**kw)
    assert reply.choices[0].text == ref
    assert reply.usage.completion_tokens == STORY_TOKENS
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == ref


def test_openai_package_chat(chat_server):
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="x")
    ref = chat_server.refs["chat"]
    kw = {
        "model": "stories260K",
        "messages": CHAT_MESSAGES,
        "temperature": 0,
        "max_completion_tokens": STORY_TOKENS,
    }
    reply = client.chat.completions.create(**kw)
    assert reply.choices[0].message.content == ref
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == STORY_TOKENS
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_openai_package_errors(mlx_server):
    client = openai.OpenAI(base_url=f"{mlx_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.completions.create(model="stories260K", prompt="hi", n=2)


def test_ollama_generate_applies_the_chat_template(chat_server):
    """/api/generate wraps prompt and system in the template, as Ollama
    does; "raw" sends the prompt as is."""
    body = {
        "model": "stories260K",
        "system": "Be brief.",
        "prompt": CHAT_MESSAGES[0]["content"],
        "stream": False,
        "options": {"temperature": 0, "num_predict": STORY_TOKENS},
    }
    reply = json.loads(post(chat_server.url, "/api/generate", body)[2])
    assert reply["response"] == chat_server.refs["system"]
    raw = json.loads(post(chat_server.url, "/api/generate", body | {"raw": True})[2])
    ids = chat_server.engine.encode_prompt(CHAT_MESSAGES[0]["content"], chat=False)
    assert raw["prompt_eval_count"] == len(ids) < reply["prompt_eval_count"]


def test_real_chat_template(smol_server):
    """SmolLM2's own chat template, through both client packages (the
    smallest requests: each prompt token costs ~0.4 s on this CPU)."""
    ref = smol_server.refs["chat"]
    url = smol_server.url
    options = {"temperature": 0, "num_predict": SMOL_TOKENS}
    reply = ollama.Client(host=url).chat(
        model="smollm2-135m", messages=SMOL_MESSAGES, options=options
    )
    assert reply.message.content == ref
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    chunks = client.chat.completions.create(
        model="smollm2-135m",
        messages=SMOL_MESSAGES,
        temperature=0,
        max_tokens=SMOL_TOKENS,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref


# -- a Java 11 HttpClient, byte for byte ---------------------------------------------

# The program:
#
#   HttpClient client = HttpClient.newHttpClient();
#   HttpRequest request = HttpRequest
#       .newBuilder(URI.create("http://localhost:11434/api/generate"))
#       .header("Content-Type", "application/json")
#       .POST(HttpRequest.BodyPublishers.ofString(
#           "{\"model\": \"stories260K\", \"prompt\": \"Once upon a time\"}"))
#       .build();
#   client.send(request, HttpResponse.BodyHandlers.ofLines())
#       .body().forEach(System.out::println);
#
# Java 11's client prefers HTTP/2, so on http:// it sends an HTTP/1.1
# request that offers an h2c upgrade; its own headers come sorted, then the
# program's. A server without HTTP/2 must answer in HTTP/1.1 (RFC 7540 3.2).
# Pinned to HTTP/1.1 (.version(HttpClient.Version.HTTP_1_1)) it sends no
# upgrade headers.
JAVA11_DEFAULT = (
    b"POST /api/generate HTTP/1.1\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\n"
    b"Content-Length: 54\r\n"
    b"Host: localhost:11434\r\n"
    b"HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
    b"Upgrade: h2c\r\n"
    b"User-Agent: Java-http-client/11.0.22\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
    b'{"model": "stories260K", "prompt": "Once upon a time"}'
)
JAVA11_HTTP_1_1 = (
    b"POST /api/generate HTTP/1.1\r\n"
    b"Content-Length: 54\r\n"
    b"Host: localhost:11434\r\n"
    b"User-Agent: Java-http-client/11.0.22\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
    b'{"model": "stories260K", "prompt": "Once upon a time"}'
)


@pytest.mark.parametrize(
    "java", [JAVA11_DEFAULT, JAVA11_HTTP_1_1], ids=["h2c-offer", "http1.1"]
)
def test_java11_http_client_request(stories_server, java):
    head, body = java.split(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    with socket.create_connection(("127.0.0.1", stories_server.port), timeout=60) as s:
        s.sendall(java)
        f = s.makefile("rb")
        status, headers, chunks = read_response(f)
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"] == "application/x-ndjson"
        assert "upgrade" not in headers
        # Every chunk is one whole NDJSON line.
        assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
        objs = [json.loads(c) for c in chunks]
        final = objs[-1]
        assert_final_stats(final)
        assert all(not o["done"] for o in objs[:-1])
        # Sampled with Ollama's defaults: check the pieces against the ids.
        n_prompt = final["prompt_eval_count"]
        generated = final["context"][n_prompt:]
        text = "".join(o["response"] for o in objs)
        assert text == stories_server.engine.tokenizer.decode(generated)
        assert final["eval_count"] <= SERVER_MAX_TOKENS
        # The connection stays open for the client's next request.
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost:11434\r\n\r\n")
        status, headers, chunks = read_response(f)
        assert status == "HTTP/1.1 200 OK" and json.loads(chunks[0])["version"]
