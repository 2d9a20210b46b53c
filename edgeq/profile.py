"""`edgeq profile` on the host: run the artifact's profiler here, one fresh
process per thread count, against this machine's measured bandwidth; record
the environment; append results to a JSONL file; read them back.

The measuring code is the device-side one (edgeq_targets.common.profile), so
a record made here and one sent back by a device mean the same thing.
README.md, section "Profiling", documents the record; `RECORD_FIELDS` below
is the same schema in code.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import EdgeqError

log = logging.getLogger(__name__)

SCHEMA = "edgeq.profile/1"

# Required fields of a record, by section; each value's JSON type (None: any).
RECORD_FIELDS: dict[str, dict[str, tuple] | tuple] = {
    "schema": (str,),
    "test_time": (str,),
    "artifact": {"id": (str,), "model": (str,), "target": (str,), "path": (str,)},
    "plan": {
        "bits": (int,),
        "bits_per_weight": (int, float),
        "context_length": (int,),
        "weights_bytes": (int,),
        "decode_bytes_per_token": (int,),
    },
    "env": {
        "cpu_model": (str, type(None)),
        "cpu_flags": (list,),
        "threads": (int, type(None)),
        "runtime": (dict,),
        "edgeq_version": (str, type(None)),
        "device": (dict,),
    },
    "config": {
        "threads": (int, type(None)),
        "prompt_tokens": (int,),
        "prompt_tokens_requested": (int,),
        "gen_tokens": (int,),
        "repeats": (int,),
        "warmup": (bool,),
    },
    "load_s": (int, float, type(None)),
    "warmup": (dict, type(None)),
    "samples": (list,),
    "summary": (dict,),
    "memory": (dict,),
    "roofline": {
        "bytes_per_token": (int, type(None)),
        "bandwidth_gbs": (int, float, type(None)),
        "bandwidth_source": (str, type(None)),
    },
    "warnings": (list,),
}


class ProfileError(EdgeqError):
    """A profile cannot run, or a results file cannot be read."""


@dataclass
class ProfileRequest:
    """What `edgeq profile ARTIFACT` measures (see its --help)."""

    artifact: Path
    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    gen_tokens: int = 128
    repeats: int = 5
    threads: list[int | None] = field(default_factory=lambda: [None])
    warmup: bool = True
    device: str | None = None  # a profile's bandwidth instead of this machine's
    bandwidth_gbs: float | None = None  # overrides both


@dataclass
class ProfileResult:
    records: list[dict]
    best: dict | None  # best thread counts for prefill and decode
    suggestion: str | None  # TOML lines for the device profile


# --- This machine -------------------------------------------------------------


def local_device(
    name: str | None = None, measure: bool = True, quick_seconds: float = 1.0
) -> dict:
    """The device profile results are recorded against.

    `name` picks a profile of devices.toml. Otherwise: this machine's entry
    written by `edgeq devices detect` when there is one; else a profile
    made now from a quick bandwidth measurement (not saved), or with no
    bandwidth when `measure` is false.
    """
    from edgeq.devices import (
        default_device_name,
        get_device,
        load_devices,
        measure_bandwidth_gbs,
        user_devices_path,
    )

    if name:
        prof = get_device(name)
        return {**prof.to_dict(), "origin": f"profile {name!r} (--device)"}
    local = load_devices().get(default_device_name())
    if local is not None and local.source == user_devices_path():
        return {**local.to_dict(), "origin": "edgeq devices detect"}

    import os

    cores = os.cpu_count() or 1
    device = {"name": default_device_name(), "bandwidth_gbs": None, "cores": cores}
    if not measure:
        return {**device, "origin": "this machine, not profiled"}
    log.info("no detected profile of this machine; measuring bandwidth")
    gbs = measure_bandwidth_gbs(128, threads=cores, max_seconds=quick_seconds)
    return {
        **device,
        "bandwidth_gbs": round(gbs, 1),
        "origin": (
            f"measured now ({quick_seconds:g} s numpy copy, not saved; "
            "`edgeq devices detect` keeps a profile)"
        ),
    }


# --- Running ----------------------------------------------------------------------


def _child_options(req: ProfileRequest, device: dict) -> list[str]:
    opts = [
        "--prompt-tokens",
        ",".join(map(str, req.prompt_tokens)),
        "--gen-tokens",
        str(req.gen_tokens),
        "--repeats",
        str(req.repeats),
    ]
    if not req.warmup:
        opts.append("--no-warmup")
    gbs = req.bandwidth_gbs or device.get("bandwidth_gbs")
    if gbs:
        source = "given with --bandwidth-gbs" if req.bandwidth_gbs else device["origin"]
        if not req.bandwidth_gbs:
            source = f"device {device.get('name')!r}: {source}"
        # "=": a source that starts with "-" must not read as an option.
        opts += ["--bandwidth-gbs", str(gbs), f"--bandwidth-source={source}"]
    return opts


def check_request(req: ProfileRequest) -> None:
    """Refuse what cannot run, before any process starts."""
    manifest = Path(req.artifact) / "manifest.json"
    if not manifest.is_file():
        raise ProfileError(
            f"{req.artifact}: no manifest.json; pass an artifact folder "
            "(made by `edgeq deploy`)"
        )
    if req.repeats < 1:
        raise ProfileError(f"--repeats {req.repeats}: must be at least 1")
    if req.gen_tokens < 0:
        raise ProfileError(f"--gen-tokens {req.gen_tokens}: must be 0 or more")


def run_profile(req: ProfileRequest, progress=None) -> ProfileResult:
    """Profile `req.artifact` here; `progress(i, n, threads)` before each
    thread count. Each thread count runs in a fresh Python process."""
    from edgeq_targets.common.profile import ProfileFailed, run_children

    from edgeq import __version__

    check_request(req)
    device = local_device(req.device, measure=req.bandwidth_gbs is None)
    prefix = [
        sys.executable,
        "-m",
        "edgeq_targets.common.profile",
        "--artifact",
        str(Path(req.artifact).resolve()),
    ]
    options = _child_options(req, device)
    records: list[dict] = []
    for i, threads in enumerate(req.threads):
        if progress:
            progress(i, len(req.threads), threads)
        try:
            records += run_children(prefix, [threads], options)
        except ProfileFailed as e:
            raise ProfileError(f"{req.artifact}: {e}") from None
    for rec in records:
        rec["env"]["edgeq_version"] = __version__
        rec["env"]["device"] = device
    best = best_threads(records)
    return ProfileResult(records, best, thread_suggestion(best, device))


def best_threads(records: list[dict]) -> dict | None:
    """Best thread count for prefill and for decode (device-side code)."""
    from edgeq_targets.common.profile_figures import best_threads as best

    return best(records)


def thread_suggestion(best: dict | None, device: dict) -> str | None:
    """The TOML lines that would keep `best` with the device's profile."""
    if not best or "prefill" not in best or "decode" not in best:
        return None
    from edgeq.devices import user_devices_path

    p, d = best["prefill"]["threads"], best["decode"]["threads"]
    return (
        f"# measured by edgeq profile: best prefill {p}, best decode {d} threads\n"
        f"# for [{device.get('name')}] in {user_devices_path()} (devices.toml has\n"
        "# no threads field yet: until it does, pass --threads to the runner)\n"
        f"threads = {{ prefill = {p}, decode = {d} }}"
    )


# --- Results files ----------------------------------------------------------------


def validate_record(rec: dict, where: str = "record") -> None:
    """Raise ProfileError naming the first field that is missing or of the
    wrong type (RECORD_FIELDS is the schema)."""
    if not isinstance(rec, dict):
        raise ProfileError(f"{where}: not a JSON object")
    if rec.get("schema") != SCHEMA:
        raise ProfileError(
            f"{where}: field 'schema' is {rec.get('schema')!r}, expected "
            f"{SCHEMA!r}; re-run `edgeq profile --save` with this edgeq"
        )
    for key, spec in RECORD_FIELDS.items():
        if key not in rec:
            raise ProfileError(f"{where}: field {key!r} is missing")
        if isinstance(spec, dict):
            _check_section(rec[key], spec, f"{where}: field {key!r}")
        elif not isinstance(rec[key], spec):
            raise ProfileError(f"{where}: field {key!r} has the wrong type")


def _check_section(section, spec: dict, where: str) -> None:
    if not isinstance(section, dict):
        raise ProfileError(f"{where} must be an object")
    for key, types in spec.items():
        if key not in section:
            raise ProfileError(f"{where}.{key} is missing")
        value = section[key]
        # JSON has one number type: an int is a fine float, a bool is not.
        if isinstance(value, bool) and bool not in types:
            raise ProfileError(f"{where}.{key} has the wrong type")
        if not isinstance(value, types):
            raise ProfileError(f"{where}.{key} has the wrong type")


def append_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Append `records`, one JSON object per line (the file is created)."""
    path = Path(path)
    for i, rec in enumerate(records):
        validate_record(rec, f"record {i}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True, allow_nan=False) + "\n")
    log.info("appended %d records to %s", len(records), path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a results file; ProfileError names file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: not found; pass a file made by --save") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read ({e})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ProfileError(f"{path}:{number}: not JSON ({e.args[0]})") from None
        validate_record(rec, f"{path}:{number}")
        records.append(rec)
    return records


def flatten(rec: dict, prefix: str = "") -> dict:
    """Dotted keys for nested fields; per-run samples are left out (CSV rows
    are one per record), short lists become space-separated text."""
    out = {}
    for key, value in rec.items():
        name = f"{prefix}{key}"
        if key == "samples":
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list):
            out[name] = " ".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def to_csv(records: list[dict]) -> str:
    """One CSV row per record, columns as `flatten` names them."""
    rows = [flatten(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
