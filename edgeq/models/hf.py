"""Hugging Face model folders: config.json, safetensors (single or sharded),
tokenizer files."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np

from edgeq.errors import ModelError
from edgeq.models.config import config_from_hf
from edgeq.models.safetensors_io import SafetensorsFile
from edgeq.models.source import ModelSource, TensorInfo, check_tensor_set

log = logging.getLogger(__name__)

# Files copied into artifacts as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

INDEX = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"[^/\\\x00]+\.safetensors")


class HFFolder(ModelSource):
    format = "hf"

    def __init__(self, path: Path, name: str | None = None, tie: bool | None = None):
        super().__init__(path, name or Path(path).name)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{self.path}: no config.json; not a model folder")
        raw = _read_json(cfg_path)
        self.config = config_from_hf(raw, where=str(cfg_path))
        self.raw_config = raw
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._open_weights()
        for fname in TOKENIZER_FILES:
            if (self.path / fname).is_file():
                self.tokenizer_files[fname] = (self.path / fname).read_bytes()
        if "tokenizer.json" not in self.tokenizer_files:
            raise ModelError(
                f"{self.path}: no tokenizer.json; edgeq needs the fast tokenizer "
                "file beside config.json"
            )
        _check_tokenizer(self.path / "tokenizer.json", self.tokenizer_files)
        check_tensor_set(self, tie)
        self.source_sha256 = self._fingerprint()

    def _open_weights(self) -> None:
        index = self.path / INDEX
        if index.is_file():
            shards = self._shards_from_index(index)
            stray = self.path / "model.safetensors"
            if stray.is_file() and "model.safetensors" not in shards:
                log.warning(
                    "%s: ignoring model.safetensors beside the shards; only the "
                    "files named in %s are read",
                    self.path,
                    INDEX,
                )
        elif (self.path / "model.safetensors").is_file():
            shards = {"model.safetensors": None}
            others = sorted(
                p.name
                for p in self.path.glob("*.safetensors")
                if p.name != "model.safetensors"
            )
            if others:
                log.warning(
                    "%s: reading model.safetensors only; %s beside it are not "
                    "named by any %s and are ignored",
                    self.path,
                    ", ".join(others),
                    INDEX,
                )
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                other = sorted(
                    p.name for p in self.path.glob("*") if p.suffix in (".bin", ".pt")
                )
                hint = f" (found {', '.join(other)}: convert to safetensors)"
                raise ModelError(
                    f"{self.path}: no model.safetensors or {INDEX}"
                    + (hint if other else "")
                )
            shards = {n: None for n in found}
        for fname, names in shards.items():
            f = SafetensorsFile(self.path / fname)
            self._files[fname] = f
            if names is not None:
                lacking = sorted(set(names) - set(f.entries))
                if lacking:
                    more = f" (nor {len(lacking) - 1} more)" if len(lacking) > 1 else ""
                    raise ModelError(
                        f"{self.path / INDEX}: maps '{lacking[0]}' to {fname}, "
                        f"which does not contain it{more}; the download may be "
                        "incomplete or the index is stale"
                    )
            for tname, e in f.entries.items():
                if names is not None and tname not in names:
                    continue
                self._where[tname] = fname
                self._infos[tname] = TensorInfo(tname, e.shape, e.dtype)

    def _shards_from_index(self, index: Path) -> dict[str, list[str]]:
        weight_map = _read_json(index)
        if isinstance(weight_map, dict):
            weight_map = weight_map.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: malformed (no 'weight_map' object)")
        shards: dict[str, list[str]] = {}
        for tname, fname in weight_map.items():
            # A shard is a file in this folder: a path could read anything.
            if not isinstance(fname, str) or not _SHARD_NAME.fullmatch(fname):
                raise ModelError(
                    f"{index}: maps '{tname}' to {fname!r}, which is not a "
                    ".safetensors file name in this folder; the index is corrupt"
                )
            shards.setdefault(fname, []).append(tname)
        missing = sorted(f for f in shards if not (self.path / f).is_file())
        if missing:
            raise ModelError(
                f"{index}: names shard(s) {', '.join(missing)} that are not in "
                f"{self.path}; the download may be incomplete"
            )
        return shards

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        return self._files[self._where[name]].read(name, rows)

    def _fingerprint(self) -> str:
        """sha256 over config.json and every weight file, in name order."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for fname in sorted(self._files):
            h.update(fname.encode())
            with open(self._files[fname].path, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        return h.hexdigest()


def _read_json(path: Path):
    """A small JSON file of the folder, with what it really is when not JSON."""
    data = path.read_bytes()
    if data.startswith(b"version https://git-lfs"):
        raise ModelError(
            f"{path} is a git-lfs pointer, not the file; run `git lfs pull` or "
            "download the real file"
        )
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({e}); download it again") from None


def _check_tokenizer(path: Path, files: dict[str, bytes]) -> None:
    """Parse the tokenizer files now, so a broken one fails here and not in
    the smoke test after the whole build."""
    from tokenizers import Tokenizer

    for fname in files:
        if fname.endswith(".json"):
            _read_json(path.parent / fname)
    try:
        Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception
        raise ModelError(
            f"{path}: the tokenizers library cannot load it ({str(e)[:120]}); "
            "download it again"
        ) from None


__all__ = ["HFFolder", "TensorInfo"]
