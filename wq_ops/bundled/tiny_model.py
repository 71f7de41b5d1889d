"""The embedded default model: a tiny Llama-architecture checkpoint with seeded random weights and a
byte-level tokenizer, written once into a cache directory (atomically: temp folder, then rename).

It exists so that `python -m jobs.quantize` runs offline on a fresh machine. Its weights are random,
so its perplexity means nothing; it exercises every step of the real pipeline (sharded safetensors,
tokenizer, blocks, actors, artifact) in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_MODEL_VERSION", "ensure_tiny_checkpoint"]

TINY_MODEL_VERSION = "tiny-llama-v1"
_SEED = 20261123


def _byte_level_tokenizer():  # type: ignore[no-untyped-def]
    """GPT-2 style byte-level BPE with no merges: one token per byte, plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 byte values (bytes that are printable map to themselves).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   model_max_length=4096)


def _write(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, rms_norm_eps=1e-5, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    model: Any = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model = model.to(torch.bfloat16)
    # Small shards on purpose: the default job then reads a multi-shard checkpoint like a real one.
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, max_shard_size="2MB", safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _byte_level_tokenizer().save_pretrained(directory)


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """The tiny checkpoint's directory under `cache_dir`, written first if it is not there yet."""
    target = cache_dir / TINY_MODEL_VERSION
    if (target / "model.safetensors.index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_VERSION}.", dir=cache_dir))
    try:
        _write(tmp)
        try:
            os.rename(tmp, target)             # atomic; if another process won the race, keep theirs
        except OSError:
            if not (target / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
