"""Brief fuzzing of every reader that takes untrusted files (issue 8, item 4).

Property, for each reader: on any input it either succeeds or raises
EdgeqError. Never another exception type, never a hang (each example runs
under a 10 s alarm), never an absurd allocation (each example runs with the
address-space limit lowered to what the process has plus 2 GiB, so a header
claiming 2^60 tensors cannot make anything reserve memory for them).

Inputs are valid files mutated by hypothesis: bytes overwritten, integers
set to extremes, cuts, and fields replaced by arbitrary values of any type.
The whole module takes ~40 s; EDGEQ_FUZZ_EXAMPLES scales every test's
example count for longer runs (bench/fuzz_readers.py runs coverage-guided
fuzzing with atheris for hours).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import resource
import signal
import struct
import sys
import tarfile
from pathlib import Path

import pytest
from helpers_models import (
    random_tensors,
    save_safetensors,
    tiny_config,
    write_gguf_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeq.errors import EdgeqError

SCALE = float(os.environ.get("EDGEQ_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int):
    """hypothesis settings for one fuzz test: no deadline (the machine is
    busy; the alarm catches hangs), no example database in the repo."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


class Hang(Exception):
    """A reader ran past the alarm."""


@contextlib.contextmanager
def guarded(seconds: int = 10, headroom: int = 2 << 30):
    """Run the body under an alarm and a lowered address-space limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_bytes()
    limit = vm + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def alarm(*_):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS"
)


def either_ok_or_edgeq_error(fn, *args):
    """The property: fn succeeds or raises EdgeqError (anything else fails
    the test with its traceback, which names the reader's bug)."""
    with guarded():
        try:
            return fn(*args)
        except EdgeqError as e:
            assert "\n" not in str(e), "an error message is one line"
            return None


# -- mutations of bytes ---------------------------------------------------------

EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated(draw, seed: bytes, focus: int | None = None):
    """`seed` with 1-4 edits: a byte set, a u32/u64 set to an extreme, a cut,
    a span deleted or inserted. `focus` biases edits to the first bytes
    (the header), where a reader's decisions are made."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        end = min(len(data), focus) if focus and draw(st.booleans()) else len(data)
        at = draw(st.integers(0, max(0, end - 1)))
        kind = draw(st.sampled_from(["byte", "u32", "u64", "cut", "delete", "insert"]))
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind in ("u32", "u64"):
            width = 4 if kind == "u32" else 8
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif kind == "cut":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# -- safetensors ------------------------------------------------------------------


@pytest.fixture(scope="module")
def safetensors_seed(tmp_path_factory) -> bytes:
    cfg = tiny_config(hidden_size=8, head_dim=4, intermediate_size=8,
                      vocab_size=8, num_hidden_layers=1)  # fmt: skip
    path = tmp_path_factory.mktemp("st") / "seed.safetensors"
    save_safetensors(path, random_tensors(cfg))
    return path.read_bytes()


def read_safetensors(path: Path) -> None:
    from edgeq.models.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    for name, entry in f.entries.items():
        f.read(name)
        if entry.shape:
            f.read(name, rows=slice(1, 3))


@given(data=st.data())
@fuzz(300)
def test_safetensors_bytes(data, safetensors_seed, tmp_path_factory):
    path = tmp_path_factory.mktemp("f", numbered=True) / "model.safetensors"
    head = struct.unpack("<Q", safetensors_seed[:8])[0] + 8
    path.write_bytes(data.draw(mutated(safetensors_seed, focus=head)))
    either_ok_or_edgeq_error(read_safetensors, path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
SIZES = st.integers(-2, 64) | st.sampled_from(EXTREMES) | st.floats() | JSON


@st.composite
def safetensors_headers(draw) -> bytes:
    """A header of entries whose dtype, shape and offsets are drawn from
    plausible and absurd values, then data bytes of a drawn length."""
    header = {}
    for i in range(draw(st.integers(0, 4))):
        spec = {
            "dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "Q4"])
                          | JSON),
            "shape": draw(st.lists(SIZES, max_size=4) | JSON),
            "data_offsets": draw(st.lists(SIZES, min_size=2, max_size=2) | JSON),
        }  # fmt: skip
        for key in draw(st.lists(st.sampled_from(list(spec)), max_size=1)):
            del spec[key]
        header[f"t{i}"] = spec
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    raw = json.dumps(header).encode()
    length = draw(st.just(len(raw)) | st.sampled_from(EXTREMES))
    data = draw(st.binary(max_size=256))
    return struct.pack("<Q", length % (1 << 64)) + raw + data


@given(blob=safetensors_headers())
@fuzz(150)
def test_safetensors_headers(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("f", numbered=True) / "model.safetensors"
    path.write_bytes(blob)
    either_ok_or_edgeq_error(read_safetensors, path)


# -- GGUF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("g") / "seed.gguf"
    return write_gguf_model(path, hidden=8, heads=2, ffn=8, vocab=8).read_bytes()


def read_gguf(path: Path) -> None:
    from edgeq.models.gguf_file import GGUFModel

    m = GGUFModel(path)
    for name in m.tensor_names():
        m.read(name)


@given(data=st.data())
@fuzz(300)
def test_gguf_bytes(data, gguf_seed, tmp_path_factory):
    path = tmp_path_factory.mktemp("f", numbered=True) / "m.gguf"
    path.write_bytes(data.draw(mutated(gguf_seed, focus=2048)))
    either_ok_or_edgeq_error(read_gguf, path)


GGUF_VALUES = (
    st.integers(-(2**31), 2**32 - 1)
    | st.floats(width=32)
    | st.text(max_size=8)
    | st.booleans()
    | st.lists(st.integers(0, 2**31 - 1), max_size=4)
)
GGUF_KEYS = ["embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv",
             "attention.key_length", "context_length", "vocab_size",
             "rope.freq_base", "attention.layer_norm_rms_epsilon",
             "rope.scaling.type", "rope.scaling.factor"]  # fmt: skip


def _add_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


@given(
    changes=st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, max_size=3),
    arch=st.sampled_from(["llama", "qwen2", "gemma3", "bert", ""]),
)
@fuzz(60)
def test_gguf_metadata_of_any_type(changes, arch, tmp_path_factory):
    """Well-formed GGUF files whose metadata values have any type or value:
    the loader checks each one it uses."""
    import gguf

    path = tmp_path_factory.mktemp("f", numbered=True) / "m.gguf"
    write_gguf_model(path, hidden=8, heads=2, ffn=8, vocab=8)
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(path) + ".new", arch or "llama")
    if not arch:
        writer.kv_data[0].pop("general.architecture", None)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        short = name.split(".", 1)[1] if name.startswith("llama.") else None
        if short in changes:
            continue
        key = f"{arch}.{short}" if short else name
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, field.types[0])
    for short, value in changes.items():
        _add_value(writer, f"{arch}.{short}", value)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    either_ok_or_edgeq_error(read_gguf, Path(str(path) + ".new"))


# -- config.json ------------------------------------------------------------------

CONFIG_KEYS = list(tiny_config("gemma3")) + ["rope_scaling", "rope_parameters",
                                             "text_config", "head_dim"]  # fmt: skip


@given(
    arch=st.sampled_from(["llama", "qwen2", "qwen3", "gemma3"]),
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=3),
)
@fuzz(300)
def test_config_json_fields_of_any_type(arch, changes):
    from edgeq.models.config import config_from_hf

    raw = {**tiny_config(arch), **changes}
    either_ok_or_edgeq_error(config_from_hf, raw, "config.json")


@given(raw=JSON)
@fuzz(100)
def test_config_json_of_any_shape(raw):
    from edgeq.models.config import config_from_hf

    either_ok_or_edgeq_error(config_from_hf, raw, "config.json")


# -- manifest.json and the runtime it asks for ------------------------------------

SHA = "0" * 64
MANIFEST = {
    "format_version": 1,
    "artifact_id": "0123456789abcdef",
    "target": "onnxruntime",
    "files": {"model.onnx": {"sha256": SHA, "size": 3}},
    "runtime": {
        "python": ">=3.10",
        "packages": {"onnxruntime": ">=1.18", "numpy": ">=1.24"},
        "onnx": {"opset": 14, "ir_version": 8},
        "arch": "arm64",
        "isa": ["neon", "dotprod"],
    },
}
PI5 = {
    "arch": "aarch64", "userland_bits": 64, "python": "3.11.2",
    "libc": "glibc 2.36", "packages": {"onnxruntime": "1.20.1"},
    "cpu_flags": ["fp", "asimd", "asimddp", "asimdhp"],
}  # fmt: skip
PATHS = [(), ("files",), ("files", "model.onnx"), ("runtime",),
         ("runtime", "packages"), ("runtime", "onnx"), ("runtime", "python"),
         ("runtime", "isa"), ("runtime", "arch"), ("format_version",)]  # fmt: skip


def check_manifest(data: bytes) -> None:
    from edgeq import preflight
    from edgeq.artifact import _parse_manifest

    manifest = _parse_manifest("fuzz", data)
    reasons = preflight.check_runtime(manifest["runtime"], PI5)
    assert all(isinstance(r, str) for r in reasons)
    preflight.missing_packages(manifest["runtime"], PI5)


# Near-valid version specifiers ('>=.180', '==1..*'), which plain text rarely hits.
SPECS = st.from_regex(r"([~=!<>]{0,2}[0-9.*]{0,6},?){1,2}", fullmatch=True)


@given(
    where=st.sampled_from(PATHS),
    key=st.none() | st.text(max_size=10),
    value=JSON | SPECS | st.dictionaries(st.sampled_from(["onnxruntime"]), SPECS),
)
@fuzz(300)
def test_manifest_fields_of_any_type(where, key, value):
    """A field at `where` replaced by any JSON value (key None), or a key of
    any name added beside it."""
    manifest = json.loads(json.dumps(MANIFEST))
    parent, last = (manifest, None) if not where else (manifest, where[-1])
    for part in where[:-1]:
        parent = parent[part]
    if last is None:
        manifest = value if key is None else {**manifest, key: value}
    elif key is None:
        parent[last] = value
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    either_ok_or_edgeq_error(check_manifest, json.dumps(manifest).encode())


@given(spec=SPECS, version=st.from_regex(r"[0-9.]{0,6}", fullmatch=True))
@fuzz(300)
def test_version_specifiers_of_any_form(spec, version):
    """Found by bench/fuzz_readers.py: '>=.180' in a manifest crashed
    pre-flight with a TypeError; every specifier now reads or is refused."""
    from edgeq.preflight import version_satisfies

    either_ok_or_edgeq_error(version_satisfies, version, spec)


@given(data=st.data())
@fuzz(200)
def test_manifest_bytes(data):
    seed = json.dumps(MANIFEST, indent=1).encode()
    either_ok_or_edgeq_error(check_manifest, data.draw(mutated(seed)))


# -- archives ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive_seed(tmp_path_factory) -> bytes:
    from edgeq import artifact

    root = tmp_path_factory.mktemp("a")
    folder = root / "art"
    (folder / "runner").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx" * 50)
    (folder / "runner/run.py").write_text("print('hi')\n")
    artifact.write_manifest(folder, {"target": "onnxruntime", "runtime": {}})
    archive = artifact.pack(folder, root / "art.tar.gz")
    return gzip.decompress(archive.read_bytes())


def check_archive(archive: Path, dest: Path) -> None:
    from edgeq import artifact

    try:
        artifact.verify(archive)
    finally:
        try:
            artifact.safe_extract(archive, dest)
        except EdgeqError:
            assert not dest.exists()
        else:
            for path in dest.rglob("*"):
                assert not path.is_symlink()
                assert path.resolve().is_relative_to(dest.resolve())
        left = [p.name for p in dest.parent.iterdir() if p.name.startswith(".")]
        assert not left, left


@given(data=st.data())
@fuzz(200)
def test_archive_bytes(data, archive_seed, tmp_path_factory):
    """Mutations of the tar stream, gzipped again (a mutated gzip stream
    mostly fails its CRC, which tests little)."""
    root = tmp_path_factory.mktemp("f", numbered=True)
    archive = root / "x.tar.gz"
    tar = data.draw(mutated(archive_seed, focus=4096))
    archive.write_bytes(gzip.compress(tar, mtime=0))
    either_ok_or_edgeq_error(check_archive, archive, root / "out")


MEMBER_NAMES = st.sampled_from(
    ["art/manifest.json", "art/model.onnx", "art/runner/run.py", "art", "art/",
     "/etc/passwd", "art/../../evil", "../evil", "art/./x", "art//x", "other/x",
     "C:/x", "art\\x", "art/a/../../x", "."]
) | st.text(min_size=1, max_size=12)  # fmt: skip
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                         tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])  # fmt: skip


@given(
    members=st.lists(
        st.tuples(MEMBER_NAMES, KINDS, st.binary(max_size=32), MEMBER_NAMES),
        min_size=1,
        max_size=6,
    )
)
@fuzz(200)
def test_archive_members_of_any_kind(members, tmp_path_factory):
    """Hostile entries: absolute paths, '..', links out, devices, duplicates."""
    root = tmp_path_factory.mktemp("f", numbered=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    archive = root / "x.tar.gz"
    archive.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    either_ok_or_edgeq_error(check_archive, archive, root / "out")


# -- devices.toml and fleet.toml ------------------------------------------------------


def toml_value(value) -> str:
    """TOML source for a value (hypothesis draws; tomllib reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{" + items + "}"
    return str(value)  # dates and times: their isoformat is TOML


TOML = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=8) | st.dates() | st.datetimes(),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
DEVICE = {
    "description": "Raspberry Pi 5, 8 GB", "ram_gb": 8, "usable_fraction": 0.75,
    "bandwidth_gbs": 17.07, "arch": "arm64", "isa": ["neon", "dotprod", "fp16"],
    "cores": 4, "os": "linux", "target": "onnxruntime", "cpu": "BCM2712",
    "python": "3.11", "decode_efficiency": 0.6,
    "runtime": {"onnxruntime": ">=1.18"},
}  # fmt: skip


def load_devices_from(text: str, folder: Path) -> None:
    from edgeq.devices import load_devices

    user = folder / "devices.toml"
    user.write_text(text, encoding="utf-8")
    load_devices(user_path=user)


@given(
    field=st.sampled_from([*DEVICE, "unknown_field"]),
    value=TOML,
    name=st.just("my-board") | st.text(min_size=1, max_size=10),
)
@fuzz(150)
def test_every_field_of_a_device_entry(field, value, name, tmp_path_factory):
    table = {**DEVICE, field: value}
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    text = f"[{json.dumps(name)}]\n{body}"
    folder = tmp_path_factory.mktemp("f", numbered=True)
    either_ok_or_edgeq_error(load_devices_from, text, folder)


@given(data=st.data())
@fuzz(150)
def test_devices_toml_bytes(data, tmp_path_factory):
    seed = "[my-board]\n" + "".join(
        f"{k} = {toml_value(v)}\n" for k, v in DEVICE.items()
    )
    text = data.draw(mutated(seed.encode())).decode("utf-8", "replace")
    folder = tmp_path_factory.mktemp("f", numbered=True)
    either_ok_or_edgeq_error(load_devices_from, text, folder)


FLEET = {
    "fleet": {"model": "smollm2-135m"},
    "defaults": {"user": "edgeq", "port": 22, "install_dir": "/opt/edgeq"},
    "groups.pis": {"hosts": ["pi-a", "pi-b"], "device": "rpi5-8gb"},
    "hosts.pi-a": {"address": "10.0.0.21"},
    "hosts.pi-b": {"address": "10.0.0.22", "port": 2222},
    "rollout": {"canary": ["pi-a"], "batch": "50%", "max_failure_percent": 25},
    "rollout.gate": {"prompt": "Once upon a time", "min_decode_share": 0.5},
}
FLEET_FIELDS = [
    ("fleet", "model"), ("fleet", "state_dir"), ("defaults", "port"),
    ("defaults", "user"), ("defaults", "service"), ("defaults", "preflight"),
    ("groups.pis", "hosts"), ("groups.pis", "device"), ("hosts.pi-a", "address"),
    ("hosts.pi-b", "port"), ("hosts.pi-b", "key_file"), ("rollout", "canary"),
    ("rollout", "batch"), ("rollout", "max_failure_percent"),
    ("rollout", "keep_releases"), ("rollout.gate", "min_decode_share"),
    ("rollout.gate", "max_tokens"), ("build", "bits"), ("hosts.pi-c", "address"),
    ("fleet", "unknown"),
]  # fmt: skip


def fleet_text(sections: dict[str, dict]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
        for name, table in sections.items()
    )


def load_fleet_from(text: str, folder: Path) -> None:
    from edgeq.fleet.config import load_fleet

    path = folder / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    load_fleet(path)


@given(where=st.sampled_from(FLEET_FIELDS), value=TOML)
@fuzz(150)
def test_every_field_of_fleet_toml(where, value, tmp_path_factory):
    section, key = where
    sections = {name: dict(table) for name, table in FLEET.items()}
    sections.setdefault(section, {})[key] = value
    folder = tmp_path_factory.mktemp("f", numbered=True)
    either_ok_or_edgeq_error(load_fleet_from, fleet_text(sections), folder)


@given(data=st.data())
@fuzz(150)
def test_fleet_toml_bytes(data, tmp_path_factory):
    seed = fleet_text(FLEET).encode()
    text = data.draw(mutated(seed)).decode("utf-8", "replace")
    folder = tmp_path_factory.mktemp("f", numbered=True)
    either_ok_or_edgeq_error(load_fleet_from, text, folder)
