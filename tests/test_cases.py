"""The shared failure cases C01-C12 (../shared/cases/README.md), each built
from random weights as the case describes and run through the public
interface: `edgeq` commands, open_model, make_plan, artifact.install.

The ONNX graph-level halves of C05-C09 and C12 live in test_onnx_cases.py,
the profiler arithmetic of C11 and C12 in test_profile.py; the tests here
cover what the cases ask of loaders, planner, deploy and artifacts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import (
    MAC,
    PI,
    assert_nothing_written,
    assert_one_line_error,
    deploy_args,
    flip_byte,
    leftovers,
)
from helpers_models import (
    edit_config,
    random_tensors,
    save_safetensors,
    tiny_config,
    write_gguf_model,
    write_hf_model,
)
from typer.testing import CliRunner

from edgeq.cli import app
from edgeq.errors import ArtifactError, ModelError

# Raspberry Pi 5 facts as `edgeq install` gathers them on the device.
PI5_FACTS = {
    "arch": "aarch64", "userland_bits": 64, "python": "3.11.2",
    "libc": "glibc 2.36", "packages": {},
    "cpu_flags": ["fp", "asimd", "evtstrm", "aes", "crc32", "asimddp", "asimdhp"],
}  # fmt: skip


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_USER_DEVICES", str(tmp_path / "user-devices.toml"))
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))


def deploy_ok(*argv) -> None:
    result = CliRunner().invoke(app, list(argv))
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


def mlx_lm_generates(folder: Path) -> str:
    """Load with mlx-lm itself, unpatched, and generate a few tokens."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(folder))
    return mlx_lm.generate(model, tokenizer, "hello", max_tokens=3)


def safetensors_keys(folder: Path) -> dict[str, set[str]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            out[f.name] = set(st.keys())
    return out


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    """A tiny qwen2 artifact for a Raspberry Pi 5 (onnxruntime), with archive."""
    root = tmp_path_factory.mktemp("c-artifact")
    m = write_hf_model(root / "m", "qwen2")
    out = root / "dist/qwen2-pi"
    args = deploy_args(m, out, PI)
    args.remove("--no-archive")
    deploy_ok(*args)
    return out


# -- C01 tied embeddings: config and checkpoint disagree ---------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_c01a_identical_copy_is_dropped_with_a_note(arch, tmp_path, caplog):
    from edgeq.models import open_model

    m = write_hf_model(tmp_path / "m", arch, tie_word_embeddings=True, lm_head="copy")
    with caplog.at_level("INFO", logger="edgeq.models.source"):
        src = open_model(str(m))
    assert "lm_head.weight" not in src.tensor_names()
    assert src.config.tie_word_embeddings is True
    assert "dropped lm_head.weight: an identical copy of the tied embedding" in (
        caplog.text
    )


def test_c01a_different_head_fails_before_work_and_untie_builds(tmp_path):
    m = write_hf_model(tmp_path / "m", "qwen2", tie_word_embeddings=True,
                       lm_head="different")  # fmt: skip
    out = tmp_path / "dist/out"
    result = CliRunner().invoke(app, deploy_args(m, out))
    assert_one_line_error(
        result,
        f"{m}: config says tie_word_embeddings is true but 'lm_head.weight' "
        "differs from 'model.embed_tokens.weight'; pass --untie-embeddings to "
        "keep both, or fix config.json",
    )
    assert "build" not in result.stderr  # refused before any work
    assert_nothing_written(out)

    deploy_ok(*deploy_args(m, out, MAC, "--untie-embeddings"))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    stored = set().union(*safetensors_keys(out).values())
    assert "lm_head.weight" in stored and "lm_head.scales" in stored
    assert mlx_lm_generates(out)


def test_c01b_missing_head_fails_before_work_and_tie_builds(tmp_path):
    # tie_word_embeddings absent: Llama's default (untied) expects lm_head.
    m = write_hf_model(tmp_path / "m", "llama", tie_word_embeddings=None,
                       lm_head="absent")  # fmt: skip
    out = tmp_path / "dist/out"
    result = CliRunner().invoke(app, deploy_args(m, out))
    assert_one_line_error(
        result,
        f"{m}: config says tie_word_embeddings is false but the checkpoint has "
        "no 'lm_head.weight'; pass --tie-embeddings to reuse "
        "model.embed_tokens.weight as the output head, or fix the checkpoint",
    )
    assert "build" not in result.stderr
    assert_nothing_written(out)

    deploy_ok(*deploy_args(m, out, MAC, "--tie-embeddings"))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert not any(
        k.startswith("lm_head") for k in set().union(*safetensors_keys(out).values())
    )
    assert mlx_lm_generates(out)


def test_c01_gguf_without_output_matrix_is_tied(tmp_path):
    """GGUF has no config flag: a missing output.weight means tied."""
    from edgeq.models import open_model

    src = open_model(str(write_gguf_model(tmp_path / "t.gguf", tie=True)))
    assert src.config.tie_word_embeddings is True
    assert "lm_head.weight" not in src.tensor_names()


# -- C02 shard index and shard files disagree ---------------------------------


def test_c02a_index_names_a_missing_shard(tmp_path):
    from edgeq.models import open_model

    m = write_hf_model(tmp_path / "m", shards=2)
    (m / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError) as e:
        open_model(str(m))
    assert str(e.value) == (
        f"{m}/model.safetensors.index.json: names shard(s) "
        f"model-00002-of-00002.safetensors that are not in {m}; the download may "
        "be incomplete"
    )


def test_c02b_stray_file_of_other_shapes_is_not_read(tmp_path, caplog):
    m = write_hf_model(tmp_path / "m", shards=2, seed=3)
    other = random_tensors(tiny_config(hidden_size=32, head_dim=8), seed=9)
    save_safetensors(m / "model.safetensors", other)
    out = tmp_path / "dist/out"
    with caplog.at_level("WARNING"):
        deploy_ok(*deploy_args(m, out))
    assert "ignoring model.safetensors beside the shards" in caplog.text
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


def test_c02c_index_maps_a_tensor_to_a_shard_that_lacks_it(tmp_path):
    from edgeq.models import open_model

    m = write_hf_model(tmp_path / "m", shards=2)
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    wm = data["weight_map"]
    moved = [n for n, f in wm.items() if f.startswith("model-00001")][:3]
    for n in moved:
        wm[n] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError) as e:
        open_model(str(m))
    assert str(e.value) == (
        f"{index}: maps '{min(moved)}' to model-00002-of-00002.safetensors, "
        "which does not contain it (nor 2 more); the download may be incomplete "
        "or the index is stale"
    )


def test_c02d_output_index_matches_the_files_written(tmp_path, monkeypatch):
    from edgeq.backends import mlx_backend

    # Force several output shards from a tiny model: the same path as 2 GB.
    monkeypatch.setattr(mlx_backend, "SHARD_BYTES", 40_000)
    m = write_hf_model(tmp_path / "m", shards=3)
    out = tmp_path / "dist/out"
    deploy_ok(*deploy_args(m, out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = safetensors_keys(out)
    assert len(files) > 1 and "model.safetensors" not in files
    assert set(index["weight_map"].values()) == set(files)
    for fname, keys in files.items():
        assert {k for k, f in index["weight_map"].items() if f == fname} == keys
    manifest = json.loads((out / "manifest.json").read_text())
    weights = {f for f in manifest["files"] if f.endswith(".safetensors")}
    assert weights == set(files)
    assert mlx_lm_generates(out)


# -- C03 not really a safetensors file ------------------------------------------


def _tiny_safetensors(path: Path) -> bytes:
    cfg = tiny_config(hidden_size=8, head_dim=4, intermediate_size=8,
                      vocab_size=8, num_hidden_layers=1)  # fmt: skip
    save_safetensors(path, random_tensors(cfg, dtype=np.float32))
    return path.read_bytes()


def test_c03b_every_truncation_point_of_safetensors_is_named(tmp_path):
    """Not only the last 300 bytes: every cut of a small file is caught."""
    from edgeq.models.safetensors_io import SafetensorsFile

    p = tmp_path / "model.safetensors"
    whole = _tiny_safetensors(p)
    for cut in range(len(whole)):
        p.write_bytes(whole[:cut])
        with pytest.raises(ModelError, match="truncated|not a safetensors|corrupt"):
            SafetensorsFile(p)


def test_c03b_every_truncation_point_of_gguf_is_named(tmp_path):
    from edgeq.models.gguf_file import GGUFModel

    p = tmp_path / "m.gguf"
    whole = write_gguf_model(p, hidden=8, heads=2, ffn=8, vocab=8).read_bytes()
    # Every byte of the header, then every 97th of the tensor data.
    cuts = [*range(2048), *range(2048, len(whole), 97)]
    for cut in cuts:
        p.write_bytes(whole[:cut])
        with pytest.raises(ModelError):
            GGUFModel(p)


@pytest.mark.parametrize("kind", ["lfs", "pickle"])
def test_c03ac_says_what_the_file_really_is(kind, tmp_path):
    import pickle

    from edgeq.models.safetensors_io import SafetensorsFile

    p = tmp_path / "model.safetensors"
    if kind == "lfs":
        p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
        what = "is a git-lfs pointer"
    else:
        p.write_bytes(pickle.dumps(np.zeros(3), protocol=2))
        what = "is a Python pickle, not safetensors"
    with pytest.raises(ModelError, match=re.escape(f"{p} {what}")):
        SafetensorsFile(p)


def test_c03d_a_flipped_byte_in_any_file_is_caught_before_loading(
    onnx_artifact, tmp_path
):
    """Each file the manifest lists, one byte flipped: verify names it."""
    from edgeq import artifact

    manifest = json.loads((onnx_artifact / "manifest.json").read_text())
    for rel in sorted(manifest["files"]):
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(onnx_artifact, copy)
        if (copy / rel).stat().st_size:
            flip_byte(copy / rel)
            problem = "sha256 mismatch"
        else:  # an empty __init__.py: any change is a change of size
            (copy / rel).write_bytes(b"\0")
            problem = "has 1 bytes, expected 0"
        with pytest.raises(ArtifactError, match=re.escape(f"file '{rel}' {problem}")):
            artifact.verify(copy)


def test_c03d_a_tampered_archive_is_not_installed(onnx_artifact, tmp_path):
    import gzip
    import io
    import tarfile

    from edgeq import artifact

    src = Path(str(onnx_artifact) + ".tar.gz")
    members = []
    with tarfile.open(src, "r:gz") as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("model.onnx.data"):
                data = bytes([data[0] ^ 1]) + data[1:]
            members.append((m, data))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    with pytest.raises(ArtifactError, match="model.onnx.data' sha256 mismatch"):
        artifact.install(bad, tmp_path / "models", device_facts=PI5_FACTS)
    assert not (tmp_path / "models").exists() or not any(
        (tmp_path / "models").iterdir()
    )


# -- C04 shapes the group size does not divide -------------------------------


def _plan_for(tmp_path, **overrides):
    from edgeq.devices import get_device
    from edgeq.models import open_model
    from edgeq.planner import PlanRequest, make_plan

    src = open_model(str(write_hf_model(tmp_path / "m", **overrides)))
    return src, make_plan(src, get_device(MAC), PlanRequest("mlx", group_size=64))


C04_SHAPES = {
    "hidden96-ffn176": {"hidden_size": 96, "head_dim": 24, "intermediate_size": 176},
    "gqa-8x56-2kv": {"hidden_size": 448, "num_attention_heads": 8, "head_dim": 56,
                     "num_key_value_heads": 2, "intermediate_size": 176},
    "mqa-1kv": {"hidden_size": 448, "num_attention_heads": 8, "head_dim": 56,
                "num_key_value_heads": 1, "intermediate_size": 176},
}  # fmt: skip


@pytest.mark.parametrize("shape", list(C04_SHAPES))
def test_c04_planner_falls_back_per_tensor_and_says_so(shape, tmp_path):
    _src, plan = _plan_for(tmp_path, **C04_SHAPES[shape])
    for t in plan.tensors:
        if len(t.shape) != 2:
            continue
        cols = t.shape[1]
        if cols % 64 == 0:
            assert (t.bits, t.group_size) == (4, 64), t
        elif cols % 32 == 0:
            assert (t.bits, t.group_size, t.reason) == (4, 32, "shape-fallback"), t
            assert str(cols) in t.note
        else:  # 176 fits no group: kept in 16-bit, with its size cost
            assert (t.bits, t.reason) == (16, "shape-fallback"), t
            assert re.search(r"\+\d+\.\d+ MB", t.note), t.note
    # The embedding table, the biggest matrix, is never silently left float.
    emb = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert emb.bits == 4


def test_c04_the_fallback_plan_builds_and_loads_as_planned(tmp_path):
    from edgeq.backends import mlx_backend

    m = write_hf_model(tmp_path / "m", **C04_SHAPES["gqa-8x56-2kv"])
    out = tmp_path / "dist/out"
    deploy_ok(*deploy_args(m, out, MAC, "--group-size", "64"))
    manifest = json.loads((out / "manifest.json").read_text())
    planned = {
        t["name"]: (t["bits"], t["group_size"] if t["bits"] < 16 else None)
        for t in manifest["plan"]["tensors"]
    }
    assert mlx_backend.read_back(out) == planned
    assert mlx_lm_generates(out)


# -- C05 ONNX models over 2 GB ------------------------------------------------


def test_c05_external_data_is_listed_and_the_artifact_moves(onnx_artifact, tmp_path):
    manifest = json.loads((onnx_artifact / "manifest.json").read_text())
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"])
    assert (onnx_artifact / "model.onnx").stat().st_size < (
        onnx_artifact / "model.onnx.data"
    ).stat().st_size
    moved = tmp_path / "elsewhere/qwen2"
    shutil.copytree(onnx_artifact, moved)
    result = CliRunner().invoke(
        app, ["run", str(moved), "-p", "hi", "--max-tokens", "2", "--no-chat"]
    )
    assert result.exit_code == 0, result.stderr
    assert "generation: 2 tokens" in result.stderr


# -- C06 quantized fine, will not load ----------------------------------------


def test_c06_an_unloadable_model_is_never_packaged(tmp_path, monkeypatch):
    from edgeq.backends import onnx_backend

    real = onnx_backend.build

    def build_then_break(source, plan, out, **kw):
        files = real(source, plan, out, **kw)
        model = Path(out) / "model.onnx"
        model.write_bytes(model.read_bytes()[:200])  # what a bad graph amounts to
        return files

    monkeypatch.setattr(onnx_backend, "build", build_then_break)
    m = write_hf_model(tmp_path / "m")
    out = tmp_path / "dist/out"
    args = deploy_args(m, out, PI)
    args.remove("--no-archive")
    result = CliRunner().invoke(app, args)
    assert_one_line_error(
        result,
        re.compile(
            re.escape(f"{out.parent}/.out.tmp-")
            + r"\d+/model\.onnx: ONNX Runtime cannot load it: .+"
        ),
    )
    assert_nothing_written(out)


# -- C07 INT8 depends on the CPU -------------------------------------------------


def test_c07_the_device_isa_picks_the_int8_settings(tmp_path):
    """The manifest records the device's ISA and the INT8 settings chosen
    for it; without VNNI (u8 x s8 sums saturate) weights use reduce_range,
    and the figures measured here are marked unverified for that ISA."""
    from types import SimpleNamespace

    from edgeq.backends.onnx_backend import runtime_requirements
    from edgeq.devices import get_device

    Path(tmp_path / "user-devices.toml").write_text(
        '[x86-avx2-box]\ndescription = "x86 without VNNI"\nram_gb = 8\n'
        'usable_fraction = 0.75\nbandwidth_gbs = 25\narch = "x86_64"\n'
        'isa = ["avx2"]\ncores = 4\nos = "linux"\ntarget = "onnxruntime"\n'
    )
    m = write_hf_model(tmp_path / "m")
    out = tmp_path / "dist/out"
    deploy_ok(*deploy_args(m, out, "x86-avx2-box"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"]["name"] == "x86-avx2-box"
    runtime = manifest["runtime"]
    assert runtime["isa"] == ["avx2"]
    assert runtime["int8"]["reduce_range"] is True
    assert "unverified" in runtime["int8"]["isa_note"]

    # With VNNI, or on ARM, the full 8-bit range is safe.
    no_tensors = SimpleNamespace(tensors=[])
    for name in ("x86-server-avx512-vnni", "intel-n100-16gb", "rpi4-4gb"):
        req = runtime_requirements(no_tensors, get_device(name))
        assert req["int8"]["reduce_range"] is False, name


# -- C08 INT8 ruins a decoder: the gate blocks packaging ----------------------


def test_c08_a_failing_quality_gate_packages_nothing(tmp_path):
    cfg = tiny_config("llama")
    tensors = random_tensors(cfg, seed=4)
    for i in range(cfg["num_hidden_layers"]):
        norm = tensors[f"model.layers.{i}.input_layernorm.weight"]
        norm[[3, 17, 40]] *= 50  # the case's outlier channels
    m = write_hf_model(tmp_path / "m", tensors=tensors)
    out = tmp_path / "dist/out"
    args = [a for a in deploy_args(m, out, PI, "--bits", "4")
            if a not in ("--no-quality-gate", "--no-archive")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--max-ppl-increase", "0"])
    assert_one_line_error(
        result,
        re.compile(
            r"quality gate: perplexity rose .+ top-1 agreement \d+\.\d%, KL "
            r"\d+\.\d+ nats\), more than the 0% the onnxruntime target allows; .+"
        ),
    )
    assert_nothing_written(out)


# -- C09 / C10 the device's runtime cannot take it -------------------------------


def test_c09_manifest_states_the_lowest_opset_and_old_runtimes_are_refused(
    onnx_artifact, tmp_path
):
    """The builder uses opset 14 / IR 8, which every onnxruntime edgeq knows
    reads; a model from a newer toolchain (opset 21, IR 10) is refused on a
    device with onnxruntime 1.16, with needed vs supported versions."""
    from edgeq import artifact

    runtime = json.loads((onnx_artifact / "manifest.json").read_text())["runtime"]
    assert runtime["onnx"]["opset"] == 14 and runtime["onnx"]["ir_version"] == 8

    newer = tmp_path / "newer"
    shutil.copytree(onnx_artifact, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["runtime"]["onnx"] = {"opset": 21, "ir_version": 10}
    manifest["runtime"]["packages"]["onnxruntime"] = ">=1.14"
    artifact.write_manifest(newer, manifest)
    archive = artifact.pack(newer, tmp_path / "newer.tar.gz")
    old = {**PI5_FACTS, "packages": {"onnxruntime": "1.16.3"}}
    with pytest.raises(ArtifactError) as e:
        artifact.install(archive, tmp_path / "models", device_facts=old)
    assert re.search(
        r"model needs ONNX opset 21 and IR version 10; onnxruntime 1\.16\.3 on "
        r"the device supports up to opset \d+ and IR \d+: upgrade onnxruntime to "
        r">= [\d.]+",
        str(e.value),
    ), e.value
    assert not (tmp_path / "models").exists() or not any(
        (tmp_path / "models").iterdir()
    )


C10_DEVICES = {
    "a-armv7l-py311": ({"arch": "armv7l", "userland_bits": 32},
                       "no armv7l wheels for Python 3.11"),
    "b-32bit-userland": ({"userland_bits": 32}, "32-bit user space"),
    "c-a72-no-dotprod-ort121": (
        {"cpu_flags": ["fp", "asimd", "evtstrm", "crc32", "cpuid"],
         "packages": {"onnxruntime": "1.21.0"}},
        "crashes with an illegal instruction",
    ),
    "d-py313": ({"python": "3.13.1"}, "3.13"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(C10_DEVICES))
def test_c10_install_preflight_refuses_with_the_reason(name, onnx_artifact, tmp_path):
    from edgeq import artifact

    changes, reason = C10_DEVICES[name]
    archive = Path(str(onnx_artifact) + ".tar.gz")
    if name.startswith("d-"):
        # (d) an artifact pinned to an onnxruntime without a 3.13 wheel.
        pinned = tmp_path / "pinned"
        shutil.copytree(onnx_artifact, pinned)
        manifest = json.loads((pinned / "manifest.json").read_text())
        manifest["runtime"]["packages"]["onnxruntime"] = "==1.19.2"
        artifact.write_manifest(pinned, manifest)
        archive = artifact.pack(pinned, tmp_path / "pinned.tar.gz")
    with pytest.raises(ArtifactError) as e:
        artifact.install(archive, tmp_path / "models",
                         device_facts={**PI5_FACTS, **changes})  # fmt: skip
    assert reason in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "models").exists() or not any(
        (tmp_path / "models").iterdir()
    )


# -- C11 / C12 profiler: warm-up, threads, memory sources ---------------------


def test_c11_c12_profile_separates_warmup_and_labels_memory(onnx_artifact):
    args = ["profile", str(onnx_artifact), "--prompt-tokens", "8", "--gen-tokens",
            "4", "--repeats", "2", "--json", "--bandwidth-gbs", "10"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    (rec,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    # C11: load and the first run apart from steady state; median and spread;
    # thread count and runtime version recorded.
    assert rec["load_s"] > 0 and rec["warmup"] is not None
    assert len(rec["samples"]) == 2
    decode = rec["summary"]["decode_tokens_per_s"]
    assert decode["min"] <= decode["median"] <= decode["max"] and decode["n"] == 2
    assert "threads" in rec["env"] and "threads" in rec["config"]
    assert rec["env"]["runtime"]["versions"]["onnxruntime"]
    # C12: each memory figure with its source and phase; KV cache included.
    mem = rec["memory"]
    assert mem["rss_source"].startswith("os: ")
    assert set(mem["peak_rss_bytes_by_phase"]) >= {"load", "runs"}
    manifest = json.loads((onnx_artifact / "manifest.json").read_text())
    assert mem["kv_cache_bytes"] == manifest["plan"]["predictions"]["kv_cache_bytes"]
    # The >1.5x-weights warning itself: test_profile.py, with controlled figures.


# -- the real executable, once -------------------------------------------------


def test_runner_inside_the_artifact_generates(onnx_artifact):
    """The artifact runs with its own runner, no edgeq import needed."""
    proc = subprocess.run(
        [sys.executable, str(onnx_artifact / "runner/run.py"), "generate", "-p",
         "hi", "--max-tokens", "2", "--no-chat"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not leftovers(onnx_artifact.parent, onnx_artifact.name)


def test_edit_config_helper_round_trips(tmp_path):
    m = write_hf_model(tmp_path / "m")
    edit_config(m, rope_theta=5e5, attention_bias=None)
    cfg = json.loads((m / "config.json").read_text())
    assert cfg["rope_theta"] == 5e5 and "attention_bias" not in cfg
