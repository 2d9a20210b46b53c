"""Fixtures of the server tests, loaded as a plugin by test_serve_*.py.

Each artifact is built once per session and served once, on a free port of
127.0.0.1, by the real server in a thread. Greedy references come from the
same engine's `generate`, called directly before the server takes it over
(an engine runs one generation at a time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edgeq_targets.common.engine import load_engine
from serve_helpers import (
    ALIAS,
    CHAT_MESSAGES,
    CHAT_TEMPLATE,
    SERVER_MAX_TOKENS,
    SMOL_MESSAGES,
    SMOL_TOKENS,
    STORY_PROMPT,
    STORY_TOKENS,
    Served,
    greedy,
    start_server,
)


def _serve(name, folder, refs_of, **config):
    engine = load_engine(folder)
    refs = refs_of(engine)
    server = start_server(engine, **config)
    yield Served(name, Path(folder), engine, server, refs)
    server.stop()


def _story_refs(engine) -> dict:
    return {"story": greedy(engine, STORY_PROMPT, STORY_TOKENS, chat=False)}


@pytest.fixture(scope="session")
def stories_onnx_artifact(build_dir, stories_gguf) -> Path:
    """stories260K for a Raspberry Pi 5 (onnxruntime, INT8)."""
    from edgeq.deploy import DeployRequest, deploy

    req = DeployRequest(
        model=str(stories_gguf),
        device="rpi5-8gb",
        out=build_dir / "serve-onnx",
        quality_gate=False,
        archive=False,
        smoke_tokens=4,
    )
    return deploy(req).folder


@pytest.fixture(scope="session")
def stories_chat_artifact(stories_mlx, build_dir) -> Path:
    """stories260K (MLX) given a small chat template, so the chat endpoints
    run at the tiny model's speed; the manifest is rewritten to match."""
    from edgeq.artifact import load_manifest, write_manifest

    folder = build_dir / "serve-stories-chat"
    shutil.copytree(stories_mlx.folder, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    write_manifest(folder, load_manifest(folder))
    return folder


@pytest.fixture(scope="session")
def mlx_server(stories_mlx):
    yield from _serve(
        "mlx",
        stories_mlx.folder,
        _story_refs,
        model_name=ALIAS,
        max_tokens=SERVER_MAX_TOKENS,
    )


@pytest.fixture(scope="session")
def onnx_server(stories_onnx_artifact):
    yield from _serve(
        "onnx", stories_onnx_artifact, _story_refs, max_tokens=SERVER_MAX_TOKENS
    )


@pytest.fixture(scope="session")
def chat_server(stories_chat_artifact):
    def refs(engine):
        system = [{"role": "system", "content": "Be brief."}] + CHAT_MESSAGES
        return {
            "chat": greedy(engine, CHAT_MESSAGES, STORY_TOKENS),
            "system": greedy(engine, system, STORY_TOKENS),
        }

    yield from _serve("chat", stories_chat_artifact, refs, max_tokens=SERVER_MAX_TOKENS)


@pytest.fixture(scope="session")
def smol_server(smollm2_mlx):
    def refs(engine):
        return {"chat": greedy(engine, SMOL_MESSAGES, SMOL_TOKENS)}

    yield from _serve("smol", smollm2_mlx.folder, refs, max_tokens=SERVER_MAX_TOKENS)


@pytest.fixture(params=["mlx", "onnx"])
def stories_server(request) -> Served:
    """stories260K behind the server, once per target."""
    return request.getfixturevalue(f"{request.param}_server")
