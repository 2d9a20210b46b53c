"""ONNX Runtime target: builds the decoder graph straight from the model's
tensors with the `onnx` package (no torch, no transformers), quantizing each
weight as it is written, per the plan.

Files written into the output folder:

    model.onnx        the graph; weights referenced by relative name
    model.onnx.data   every initializer over 1 KiB, 64 KiB-aligned when large

The graph's interface is described in `edgeq.backends.onnx_decoder`; its
metadata_props carry the model config, the INT8 settings chosen for the
device and the storage of every tensor (keys start with "edgeq.").
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgeq.backends.onnx_decoder import DecoderGraph, GraphOptions
from edgeq.backends.onnx_graph import GraphWriter, check_single_file, load_structure
from edgeq.backends.onnx_linear import LinearEmitter, QuantSettings, check_supported
from edgeq.errors import DeviceError, TargetError

log = logging.getLogger(__name__)

# Lowest versions that cover the operators emitted (case C09): opset 14 for
# Split/Reshape/Unsqueeze with tensor inputs and Trilu-era shape ops; IR 8 is
# what ONNX Runtime >= 1.12 reads. Contrib ops are all version 1.
OPSET = 14
IR_VERSION = 8
# Oldest onnxruntime each storage runs on, checked by running the tiny-model
# tests on 1.20.1, 1.22.0 and 1.32.0 (1.20 lacks 8-bit MatMulNBits; 1.18
# wheels need numpy 1.x, not tried).
MIN_ORT = {
    "float": "1.20",
    "per_channel": "1.20",
    "nbits2": "1.32",  # only tried on 1.32
    "nbits4": "1.20",
    "nbits8": "1.22",
}
MODEL_FILES = ["model.onnx", "model.onnx.data"]


def int8_settings(device) -> QuantSettings:
    """INT8 kernel choices from the device profile's CPU features (case C07)."""
    isa = set(getattr(device, "isa", ()) or ())
    arch = getattr(device, "arch", "")
    if arch == "x86_64" and isa & {"avx512_vnni", "avx_vnni"}:
        return QuantSettings(
            False, 4, "x86 with VNNI: u8 x s8 dot products do not saturate"
        )
    if arch == "x86_64":
        return QuantSettings(
            True,
            4,
            "x86 without VNNI: per-channel INT8 weights use 7 bits (reduce_range) "
            "so that u8 x s8 pair sums fit int16 (vpmaddubsw); unverified here",
        )
    if arch == "arm64":
        note = (
            "arm64 with dot product"
            if "dotprod" in isa
            else ("arm64 without dot product: MatMulNBits int8 path unverified")
        )
        return QuantSettings(False, 4, note)
    return QuantSettings(False, 4, f"unknown arch '{arch}': ONNX Runtime defaults")


def _device(name: str):
    from edgeq.devices import get_device

    try:
        return get_device(name)
    except DeviceError:
        log.warning("device '%s' unknown; INT8 settings use defaults", name)
        return None


def build(
    source,
    plan,
    out: Path,
    progress=None,
    *,
    options: GraphOptions | None = None,
    single_file: bool = False,
    settings: QuantSettings | None = None,
) -> list[str]:
    """Write model.onnx + model.onnx.data into `out`; returns the file names.

    Every tensor is read once, quantized per the plan and written before the
    next is read. `options` and `settings` override the graph options and
    the device's INT8 settings (bench, tests). If ONNX Runtime cannot open
    or run the graph with fused contrib
    ops, it is rebuilt with standard ops only (recorded in the metadata);
    if that fails too, TargetError (an unloadable model is never returned).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(source, plan)
    if single_file:
        check_single_file(sum(t.storage_bytes() for t in plan.tensors))
        raise TargetError(
            "the onnxruntime target always writes weights to model.onnx.data; "
            "single-file models are not offered"
        )
    opts = options or default_options(source.config, plan)
    settings = settings or int8_settings(_device(plan.device))
    _write(source, plan, out, opts, settings, progress)
    error = _session_error(out)
    if error and (opts.fused_attention or opts.fused_norms):
        log.warning(
            "ONNX Runtime cannot run the fused graph (%s); rebuilding "
            "with standard ops",
            error,
        )
        plain = replace(opts, fused_attention=False, fused_norms=False)
        _write(source, plan, out, plain, settings, None, fallback=error)
        error = _session_error(out)
    if error:
        raise TargetError(f"{out / 'model.onnx'}: ONNX Runtime cannot load it: {error}")
    return list(MODEL_FILES)


# The INT8 storage edgeq ships (bench/README.md has the table behind it): on
# SmolLM2-135M, per-channel INT8 with per-tensor uint8 activations
# (DynamicQuantizeMatMul, what quantize_dynamic makes) agreed with the float
# model on 60% of next tokens (+50% perplexity), because a few activation
# channels carry outliers (case C08). MatMulNBits 8-bit with block 32 and
# accuracy_level 4 quantizes activations per block of 32 as well: 96%
# agreement, perplexity within 0.1%, and it runs faster.
INT8_BLOCK = 32


def default_onnx_rules(plan, device=None):
    """Rewrite a uniform per-channel INT8 plan into the storage that keeps
    the model's answers: 8-bit blocks of 32 for every matrix whose input
    width allows it; others stay per-channel INT8. Returns the plan; each
    changed tensor gets reason "rule" and a note. Plans with other bits or
    an explicit group size are returned unchanged. The planner should call
    it before computing predictions (storage sizes change slightly)."""
    if plan.target != "onnxruntime" or plan.defaults.get("bits") != 8:
        return plan
    if plan.defaults.get("group_size") is not None:
        return plan
    for t in plan.tensors:
        if t.bits == 8 and t.group_size is None and t.shape[-1] % INT8_BLOCK == 0:
            t.group_size, t.reason = INT8_BLOCK, "rule"
            t.note = (
                "INT8 block 32 (MatMulNBits, int8 activations per block): "
                "per-tensor activation quantization loses outlier channels"
            )
    if (
        device is not None
        and getattr(device, "arch", "") == "arm64"
        and ("dotprod" not in (getattr(device, "isa", ()) or ()))
    ):
        plan.warnings.append(
            "MatMulNBits int8 kernels want ARM dot-product instructions, which "
            f"'{device.name}' lacks: its INT8 speed is unverified"
        )
    return plan


def default_options(cfg, plan) -> GraphOptions:
    """Fused contrib ops where ONNX Runtime's kernels take the shapes."""
    fused_attention = cfg.head_dim % 16 == 0
    if not fused_attention:
        log.info(
            "head_dim %d is not a multiple of 16 (GroupQueryAttention's "
            "requirement): attention uses standard ops",
            cfg.head_dim,
        )
    return GraphOptions(
        fused_attention=fused_attention,
        context_length=int(plan.runtime.get("context_length", 4096)),
    )


def _check_plan(source, plan) -> None:
    if plan.target != "onnxruntime":
        raise TargetError(
            f"plan is for target '{plan.target}', not onnxruntime; make the plan "
            "with --target onnxruntime"
        )
    planned = {t.name for t in plan.tensors}
    missing = sorted(set(source.tensor_names()) - planned)
    if missing:
        raise TargetError(f"plan does not cover tensor '{missing[0]}' of the model")
    for t in plan.tensors:
        check_supported(t)


def _write(source, plan, out, opts, settings, progress, fallback: str = "") -> None:
    seen: list[str] = []

    def done(name: str) -> None:
        seen.append(name)
        if progress:
            progress(name)

    gw = GraphWriter(out)
    try:
        lin = LinearEmitter(gw, source, plan, settings, done)
        DecoderGraph(gw, lin, source, opts).build()
        gw.metadata.update(_metadata(source, plan, opts, settings, lin, fallback))
        gw.save(OPSET, IR_VERSION)
    finally:
        gw.close()
    expected = set(source.tensor_names())
    if sorted(seen) != sorted(expected):
        extra = sorted(set(seen) ^ expected)
        raise TargetError(f"builder bug: tensors not written exactly once: {extra[:3]}")


def _metadata(source, plan, opts, settings, lin, fallback) -> dict[str, str]:
    return {
        "edgeq.format": "edgeq-onnx-decoder/1",
        "edgeq.model": source.name,
        "edgeq.config": json.dumps(source.config.to_dict(), sort_keys=True),
        "edgeq.options": json.dumps(asdict(opts), sort_keys=True),
        "edgeq.int8": json.dumps(asdict(settings), sort_keys=True),
        "edgeq.fused_weights": json.dumps(lin.fused, sort_keys=True),
        "edgeq.tables": json.dumps(lin.tables, sort_keys=True),
        "edgeq.device": plan.device,
        "edgeq.fallback": fallback,
    }


def _open_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _session_error(out: Path) -> str:
    """'' when the model loads and runs a prefill and a decode step, else why
    not (some kernels refuse shapes only at run time)."""
    try:
        smoke_check(out)
    except TargetError as e:
        return str(e).split(": ", 1)[-1]
    return ""


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def metadata(folder: Path) -> dict[str, str]:
    """The model's edgeq.* metadata_props."""
    model = load_structure(Path(folder) / "model.onnx")
    return {p.key: p.value for p in model.metadata_props}


def runtime_requirements(plan, device) -> dict:
    """What the device needs to run the artifact, for the manifest."""
    kinds = {"float"}
    for t in plan.tensors:
        if t.quantized:
            kinds.add("per_channel" if t.group_size is None else f"nbits{t.bits}")
    ort_min = max(
        (MIN_ORT[k] for k in kinds), key=lambda v: tuple(map(int, v.split(".")))
    )
    settings = int8_settings(device)
    return {
        "packages": {
            "onnxruntime": f">={ort_min}",
            "numpy": ">=1.24",
            "tokenizers": ">=0.19",
            "jinja2": ">=3.1",
        },
        "onnx": {
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "domains": {"ai.onnx": OPSET, "com.microsoft": 1},
        },
        "arch": getattr(device, "arch", None),
        "isa": list(getattr(device, "isa", ()) or ()),
        "int8": asdict(settings),
    }


def read_back(folder: Path) -> dict[str, tuple[int, int | None]]:
    """{HF tensor name: (bits, group_size or None)} as stored in model.onnx,
    found from each initializer's type and the node that consumes it."""
    from edgeq.backends.onnx_readback import stored_tensors

    return stored_tensors(load_structure(Path(folder) / "model.onnx"))


def smoke_check(folder: Path) -> None:
    """Open a session and run one prefill and one decode step; TargetError
    with a one-line reason when the model cannot load or run (case C06)."""
    folder = Path(folder)
    path = folder / "model.onnx"
    try:
        sess = _open_session(path)
    except Exception as e:  # noqa: BLE001
        raise TargetError(
            f"{path}: ONNX Runtime cannot load it: {_one_line(e)}"
        ) from None
    try:
        _prefill_and_decode(sess)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"{path}: loads but fails to run: {_one_line(e)}") from None


def _prefill_and_decode(sess) -> None:
    """A 3-token prefill on an empty cache, then one token on that cache.
    Inputs that are not the decoder's get zeros (dynamic dims of 1), so a
    foreign graph fails with the runtime's own message."""
    feeds = {i.name: _zeros(i) for i in sess.get_inputs()}
    feeds["input_ids"] = np.array([[1, 2, 3]], np.int64)
    feeds["logits_to_keep"] = np.array([1], np.int64)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    for name in names:
        if name.startswith("present."):
            feeds[name.replace("present.", "past_key_values.")] = outs[name]
    feeds["input_ids"] = np.array([[4]], np.int64)
    logits = dict(zip(names, sess.run(None, feeds))).get("logits")
    if logits is None or logits.shape[:2] != (1, 1) or not np.isfinite(logits).all():
        shape = None if logits is None else logits.shape
        raise ValueError(f"decode step gave logits {shape}, not finite [1, 1, vocab]")


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _zeros(arg) -> np.ndarray:
    """Zeros for a graph input: cache inputs get length 0, other dynamic
    dimensions 1."""
    past = arg.name.startswith("past_key_values.")
    shape = [
        d if isinstance(d, int) else (0 if past and i == 2 else 1)
        for i, d in enumerate(arg.shape)
    ]
    return np.zeros(shape, _ORT_TYPES.get(arg.type, np.float32))
