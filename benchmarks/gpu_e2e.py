"""End-to-end single-GPU benchmark: wq against llm-compressor on the same checkpoint files and tokens.

Makes checkpoints with random bf16 weights (Llama-3-8B and Llama-3.2-1B shapes; mixture-of-experts models cut
to 4 decoder layers: Qwen3-30B-A3B's and Mixtral-8x7B's shapes, experts under the released checkpoints'
per-expert names, and gpt-oss-20b's, experts fused as transformers saves them; sharded safetensors, a one-token
tokenizer), a parquet of random calibration token ids, then
runs each tool as its own process, timing the whole job from checkpoint to written artifact, and samples the GPU's used
memory with nvidia-smi (the same probe for both tools, CUDA context included; the checkpoints are made in a
child process, so this one holds no GPU memory meanwhile). Prints one table with
wall time, GPU peak, the ratio llm-compressor / wq, and wq's per-phase times from its wq_report.json.

    python benchmarks/gpu_e2e.py --cases 8b:gptq --tools wq,llmcompressor --work /tmp/bench
    python benchmarks/gpu_e2e.py --cases 1b:gptq,1b:awq --json /tmp/bench/1b.json
    python benchmarks/gpu_e2e.py --cases qwen3moe:gptq,mixtral:gptq --work /tmp/bench
    python benchmarks/gpu_e2e.py --cases 8b:fp8,8b:w8a8 --work /tmp/bench
    python benchmarks/gpu_e2e.py --cases gptoss:gptq --tools wq --wq-args '--group-size 64'

Methods: gptq (W4A16 g128), awq (W4A16_ASYM), and the activation presets: fp8 (FP8_DYNAMIC, rounded to nearest:
llm-compressor's QuantizationModifier) and w8a8 (W8A8: SmoothQuant at 0.5 then GPTQ, in both tools).

On the GPU machine Ray and llm-compressor come from the bundle (see ../shared/README.md):
    mkdir -p /tmp/site && tar xJf .device/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # Mixtures of experts, 4 decoder layers of each (the released models have 48 and 32).
    "qwen3moe": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                     num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False),
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                    tie_word_embeddings=False),
    # gpt-oss-20b's (24 layers released), experts fused as transformers saves them; 2880 takes groups of 32 or 64.
    "gptoss": dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                   num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   sliding_window=128, vocab_size=201088, tie_word_embeddings=False),
}
# (transformers config class, architecture) per shape; Llama for the others.
ARCHITECTURES = {"qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
                 "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                 "gptoss": ("GptOssConfig", "GptOssForCausalLM")}
# The routed MLPs' routers, kept in bf16 by both tools (llm-compressor's habit: ignore them by name).
ROUTERS = ["re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]
SHARD_BYTES = 5 * 2**30


def checkpoint_path(shape: str, root: Path) -> Path:
    return root / f"{'llama-' if shape not in ARCHITECTURES else ''}{shape}-random"


def checkpoint_tensors(shape: str):  # type: ignore[no-untyped-def]
    """(config, [(name, shape)]) of a checkpoint as it is released: transformers' own state-dict names, but a
    routed MLP's experts under their per-expert checkpoint names (transformers 5 fuses them at load time)."""
    import re

    import torch
    import transformers

    from wq_ops.model.moe import moe_spec

    config_class, architecture = ARCHITECTURES.get(shape, ("LlamaConfig", "LlamaForCausalLM"))
    rope = {} if shape == "gptoss" else {"rope_theta": 500000.0}      # gpt-oss keeps its own YaRN rotary
    config = getattr(transformers, config_class)(**SHAPES[shape], max_position_embeddings=8192,
                                                 torch_dtype="bfloat16", **rope)
    config.architectures = [architecture]
    with torch.device("meta"):
        skeleton = getattr(transformers, architecture)(config)
    names = [(k, tuple(p.shape)) for k, p in skeleton.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    spec = moe_spec(config)
    if spec is None or spec.swiglu_limit is not None:       # gpt-oss: released fused, so written fused
        return config, names
    routed = re.compile(r"model\.layers\.(\d+)\.mlp\.(experts|gate)\b")
    out, done = [], set()
    for name, dims in names:
        match = routed.match(name)
        if match is None or int(match[1]) not in spec.sparse_blocks:
            out.append((name, dims))
        elif match[1] not in done:
            done.add(match[1])
            out += [(f"model.layers.{match[1]}.{local}", tuple(d)) for local, d in spec.params().items()]
    return config, out


def make_checkpoint(shape: str, root: Path, *, seed: int = 0, device: str = "cuda") -> Path:
    """A sharded bf16 safetensors checkpoint with random weights (std 0.02, norms 1)."""
    import torch
    from safetensors.torch import save_file

    out = checkpoint_path(shape, root)
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = root / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config, tensors_to_make = checkpoint_tensors(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, dims in tensors_to_make:
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = torch.randn(dims, generator=gen, device=device, dtype=torch.float32) * 0.02
            t = t.to(torch.bfloat16).cpu()
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    config.save_pretrained(tmp)
    _one_token_tokenizer().save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    os.replace(tmp, out)
    return out


def _one_token_tokenizer():
    """Random-weight models need a tokenizer object only to satisfy the tools' loaders."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def make_calibration(root: Path, *, n_samples: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    path = root / f"calib-{n_samples}x{seq_len}-v{vocab}.parquet"
    if not path.exists():
        ids = torch.randint(0, vocab, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
        pq.write_table(pa.table({"input_ids": ids.tolist()}), path)
    return path


class GpuMemoryProbe:
    """Peak of nvidia-smi's memory.used (MiB) on GPU 0 while running."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                 "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(line))
            if self._stop.is_set():
                break
        proc.terminate()

    def __enter__(self) -> "GpuMemoryProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# The activation presets: (wq's --scheme, llm-compressor's recipe) per benchmark method.
SCHEMES = {"fp8": "FP8_DYNAMIC", "w8a8": "W8A8", "nvfp4a16": "NVFP4A16", "nvfp4": "NVFP4"}


def run_wq(ckpt: Path, calib: Path, out: Path, method: str, args: argparse.Namespace) -> dict:
    chosen = ["--scheme", SCHEMES[method]] if method in SCHEMES else ["--method", method, "--bits", "4",
                                                                      "--group-size", "128"]
    cmd = [sys.executable, "-m", "jobs.quantize", "--model", str(ckpt), "--out", str(out), *chosen,
           "--calib", str(calib), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--actors", "1", "--gpus-per-actor", "1", "--overwrite",
           *(["--asym"] if method == "awq" else []), *args.wq_args.split()]
    log = out.with_suffix(".log")
    with GpuMemoryProbe() as probe, open(log, "w") as log_file:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, text=True, stdout=log_file, stderr=subprocess.STDOUT, env=args.env)
        try:
            proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            _dump_stacks(log_file)
            proc.kill()
            raise SystemExit(f"wq ran past {args.timeout_s} s; log and stacks in {log}:\n{log.read_text()[-6000:]}")
        wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"wq failed ({proc.returncode}):\n{log.read_text()[-8000:]}")
    report = json.loads((out / "wq_report.json").read_text())
    # Where the wall time went before and after the blocks: the driver's own timestamps.
    for line in log.read_text().splitlines():
        if any(k in line for k in ("ready to start", "started:", "plan:", "done=1/", "wrote ")) \
                or ("done=" in line and "eta_s=0.0" in line):
            print("   ", line[:160], flush=True)
    # Each actor's planned bytes and torch's device peaks (allocated, reserved), in GiB.
    memory = [{k: round(v / 2**30, 2) if k != "rank" else v for k, v in m.items()} for m in report.get("memory", [])]
    return {"wall_s": wall, "gpu_peak_gib": probe.peak_mib / 1024, "phases": report["totals"].get("phase_seconds", {}),
            "mean_output_error": report["totals"].get("mean_output_error"), "startup": report.get("startup"),
            "memory_gib": memory}


def _dump_stacks(log_file) -> None:
    """py-spy stacks of wq's driver and actors, where py-spy is installed (diagnosing a stuck run)."""
    if shutil.which("py-spy") is None:
        return
    ps = subprocess.run(["ps", "-eo", "pid,args"], text=True, capture_output=True).stdout.splitlines()
    for line in ps:
        pid, _, cmdline = line.strip().partition(" ")
        if "ray::" in cmdline or "jobs.quantize" in cmdline:
            log_file.write(f"\n== py-spy dump {pid} {cmdline[:80]}\n")
            log_file.flush()
            subprocess.run(["py-spy", "dump", "--pid", pid], stdout=log_file, stderr=subprocess.STDOUT, timeout=30)


LLMC_CHILD = r"""
import sys, time, torch, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
ckpt, calib, out, method, n, seq = sys.argv[1:7]
ROUTERS = sys.argv[7].split(",")
ds = datasets.Dataset.from_parquet(calib).select(range(int(n)))
ds = ds.map(lambda r: {"input_ids": r["input_ids"][:int(seq)], "attention_mask": [1] * int(seq)})
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(ckpt)
if method == "gptq":
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", *ROUTERS])
elif method == "fp8":
    recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head", *ROUTERS])
elif method == "w8a8":
    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", *ROUTERS])]
else:
    recipe = AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head", *ROUTERS])
oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=int(seq),
        num_calibration_samples=int(n))
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def run_llmcompressor(ckpt: Path, calib: Path, out: Path, method: str, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", LLMC_CHILD, str(ckpt), str(calib), str(out), method, str(args.samples),
           str(args.seq_len), ",".join(ROUTERS)]
    with GpuMemoryProbe() as probe:
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, text=True, capture_output=True, env=args.env, timeout=args.timeout_s)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-1500:]
            return {"error": f"ran past {args.timeout_s} s (GPU peak so far {probe.peak_mib / 1024:.1f} GiB): "
                             f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}"}
        wall = time.perf_counter() - t
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)    # its progress lines: where the time went
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return {"wall_s": wall, "gpu_peak_gib": probe.peak_mib / 1024}


MODELING = ("import transformers.models.llama.modeling_llama, transformers.models.qwen3_moe.modeling_qwen3_moe, "
            "transformers.models.mixtral.modeling_mixtral, transformers.models.gpt_oss.modeling_gpt_oss")
# What each tool's job imports (the Llama modeling code and generation included), so that no timed run
# compiles bytecode for the other.
WARM_UP = {
    "wq": "import ray, wq_ops.cluster.driver; " + MODELING +
          "; from wq_ops.kernels.build import load_extension; load_extension()",
    "llmcompressor": "import datasets, llmcompressor; " + MODELING,
}


# Before both tools: the GPU libraries' first load (cuBLAS, cuSOLVER, cuDNN's attention), in a child
# process. On a freshly started machine their files are not in the page cache yet, and the first tool to
# touch them (wq, which runs first) paid 1 to 3 s more than the second; a node that has run any GPU job
# before has them cached.
GPU_LIBRARIES = ("import torch, torch.nn.functional as F; a = torch.randn(256, 256, device='cuda'); "
                 "torch.linalg.cholesky(a @ a.T + 256 * torch.eye(256, device='cuda')); b = a.bfloat16(); b @ b; "
                 "q = torch.randn(1, 8, 256, 128, device='cuda', dtype=torch.bfloat16); "
                 "F.scaled_dot_product_attention(q, q, q, is_causal=True); torch.cuda.synchronize()")


def tool_env(pycache: str | None) -> dict[str, str]:
    """The tools' environment. With a bytecode folder, Python caches compiled modules there: a GPU image
    that sets PYTHONDONTWRITEBYTECODE (or has read-only site-packages) otherwise compiles transformers from
    source in every process, 15 to 20 s on the H100 machine, where a pip-installed package has its bytecode."""
    env = dict(os.environ)
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def warm_up(tool: str, env: dict[str, str]) -> float:
    """Before any timed run: build (or load) wq's CUDA kernels, an install step like llm-compressor's
    wheels, and import each tool's modules once, so the bytecode cache holds them."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", WARM_UP[tool]], check=True, env=env)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="8b:gptq", help="comma list of shape:method (SHAPE : gptq|awq|fp8|w8a8); shapes: "
                   + ", ".join(SHAPES))
    p.add_argument("--tools", default="wq,llmcompressor")
    p.add_argument("--work", default="/tmp/wq-bench")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--wq-args", default="", help="extra wq flags, e.g. '--propagation float'")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--timeout-s", dest="timeout_s", type=float, default=900, help="per tool run")
    p.add_argument("--pycache", default="WORK/pycache", help="bytecode cache folder for both tools ('none': the "
                   "environment's own setting)")
    p.add_argument("--make-checkpoint", dest="make_checkpoint", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, work)
        return 0
    pycache = None if args.pycache == "none" else args.pycache.replace("WORK", str(work))
    args.env = tool_env(pycache)
    tools = args.tools.split(",")
    rows = []
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", GPU_LIBRARIES], check=True, env=args.env)
    print(f"GPU libraries loaded once in {time.perf_counter() - t:.1f} s (for both tools; not timed)", flush=True)
    for tool in tools:
        print(f"{tool}: kernels and imports warmed in {warm_up(tool, args.env):.1f} s (not part of any timed run; "
              f"bytecode cache {pycache})", flush=True)
    for case in args.cases.split(","):
        shape, method = case.split(":")
        t = time.perf_counter()
        # In a child process: this one must hold no GPU memory (a CUDA context, the generator's cached
        # blocks: 2 to 4 GiB) while the probe measures the tools.
        subprocess.run([sys.executable, __file__, "--make-checkpoint", shape, "--work", str(work)], check=True)
        ckpt = checkpoint_path(shape, work)
        calib = make_calibration(work, n_samples=args.samples, seq_len=args.seq_len, vocab=SHAPES[shape]["vocab_size"])
        print(f"[{case}] checkpoint and data ready in {time.perf_counter() - t:.1f} s", flush=True)
        row = {"case": case}
        if "wq" in tools:
            row["wq"] = run_wq(ckpt, calib, work / f"out-wq-{shape}-{method}", method, args)
            print(f"[{case}] wq: {json.dumps(row['wq'])}", flush=True)
        if "llmcompressor" in tools:
            row["llmcompressor"] = run_llmcompressor(ckpt, calib, work / f"out-llmc-{shape}-{method}", method, args)
            print(f"[{case}] llm-compressor: {json.dumps(row['llmcompressor'])}", flush=True)
        rows.append(row)
    print()
    print("| case | wq wall (s) | wq GPU peak (GiB) | llm-compressor wall (s) | llmc GPU peak (GiB) | speed-up | "
          "wq phases (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wq, lc = r.get("wq", {}), r.get("llmcompressor", {})
        ratio = f"{lc['wall_s'] / wq['wall_s']:.1f}x" if "wall_s" in lc and "wall_s" in wq else "-"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in wq.get("phases", {}).items())
        nan = float("nan")
        print(f"| {r['case']} | {wq.get('wall_s', nan):.1f} | {wq.get('gpu_peak_gib', nan):.1f} | "
              f"{lc.get('wall_s', nan):.1f} | {lc.get('gpu_peak_gib', nan):.1f} | {ratio} | {phases} |")
        if "error" in lc:
            print(f"llm-compressor failed on {r['case']}: {lc['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
