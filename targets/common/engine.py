"""The contract every device-side engine meets, and what they share.

This file ships inside every artifact (runner/edgeq_targets/common/) and must
import nothing from edgeq and nothing heavier than numpy and tokenizers.

An engine loads the artifact folder and generates token by token:

    engine = load_engine(artifact_dir, threads=4)
    ids = engine.encode_prompt("Hello", chat=True)
    for tok in engine.generate(ids, GenerationConfig(max_tokens=32)):
        print(tok.text, end="")

Each yielded `Token` carries the time it became available, so profilers and
servers measure time to first token, prefill and decode the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class GenerationConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings
    stop_at_eos: bool = True

    def __post_init__(self):
        """Refuse settings no sampler can honour, naming the field."""
        import math

        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 0,
             "a whole number >= 0"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0,
             "a finite number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and
                                           0 <= self.seed < 2**63), "an integer >= 0"),
        ]  # fmt: skip
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class Token:
    id: int
    text: str  # the new text this token adds (may be "" mid-character)
    time: float  # time.perf_counter() when the token was sampled
    finish_reason: str | None = None  # "stop", "length" on the last token


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    start: float = 0.0  # before prefill
    first_token: float = 0.0  # first token sampled (prefill + 1 sample)
    end: float = 0.0
    finish_reason: str = ""


class Engine(Protocol):
    """What both targets' engines provide."""

    name: str  # "mlx" | "onnxruntime"
    artifact: Path
    manifest: dict
    tokenizer: TextCodec
    load_seconds: float
    last_stats: GenerationStats

    def encode_prompt(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        ...

    def generate(self, ids: list[int], cfg: GenerationConfig) -> Iterator[Token]:
        ...


class TextCodec:
    """Tokenizer + chat template from the artifact's tokenizer files."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template = self.config.get("chat_template")
        tmpl = folder / "chat_template.jinja"
        if not self.chat_template and tmpl.exists():
            self.chat_template = tmpl.read_text()
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        eos = gen.get("eos_token_id")
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.config.get("eos_token"):
            eid = self.tok.token_to_id(_token_text(self.config["eos_token"]))
            if eid is not None:
                self.eos_ids.add(eid)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render `messages` with the model's own template (jinja2)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        bos = _token_text(self.config.get("bos_token")) or ""
        eos = _token_text(self.config.get("eos_token")) or ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos,
            eos_token=eos,
        )  # fmt: skip

    def encode_prompt(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt string or a list of chat messages; `chat`
        None means: use the chat template when the model has one."""
        if isinstance(prompt, list):
            chat = True
        if chat is None:
            chat = bool(self.chat_template)
        if not chat:
            return self.encode(prompt)
        messages = prompt if isinstance(prompt, list) else [
            {"role": "user", "content": prompt}
        ]  # fmt: skip
        text = self.apply_chat_template(messages)
        # The template writes BOS itself where the model wants one.
        bos = _token_text(self.config.get("bos_token"))
        add = not (bos and text.startswith(bos))
        return self.encode(text, add_special_tokens=add)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Detokenizer:
    """Turns a growing list of ids into text increments without splitting a
    multi-byte character (a partial one decodes to U+FFFD: hold it back)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new


def sample(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """Next token from a 1-D logits vector: greedy, or temperature / top-k /
    top-p sampling."""
    if cfg.temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x = np.where(x < kth, -np.inf, x)
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.size, p=p))


def run_generation(
    engine, ids: list[int], cfg: GenerationConfig, step_logits
) -> Iterator[Token]:
    """The loop both engines share. `step_logits(new_ids, first)` runs the
    model on new_ids (the whole prompt first, then one token) and returns the
    last position's logits as a numpy vector."""
    stats = engine.last_stats = GenerationStats(prompt_tokens=len(ids))
    rng = np.random.default_rng(cfg.seed)
    detok = Detokenizer(engine.tokenizer)
    stats.start = time.perf_counter()
    if cfg.max_tokens <= 0:
        stats.first_token = stats.end = stats.start
        stats.finish_reason = "length"
        return
    logits = step_logits(ids, True)
    text = ""
    for n in range(cfg.max_tokens):
        tid = sample(logits, cfg, rng)
        now = time.perf_counter()
        if n == 0:
            stats.first_token = now
        stats.generated_tokens = n + 1
        if cfg.stop_at_eos and tid in engine.tokenizer.eos_ids:
            stats.end, stats.finish_reason = now, "stop"
            yield Token(tid, "", now, "stop")
            return
        piece = detok.add(tid)
        text += piece
        hit = _stop_hit(text, piece, cfg.stop)
        if hit is not None:
            stats.end, stats.finish_reason = now, "stop"
            yield Token(tid, piece[: len(piece) - hit] if hit else piece, now, "stop")
            return
        last = n + 1 == cfg.max_tokens
        if last:
            stats.end, stats.finish_reason = now, "length"
        yield Token(tid, piece, now, "length" if last else None)
        if not last:
            logits = step_logits([tid], False)


def _stop_hit(text: str, piece: str, stops: list[str]) -> int | None:
    """How many chars of `piece` to cut when `text` now contains a stop
    string (None: no stop)."""
    for s in stops:
        if not s:
            continue
        at = text.find(s, max(0, len(text) - len(piece) - len(s)))
        if at >= 0:
            return min(len(piece), len(text) - at)
    return None


def load_engine(artifact, threads: int | None = None, target: str | None = None,
                verify: bool = True, strict: bool = False):
    """Open the artifact folder with the engine its manifest names. With
    `verify`, every file the manifest lists is checked against its sha256
    first, so a tampered or corrupted file is never loaded. `strict` (the
    device-side runner's commands) also refuses a manifest without a file
    list, so deleting the list cannot switch the check off."""
    artifact = Path(artifact)
    path = artifact / "manifest.json"
    manifest = {}
    if verify or strict or target is None:
        manifest = read_manifest(path)
    if strict or (verify and "files" in manifest):
        verify_files(artifact, manifest.get("files"))
    target = target or manifest.get("target")
    try:
        if target == "mlx":
            from edgeq_targets.mlx.mlx_engine import MLXEngine

            return MLXEngine(artifact, manifest, threads=threads)
        if target == "onnxruntime":
            from edgeq_targets.onnxruntime.ort_engine import ORTEngine

            return ORTEngine(artifact, manifest, threads=threads)
    except (ImportError, MemoryError):
        raise  # a missing runtime or no memory: not the artifact's fault
    except Exception as e:  # any parse or load failure of the model files
        raise ArtifactCorrupt(
            f"{artifact}: the {target} runtime cannot load this artifact "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "rebuild it with edgeq deploy"
        ) from None
    raise ArtifactCorrupt(f"{path}: unknown target '{target}'; rebuild the artifact")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactCorrupt(f"{path}: missing; this is not an edgeq artifact") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactCorrupt(f"{path}: not valid JSON ({e}); re-copy the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactCorrupt(f"{path}: not a JSON object; re-copy the artifact")
    return manifest


class ArtifactCorrupt(Exception):
    """A file of the artifact does not match the manifest."""


def verify_files(artifact: Path, files) -> None:
    """Every file listed has its sha256 and none lies outside the artifact
    (the runner's own copy of edgeq verify; files the device adds beside
    the artifact, such as logs, are allowed here)."""
    import hashlib

    if not isinstance(files, dict) or not files:
        raise ArtifactCorrupt(
            f"{artifact}/manifest.json: no 'files' list to check; re-copy or "
            "rebuild the artifact"
        )
    root = artifact.resolve()
    for rel, entry in sorted(files.items()):
        p = (artifact / rel).resolve()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or root not in p.parents:
            raise ArtifactCorrupt(f"{artifact}/manifest.json: unsafe path '{rel}'")
        if not p.is_file() or (artifact / rel).is_symlink():
            raise ArtifactCorrupt(f"{artifact / rel}: missing; re-copy the artifact")
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        if not isinstance(entry, dict) or h.hexdigest() != entry.get("sha256"):
            raise ArtifactCorrupt(
                f"{artifact / rel}: sha256 does not match the manifest; the file was "
                "changed or corrupted in transit: rebuild or re-copy the artifact"
            )
