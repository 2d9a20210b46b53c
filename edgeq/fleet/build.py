"""One artifact per distinct device profile of a fleet, built once and cached.

The cache key hashes what decides the artifact's content: the model (its
content sha256, not its path), the plan the planner makes for the profile,
the target, the `[build]` options, the edgeq version and the runner code
that ships inside the artifact. A build lands in
``<cache_dir>/<profile>-<key>/`` as::

    artifact/          the artifact folder edgeq.deploy wrote
    artifact.tar.gz    its reproducible archive (what hosts receive)
    build.json         key, artifact id, archive sha256, predicted figures

build.json is written last, so a cache entry without it is an interrupted
build and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq import __version__
from edgeq.errors import EdgeqError, FleetError
from edgeq.fleet.config import FleetConfig
from edgeq.fsutil import atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class Build:
    """A cached artifact for one device profile."""

    device: str
    key: str
    folder: Path
    archive: Path
    archive_sha256: str
    artifact_id: str
    target: str
    predicted_tokens_per_s: float | None
    cached: bool  # True when this run reused it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (paths as strings)."""
        return {
            "device": self.device,
            "key": self.key,
            "folder": str(self.folder),
            "archive": str(self.archive),
            "archive_sha256": self.archive_sha256,
            "artifact_id": self.artifact_id,
            "target": self.target,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "cached": self.cached,
        }


def build_key(config: FleetConfig, device: str) -> tuple[str, dict[str, Any]]:
    """The cache key of `device`'s artifact and the facts it hashes.

    Planning opens the model and runs the planner, which is cheap next to a
    build; the plan, not the options alone, goes into the key, so a planner
    change that alters what would be built also misses the cache.
    """
    from edgeq.deploy import prepare

    req = _request(config, device, out=config.cache_dir / ".planning-never-written")
    _device, target, _out, source, plan = prepare(req)
    model = {k: v for k, v in source.describe().items() if k != "source"}
    facts = {
        "model": model,
        "plan": plan.to_dict(),
        "target": target,
        "build": config.build,
        "edgeq_version": __version__,
        "runner_sha256": runner_fingerprint(target),
    }
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], facts


def runner_fingerprint(target: str) -> str:
    """sha256 over the device-side runner files an artifact of `target` ships.

    The runner is part of the artifact but not of the plan: without this, a
    fixed or extended runner (a new `serve` or `profile`) would be served
    from a stale cache entry until the edgeq version changed.
    """
    import edgeq_targets

    root = Path(edgeq_targets.__file__).resolve().parent
    digest = hashlib.sha256()
    files = [root / "__init__.py"]
    for part in ("common", target):
        files += sorted((root / part).rglob("*.py"))
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _request(config: FleetConfig, device: str, out: Path):
    from edgeq.deploy import DeployRequest

    options = dict(config.build)
    options.setdefault("quality_gate", True)
    return DeployRequest(model=config.model, device=device, out=out, **options)


def cached_build(config: FleetConfig, device: str, key: str) -> Build | None:
    """The cache entry for (device, key) if it is complete, else None."""
    entry = config.cache_dir / f"{device}-{key}"
    record = entry / BUILD_RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        archive = entry / "artifact.tar.gz"
        if not archive.is_file() or archive.stat().st_size != data["archive_size"]:
            raise ValueError("archive missing or resized")
    except (ValueError, KeyError, OSError) as e:
        logger.warning("cache entry %s is damaged (%s); rebuilding", entry, e)
        return None
    return Build(
        device=device,
        key=key,
        folder=entry / "artifact",
        archive=archive,
        archive_sha256=data["archive_sha256"],
        artifact_id=data["artifact_id"],
        target=data["target"],
        predicted_tokens_per_s=data.get("predicted_tokens_per_s"),
        cached=True,
    )


def build_one(config: FleetConfig, device: str, progress=None) -> Build:
    """The artifact for `device`: from the cache, or built now and cached."""
    key, _facts = build_key(config, device)
    found = cached_build(config, device, key)
    if found:
        logger.info("%s: artifact %s from cache %s", device, found.artifact_id, key)
        return found
    from edgeq.deploy import deploy

    entry = config.cache_dir / f"{device}-{key}"
    if entry.exists():
        shutil.rmtree(entry)  # an interrupted build: start clean
    entry.mkdir(parents=True)
    req = _request(config, device, out=entry / "artifact")
    req.force = True
    say = (lambda step, detail="": progress(device, step, detail)) if progress else None
    try:
        result = deploy(req, progress=say)
    except EdgeqError as e:
        raise FleetError(
            f"building the artifact for device {device!r} failed: {e}"
        ) from None
    predicted = (result.manifest.get("predicted") or {}).get("decode_tokens_per_s")
    record = {
        "key": key,
        "device": device,
        "artifact_id": result.manifest["artifact_id"],
        "target": result.manifest["target"],
        "archive_sha256": sha256_file(result.archive),
        "archive_size": result.archive.stat().st_size,
        "predicted_tokens_per_s": predicted,
        "edgeq_version": __version__,
    }
    atomic_write_text(entry / BUILD_RECORD, json.dumps(record, indent=2) + "\n")
    logger.info("%s: built artifact %s into %s", device, record["artifact_id"], entry)
    return Build(
        device, key, result.folder, result.archive, record["archive_sha256"],
        record["artifact_id"], record["target"], predicted, cached=False,
    )  # fmt: skip


def build_all(
    config: FleetConfig,
    devices: list[str],
    progress: Callable[[str, str, str], None] | None = None,
) -> dict[str, Build]:
    """One Build per distinct profile in `devices`, in first-seen order."""
    builds = {}
    for device in dict.fromkeys(devices):
        builds[device] = build_one(config, device, progress)
    return builds
