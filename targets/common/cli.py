"""Command line of the runner that ships inside every artifact.

    python runner/run.py generate -p "Hello" [--max-tokens 64] [--threads 4]
    python runner/run.py serve [--host 127.0.0.1] [--port 11434]
    python runner/run.py profile [--json]

It needs only the target's runtime (mlx-lm, or onnxruntime + numpy +
tokenizers); never edgeq itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def artifact_root() -> Path:
    """The artifact folder: runner/edgeq_targets/common/cli.py -> three up."""
    return Path(__file__).resolve().parents[3]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def generate_main(args) -> int:
    from edgeq_targets.common.engine import GenerationConfig, load_engine

    engine = load_engine(
        args.artifact or artifact_root(), threads=args.threads, strict=True
    )
    chat = False if args.no_chat else None
    ids = engine.encode_prompt(args.prompt, chat=chat)
    cfg = GenerationConfig(
        max_tokens=args.max_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
    )  # fmt: skip
    for tok in engine.generate(ids, cfg):
        sys.stdout.write(tok.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(engine.last_stats), file=sys.stderr)
    return 0


def format_stats(s) -> str:
    """One line: prompt and generation tokens/s (decode excludes the first
    token, which prefill produced)."""
    prefill = s.first_token - s.start
    decode_n = s.generated_tokens - 1
    decode_t = s.end - s.first_token
    prompt_tps = f"{s.prompt_tokens / prefill:.1f}" if prefill > 0 else "n/a"
    gen_tps = f"{decode_n / decode_t:.1f}" if decode_n > 0 and decode_t > 0 else "n/a"
    return (
        f"prompt: {s.prompt_tokens} tokens, {prompt_tps} tokens/s | "
        f"generation: {s.generated_tokens} tokens, {gen_tps} tokens/s"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default=None, help="artifact folder")
    parser.add_argument("--threads", type=int, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for a prompt")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("--no-chat", action="store_true", help="skip the chat template")
    add_sampling_args(g)
    for name in ("serve", "profile"):
        try:
            module = __import__(f"edgeq_targets.common.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    from edgeq_targets.common.engine import ArtifactCorrupt

    try:
        if args.command == "generate":
            return generate_main(args)
        return args.func(args)
    except ArtifactCorrupt as e:
        # A damaged copy is the user's to fix: one line, no traceback.
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
