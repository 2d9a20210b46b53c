"""Shared fixtures: the real models and texts, and artifacts built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEQ_SHARED", REPO.parent / "shared"))
STORIES_GGUF = SHARED / "models" / "stories260K.gguf"
TEXT_DIR = SHARED / "text"

# The documented greedy continuation of stories260K (see shared/models/README).
STORIES_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball. She wanted to play "
    "with it, but it was too high."
)


@pytest.fixture(scope="session")
def stories_gguf() -> Path:
    assert STORIES_GGUF.is_file(), f"{STORIES_GGUF} is missing (../shared)"
    return STORIES_GGUF


@pytest.fixture(scope="session")
def austen_text() -> str:
    return (TEXT_DIR / "austen_prideprejudice.txt").read_text()


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def _deploy(model, device, out, **kw):
    from edgeq.deploy import DeployRequest, deploy

    return deploy(DeployRequest(model=model, device=device, out=out, **kw))


@pytest.fixture(scope="session")
def stories_mlx(build_dir, stories_gguf):
    """stories260K for a Mac, default plan (4-bit, group 64)."""
    return _deploy(str(stories_gguf), "macbook-air-m2-16gb", build_dir / "stories-mlx",
                   quality_gate=False)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_mlx(build_dir):
    """The README's main job: SmolLM2-135M for a MacBook Air M2, 4-bit g64."""
    return _deploy("smollm2-135m", "macbook-air-m2-16gb", build_dir / "smol-mlx",
                   quality_gate=False, smoke_tokens=8)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_mlx_f16(build_dir):
    """SmolLM2-135M kept in 16-bit: the float reference for agreement."""
    return _deploy("smollm2-135m", "macbook-air-m2-16gb", build_dir / "smol-f16",
                   bits=16, quality_gate=False, archive=False, smoke_tokens=2)  # fmt: skip
