"""Tiny random checkpoints of every supported architecture, written like real ones (sharded safetensors,
index, tokenizer), for tests that need a model but not a trained one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from wq_ops.bundled.tiny_model import _byte_level_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


MOE_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")


def tiny_config(arch: str, **overrides: Any):  # type: ignore[no-untyped-def]
    from transformers import (
        DeepseekV3Config,
        GptOssConfig,
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
           "qwen3_moe": Qwen3MoeConfig, "mixtral": MixtralConfig, "deepseek_v3": DeepseekV3Config,
           "gpt_oss": GptOssConfig}[arch]
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
    if arch == "gpt_oss":       # 4 experts, top 2, with biases; sinks; a window of 16 on blocks 0 and 2; YaRN
        common.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=16,
                      rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                           truncate=False, original_max_position_embeddings=16,
                                           rope_theta=150000.0))
    config = cls(**{**common, **overrides})
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                             "mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                             "gpt_oss": "GptOssForCausalLM"}[arch]]
    return config


def write_checkpoint(directory: Path, arch: str = "llama", *, seed: int = 0, max_shard_size: str = "200KB",
                     fused: bool = False, **overrides: Any) -> Path:
    """fused: save a mixture of experts' experts as its transformers module holds them (3-D tensors,
    `save_original_format=False`), not under the released per-expert names."""
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
    model.save_pretrained(directory, max_shard_size=max_shard_size, save_original_format=not fused)
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


def _fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a matrix to float8_e4m3fn with one float32 scale per block, as DeepSeek-V3's release stores it:
    (weight, weight_scale_inv) with weight * scale_inv ~ the original."""
    rows, cols = weight.shape
    r, c = block
    w = weight.to(torch.float32)
    padded = torch.zeros(-(-rows // r) * r, -(-cols // c) * c)
    padded[:rows, :cols] = w
    tiles = padded.view(padded.shape[0] // r, r, padded.shape[1] // c, c)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    full = scale.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(source: Path, fp8_dir: Path, dequantized_dir: Path, *, block: tuple[int, int] = (32, 32),
                         mtp_layer: bool = True) -> tuple[Path, Path]:
    """From a tiny DeepSeek-V3 checkpoint, write the same model as its release is stored (every block's linear
    in FP8 with block scales; embeddings, norms and routers as they were; with `mtp_layer`, one more layer past
    num_hidden_layers, like its multi-token-prediction layer) and, beside it, that FP8 model dequantized to
    bfloat16 in float64 (the reference a reader of the FP8 one must match)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    config = json.loads((source / "config.json").read_text())
    n = config["num_hidden_layers"]
    if mtp_layer:       # a copy of the last layer, as layer n
        prefix = f"model.layers.{n - 1}."
        tensors.update({f"model.layers.{n}." + k[len(prefix):]: v.clone() for k, v in tensors.items()
                        if k.startswith(prefix)})
    fp8: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    def dequantized_of(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        full = scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
        return (weight.double() * full).to(torch.bfloat16)

    for name, value in sorted(tensors.items()):
        is_linear = (name.startswith("model.layers.") and name.endswith("proj.weight") and value.dim() == 2)
        # Experts saved fused (`write_checkpoint(fused=True)`), as transformers 5's FP8 experts store them: a
        # matrix and its scales per expert, stacked.
        is_experts = name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and value.dim() == 3
        if is_linear:
            weight, scale = _fp8_blocks(value, block)
            dequantized[name] = dequantized_of(weight, scale)
        elif is_experts:
            pairs = [_fp8_blocks(v, block) for v in value]
            weight, scale = torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])
            dequantized[name] = torch.stack([dequantized_of(w, s) for w, s in pairs])
        else:
            fp8[name] = dequantized[name] = value
            continue
        fp8[name], fp8[name + "_scale_inv"] = weight, scale
    for directory, data, quantized in ((fp8_dir, fp8, True), (dequantized_dir, dequantized, False)):
        directory.mkdir(parents=True)
        names = sorted(n for n in data if not n.endswith("_scale_inv"))
        half = len(names) // 2              # two shards, the scales in the second: many sit apart from their weight
        shards = {"model-00001-of-00002.safetensors": names[:half],
                  "model-00002-of-00002.safetensors": names[half:] + sorted(set(data) - set(names))}
        for file, part in shards.items():
            save_file({k: data[k].contiguous() for k in part}, str(directory / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        out_config = dict(config)
        if quantized:
            out_config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                 "fmt": "e4m3", "weight_block_size": list(block)}
        (directory / "config.json").write_text(json.dumps(out_config))
        for extra in source.iterdir():
            if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(extra, directory / extra.name)
    return fp8_dir, dequantized_dir


def artifact_files(out: Path) -> dict[str, bytes]:
    """An artifact's config, index and shards (what must be byte-identical between two runs)."""
    names = ["config.json", "model.safetensors.index.json", *sorted(p.name for p in out.glob("model-*.safetensors"))]
    return {n: (out / n).read_bytes() for n in names}


def fail_index_writes(monkeypatch: Any) -> Callable[[], None]:
    """Make writing an artifact's index fail as a full disk does; returns what undoes it."""
    import wq_ops.io.artifact as artifact

    real = artifact.write_json_atomic

    def disk_full(path: Path, obj: Any) -> None:
        if path.name == "model.safetensors.index.json":
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(artifact, "write_json_atomic", disk_full)
    return lambda: monkeypatch.setattr(artifact, "write_json_atomic", real)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts, out, in) -> MXFP4 as gpt-oss's release stores it: blocks (experts, out, in / 32, 16) uint8 (input
    2 j in byte j's low nibble, 2 j + 1 in its high one), scales (experts, out, in / 32) uint8 (E8M0), and the
    values they hold in float64 (the reference a reader must match)."""
    e, rows, cols = weight.shape
    w = weight.double().reshape(e, rows, cols // 32, 32)
    amax = w.abs().amax(dim=-1).clamp(min=2.0 ** -100)
    exponent = torch.ceil(torch.log2(amax / 6.0))                            # every |value| / 2**exponent <= 6
    scaled = w / torch.pow(2.0, exponent)[..., None]
    table = torch.tensor(_E2M1, dtype=torch.float64)
    magnitude = (scaled.abs()[..., None] - table).abs().argmin(dim=-1)      # nearest E2M1 magnitude
    codes = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    values = table[magnitude] * torch.where(scaled < 0, -1.0, 1.0) * torch.pow(2.0, exponent)[..., None]
    return blocks, (exponent + 127).to(torch.uint8), values.reshape(e, rows, cols)


def write_mxfp4_checkpoint(source: Path, mxfp4_dir: Path, dequantized_dir: Path) -> tuple[Path, Path]:
    """From a tiny gpt-oss checkpoint (fused bf16 experts, stored (in, out)), write the same model as its release
    is stored (every block's `gate_up_proj` and `down_proj` as MXFP4 `_blocks`/`_scales`, (out, in); biases,
    attention, routers and norms in bf16; quantization_config mxfp4) and, beside it, that MXFP4 model
    dequantized to bfloat16 from float64 (fused, as the source was)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    config = json.loads((source / "config.json").read_text())
    mxfp4: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, value in sorted(tensors.items()):
        if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            mxfp4[name] = dequantized[name] = value
            continue
        blocks, scales, values = _mxfp4(value.transpose(1, 2))
        mxfp4[name + "_blocks"], mxfp4[name + "_scales"] = blocks, scales
        dequantized[name] = values.transpose(1, 2).to(torch.bfloat16).contiguous()
    for directory, data, quantized in ((mxfp4_dir, mxfp4, True), (dequantized_dir, dequantized, False)):
        directory.mkdir(parents=True)
        names = sorted(data)
        half = len(names) // 2            # two shards: some blocks sit apart from their scales
        shards = {"model-00001-of-00002.safetensors": names[:half],
                  "model-00002-of-00002.safetensors": names[half:]}
        for file, part in shards.items():
            save_file({k: data[k].contiguous() for k in part}, str(directory / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        out_config = dict(config)
        if quantized:      # openai/gpt-oss-120b's modules_to_not_convert, verbatim
            out_config["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}
        (directory / "config.json").write_text(json.dumps(out_config))
        for extra in source.iterdir():
            if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(extra, directory / extra.name)
    return mxfp4_dir, dequantized_dir
