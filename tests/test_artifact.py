"""Artifacts: manifest, runner copy, reproducible archives, verify, install.

Everything runs on real files in tmp_path. Hostile archives are written
with tarfile directly, the way an attacker or a broken copy would make them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeq import __version__, artifact
from edgeq.artifact import (
    compute_artifact_id,
    copy_runner,
    install,
    load_manifest,
    pack,
    safe_extract,
    verify,
    write_manifest,
)
from edgeq.cli import app
from edgeq.errors import ArtifactError
from edgeq.fsutil import (
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
)

INFO = {
    "model": {
        "name": "tiny",
        "source": "models/tiny",
        "source_sha256": "0" * 64,
        "architecture": "llama",
        "parameters": 1234,
    },
    "target": "onnxruntime",
    "device": {"name": "rpi5-8gb", "profile": {"arch": "arm64"}},
    "plan": {"tensors": {}},
    "runtime": {
        "python": ">=3.10",
        "packages": {"onnxruntime": ">=1.18"},
        "onnx": {"opset": 21, "ir_version": 10},
        "arch": "aarch64",
        "isa": ["dotprod"],
    },
    "predicted": {"file_mb": 0.01},
    "measured": {"decode_tokens_per_s": 12.5},
}
# A Raspberry Pi 5 that can run INFO's runtime.
PI5_FACTS = {
    "arch": "aarch64",
    "userland_bits": 64,
    "python": "3.11.2",
    "libc": "glibc 2.36",
    "cpu_flags": ["fp", "asimd", "asimddp"],
    "packages": {"onnxruntime": "1.20.1"},
}
MODEL_BYTES = bytes(range(256)) * 40  # 10 KiB, content fixed for reproducibility


def make_targets(root: Path) -> Path:
    """A targets/ tree like the repo's: a package, common code and a runner."""
    (root / "common" / "__pycache__").mkdir(parents=True)
    (root / "onnxruntime").mkdir()
    (root / "mlx").mkdir()
    (root / "__init__.py").write_text("")
    (root / "common" / "__init__.py").write_text("")
    (root / "common" / "util.py").write_text("GREETING = 'hello from common'\n")
    (root / "common" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"x")
    (root / "onnxruntime" / "__init__.py").write_text("")
    (root / "onnxruntime" / "__main__.py").write_text(
        "import os, sys\n"
        "from edgeq_targets.common.util import GREETING\n"
        "print(GREETING, os.environ['EDGEQ_ARTIFACT_DIR'], *sys.argv[1:])\n"
    )
    (root / "mlx" / "__main__.py").write_text("print('mlx')\n")
    return root


def make_folder(path: Path, targets: Path) -> Path:
    """An onnxruntime artifact folder with its manifest."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}\n')
    (path / "model.onnx").write_bytes(b"onnx-graph" * 10)
    (path / "model.onnx.data").write_bytes(MODEL_BYTES)
    (path / "tokenizer.json").write_text('{"version": "1.0"}\n')
    copy_runner(path, "onnxruntime", targets_dir=targets)
    write_manifest(path, INFO)
    return path


@pytest.fixture
def targets(tmp_path):
    return make_targets(tmp_path / "targets")


@pytest.fixture
def folder(tmp_path, targets):
    return make_folder(tmp_path / "dist" / "tiny-rpi5", targets)


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A .tar.gz with exactly these entries (hostile ones included)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def archive_entries(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- fsutil -------------------------------------------------------------------


def test_sha256_file_streams_large_files(tmp_path):
    data = os.urandom(5 * (1 << 20) // 2)  # 2.5 MiB: crosses block boundaries
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_atomic_write_text_replaces_and_keeps_mode(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write_text(path, "one\n")
    assert path.read_text() == "one\n"
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    atomic_write_bytes(path, b"two\n")
    assert path.read_bytes() == b"two\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert leftovers(tmp_path) == []


def test_atomic_write_disk_full_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("edgeq.fsutil.os.fsync", full)
    path = tmp_path / "plan.json"
    with pytest.raises(ArtifactError) as e:
        atomic_write_text(path, "x" * 1000)
    assert str(e.value) == f"disk full while writing {path}: free space and retry"
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_success(tmp_path):
    final = tmp_path / "dist" / "x"
    with atomic_output_dir(final, force=False) as tmp:
        assert tmp == final.with_name(f".x.tmp-{os.getpid()}")
        (tmp / "a.txt").write_text("a")
    assert (final / "a.txt").read_text() == "a"
    assert leftovers(final.parent) == []


def test_atomic_output_dir_body_raises_leaves_nothing(tmp_path):
    final = tmp_path / "x"
    with pytest.raises(RuntimeError), atomic_output_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("quantizer failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_without_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dist/x").mkdir(parents=True)
    with pytest.raises(ArtifactError) as e, atomic_output_dir(Path("dist/x")):
        pass
    assert str(e.value) == (
        "output 'dist/x' already exists; pass --force to replace it "
        "or choose another --out"
    )


def test_atomic_output_dir_force_replaces(tmp_path):
    final = tmp_path / "x"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_output_dir(final, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_output_dir_force_failure_keeps_old(tmp_path):
    final = tmp_path / "x"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_output_dir(final, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_output_dir_disk_full(tmp_path):
    final = tmp_path / "x"
    with pytest.raises(ArtifactError) as e, atomic_output_dir(final) as tmp:
        (tmp / "part.bin").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == f"disk full while writing {final}: free space and retry"
    assert list(tmp_path.iterdir()) == []


# -- manifest and runner -------------------------------------------------------


def test_manifest_lists_every_file(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    expected_files = [
        "config.json",
        "model.onnx",
        "model.onnx.data",
        "runner/edgeq_targets/__init__.py",
        "runner/edgeq_targets/common/__init__.py",
        "runner/edgeq_targets/common/util.py",
        "runner/edgeq_targets/onnxruntime/__init__.py",
        "runner/edgeq_targets/onnxruntime/__main__.py",
        "runner/run.py",
        "tokenizer.json",
    ]
    assert list(manifest["files"]) == expected_files
    data = manifest["files"]["model.onnx.data"]
    assert data == {"sha256": hashlib.sha256(MODEL_BYTES).hexdigest(), "size": 10240}
    assert manifest["artifact_id"] == compute_artifact_id(manifest["files"])
    assert len(manifest["artifact_id"]) == 16
    assert manifest["format_version"] == 1
    assert manifest["edgeq_version"] == __version__
    assert manifest["runtime"] == INFO["runtime"]
    assert manifest["measured"] == {"decode_tokens_per_s": 12.5}


def test_manifest_is_deterministic_json(folder):
    text = (folder / "manifest.json").read_text()
    again = write_manifest(folder, json.loads(text))  # recomputed keys replaced
    assert (folder / "manifest.json").read_text() == text
    assert text == json.dumps(again, sort_keys=True, indent=2) + "\n"


def test_artifact_id_is_sha256_of_sorted_paths_and_digests():
    files = {"b": {"sha256": "2" * 64, "size": 1}, "a": {"sha256": "1" * 64, "size": 1}}
    lines = f"a\0{'1' * 64}\nb\0{'2' * 64}\n".encode()
    assert compute_artifact_id(files) == hashlib.sha256(lines).hexdigest()[:16]


def test_write_manifest_refuses_symlinks(folder):
    (folder / "tokenizer.model").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError) as e:
        write_manifest(folder, INFO)
    assert str(e.value) == (
        f"artifact {folder}: 'tokenizer.model' is a symbolic link; artifacts hold "
        "real files only: copy the file in place of the link"
    )


def test_write_manifest_drops_bytecode_from_a_smoke_run(folder):
    cache = folder / "runner" / "edgeq_targets" / "common" / "__pycache__"
    cache.mkdir()
    (cache / "util.cpython-311.pyc").write_bytes(b"\x00" * 16)
    manifest = write_manifest(folder, INFO)
    assert not cache.exists()
    assert not any("__pycache__" in rel for rel in manifest["files"])


def test_runner_runs_without_edgeq(folder):
    # -I: isolated mode ignores PYTHONPATH and user site; -S: no site-packages,
    # so neither edgeq nor the repo's edgeq_targets can be imported.
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(folder / "runner" / "run.py"), "--hi"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert done.stdout == f"hello from common {folder.resolve()} --hi\n"
    assert not list(folder.rglob("__pycache__"))
    verify(folder)  # running it left nothing behind


def test_copy_runner_from_the_repo(tmp_path):
    written = copy_runner(tmp_path, "onnxruntime")
    rel = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"runner/run.py", "runner/edgeq_targets/__init__.py"} <= rel
    assert "runner/edgeq_targets/onnxruntime/__init__.py" in rel
    assert not any("__pycache__" in r or "/mlx/" in r for r in rel)


def test_copy_runner_unknown_target(tmp_path, targets):
    with pytest.raises(ArtifactError) as e:
        copy_runner(tmp_path, "tensorrt", targets_dir=targets)
    assert str(e.value) == (
        f"no runner for target 'tensorrt' in {targets}: "
        "check --target or reinstall edgeq"
    )


# -- pack: reproducible archives -------------------------------------------------


def test_pack_is_byte_reproducible(tmp_path, folder, targets):
    first = pack(folder, tmp_path / "a.tar.gz").read_bytes()
    second = pack(folder, tmp_path / "b.tar.gz").read_bytes()
    assert first == second

    # Rebuilt elsewhere, later, with other file times: same bytes.
    other = make_folder(tmp_path / "elsewhere" / "tiny-rpi5", targets)
    for path in other.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    third = pack(other, tmp_path / "c.tar.gz").read_bytes()
    assert third == first


def test_pack_fixes_times_owners_and_names(tmp_path, folder):
    path = pack(folder, tmp_path / "tiny.tar.gz")
    raw = path.read_bytes()
    assert raw[3] == 0  # gzip FLG: no file name, no comment, no extra
    assert raw[4:8] == b"\0\0\0\0"  # gzip MTIME
    members = [m for m, _ in archive_entries(path)]
    names = [m.name for m in members]
    assert names[:3] == [
        "tiny-rpi5",
        "tiny-rpi5/runner",
        "tiny-rpi5/runner/edgeq_targets",
    ]
    assert "tiny-rpi5/manifest.json" in names
    assert len(names) == len(set(names))
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.pax_headers == {}


def test_pack_refuses_a_folder_that_fails_verify(tmp_path, folder):
    (folder / "notes.txt").write_text("added later")
    with pytest.raises(ArtifactError):
        pack(folder, tmp_path / "tiny.tar.gz")
    assert not (tmp_path / "tiny.tar.gz").exists()


def test_pack_disk_full_leaves_nothing(tmp_path, folder, monkeypatch):
    real_addfile = tarfile.TarFile.addfile
    calls = []

    def addfile(self, info, fileobj=None):
        calls.append(info.name)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArtifactError) as e:
        pack(folder, out / "tiny.tar.gz")
    assert str(e.value) == (
        f"disk full while writing {out / 'tiny.tar.gz'}: free space and retry"
    )
    assert list(out.iterdir()) == []


# -- verify --------------------------------------------------------------------


def test_verify_folder_and_archive(tmp_path, folder):
    manifest = verify(folder)
    assert manifest["artifact_id"] == load_manifest(folder)["artifact_id"]
    archive = pack(folder, tmp_path / "tiny.tar.gz")
    assert verify(archive) == manifest
    assert load_manifest(archive) == manifest


def test_verify_catches_flipped_byte(folder):
    path = folder / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01
    path.write_bytes(bytes(data))
    want = hashlib.sha256(MODEL_BYTES).hexdigest()
    got = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: file 'model.onnx.data' sha256 mismatch (expected "
        f"{want[:12]}.., got {got[:12]}..): the file was changed or corrupted in "
        "transit; rebuild or re-copy it"
    )


def test_verify_catches_missing_file(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: file 'tokenizer.json' is missing: the copy is "
        "incomplete; re-copy the artifact or rebuild it"
    )


def test_verify_catches_truncated_file(folder):
    (folder / "model.onnx.data").write_bytes(MODEL_BYTES[:-300])
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: file 'model.onnx.data' has 9940 bytes, expected "
        "10240: it was truncated or changed in transit; rebuild or re-copy it"
    )


def test_verify_catches_extra_files(folder):
    (folder / "model.safetensors").write_bytes(b"stray")
    (folder / "runner" / "evil.py").write_text("")
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: file 'model.safetensors' (and 1 more) is not listed "
        "in manifest.json: something added it after the build; remove it or "
        "rebuild"
    )


def test_verify_catches_edited_artifact_id(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifact_id"] = "0123456789abcdef"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: artifact_id 0123456789abcdef does not match the files "
        "manifest.json lists: the manifest was edited; rebuild the artifact"
    )


def test_verify_missing_or_broken_manifest(folder):
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: manifest.json is missing: this is not an edgeq "
        "artifact, or it was copied incompletely; rebuild or re-copy it"
    )
    (folder / "manifest.json").write_text('{"files": ')  # cut in transit
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: manifest.json is not valid JSON (Expecting value: "
        "line 1 column 11 (char 10)): it was damaged in transit; rebuild or "
        "re-copy the artifact"
    )


def test_verify_newer_format_version(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: manifest.json has format_version 2 but this edgeq "
        f"{__version__} reads format 1: use the edgeq version that built it, or "
        "rebuild"
    )


def test_verify_refuses_unsafe_manifest_paths(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        verify(folder)
    assert str(e.value) == (
        f"artifact {folder}: manifest.json lists an unsafe path '../../etc/passwd'; "
        "refusing the artifact: rebuild it"
    )


def test_verify_missing_path(tmp_path):
    with pytest.raises(ArtifactError) as e:
        verify(tmp_path / "nope")
    assert (
        str(e.value) == f"artifact {tmp_path / 'nope'} does not exist: check the path"
    )


def test_verify_archive_with_changed_member(tmp_path, folder):
    good = pack(folder, tmp_path / "good.tar.gz")
    entries = []
    for info, data in archive_entries(good):
        if info.name.endswith("model.onnx.data"):
            data = data[:100] + b"\xff" + data[101:]
        entries.append((info, data))
    bad = write_tar(tmp_path / "bad.tar.gz", entries)
    with pytest.raises(ArtifactError) as e:
        verify(bad)
    assert str(e.value).startswith(
        f"artifact {bad}: file 'model.onnx.data' sha256 mismatch (expected "
        f"{hashlib.sha256(MODEL_BYTES).hexdigest()[:12]}.., got "
    )


def test_verify_truncated_archive(tmp_path, folder):
    good = pack(folder, tmp_path / "good.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError) as e:
        verify(cut)
    message = str(e.value)
    assert message.startswith(f"archive {cut} is truncated or corrupt (")
    assert message.endswith("): re-copy it, or pack it again")
    assert "\n" not in message


def test_verify_not_an_archive(tmp_path):
    path = tmp_path / "model.tar.gz"
    path.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ArtifactError) as e:
        verify(path)
    assert str(e.value) == (
        f"archive {path} is truncated or corrupt (not a gzip file): "
        "re-copy it, or pack it again"
    )


# -- safe_extract: hostile archives ------------------------------------------------


HOSTILE = {
    "absolute": (
        entry("/abs/evil", b"x"),
        "entry '/abs/evil' has an absolute or non-POSIX path",
    ),
    "dotdot": (
        entry("x/../../x", b"x"),
        "entry 'x/../../x' escapes the artifact folder with '..'",
    ),
    "symlink": (
        entry("x/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        "entry 'x/passwd' is a symbolic link to '/etc/passwd'",
    ),
    "hardlink": (
        entry("x/shadow", kind=tarfile.LNKTYPE, link="/etc/shadow"),
        "entry 'x/shadow' is a hard link to '/etc/shadow'",
    ),
    "device": (
        entry("x/null", kind=tarfile.CHRTYPE),
        "entry 'x/null' is a device file or FIFO",
    ),
    "outside top": (
        entry("y/config.json", b"{}"),
        "entry 'y/config.json' lies outside the archive's top folder 'x'",
    ),
    "twice": (
        entry("x/config.json", b"{}"),
        "entry 'x/config.json' appears twice",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_safe_extract_refuses(tmp_path, case):
    bad_entry, problem = HOSTILE[case]
    entries = [entry("x", kind=tarfile.DIRTYPE), entry("x/config.json", b"{}")]
    archive = write_tar(tmp_path / "bad.tar.gz", [*entries, bad_entry])
    dest = tmp_path / "out" / "x"
    with pytest.raises(ArtifactError) as e:
        safe_extract(archive, dest)
    assert str(e.value) == (
        f"archive {archive}: {problem}; refusing to extract it: the archive was "
        "not made by edgeq or was tampered with"
    )
    assert list((tmp_path / "out").iterdir()) == []
    assert not Path("/abs").exists()


def test_safe_extract_good_archive(tmp_path, folder):
    archive = pack(folder, tmp_path / "tiny.tar.gz")
    dest = safe_extract(archive, tmp_path / "out" / "tiny")
    assert verify(dest) == load_manifest(folder)
    assert (dest / "model.onnx.data").read_bytes() == MODEL_BYTES
    assert (dest / "model.onnx.data").stat().st_mode & 0o777 == 0o644
    with pytest.raises(ArtifactError):
        safe_extract(archive, dest)  # exists, no force
    assert safe_extract(archive, dest, force=True) == dest


def test_safe_extract_truncated_archive_leaves_nothing(tmp_path, folder):
    good = pack(folder, tmp_path / "good.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good[: len(good) * 3 // 4])
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as e:
        safe_extract(cut, out / "tiny")
    assert str(e.value).startswith(f"archive {cut} is truncated or corrupt (")
    assert list(out.iterdir()) == []


# -- install ---------------------------------------------------------------------


def test_install(tmp_path, folder):
    archive = pack(folder, tmp_path / "tiny.tar.gz")
    artifact_id = load_manifest(folder)["artifact_id"]
    dest = install(archive, tmp_path / "models", device_facts=PI5_FACTS)
    assert dest == tmp_path / "models" / artifact_id
    assert verify(dest)["artifact_id"] == artifact_id
    assert install(archive, tmp_path / "models", device_facts=PI5_FACTS) == dest


def test_install_refuses_a_device_that_cannot_run_it(tmp_path, folder):
    archive = pack(folder, tmp_path / "tiny.tar.gz")
    pi_32bit = {**PI5_FACTS, "arch": "armv7l", "userland_bits": 32}
    with pytest.raises(ArtifactError) as e:
        install(archive, tmp_path / "models", device_facts=pi_32bit)
    assert str(e.value) == (
        f"artifact {archive} cannot run on this device: onnxruntime publishes no "
        "armv7l wheels for Python 3.11; use a 64-bit OS"
    )
    assert not (tmp_path / "models").exists()


def test_install_over_a_damaged_copy_needs_force(tmp_path, folder):
    archive = pack(folder, tmp_path / "tiny.tar.gz")
    dest = install(archive, tmp_path / "models", device_facts=PI5_FACTS)
    (dest / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError) as e:
        install(archive, tmp_path / "models", device_facts=PI5_FACTS)
    assert str(e.value).startswith(f"'{dest}' already exists but does not verify (")
    assert str(e.value).endswith("); pass --force to replace it")
    install(archive, tmp_path / "models", force=True, device_facts=PI5_FACTS)
    assert verify(dest)


def test_install_damaged_archive_leaves_nothing(tmp_path, folder):
    good = pack(folder, tmp_path / "good.tar.gz")
    entries = []
    for info, data in archive_entries(good):
        if info.name.endswith("tokenizer.json"):
            data = data.replace(b"1.0", b"2.0")
        entries.append((info, data))
    bad = write_tar(tmp_path / "bad.tar.gz", entries)
    with pytest.raises(ArtifactError) as e:
        install(bad, tmp_path / "models", device_facts=PI5_FACTS)
    assert "file 'tokenizer.json' sha256 mismatch" in str(e.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_install_disk_full_leaves_nothing(tmp_path, folder, monkeypatch):
    archive = pack(folder, tmp_path / "tiny.tar.gz")

    def full(tar, member):
        yield b"partial"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "_stream", full)
    models = tmp_path / "models"
    with pytest.raises(ArtifactError) as e:
        install(archive, models, device_facts=PI5_FACTS)
    dest = models / load_manifest(archive)["artifact_id"]
    assert str(e.value) == f"disk full while writing {dest}: free space and retry"
    assert list(models.iterdir()) == []


# -- CLI -------------------------------------------------------------------------


def test_cli_verify(folder):
    manifest = load_manifest(folder)
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0, result.output
    assert (
        result.stdout
        == f"OK {folder}: artifact {manifest['artifact_id']}, 10 files, 11.2 KB\n"
    )

    result = CliRunner().invoke(app, ["verify", str(folder), "--json"])
    total = sum(e["size"] for e in manifest["files"].values())
    assert json.loads(result.stdout) == {
        "ok": True,
        "path": str(folder),
        "artifact_id": manifest["artifact_id"],
        "target": "onnxruntime",
        "files": 10,
        "total_bytes": total,
    }


def test_cli_verify_failure_is_one_line(folder):
    (folder / "config.json").unlink()
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: artifact {folder}: file 'config.json' is missing: the copy is "
        "incomplete; re-copy the artifact or rebuild it\n"
    )


def test_cli_verify_json_failure(folder):
    (folder / "config.json").unlink()
    result = CliRunner().invoke(app, ["verify", str(folder), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "ok": False,
        "path": str(folder),
        "error": f"artifact {folder}: file 'config.json' is missing: the copy is "
        "incomplete; re-copy the artifact or rebuild it",
    }


def test_cli_install_on_this_machine(tmp_path, targets):
    # An artifact whose runtime is this machine's, so the real pre-flight and
    # import smoke test pass.
    info = {**INFO, "runtime": {**INFO["runtime"], "isa": []}}
    info["runtime"]["arch"] = platform.machine().lower()
    info["runtime"]["onnx"] = {"opset": 17, "ir_version": 8}
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "model.onnx").write_bytes(b"graph")
    copy_runner(path, "onnxruntime", targets_dir=targets)
    manifest = write_manifest(path, info)
    archive = pack(path, tmp_path / "tiny.tar.gz")

    result = CliRunner().invoke(
        app, ["install", str(archive), "--to", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'm' / manifest['artifact_id']}\n"
