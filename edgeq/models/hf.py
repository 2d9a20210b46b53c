"""Hugging Face model folders: config.json, safetensors (single or sharded),
tokenizer files."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from edgeq.errors import ModelError
from edgeq.models.config import config_from_hf
from edgeq.models.safetensors_io import SafetensorsFile, TensorInfo
from edgeq.models.source import ModelSource, TensorInfo as _TI, check_tensor_set

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


class HFFolder(ModelSource):
    format = "hf"

    def __init__(self, path: Path, name: str | None = None, tie: bool | None = None):
        super().__init__(path, name or Path(path).name)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{self.path}: no config.json; not a model folder")
        try:
            raw = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
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
                    raise ModelError(
                        f"{self.path / INDEX}: maps '{lacking[0]}' to {fname}, "
                        f"which does not contain it ({len(lacking)} such tensors); "
                        "the download may be incomplete or the index is stale"
                    )
            for tname, e in f.entries.items():
                if names is not None and tname not in names:
                    continue
                self._where[tname] = fname
                self._infos[tname] = _TI(tname, e.shape, e.dtype)

    def _shards_from_index(self, index: Path) -> dict[str, list[str]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ModelError(f"{index}: malformed (no 'weight_map' object)") from None
        shards: dict[str, list[str]] = {}
        for tname, fname in weight_map.items():
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


__all__ = ["HFFolder", "TensorInfo"]
