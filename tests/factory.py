"""Tiny random checkpoints of every supported architecture, written like real ones (sharded safetensors,
index, tokenizer), for tests that need a model but not a trained one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wq_ops.bundled.tiny_model import _byte_level_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


MOE_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny_config(arch: str, **overrides: Any):  # type: ignore[no-untyped-def]
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=257, dtype="bfloat16")
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "qwen3_moe": Qwen3MoeConfig, "mixtral": MixtralConfig, "deepseek_v3": DeepseekV3Config}[arch]
    if arch in ("mistral", "mixtral"):
        common["sliding_window"] = None
    if arch == "qwen3_moe":     # block 0 dense (mlp_only_layers), the others routed: 4 experts, top 2
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[0],
                      norm_topk_prob=True)
    if arch == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    if arch == "deepseek_v3":   # multi-head latent attention; block 0 dense; 8 experts in 4 groups, top 2 groups
        common.update(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                      qk_nope_head_dim=16, v_head_dim=32, num_key_value_heads=4)
        common.pop("head_dim")
    config = cls(**{**common, **overrides})
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                             "mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[arch]]
    return config


def write_checkpoint(directory: Path, arch: str = "llama", *, seed: int = 0, max_shard_size: str = "200KB",
                     **overrides: Any) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    hf_logging.disable_progress_bar()
    model.to(torch.bfloat16)
    if arch == "deepseek_v3":      # its releases store the router (weight and bias) in float32
        for name, module in model.named_modules():
            if name.endswith(".mlp.gate"):
                module.to(torch.float32)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    _byte_level_tokenizer().save_pretrained(directory)
    return directory


def write_text(path: Path, n_chars: int = 20000, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = ["the", "model", "quantize", "block", "weight", "of", "and", "a", "to", "in", "is", "data", "layer",
             "scale", "error", "group", "token", "every", "with", "for"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(words) + ("." if rng.random() < 0.1 else ""))
    path.write_text(" ".join(out))
    return path


def gpu_job_shards(tmp_path: Path, model: Path, calib: Path, name: str, **options: Any) -> dict[str, bytes]:
    """Run a small in-process GPU job (16 samples of 64 tokens, micro-batches of 4) into tmp_path / name;
    returns its shards' bytes by file name."""
    from wq_ops.cluster.driver import run_job
    from wq_ops.config import JobConfig

    base = {"out": str(tmp_path / name), "model": str(model), "calib": str(calib), "samples": 16, "seq_len": 64,
            "micro_batch_samples": 4, "runtime": "local", "gpus_per_actor": 1, "backend": "cuda"}
    result = run_job(JobConfig.from_dict({**base, **options}), cache_dir=tmp_path / "cache")
    return {p.name: p.read_bytes() for p in sorted(result.out_dir.glob("*.safetensors"))}
