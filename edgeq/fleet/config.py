"""fleet.toml: the hosts of a fleet, their groups, and the rollout policy.

Layout (examples/fleet.toml is a commented copy)::

    [fleet]            model, state_dir, cache_dir, wheel_cache
    [build]            options of `edgeq deploy` for every profile
    [defaults]         host fields every host starts from
    [groups.NAME]      hosts = [...], plus host fields for its members
    [hosts.NAME]       address, device, ... (host fields)
    [rollout]          canary, batch, max_failure_percent, keep_releases
    [rollout.gate]     prompt, max_tokens, min_decode_share, min_tokens_per_s

A host's fields are resolved as defaults, then its groups in file order,
then the host's own table. Two groups that set one field differently are
an error, not a silent choice. Every error names the file, the host or
section, and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.errors import FleetError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULT_STATE_DIR = ".edgeq-fleet"
SERVICE_MODES = ("systemd", "supervisor", "none")
PREFLIGHT_MODES = ("refuse", "warn")
BUILD_KEYS = (
    "target",
    "bits",
    "group_size",
    "target_bpw",
    "context_length",
    "smoke_tokens",
    "max_ppl_increase",
    "quality_gate",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Host:
    """One device of the fleet, with every field resolved."""

    name: str
    address: str
    device: str
    install_dir: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    python: str = "/usr/bin/python3"
    service: str = "systemd"  # how run.py serve is kept running
    service_port: int = 8080
    preflight: str = "refuse"  # "warn": deploy even if the facts disagree
    min_decode_share: float | None = None  # None: the rollout gate's
    min_tokens_per_s: float | None = None
    groups: tuple[str, ...] = ()

    @property
    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and localhost (test and lab hosts)."""
        if self.address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False


_HOST_FIELDS = {f.name for f in dataclasses.fields(Host)} - {"name", "groups"}
_REQUIRED = ("address", "device", "install_dir")


@dataclass(frozen=True)
class Gate:
    """The health gate each host runs on a new release before switching."""

    prompt: str = "Once upon a time"
    max_tokens: int = 32
    min_decode_share: float = 0.5  # of the plan's predicted decode tokens/s
    min_tokens_per_s: float | None = None  # replaces the share when set
    timeout_s: int = 600
    use_profile: bool = True  # `run.py profile --json` when the runner has it


@dataclass(frozen=True)
class Policy:
    """How the rollout proceeds: canaries, batches, failure budget."""

    canary: tuple[str, ...] = ()
    batch: int | str = 1  # a count of hosts, or "NN%" of the fleet
    max_failure_percent: float = 0.0
    keep_releases: int = 3
    gate: Gate = field(default_factory=Gate)


@dataclass(frozen=True)
class FleetConfig:
    """A parsed, validated fleet.toml."""

    path: Path
    model: str
    hosts: dict[str, Host]
    groups: dict[str, tuple[str, ...]]
    policy: Policy
    build: dict[str, Any]
    state_dir: Path
    cache_dir: Path
    wheel_cache: Path | None = None

    def select(self, names: list[str] | None) -> list[Host]:
        """Hosts named (or in groups named) by `names`; all when None."""
        if not names:
            return list(self.hosts.values())
        chosen = expand_names(self, names, "--hosts")
        return [self.hosts[n] for n in self.hosts if n in chosen]


def load_fleet(path: str | Path) -> FleetConfig:
    """Read and validate fleet.toml; FleetError names host/section and field."""
    path = Path(path)
    data = _read(path)
    where = str(path)
    _check_keys(
        data,
        ("fleet", "build", "defaults", "groups", "hosts", "rollout"),
        where,
    )
    fleet = _table(data, "fleet", where)
    _check_keys(
        fleet, ("model", "state_dir", "cache_dir", "wheel_cache"), f"{where}: [fleet]"
    )
    model = fleet.get("model")
    if not isinstance(model, str) or not model:
        raise FleetError(
            f"{where}: [fleet] field 'model' is missing: set it to a model name, "
            "folder or .gguf file, as for `edgeq deploy`"
        )
    base = path.resolve().parent
    state_dir = _path(
        fleet.get("state_dir", DEFAULT_STATE_DIR), base, where, "state_dir"
    )
    cache = fleet.get("cache_dir")
    cache_dir = _path(cache, base, where, "cache_dir") if cache else state_dir / "cache"
    wheels = fleet.get("wheel_cache")
    wheel_cache = _path(wheels, base, where, "wheel_cache") if wheels else None
    if model.startswith((".", "~")) or "/" in model:
        candidate = _path(model, base, where, "model")
        model = str(candidate) if candidate.exists() else model

    groups_raw = _table(data, "groups", where)
    hosts_raw = _table(data, "hosts", where)
    if not hosts_raw:
        raise FleetError(f"{where}: no [hosts.NAME] tables: add at least one host")
    groups = _parse_groups(groups_raw, hosts_raw, where)
    defaults = _table(data, "defaults", where)
    _check_keys(defaults, sorted(_HOST_FIELDS - {"address"}), f"{where}: [defaults]")
    for key, value in defaults.items():  # blame [defaults], not its first host
        _check_host_value(f"{where}: [defaults]", key, value)
    hosts = {
        name: _resolve_host(name, table, defaults, groups_raw, groups, where)
        for name, table in hosts_raw.items()
    }
    config = FleetConfig(
        path=path,
        model=model,
        hosts=hosts,
        groups=groups,
        policy=Policy(),
        build=_parse_build(_table(data, "build", where), where),
        state_dir=state_dir,
        cache_dir=cache_dir,
        wheel_cache=wheel_cache,
    )
    policy = _parse_policy(_table(data, "rollout", where), config, where)
    return dataclasses.replace(config, policy=policy)


def expand_names(config: FleetConfig, names: list[str], where: str) -> set[str]:
    """Host names for a list of host or group names; unknown names raise."""
    chosen: set[str] = set()
    for name in names:
        if name in config.hosts:
            chosen.add(name)
        elif name in config.groups:
            chosen.update(config.groups[name])
        else:
            known = [*config.hosts, *config.groups]
            raise FleetError(f"{where}: no host or group {name!r}{_hint(name, known)}")
    return chosen


# -- reading -------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FleetError(
            f"{path}: file not found; pass the path of a fleet.toml"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FleetError(f"{path}: cannot read it ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FleetError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    _refuse_templates(data, str(path))
    return data


# Values land in Ansible's inventory and playbook, where Jinja would run
# "{{ lookup('pipe', ...) }}" on the controller; no field needs template
# syntax, so it is refused everywhere, with control characters.
_TEMPLATE_MARKS = ("{{", "{%", "{#")


def _refuse_templates(value: Any, where: str, field: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_templates(v, where, f"{field}.{k}" if field else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_templates(v, where, f"{field}[{i}]")
    elif isinstance(value, str):
        bad = any(m in value for m in _TEMPLATE_MARKS)
        if bad or any(ord(c) < 32 for c in value):
            raise FleetError(
                f"{where}: field '{field}' holds template syntax or control "
                f"characters ({value[:40]!r}); Ansible would evaluate it: remove them"
            )


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise FleetError(f"{where}: '{key}' must be a table ([{key}])")
    return value


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(table: dict[str, Any], allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise FleetError(
                f"{where}: unknown field {key!r}{_hint(key, list(allowed))}"
            )


def _path(value: Any, base: Path, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise FleetError(f"{where}: [fleet] field '{key}' must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


# -- groups and hosts ------------------------------------------------------------


def _parse_groups(groups_raw, hosts_raw, where: str) -> dict[str, tuple[str, ...]]:
    groups = {}
    for name, table in groups_raw.items():
        here = f"{where}: group {name!r}"
        if not isinstance(table, dict):
            raise FleetError(f"{here}: must be a table [groups.{name}]")
        if name in hosts_raw:
            raise FleetError(f"{here}: a host has the same name; rename one of them")
        _check_keys(table, sorted(_HOST_FIELDS - {"address"} | {"hosts"}), here)
        members = table.get("hosts", [])
        if not isinstance(members, list) or not all(
            isinstance(m, str) for m in members
        ):
            raise FleetError(f"{here}: field 'hosts' must be a list of host names")
        for member in members:
            if member not in hosts_raw:
                raise FleetError(
                    f"{here}: field 'hosts' names {member!r}, which has no "
                    f"[hosts.{member}] table{_hint(member, list(hosts_raw))}"
                )
        for key, value in table.items():
            if key != "hosts":
                _check_host_value(here, key, value)
        groups[name] = tuple(members)
    return groups


def _resolve_host(name, table, defaults, groups_raw, groups, where) -> Host:
    here = f"{where}: host {name!r}"
    if not _NAME.fullmatch(name):
        raise FleetError(
            f"{here}: names may hold letters, digits, '.', '_' and '-' only"
        )
    if not isinstance(table, dict):
        raise FleetError(f"{here}: must be a table [hosts.{name}]")
    _check_keys(table, sorted(_HOST_FIELDS), here)
    values = dict(defaults)
    member_of = [g for g, members in groups.items() if name in members]
    set_by: dict[str, str] = {}
    for group in member_of:
        for key, value in groups_raw[group].items():
            if key == "hosts":
                continue
            if key in set_by and values[key] != value:
                raise FleetError(
                    f"{here}: groups {set_by[key]!r} and {group!r} set field "
                    f"{key!r} differently; set it in [hosts.{name}]"
                )
            values[key], set_by[key] = value, group
    values.update(table)
    for key in _REQUIRED:
        if key not in values:
            raise FleetError(
                f"{here}: field {key!r} is missing; set it in [hosts.{name}], "
                "one of its groups, or [defaults]"
            )
    for key, value in values.items():
        _check_host_value(here, key, value)
    if "key_file" in values:
        values["key_file"] = str(Path(values["key_file"]).expanduser())
    return Host(name=name, groups=tuple(member_of), **values)


def _check_host_value(here: str, key: str, value: Any) -> None:
    problem = None
    if key in ("port", "service_port"):
        if not (isinstance(value, int) and not isinstance(value, bool)) or not (
            1 <= value <= 65535
        ):
            problem = "must be an integer port, 1-65535"
    elif key == "service":
        if value not in SERVICE_MODES:
            problem = f"must be one of {', '.join(SERVICE_MODES)}"
    elif key == "preflight":
        if value not in PREFLIGHT_MODES:
            problem = f"must be one of {', '.join(PREFLIGHT_MODES)}"
    elif key in ("min_decode_share", "min_tokens_per_s"):
        if not _is_number(value) or value < 0:
            problem = "must be a number >= 0"
    elif key in ("install_dir", "python"):
        if not isinstance(value, str) or not value.startswith("/"):
            problem = "must be an absolute path on the host"
    elif not isinstance(value, str) or not value:
        problem = "must be a non-empty string"
    if problem:
        raise FleetError(f"{here}: field {key!r} {problem}, got {value!r}")
    if key == "device":
        _check_device(here, value)


def _check_device(here: str, name: str) -> None:
    from edgeq.devices import get_device
    from edgeq.errors import DeviceError

    try:
        get_device(name)
    except DeviceError as e:  # re-worded to name the host
        raise FleetError(f"{here}: field 'device': {e}") from None


def _is_number(value: Any) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value)


# -- build and rollout -------------------------------------------------------------


def _parse_build(table: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(table, BUILD_KEYS, f"{where}: [build]")
    for key, value in table.items():
        ok = {
            "target": lambda v: v in ("mlx", "onnxruntime"),
            "quality_gate": lambda v: isinstance(v, bool),
            "target_bpw": _is_number,
            "max_ppl_increase": _is_number,
        }.get(key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
        if not ok(value):
            raise FleetError(
                f"{where}: [build] field {key!r} has a bad value {value!r}"
            )
    return dict(table)


def _parse_policy(table: dict[str, Any], config: FleetConfig, where: str) -> Policy:
    here = f"{where}: [rollout]"
    _check_keys(
        table,
        ("canary", "batch", "max_failure_percent", "keep_releases", "gate"),
        here,
    )
    canary = table.get("canary", [])
    if isinstance(canary, str):
        canary = [canary]
    if not isinstance(canary, list) or not all(isinstance(c, str) for c in canary):
        raise FleetError(
            f"{here}: field 'canary' must be a list of host or group names"
        )
    expand_names(config, canary, f"{here} field 'canary'")
    batch = table.get("batch", 1)
    _check_batch(batch, here)
    fail = table.get("max_failure_percent", 0)
    if not _is_number(fail) or not 0 <= fail <= 100:
        raise FleetError(
            f"{here}: field 'max_failure_percent' must be 0-100, got {fail!r}"
        )
    keep = table.get("keep_releases", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise FleetError(
            f"{here}: field 'keep_releases' must be an integer >= 1, got {keep!r}"
        )
    gate = _parse_gate(_table(table, "gate", here), f"{where}: [rollout.gate]")
    return Policy(tuple(canary), batch, float(fail), keep, gate)


def _check_batch(batch: Any, here: str) -> None:
    if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
        return
    percent = isinstance(batch, str) and re.fullmatch(r"\d+(\.\d+)?%", batch)
    if percent and 0 < float(batch[:-1]) <= 100:
        return
    raise FleetError(
        f"{here}: field 'batch' must be a host count >= 1 or a percentage "
        f'such as "25%", got {batch!r}'
    )


def _parse_gate(table: dict[str, Any], here: str) -> Gate:
    _check_keys(table, [f.name for f in dataclasses.fields(Gate)], here)
    checks = {
        "prompt": (lambda v: isinstance(v, str) and v.strip(), "a non-empty string"),
        "max_tokens": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
        "min_decode_share": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "min_tokens_per_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "timeout_s": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        "use_profile": (lambda v: isinstance(v, bool), "true or false"),
    }
    for key, value in table.items():
        ok, wanted = checks[key]
        if not ok(value) or isinstance(value, bool) and key != "use_profile":
            raise FleetError(f"{here}: field {key!r} must be {wanted}, got {value!r}")
    return Gate(**table)


def batch_size(batch: int | str, total: int) -> int:
    """Hosts per batch for a policy's `batch` over `total` hosts (>= 1)."""
    if isinstance(batch, str):
        return max(1, math.ceil(total * float(batch[:-1]) / 100))
    return batch
