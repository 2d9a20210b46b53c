"""Rebuild a Hugging Face fast tokenizer (tokenizer.json) from GGUF metadata.

GGUF carries the vocabulary, and either BPE merges (`gpt2` models: SmolLM,
Llama 3, Qwen) or SentencePiece scores (`llama` models: Llama 2, Gemma,
llama2.c's stories). For SentencePiece vocabularies we derive BPE merges from
the scores, the same way sentencepiece's BPE would rank them, and use byte
fallback for characters outside the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeq.errors import ModelError
from edgeq.models.config import ModelConfig

# tokenizer.ggml.token_type values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of the BPE vocabularies we know, by the
# `tokenizer.ggml.pre` name llama.cpp writes.
_GPT2_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_PRE = {
    "default": ("gpt2", None),
    "gpt-2": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "smollm": ("digits", None),
    "llama-bpe": ("regex", _LLAMA3_REGEX),
    "llama3": ("regex", _LLAMA3_REGEX),
    "qwen2": ("regex", _QWEN2_REGEX),
}


def _strings(fields, key) -> list[str]:
    f = fields[key]
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _ints(fields, key) -> list:
    f = fields[key]
    return [f.parts[i].tolist()[0] for i in f.data]


def _opt(fields, key, default=None):
    if key not in fields:
        return default
    v = fields[key].contents()
    return None if v == 0xFFFFFFFF else v


def tokenizer_files_from_gguf(reader, cfg: ModelConfig, path: Path) -> dict:
    """tokenizer.json and tokenizer_config.json bytes for the GGUF's tokenizer."""
    from tokenizers import AddedToken

    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelError(f"{path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
    kind = _opt(fields, "tokenizer.ggml.model")
    tokens = _strings(fields, "tokenizer.ggml.tokens")
    types = (
        _ints(fields, "tokenizer.ggml.token_type")
        if "tokenizer.ggml.token_type" in fields
        else [_NORMAL] * len(tokens)
    )
    add_bos = bool(_opt(fields, "tokenizer.ggml.add_bos_token", kind == "llama"))
    bos_id = _opt(fields, "tokenizer.ggml.bos_token_id")
    eos_id = _opt(fields, "tokenizer.ggml.eos_token_id")
    unk_id = _opt(fields, "tokenizer.ggml.unknown_token_id")
    pad_id = _opt(fields, "tokenizer.ggml.padding_token_id")

    if len(types) != len(tokens):
        raise ModelError(
            f"{path}: GGUF tokenizer has {len(tokens)} tokens but {len(types)} "
            "token types; the file is corrupt"
        )
    for key, tid in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)):
        if tid is not None and not 0 <= tid < len(tokens):
            raise ModelError(
                f"{path}: GGUF tokenizer.ggml.{key}_token_id {tid} is not one of "
                f"its {len(tokens)} tokens; the file is corrupt"
            )

    if kind == "gpt2":
        tok = _bpe_tokenizer(fields, tokens, path)
    elif kind == "llama":
        scores = [float(s) for s in fields["tokenizer.ggml.scores"].contents()]
        if len(scores) != len(tokens):
            raise ModelError(
                f"{path}: GGUF tokenizer has {len(tokens)} tokens but "
                f"{len(scores)} scores; the file is corrupt"
            )
        prefix = bool(_opt(fields, "tokenizer.ggml.add_space_prefix", True))
        tok = _spm_tokenizer(tokens, scores, types, prefix, unk_id)
    else:
        raise ModelError(
            f"{path}: GGUF tokenizer model '{kind}' is not supported; edgeq "
            "handles 'gpt2' (BPE) and 'llama' (SentencePiece)"
        )

    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL or (ty == _USER_DEFINED and t.startswith("<"))
    ]
    tok.add_special_tokens(specials)
    if add_bos and bos_id is not None:
        from tokenizers.processors import TemplateProcessing

        bos = tokens[bos_id]
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, bos_id)],
        )

    def name(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos_id),
        "eos_token": name(eos_id),
        "unk_token": name(unk_id),
        "pad_token": name(pad_id),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }
    template = _opt(fields, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    gen = {"bos_token_id": bos_id, "eos_token_id": cfg.eos_token_ids or eos_id}
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": _json(tcfg),
        "generation_config.json": _json(gen),
    }


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _bpe_tokenizer(fields, tokens, path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = _opt(fields, "tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        raise ModelError(
            f"{path}: BPE pre-tokenizer '{pre}' is not supported; edgeq "
            f"handles {', '.join(sorted(_BPE_PRE))}"
        )
    merges = [tuple(m.split(" ", 1)) for m in _strings(fields, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    style, regex = _BPE_PRE[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True
        )
    elif style == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(tokens, scores, types, add_prefix, unk_id):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {
        t: i
        for i, t in enumerate(tokens)
        if types[i] in (_NORMAL, _USER_DEFINED, _UNKNOWN) or types[i] == 0
    }
    # A merge (a, b) exists when a + b is a piece; rank by that piece's score.
    ranked = []
    for piece, pid in mergeable.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                ranked.append((-scores[pid], pid, mergeable[a], a, b))
    ranked.sort()
    merges = [(a, b) for *_, a, b in ranked]
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # Metaspace with prepend "first" adds the dummy prefix only at the start
    # of the text, not after every special token.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never",
        split=False,
    )  # fmt: skip
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok
