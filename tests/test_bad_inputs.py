"""Every bad input gets one `Error:` line, exit code 1, no traceback and no
half-written output (issue 8, item 1).

Each row of BAD_INPUTS builds one broken input in a temporary folder and
gives the command line to run and the exact message expected. Every row
also checks that the output folder does not exist and that no temporary
folder (`.NAME.tmp-PID`, `.NAME.old-PID`) is left beside it. A few rows
run the real `edgeq` executable too, to prove no traceback reaches a
terminal. README.md's "Bad input" table lists the same inputs and messages.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import (
    EDGEQ,
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

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 1342177280\n"
)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user devices file and no model cache from the machine leak in."""
    monkeypatch.setenv("EDGEQ_USER_DEVICES", str(tmp_path / "no-user-devices.toml"))
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))


# -- the table ---------------------------------------------------------------


@dataclass
class Bad:
    """One bad input: `make(tmp)` writes it and returns (argv, message); the
    message may be a compiled regex for parts another module words."""

    make: Callable[[Path], tuple[list[str], str | re.Pattern]]
    out: str = "dist/out"


def lfs_safetensors(tmp):
    m = write_hf_model(tmp / "m")
    (m / "model.safetensors").write_text(LFS_POINTER)
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/model.safetensors is a git-lfs pointer, not the weights; run "
        "`git lfs pull` or download the real file"
    )


def lfs_gguf(tmp):
    g = tmp / "model.gguf"
    g.write_text(LFS_POINTER)
    return deploy_args(g, tmp / "dist/out"), (
        f"{g} is a git-lfs pointer, not the weights; run `git lfs pull` or "
        "download the real file"
    )


def lfs_config(tmp):
    m = write_hf_model(tmp / "m")
    (m / "config.json").write_text(LFS_POINTER)
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/config.json is a git-lfs pointer, not the file; run `git lfs pull` "
        "or download the real file"
    )


def truncated_safetensors(tmp):
    m = write_hf_model(tmp / "m")
    p = m / "model.safetensors"
    size = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-300])
    return deploy_args(m, tmp / "dist/out"), (
        f"{p}: truncated: expected at least {size} bytes, found {size - 300}; "
        "download it again"
    )


def truncated_gguf(tmp):
    g = write_gguf_model(tmp / "model.gguf")
    size = g.stat().st_size
    g.write_bytes(g.read_bytes()[:-300])
    return deploy_args(g, tmp / "dist/out"), (
        f"{g}: truncated: tensors need {size} bytes, file has {size - 300}; "
        "download it again"
    )


def gguf_claims_2_60_tensors(tmp):
    g = write_gguf_model(tmp / "model.gguf")
    data = bytearray(g.read_bytes())
    data[8:16] = (1 << 60).to_bytes(8, "little")  # u64 tensor count
    g.write_bytes(bytes(data))
    left = len(data) - 24
    return deploy_args(g, tmp / "dist/out"), (
        f"{g}: corrupt or truncated GGUF header (the tensor count at byte 24 "
        f"claims {1 << 60} items, more than the {left} bytes left can hold); "
        "download it again"
    )


def safetensors_header_claims_2_60_bytes(tmp):
    m = write_hf_model(tmp / "m")
    p = m / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[:8] = (1 << 60).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    return deploy_args(m, tmp / "dist/out"), (
        f"{p}: not a safetensors file or truncated (header claims {1 << 60} "
        f"bytes, file has {len(data)}); download it again"
    )


def pickle_as_safetensors(tmp):
    m = write_hf_model(tmp / "m")
    p = m / "model.safetensors"
    p.write_bytes(pickle.dumps({"model.norm.weight": [1.0] * 64}, protocol=4))
    return deploy_args(m, tmp / "dist/out"), (
        f"{p} is a Python pickle, not safetensors; convert it to safetensors first"
    )


def torch_zip_as_safetensors(tmp):
    m = write_hf_model(tmp / "m")
    p = m / "model.safetensors"
    p.unlink()
    with zipfile.ZipFile(p, "w") as z:  # torch.save's format is a zip
        z.writestr("archive/data.pkl", pickle.dumps({}))
    return deploy_args(m, tmp / "dist/out"), (
        f"{p} is a zip archive (a PyTorch checkpoint?), not safetensors; "
        "convert it to safetensors first"
    )


def only_pytorch_bin(tmp):
    m = write_hf_model(tmp / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: no model.safetensors or model.safetensors.index.json (found "
        "pytorch_model.bin: convert to safetensors)"
    )


def _edit_index(m: Path, edit) -> Path:
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def index_names_missing_shard(tmp):
    m = write_hf_model(tmp / "m", shards=2)
    third = "model-00003-of-00003.safetensors"
    index = _edit_index(m, lambda wm: wm.update({"model.norm.weight": third}))
    return deploy_args(m, tmp / "dist/out"), (
        f"{index}: names shard(s) {third} that are not in {m}; the download may "
        "be incomplete"
    )


def index_points_at_wrong_shard(tmp):
    m = write_hf_model(tmp / "m", shards=2)
    first, second = (f"model-0000{i}-of-00002.safetensors" for i in (1, 2))

    def swap(wm):
        wm["model.norm.weight"] = first if wm["model.norm.weight"] == second else second

    index = _edit_index(m, swap)
    shard = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    return deploy_args(m, tmp / "dist/out"), (
        f"{index}: maps 'model.norm.weight' to {shard}, which does not contain "
        "it; the download may be incomplete or the index is stale"
    )


def index_points_outside_folder(tmp):
    m = write_hf_model(tmp / "m", shards=2)
    index = _edit_index(
        m, lambda wm: wm.update({"model.norm.weight": "../other.safetensors"})
    )
    return deploy_args(m, tmp / "dist/out"), (
        f"{index}: maps 'model.norm.weight' to '../other.safetensors', which is "
        "not a .safetensors file name in this folder; the index is corrupt"
    )


def tied_but_head_differs(tmp):
    m = write_hf_model(tmp / "m", tie_word_embeddings=True, lm_head="different")
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: config says tie_word_embeddings is true but 'lm_head.weight' "
        "differs from 'model.embed_tokens.weight'; pass --untie-embeddings to "
        "keep both, or fix config.json"
    )


def _no_head(tmp, m):
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: config says tie_word_embeddings is false but the checkpoint has no "
        "'lm_head.weight'; pass --tie-embeddings to reuse "
        "model.embed_tokens.weight as the output head, or fix the checkpoint"
    )


def untied_but_no_head(tmp):
    m = write_hf_model(tmp / "m", "qwen2", tie_word_embeddings=False, lm_head="absent")
    return _no_head(tmp, m)


def tie_key_missing_and_no_head(tmp):
    # Llama's default is untied, so a missing key means "expects lm_head".
    m = write_hf_model(tmp / "m", tie_word_embeddings=None, lm_head="absent")
    return _no_head(tmp, m)


def unknown_rope_scaling(tmp):
    m = write_hf_model(tmp / "m", rope_scaling={"rope_type": "longrope", "factor": 4.0})
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/config.json: rope_scaling type 'longrope' is not supported; edgeq "
        "implements linear, llama3, yarn"
    )


def unknown_architecture_hf(tmp):
    m = write_hf_model(tmp / "m", model_type="gpt2")
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/config.json: model_type 'gpt2' is not supported; edgeq handles "
        "gemma3, gemma3_text, llama, mistral, qwen2, qwen3"
    )


def unknown_architecture_gguf(tmp):
    g = write_gguf_model(tmp / "model.gguf", arch="bert")
    return deploy_args(g, tmp / "dist/out"), (
        f"{g}: GGUF architecture 'bert' is not supported; edgeq handles gemma3, "
        "llama, mistral, qwen2, qwen3"
    )


def unknown_activation(tmp):
    m = write_hf_model(tmp / "m", hidden_act="relu")
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/config.json: hidden_act 'relu' is not supported for llama; edgeq "
        "implements 'silu'"
    )


def config_field_wrong_type(tmp):
    m = write_hf_model(tmp / "m")
    edit_config(m, num_hidden_layers="2")
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}/config.json: field 'num_hidden_layers' must be a positive integer, "
        "got '2'"
    )


def config_claims_a_billion_layers(tmp):
    m = write_hf_model(tmp / "m")
    edit_config(m, num_hidden_layers=10**9)
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: config says 1000000000 layers but the checkpoint holds only 21 "
        "tensors; config and weights do not belong together"
    )


def config_and_weights_disagree(tmp):
    m = write_hf_model(tmp / "m")
    edit_config(m, intermediate_size=96)
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], "
        "config.json implies [96, 64]; config and weights do not belong together"
    )


def broken_tokenizer(tmp):
    m = write_hf_model(tmp / "m")
    (m / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    return deploy_args(m, tmp / "dist/out"), re.compile(
        re.escape(f"{m}/tokenizer.json: not valid JSON (") + r".+\); download it again"
    )


def _nonfinite(tmp, value, counts):
    tensors = random_tensors(tiny_config())
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    m = write_hf_model(tmp / "m", tensors=tensors)
    return deploy_args(m, tmp / "dist/out"), (
        f"{m}: tensor 'model.layers.1.mlp.up_proj.weight' has {counts} values; "
        "the checkpoint is corrupt or was saved after training diverged: "
        "download it again or use an earlier checkpoint"
    )


def nan_weights(tmp):
    return _nonfinite(tmp, np.nan, "1 NaN and 0 infinite")


def infinite_weights(tmp):
    return _nonfinite(tmp, -np.inf, "0 NaN and 1 infinite")


def unknown_device(tmp):
    m = write_hf_model(tmp / "m")
    return deploy_args(m, tmp / "dist/out", "rpi5-8g"), (
        "unknown device 'rpi5-8g'; did you mean 'rpi5-8gb', 'rpi5-4gb', "
        "'rpi4-8gb'? `edgeq devices` lists them all, `edgeq devices detect` "
        "profiles this machine"
    )


def bad_device_entry(tmp):
    user = Path(os.environ["EDGEQ_USER_DEVICES"])
    user.write_text(
        '[my-board]\ndescription = "x"\nram_gb = 8\nusable_fraction = 0.75\n'
        'bandwidth_gbs = -3\narch = "arm64"\nisa = ["neon"]\ncores = 4\n'
        'os = "linux"\ntarget = "onnxruntime"\n'
    )
    m = write_hf_model(tmp / "m")
    return deploy_args(m, tmp / "dist/out", "my-board"), (
        f"{user}: device 'my-board': field 'bandwidth_gbs' must be a positive "
        "number, got -3"
    )


def does_not_fit(tmp):
    # 2 layers x 2 KV heads x 16 x 2 (K, V) x 2 bytes = 256 B per token:
    # 10^8 tokens of context need 25.6 GB of KV cache; a Pi 4 has 3.2 GB.
    m = write_hf_model(tmp / "m")
    args = deploy_args(m, tmp / "dist/out", "rpi4-4gb", "--context", "100000000")
    return args, re.compile(
        r"model needs 2\d\.\d\d GB \(weights 0\.00 GB \+ KV cache 25\.60 GB at "
        r"100000000 tokens \+ .*runtime.*\) but device 'rpi4-4gb' has 3\.22 GB "
        r"usable; .+"
    )


def mlx_on_a_pi(tmp):
    m = write_hf_model(tmp / "m")
    return deploy_args(m, tmp / "dist/out", PI, "--target", "mlx"), (
        "--target mlx cannot run on device 'rpi5-8gb' (linux/arm64); mlx needs "
        "macos on arm64; use --target onnxruntime (the device's preferred target)"
    )


def unknown_target(tmp):
    m = write_hf_model(tmp / "m")
    return deploy_args(m, tmp / "dist/out", PI, "--target", "tensorrt"), (
        "--target tensorrt: unknown target; choose one of mlx, onnxruntime"
    )


def unknown_model(tmp):
    return deploy_args("no-such-model", tmp / "dist/out"), (
        "model 'no-such-model' is neither a file or folder nor a known name "
        "(gemma3-270m, smollm2-135m); give a Hugging Face folder or a .gguf file"
    )


def output_exists(tmp):
    m = write_hf_model(tmp / "m")
    out = tmp / "dist/existing"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("the user's")
    return deploy_args(m, out), (
        f"output '{out}' already exists; pass --force to replace it or choose "
        "another --out"
    )


def force_over_a_non_artifact(tmp):
    m = write_hf_model(tmp / "m")
    out = tmp / "dist/existing"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("the user's")
    return deploy_args(m, out, MAC, "--force"), (
        f"--out {out} exists and is not an edgeq artifact; --force replaces only "
        "artifacts: remove it yourself or choose another --out"
    )


def force_over_the_model(tmp):
    m = write_hf_model(tmp / "dist/existing")
    (m / "keep.txt").write_text("the user's")
    return deploy_args(m, m, MAC, "--force"), (
        f"--out {m} is the model being read or holds it; choose another --out"
    )


def output_under_a_file(tmp):
    m = write_hf_model(tmp / "m")
    (tmp / "dist").mkdir()
    (tmp / "dist/file").write_text("not a folder")
    out = tmp / "dist/file/out"
    return deploy_args(m, out), (
        f"output '{out}': '{tmp}/dist/file' is a file, not a folder; choose "
        "another output path"
    )


def bad_fleet_host(tmp):
    fleet = tmp / "fleet.toml"
    fleet.write_text(
        '[fleet]\nmodel = "smollm2-135m"\n[hosts.pi-a]\naddress = "10.0.0.5"\n'
        'device = "rpi5-8gb"\ninstall_dir = "/opt/edgeq"\nport = 70000\n'
    )
    return ["fleet", "status", str(fleet)], re.compile(
        re.escape(f"{fleet}: host 'pi-a'") + r".*'port'.*"
    )


BAD_INPUTS = {
    "git-lfs pointer as model.safetensors": Bad(lfs_safetensors),
    "git-lfs pointer as .gguf": Bad(lfs_gguf),
    "git-lfs pointer as config.json": Bad(lfs_config),
    "safetensors, last 300 bytes cut": Bad(truncated_safetensors),
    "GGUF, last 300 bytes cut": Bad(truncated_gguf),
    "GGUF header claiming 2^60 tensors": Bad(gguf_claims_2_60_tensors),
    "safetensors header length 2^60": Bad(safetensors_header_claims_2_60_bytes),
    "pickle named model.safetensors": Bad(pickle_as_safetensors),
    "torch zip named model.safetensors": Bad(torch_zip_as_safetensors),
    "only pytorch_model.bin": Bad(only_pytorch_bin),
    "index names a missing shard": Bad(index_names_missing_shard),
    "index maps a tensor to the wrong shard": Bad(index_points_at_wrong_shard),
    "index names a file outside the folder": Bad(index_points_outside_folder),
    "tied in config, different lm_head": Bad(tied_but_head_differs),
    "untied in config, no lm_head": Bad(untied_but_no_head),
    "tie key missing, no lm_head": Bad(tie_key_missing_and_no_head),
    "unknown RoPE scaling": Bad(unknown_rope_scaling),
    "unknown model_type": Bad(unknown_architecture_hf),
    "unknown GGUF architecture": Bad(unknown_architecture_gguf),
    "unsupported activation": Bad(unknown_activation),
    "config field of the wrong type": Bad(config_field_wrong_type),
    "config claims 10^9 layers": Bad(config_claims_a_billion_layers),
    "config and weights disagree": Bad(config_and_weights_disagree),
    "broken tokenizer.json": Bad(broken_tokenizer),
    "NaN weight": Bad(nan_weights),
    "infinite weight": Bad(infinite_weights),
    "unknown device": Bad(unknown_device),
    "bad field in devices.toml": Bad(bad_device_entry),
    "does not fit the device": Bad(does_not_fit),
    "target the device cannot run": Bad(mlx_on_a_pi),
    "unknown target": Bad(unknown_target),
    "unknown model name": Bad(unknown_model),
    "output exists, no --force": Bad(output_exists, out="dist/existing"),
    "--force over a folder that is not an artifact": Bad(
        force_over_a_non_artifact, out="dist/existing"
    ),
    "--force over the model being read": Bad(force_over_the_model, out="dist/existing"),
    "output path under a file": Bad(output_under_a_file, out="dist/file/out"),
    # fleet status writes nothing; the path only proves that.
    "bad field in fleet.toml": Bad(bad_fleet_host, out="fleet-out"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line(name, tmp_path):
    bad = BAD_INPUTS[name]
    argv, message = bad.make(tmp_path)
    before = sorted(p.name for p in (tmp_path / "dist").glob("*"))
    result = CliRunner().invoke(app, argv)
    assert_one_line_error(result, message)
    out = tmp_path / bad.out
    if bad.out == "dist/existing":  # the user's folder is left as it was
        assert (out / "keep.txt").read_text() == "the user's"
        assert not leftovers(out.parent, out.name)
    else:
        assert_nothing_written(out)
    assert sorted(p.name for p in (tmp_path / "dist").glob("*")) == before


@pytest.mark.parametrize(
    "name",
    ["git-lfs pointer as model.safetensors", "GGUF, last 300 bytes cut",
     "unknown device"],
)  # fmt: skip
def test_real_executable_prints_no_traceback(name, tmp_path):
    """The installed `edgeq` script, in a child process, as a user runs it."""
    argv, message = BAD_INPUTS[name].make(tmp_path)
    proc = subprocess.run(
        [str(EDGEQ), *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {message}"
    assert_nothing_written(tmp_path / "dist/out")


# -- the stray weight file: a warning, not an error --------------------------


def test_stray_model_safetensors_beside_shards_is_ignored(tmp_path, caplog):
    """C02 (b): only the files the index names are read, with a warning."""
    from edgeq.models import open_model

    m = write_hf_model(tmp_path / "m", shards=2)
    save_safetensors(m / "model.safetensors", {"junk": np.zeros((3, 5), np.float32)})
    with caplog.at_level("WARNING"):
        src = open_model(str(m))
    assert "junk" not in src.tensor_names()
    assert [r.getMessage() for r in caplog.records] == [
        (
            f"{m}: ignoring model.safetensors beside the shards; only the files "
            "named in model.safetensors.index.json are read"
        )
    ]


# -- artifacts: tampered, truncated ---------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """One tiny ONNX Runtime artifact with its archive, built once."""
    root = tmp_path_factory.mktemp("artifact")
    m = write_hf_model(root / "m", "qwen2")
    out = root / "dist/qwen2-pi"
    args = deploy_args(m, out, PI)
    args.remove("--no-archive")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def tampered(artifact, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    flip_byte(copy / "model.onnx.data")
    return copy


def test_verify_refuses_a_tampered_artifact(tampered):
    result = CliRunner().invoke(app, ["verify", str(tampered)])
    assert_one_line_error(
        result,
        re.compile(
            re.escape(f"artifact {tampered}: file 'model.onnx.data' sha256 mismatch")
            + r" \(expected [0-9a-f]{12}\.\., got [0-9a-f]{12}\.\.\): the file was "
            r"changed or corrupted in transit; rebuild or re-copy it"
        ),
    )


def test_run_refuses_a_tampered_artifact_before_loading(tampered, monkeypatch):
    from edgeq_targets.common import engine

    def must_not_load(*a, **k):
        raise AssertionError("a tampered artifact was loaded")

    monkeypatch.setattr(engine, "load_engine", must_not_load)
    result = CliRunner().invoke(app, ["run", str(tampered), "-p", "hi"])
    assert_one_line_error(
        result,
        re.compile(re.escape(f"artifact {tampered}: file 'model.onnx.data'") + ".*"),
    )


def test_the_artifacts_own_runner_refuses_a_tampered_file(tampered):
    """On the device there is no edgeq: runner/run.py checks sha256 itself."""
    proc = subprocess.run(
        [sys.executable, str(tampered / "runner/run.py"), "generate", "-p", "hi"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"Error: {tampered}/model.onnx.data: sha256 does not match the manifest; "
        "the file was changed or corrupted in transit: rebuild or re-copy the "
        "artifact"
    )


def test_verify_refuses_a_truncated_archive(artifact, tmp_path):
    archive = tmp_path / "cut.tar.gz"
    data = Path(str(artifact) + ".tar.gz").read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["verify", str(archive)])
    assert_one_line_error(
        result,
        re.compile(
            re.escape(f"archive {archive} is truncated or corrupt (")
            + r".+\): re-copy it, or pack it again"
        ),
    )


# -- --force and a full disk: the old output survives any failure --------------


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_force_replaces_only_on_success(tmp_path):
    out = tmp_path / "dist/out"
    good = write_hf_model(tmp_path / "good", seed=1)
    assert CliRunner().invoke(app, deploy_args(good, out)).exit_code == 0
    first = manifest_of(out)["artifact_id"]

    # A failing build with --force leaves the previous output as it was.
    nan = random_tensors(tiny_config())
    nan["model.norm.weight"][0] = np.nan
    bad = write_hf_model(tmp_path / "bad", tensors=nan)
    result = CliRunner().invoke(app, deploy_args(bad, out, MAC, "--force"))
    assert result.exit_code == 1 and "NaN" in result.stderr
    assert manifest_of(out)["artifact_id"] == first
    assert not leftovers(out.parent, out.name)

    other = write_hf_model(tmp_path / "other", seed=2)
    result = CliRunner().invoke(app, deploy_args(other, out, MAC, "--force"))
    assert result.exit_code == 0, result.stderr
    assert manifest_of(out)["artifact_id"] != first
    assert not leftovers(out.parent, out.name)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_while_saving_weights(monkeypatch, out):
    import mlx.core as mx

    real = mx.save_safetensors

    def half_then_full(path, arrays, metadata=None):
        real(path, arrays, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partial file
        _enospc()

    monkeypatch.setattr(mx, "save_safetensors", half_then_full)


def _full_while_copying_tokenizer(monkeypatch, out):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith("tokenizer"):
            _enospc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def _full_while_writing_manifest(monkeypatch, out):
    from edgeq import artifact

    monkeypatch.setattr(artifact, "atomic_write_text", _enospc)


@pytest.mark.parametrize(
    "fill",
    [_full_while_saving_weights, _full_while_copying_tokenizer,
     _full_while_writing_manifest],
    ids=["weights", "tokenizer", "manifest"],
)  # fmt: skip
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force"])
def test_disk_full_mid_write_leaves_nothing(tmp_path, monkeypatch, fill, existing):
    model = write_hf_model(tmp_path / "m")
    out = tmp_path / "dist/out"
    if existing:  # an earlier artifact: --force may replace only those
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        (out / "old.txt").write_text("previous build")
    fill(monkeypatch, out)
    extra = ["--force"] if existing else []
    result = CliRunner().invoke(app, deploy_args(model, out, MAC, *extra))
    assert_one_line_error(
        result, f"disk full while writing {out}: free space and retry"
    )
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "old.txt"]
        assert not leftovers(out.parent, out.name)
    else:
        assert_nothing_written(out)


def test_disk_full_while_packing_leaves_no_stale_archive(tmp_path, monkeypatch):
    """The folder is complete and verifies; the archive of an earlier build
    is not left beside it to be shipped by mistake."""
    from edgeq import artifact

    model = write_hf_model(tmp_path / "m")
    out = tmp_path / "dist/out"
    old_archive = Path(str(out) + ".tar.gz")
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")  # an earlier artifact
    old_archive.write_bytes(b"an archive of the previous build")

    def half_then_full(raw, *args):
        raw.write(b"\x1f\x8b partial")
        _enospc()

    monkeypatch.setattr(artifact, "_write_tar", half_then_full)
    args = [a for a in deploy_args(model, out, MAC, "--force") if a != "--no-archive"]
    result = CliRunner().invoke(app, args)
    assert_one_line_error(
        result, f"disk full while writing {old_archive}: free space and retry"
    )
    assert not old_archive.exists()
    artifact.verify(out)
    assert not leftovers(out.parent, out.name)
    assert not leftovers(out.parent, old_archive.name)


# -- fleet: a host nobody answers on ---------------------------------------------


def test_unreachable_host_is_reported_not_raised(tmp_path):
    """`edgeq fleet status` names the host and why; a rollout that meets one
    stops per policy (tests/test_fleet_ssh.py, against real sshd)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[fleet]\nmodel = "smollm2-135m"\nstate_dir = "{tmp_path}/state"\n'
        '[hosts.gone]\naddress = "127.0.0.1"\nport = 1\n'  # nothing listens on 1
        f'device = "rpi5-8gb"\ninstall_dir = "{tmp_path}/root"\n'
    )
    result = CliRunner().invoke(app, ["fleet", "status", str(fleet), "--json"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    (row,) = json.loads(result.stdout)
    assert (row["host"], row["reachable"], row["health"]) == ("gone", False,
                                                             "unreachable")  # fmt: skip
    assert row["error"]  # ssh's own reason, e.g. "Connection refused"
