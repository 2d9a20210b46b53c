"""MLX target: affine group quantization with mlx.core.quantize, saved in the
layout mlx-lm loads (config.json with a per-layer "quantization" table,
model.safetensors with weight / scales / biases per quantized layer).

Tensors stream one at a time from the source; the embedding table is
quantized in row blocks so that no full float32 copy of it exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgeq.errors import TargetError

log = logging.getLogger(__name__)

ROW_BLOCK_BYTES = 64 << 20  # float32 bytes converted at once
SHARD_BYTES = 2 << 30  # mlx-lm reads sharded files with an index


def float_dtype(cfg):
    """Gemma's activations overflow float16; it runs in bfloat16 like upstream."""
    import mlx.core as mx

    return mx.bfloat16 if cfg.is_gemma else mx.float16


def build(source, plan, out: Path, progress=None) -> list[str]:
    """Write the quantized model into `out`; returns the files written."""
    import mlx.core as mx

    cfg = source.config
    dtype = float_dtype(cfg)
    shard: dict = {}
    shard_bytes = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    quant_table: dict = {}

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        fname = f"model-{len(files) + 1:05d}.safetensors"
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        for k in shard:
            weight_map[k] = fname
        files.append(fname)
        shard, shard_bytes = {}, 0

    for t in plan.tensors:
        arrays = _convert(source, t, dtype)
        layer = t.name.rsplit(".", 1)[0]
        if t.quantized:
            quant_table[layer] = {"group_size": t.group_size, "bits": t.bits}
        elif t.name.endswith(".weight") and len(t.shape) == 2:
            quant_table[layer] = False
        for k, v in arrays.items():
            mx.eval(v)
            shard[k] = v
            shard_bytes += v.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
        if progress:
            progress(t.name)
    flush()
    files = _finish_shards(out, files, weight_map)
    _write_config(out, cfg, plan, quant_table)
    return files + ["config.json"]


def _convert(source, t, dtype) -> dict:
    """The arrays stored for one planned tensor."""
    import mlx.core as mx

    if not t.quantized:
        return {t.name: mx.array(source.read(t.name)).astype(dtype)}
    if t.scheme != "affine":
        raise TargetError(
            f"plan: tensor '{t.name}' asks for scheme '{t.scheme}'; the mlx "
            "target stores affine groups only"
        )
    rows = t.shape[0]
    block = max(1, ROW_BLOCK_BYTES // (4 * t.shape[1]))
    parts = []
    for start in range(0, rows, block):
        w = mx.array(source.read(t.name, rows=slice(start, start + block)))
        q = mx.quantize(w.astype(dtype), group_size=t.group_size, bits=t.bits)
        mx.eval(q)
        parts.append(q)
        del w
    weight, scales, biases = (
        mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
        for i in range(3)
    )
    base = t.name[: -len(".weight")]
    return {t.name: weight, f"{base}.scales": scales, f"{base}.biases": biases}


def _finish_shards(out: Path, files: list[str], weight_map: dict) -> list[str]:
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
        return ["model.safetensors"]
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files + ["model.safetensors.index.json"]


def _write_config(out: Path, cfg, plan, quant_table: dict) -> None:
    hf = cfg.to_hf_config()
    d = plan.defaults
    quant = {"group_size": d.get("group_size") or 64, "bits": d.get("bits", 4)}
    if quant["bits"] >= 16:
        quant["bits"] = 8  # unused default: every layer has its own entry
    quant.update(quant_table)
    hf["quantization"] = quant
    hf["quantization_config"] = quant
    hf["torch_dtype"] = "bfloat16" if cfg.is_gemma else "float16"
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def read_back(folder: Path) -> dict:
    """{tensor name: (bits, group_size)} as stored in an MLX artifact, with
    (16, None) for float tensors: lets tests check artifact == plan."""
    import mlx.core as mx

    cfg = json.loads((folder / "config.json").read_text())
    table = cfg.get("quantization", {})
    stored = {}
    for f in sorted(folder.glob("*.safetensors")):
        arrays = mx.load(str(f))
        for name, arr in arrays.items():
            if name.endswith((".scales", ".biases")):
                continue
            layer = name.rsplit(".", 1)[0]
            entry = table.get(layer)
            if isinstance(entry, dict):
                scales = arrays[f"{layer}.scales"]
                cols = arr.shape[1] * 32 // entry["bits"]
                if cols // scales.shape[1] != entry["group_size"]:
                    raise TargetError(f"{f}: '{name}' scales do not match its group")
                stored[name] = (entry["bits"], entry["group_size"])
            else:
                if arr.dtype not in (mx.float16, mx.bfloat16, mx.float32):
                    raise TargetError(f"{f}: '{name}' is {arr.dtype}, not float")
                stored[name] = (16, None)
    return stored


def check_quantizable(shape, group_size: int) -> bool:
    return len(shape) == 2 and shape[1] % group_size == 0 and np.prod(shape) > 0


def runtime_requirements(plan, device) -> dict:
    """What the device needs to run the artifact (for the manifest)."""
    return {
        "python": ">=3.10",
        "packages": {"mlx": ">=0.22", "mlx-lm": ">=0.22"},
        "arch": device.arch,
        "os": device.os,
        "isa": [],
    }


def smoke_check(folder: Path) -> None:
    """mlx-lm itself loads the folder and runs one forward pass."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(Path(folder))
        out = model(mx.array([[1, 2, 3]]))
        mx.eval(out)
    except Exception as e:  # any failure here means: do not ship
        raise TargetError(
            f"{folder}: mlx-lm cannot load or run the built model ({e}); "
            "this is a bug in edgeq's MLX target, please report it"
        ) from None
    if not bool(mx.isfinite(out).all()):
        raise TargetError(f"{folder}: the built model produces NaN or infinity")
