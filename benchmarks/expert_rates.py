"""Per-expert rates on one GPU: what an expert actor spends on each routed expert of a block (the statistics
and passes, the GPTQ solve, the packing), at a released model's expert shape and token density, in-process
(no Ray, no checkpoint): random bf16 experts, random calibration states, uniform random top-k routing over
128 x 2048 tokens. Also the routed inputs' and outputs' trips between device and host (what --expert-actors
adds per block). The plan's time estimate (`wq_ops/cluster/estimate.py`) takes its constants from here.

    python benchmarks/expert_rates.py --shapes deepseek_v3,qwen3_30b --experts 16 --json /tmp/rates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wq_ops.block.experts import RoutedInputs, quantize_experts_  # noqa: E402
from wq_ops.block.work import BlockTask  # noqa: E402
from wq_ops.cluster.expert_pool import RoutedTransfer  # noqa: E402
from wq_ops.config import Format, QuantConfig  # noqa: E402
from wq_ops.device.timing import CudaEventClock  # noqa: E402
from wq_ops.device.transport import from_host, to_host  # noqa: E402
from wq_ops.model.architecture import describe_model, instantiate_on_meta  # noqa: E402
from wq_ops.model.block import DecoderBlock, make_sequence_context  # noqa: E402
from wq_ops.model.moe import sort_by_expert  # noqa: E402

SHAPES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432, n_routed_experts=256,
                         num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=0,
                         num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280)),
    "qwen3_30b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
}


def one_block(shape: str, device: torch.device):  # type: ignore[no-untyped-def]
    import transformers

    config_class, architecture, dims = SHAPES[shape]
    config = getattr(transformers, config_class)(**dims, num_hidden_layers=1, max_position_embeddings=4096)
    config.architectures = [architecture]
    layout = describe_model(config)
    kind = layout.block(0)
    meta = instantiate_on_meta(config)
    rotary = type(meta.model.rotary_emb)(config=config).to(device)
    ctx = make_sequence_context(rotary, seq_len=16, hidden_size=config.hidden_size, window=None, device=device,
                                dtype=torch.bfloat16)
    return kind, DecoderBlock(meta.model.layers[0], ctx, moe=kind.moe)


def measure(shape: str, n_experts: int, tokens: int, micro: int, device: torch.device) -> dict[str, float]:
    kind, block = one_block(shape, device)
    moe = kind.moe
    assert moe is not None
    gen = torch.Generator(device=device).manual_seed(0)
    experts = range(n_experts)
    params = {moe.expert(e, w) + ".weight": (torch.randn(shape_, generator=gen, device=device) * 0.02)
              .to(torch.bfloat16)
              for e in experts for w, shape_ in (("gate", (moe.expert_intermediate, moe.hidden_size)),
                                                  ("up", (moe.expert_intermediate, moe.hidden_size)),
                                                  ("down", (moe.hidden_size, moe.expert_intermediate)))}
    flats, weights, sorts = [], [], []
    for _ in range(tokens // micro):
        flats.append(torch.randn(micro, moe.hidden_size, generator=gen, device=device).to(torch.bfloat16))
        scores = torch.rand(micro, moe.n_experts, generator=gen, device=device)
        top, chosen = scores.topk(moe.top_k, dim=-1)
        weights.append(top / top.sum(-1, keepdim=True))
        sorts.append(sort_by_expert(chosen, moe.n_experts))
    inputs = RoutedInputs(tuple(flats), tuple(weights), tuple(sorts))
    rows = sum(s.starts[n_experts] for s in sorts)
    quant = QuantConfig(method="gptq", bits=4, group_size=128, sym=True, backend="cuda")
    task = BlockTask(quant=quant, fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers",
                     linears=kind.linears, moe=moe, kept=kind.kept)
    outs: list[torch.Tensor] = []
    # A warm-up range of one expert (kernel build and load, cuBLAS handles), then the timed one.
    quantize_experts_(block, params, task, range(0, 1), inputs, emit=lambda e, ys: None,
                      clock=CudaEventClock(device))
    torch.cuda.synchronize()
    clock = CudaEventClock(device)
    t = time.perf_counter()
    quantize_experts_(block, params, task, experts, inputs, emit=lambda e, ys: outs.extend(y.cpu() for y in ys),
                      clock=clock)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    phases = clock.seconds()
    t = time.perf_counter()
    transfer = RoutedTransfer.of(inputs)
    to_host_s = time.perf_counter() - t
    t = time.perf_counter()
    transfer.on(device)
    torch.cuda.synchronize()
    to_device_s = time.perf_counter() - t
    sent = sum(f.numel() * 2 for f in flats)
    ys = torch.cat(outs)
    t = time.perf_counter()
    from_host(to_host(ys), device)
    torch.cuda.synchronize()
    ys_s = time.perf_counter() - t
    return {"shape": shape, "experts": n_experts, "tokens": tokens, "routed_rows": rows,
            "wall_s": round(wall, 3), "per_expert_s": round(wall / n_experts, 4),
            **{f"{k}_per_expert_s": round(v / n_experts, 4) for k, v in phases.items()},
            "inputs_to_host_gb_s": round(sent / to_host_s / 1e9, 2),
            "inputs_to_device_gb_s": round(sent / to_device_s / 1e9, 2),
            "outputs_round_trip_gb_s": round(ys.numel() * 2 / ys_s / 1e9, 2),
            "device": torch.cuda.get_device_name(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="deepseek_v3,qwen3_30b,mixtral")
    p.add_argument("--experts", type=int, default=16, help="experts in the timed range (mixtral: at most 8)")
    p.add_argument("--tokens", type=int, default=128 * 2048)
    p.add_argument("--micro", type=int, default=8 * 2048, help="tokens per micro-batch")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    results = []
    for shape in args.shapes.split(","):
        n = min(args.experts, 8) if shape == "mixtral" else args.experts
        r = measure(shape, n, args.tokens, args.micro, device)
        print(json.dumps(r), flush=True)
        results.append(r)
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
