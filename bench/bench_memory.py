"""Peak memory of `edgeq deploy` on a model with real Llama shapes.

Writes a synthetic Hugging Face folder with Llama-3.2-1B's shapes (random
bf16 weights, written one tensor at a time), deploys it, and reports the
peak resident memory of the deploy process against the model's bf16 size.
The promise: memory is bounded by the largest tensor, not the model, so the
peak stays below half of the bf16 size.

    python bench/bench_memory.py                 # Llama-3.2-1B shapes
    python bench/bench_memory.py --shape llama3-8b   # optional, ~16 GB disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                        vocab_size=128256, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                      vocab_size=128256, tie_word_embeddings=False),
}  # fmt: skip


def write_model(folder: Path, shape: dict, seed: int = 0) -> int:
    """A Llama HF folder with random bf16 weights; returns its bf16 bytes.
    Tensors are generated and written one at a time (a safetensors file is
    assembled by hand so the whole model is never in memory)."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
           **shape}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(folder)
    tensors = _tensor_shapes(cfg)
    header, offset = {}, 0
    for name, shp in tensors.items():
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shp in tensors.items():
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            rows = shp[0]
            step = max(1, (32 << 20) // (4 * int(np.prod(shp[1:])) or 1))
            for start in range(0, rows, step):
                block = rng.standard_normal((min(step, rows - start), *shp[1:]),
                                            dtype=np.float32) * scale  # fmt: skip
                f.write((block.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return offset


def _tensor_shapes(c: dict) -> dict:
    h, d, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                    p + "mlp.down_proj.weight": (h, ffn)})  # fmt: skip
    return out


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.ByteFallback()
    tok.save(str(folder / "tokenizer.json"))


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """Run `cmd`; return (peak RSS bytes of it and its children, seconds, rc)."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(
                c.memory_info().rss for c in proc.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    # The kernel's own high-water mark catches spikes between samples.
    return peak, time.perf_counter() - start, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--target", default="mlx", choices=["mlx", "onnxruntime"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default="bench/results/memory.json")
    args = ap.parse_args()
    device = "macbook-pro-m4-max-64gb" if args.target == "mlx" else "x86-server-avx512-vnni"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = Path(tmp) / "model"
        t0 = time.perf_counter()
        bf16_bytes = write_model(model, SHAPES[args.shape])
        print(f"wrote {args.shape} ({bf16_bytes / 1e9:.2f} GB bf16) in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)  # fmt: skip
        cmd = [sys.executable, "-c", _DEPLOY, str(model), device, str(Path(tmp) / "out")]
        peak, secs, rc = peak_rss_of(cmd)
        if rc != 0:
            print(f"deploy failed with exit code {rc}", file=sys.stderr)
            return 1
        hwm = json.loads((Path(tmp) / "out.hwm").read_text())
    result = {
        "shape": args.shape, "target": args.target, "device": device,
        "bf16_bytes": bf16_bytes, "peak_rss_bytes_sampled": peak,
        "peak_rss_bytes_kernel": hwm["build_hwm"], "peak_rss_bytes_with_smoke": hwm["total_hwm"],
        "ratio_build_to_bf16": round(hwm["build_hwm"] / bf16_bytes, 3),
        "ratio_total_to_bf16": round(hwm["total_hwm"] / bf16_bytes, 3),
        "deploy_seconds": round(secs, 1),
    }  # fmt: skip
    print(f"{'shape':14} {'bf16 GB':>8} {'build peak GB':>14} {'ratio':>6} "
          f"{'with smoke GB':>14} {'ratio':>6}")  # fmt: skip
    print(f"{args.shape:14} {bf16_bytes / 1e9:8.2f} {hwm['build_hwm'] / 1e9:14.2f} "
          f"{result['ratio_build_to_bf16']:6.2f} {hwm['total_hwm'] / 1e9:14.2f} "
          f"{result['ratio_total_to_bf16']:6.2f}")  # fmt: skip
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# Runs in a child so its peak RSS is its own. VmHWM (the kernel's high-water
# mark) is read after the build and again at the end.
_DEPLOY = r"""
import json, sys
from pathlib import Path
from edgeq.deploy import DeployRequest, prepare, deploy
import edgeq.deploy as d

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

marks = {}
def progress(step, detail=""):
    if step == "smoke" and "build_hwm" not in marks:
        marks["build_hwm"] = hwm()
model, device, out = sys.argv[1:4]
deploy(DeployRequest(model, device, out=Path(out), quality_gate=False, archive=False,
                     smoke_tokens=2, context_length=2048), progress=progress)
marks["total_hwm"] = hwm()
Path(out + ".hwm").write_text(json.dumps(marks))
"""

if __name__ == "__main__":
    sys.exit(main())
