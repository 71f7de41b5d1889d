"""Which tokens should an expert's statistics see: its routed ones, or all? Measured on a mixture-of-experts model
with real activations: SmolLM2-135M upcycled into a Mixtral whose 4 experts are copies of each block's MLP, top-2
routing with the routing weights renormalised (so the float MoE computes exactly SmolLM2), and a router made of
the MLP's gate rows averaged over 4 slices of its channels (each token goes to the 2 experts whose slices its
input drives hardest: sparse, uneven routing). After quantization the copies differ: each expert is quantized on
the statistics of the tokens it sees (routed) or of every token (all), and each token then runs through its two
experts. Then GPTQ with --moe-calibration routed and all, and WikiText-2 perplexity of the float MoE and of both
artifacts.

  python benchmarks/moe_calibration.py --smollm2 /tmp/smollm2-hf --work /tmp/wq-moe-calib --write benchmarks/moe.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
N_EXPERTS, TOP_K = 4, 2


def upcycle(smollm2: Path, out: Path) -> Path:
    """SmolLM2 as a Mixtral checkpoint (per-expert tensor names, as Mixtral's releases store them)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = json.loads((smollm2 / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(smollm2.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    inter = src["intermediate_size"] // N_EXPERTS
    out_tensors: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".mlp." not in name:
            out_tensors[name] = t
    for i in range(src["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        gate, up, down = tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"], tensors[p + "down_proj.weight"]
        q = f"model.layers.{i}.block_sparse_moe."
        for e in range(N_EXPERTS):
            out_tensors[q + f"experts.{e}.w1.weight"] = gate.clone()
            out_tensors[q + f"experts.{e}.w3.weight"] = up.clone()
            out_tensors[q + f"experts.{e}.w2.weight"] = down.clone()
        router = [gate[e * inter:(e + 1) * inter].float().mean(dim=0) for e in range(N_EXPERTS)]
        out_tensors[q + "gate.weight"] = (torch.stack(router) * 8).to(gate.dtype)
    save_file(out_tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    theta = (src.get("rope_parameters") or {}).get("rope_theta", src.get("rope_theta", 10000.0))
    config = MixtralConfig(vocab_size=src["vocab_size"], hidden_size=src["hidden_size"],
                           intermediate_size=src["intermediate_size"],
                           num_hidden_layers=src["num_hidden_layers"], num_attention_heads=src["num_attention_heads"],
                           num_key_value_heads=src["num_key_value_heads"],
                           head_dim=src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"],
                           max_position_embeddings=src["max_position_embeddings"], rms_norm_eps=src["rms_norm_eps"],
                           rope_theta=theta, tie_word_embeddings=src["tie_word_embeddings"],
                           num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K, sliding_window=None,
                           hidden_act=src.get("hidden_act", "silu"),
                           bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"),
                           dtype="bfloat16")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model.safetensors" for n in out_tensors}}))
    for f in smollm2.glob("tokenizer*"):
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--write", help="write the markdown table here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = upcycle(Path(args.smollm2), work / "smollm2-moe")
    text = SHARED / "assets/wikitext-2/raw/wiki.test.raw"
    calib = SHARED / "assets/wikitext-2/tokenized/valid.txt"

    def ppl(path: Path) -> float:
        out = work / (path.name + ".ppl.json")
        if not out.exists():
            subprocess.run([sys.executable, "-m", "jobs.eval", "--model", str(path), "--text", str(text),
                            "--seq-len", "512", "--max-windows", str(args.eval_windows), "--threads", str(args.cpus),
                            "--dtype", "float32", "--device", "cpu", "--json", str(out)],
                           check=True, cwd=REPO, capture_output=True)
        return json.loads(out.read_text())["ppl"]

    rows = [("float MoE", "-", ppl(model), None)]
    for mode in ("routed", "all"):
        out = work / f"gptq-{mode}"
        if not (out / "model.safetensors.index.json").exists():
            subprocess.run([sys.executable, "-m", "jobs.quantize", "--model", str(model), "--out", str(out),
                            "--method", "gptq", "--bits", "4", "--group-size", "64", "--calib", str(calib),
                            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--moe-calibration", mode,
                            "--cpus-per-actor", str(args.cpus), "--overwrite", "--log-level", "WARNING"],
                           check=True, cwd=REPO, capture_output=True)
        report = json.loads((out / "wq_report.json").read_text())
        rows.append((f"GPTQ w4g64, --moe-calibration {mode}", report["totals"]["starved_expert_layers"], ppl(out),
                     report["totals"]["wall_seconds"]))
        print(rows[-1], flush=True)
    base = rows[0][2]
    lines = [
        "# Mixture-of-experts calibration: routed or all tokens",
        "",
        f"Measured {date.today().isoformat()} on CPU ({args.cpus} threads) with `benchmarks/moe_calibration.py "
        f"--samples {args.samples} --seq-len {args.seq_len} --eval-windows {args.eval_windows}`. The model: "
        f"SmolLM2-135M upcycled into a Mixtral ({N_EXPERTS} copies of each MLP, top-{TOP_K} with renormalised "
        "weights, so the float MoE is SmolLM2 exactly; see the script). Calibration: WikiText-2 validation "
        "windows; evaluation: the first windows of 512 tokens of the raw test split, computed in float32.",
        "",
        "| weights | starved expert linears | ppl | vs float | quantize wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, starved, value, seconds in rows:
        rel = "-" if seconds is None else f"{(value / base - 1) * 100:+.1f}%"
        lines.append(f"| {name} | {starved} | {value:.3f} | {rel} | {'-' if seconds is None else f'{seconds:.0f}'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        Path(args.write).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
