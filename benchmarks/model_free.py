"""Model-free quantization (`wq --model-free`) against llm-compressor's `model_free_ptq`, on the same checkpoint
files, with the time to read the checkpoint once as the floor ("read": every tensor of every shard loaded by a
fresh process through safetensors, the page cache dropped first where the machine allows it, as before every
timed run).

Makes an 8B-shape (or 1B-shape) checkpoint of random bf16 weights with `benchmarks/gpu_e2e.py`, then runs each tool
as its own process, timing it from start to written artifact and sampling the GPU's memory (nvidia-smi).
Prints one table: wall time, GPU peak, and each tool's time over the read's and over wq's.

    python benchmarks/model_free.py --shape 8b --cases FP8_DYNAMIC,W4A16 --work /tmp/mf-bench \\
        --wq-args="--actors 4 --gpus-per-actor 0.25 --cpus-per-actor 4" --llmc-workers 8

Cases are scheme names; wq's W4A16 is HQQ (its model-free default for integer weights), llm-compressor's is RTN
with its memoryless min-max observer (the only grid it has without calibration): the row says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_e2e import SHAPES, GpuMemoryProbe, checkpoint_path, tool_env  # noqa: E402

READ_CHILD = r"""
import json, sys, time
from pathlib import Path
from safetensors import safe_open
root = Path(sys.argv[1])
files = sorted(set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"].values()))
t, total = time.perf_counter(), 0
for f in files:
    with safe_open(str(root / f), framework="pt") as g:
        for k in g.keys():
            total += g.get_tensor(k).numel()
print(json.dumps({"elements": total, "seconds": time.perf_counter() - t}))
"""

LLMC_CHILD = r"""
import sys
from llmcompressor import model_free_ptq
ckpt, out, scheme, workers, device = sys.argv[1:6]
model_free_ptq(model_stub=ckpt, save_directory=out, scheme=scheme, ignore=["lm_head", "re:.*mlp.gate$"],
               max_workers=int(workers), device=device)
"""


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be dropped (root on Linux): then every run reads from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> dict:
    cold = drop_page_cache()
    with GpuMemoryProbe() as probe, open(log, "w") as out:
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"ran past {timeout_s} s", "cold": cold}
        wall = time.perf_counter() - t
    if proc.returncode:
        return {"error": log.read_text()[-1500:], "cold": cold}
    return {"wall_s": wall, "gpu_peak_gib": probe.peak_mib / 1024, "cold": cold}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="FP8_DYNAMIC", help="comma list of schemes")
    p.add_argument("--tools", default="read,wq,llmcompressor")
    p.add_argument("--work", default="/tmp/mf-bench")
    p.add_argument("--wq-args", default="--actors 4 --gpus-per-actor 0.25 --cpus-per-actor 4")
    p.add_argument("--llmc-workers", type=int, default=8)
    p.add_argument("--llmc-device", default="cuda:0")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = tool_env(str(work / "pycache"))
    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "gpu_e2e.py"), "--make-checkpoint", args.shape,
                    "--work", str(work)], check=True)
    ckpt = checkpoint_path(args.shape, work)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t:.1f} s", flush=True)
    tools = args.tools.split(",")
    for tool in tools:     # imports compiled once, so no timed run pays for bytecode
        warm = {"wq": "import ray, wq_ops.cluster.model_free; from wq_ops.kernels.build import load_extension; "
                      "load_extension()", "llmcompressor": "import llmcompressor"}.get(tool)
        if warm:
            subprocess.run([sys.executable, "-c", warm], check=True, env=env)
    read = timed([sys.executable, "-c", READ_CHILD, str(ckpt)], env, work / "read.log", args.timeout_s) \
        if "read" in tools else {}
    print(f"read: {json.dumps(read)}", flush=True)
    rows = []
    for scheme in args.cases.split(","):
        row: dict = {"scheme": scheme, "read": read}
        if "wq" in tools:
            out = work / f"out-wq-{scheme}"
            row["wq"] = timed([sys.executable, "-m", "jobs.quantize", "--model", str(ckpt), "--model-free",
                               "--scheme", scheme, "--out", str(out), "--overwrite", *args.wq_args.split()],
                              env, work / f"wq-{scheme}.log", args.timeout_s)
            if "wall_s" in row["wq"]:
                report = json.loads((out / "wq_report.json").read_text())
                row["wq"]["method"] = report["job"]["method"]
                row["wq"]["mean_weight_error"] = report["totals"]["mean_weight_error"]
            print(f"[{scheme}] wq: {json.dumps(row['wq'])}", flush=True)
        if "llmcompressor" in tools:
            row["llmcompressor"] = timed([sys.executable, "-c", LLMC_CHILD, str(ckpt), str(work / f"out-llmc-{scheme}"),
                                          scheme, str(args.llmc_workers), args.llmc_device],
                                         env, work / f"llmc-{scheme}.log", args.timeout_s)
            print(f"[{scheme}] llm-compressor: {json.dumps(row['llmcompressor'])}", flush=True)
        rows.append(row)
    nan = float("nan")
    print()
    print("| scheme | read (s) | wq wall (s) | wq GPU peak (GiB) | llm-compressor wall (s) | llmc GPU peak (GiB) | "
          "llmc / wq | wq / read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wq, lc, rd = r.get("wq", {}), r.get("llmcompressor", {}), r.get("read", {})
        ratio = f"{lc['wall_s'] / wq['wall_s']:.1f}x" if "wall_s" in lc and "wall_s" in wq else "-"
        over_read = f"{wq['wall_s'] / rd['wall_s']:.2f}" if "wall_s" in wq and "wall_s" in rd else "-"
        print(f"| {r['scheme']} ({wq.get('method', '?')}) | {rd.get('wall_s', nan):.1f} | "
              f"{wq.get('wall_s', nan):.1f} | {wq.get('gpu_peak_gib', nan):.1f} | {lc.get('wall_s', nan):.1f} | "
              f"{lc.get('gpu_peak_gib', nan):.1f} | {ratio} | {over_read} |")
        for tool in ("wq", "llmcompressor"):
            if "error" in r.get(tool, {}):
                print(f"{tool} failed on {r['scheme']}: {r[tool]['error']}")
    print(f"page cache dropped before each run: {read.get('cold', '?')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
