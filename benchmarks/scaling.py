"""Scaling across GPUs of one machine: the same wq job with 1, 2, 4 ... actors, one GPU each, in one run.

Uses gpu_e2e.py's random-weight checkpoints and random calibration tokens (Llama-3-8B shape by default,
128 x 2048 tokens, GPTQ W4A16 g128). Prints, per GPU count: wall time of the whole job, speed-up over
one GPU, and each actor's busy fraction: the seconds its blocks computed (forward, solve, pack; loads
and writes overlap them) over the time from the first block's start to the last block's end. Float
propagation (`--propagation float`) is what lets actors overlap; with quantized propagation each actor
waits for the previous one, and the table shows it.

    python benchmarks/scaling.py --gpus 1,2 --shape 8b --work /tmp/bench
    python benchmarks/scaling.py --gpus 1,2,4,8 --shape 70b --propagation float --work /data/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import SHAPES, build_kernels, make_calibration, make_checkpoint  # noqa: E402

COMPUTE_PHASES = ("forward", "solve", "pack")


def busy_fractions(report: dict) -> list[float]:
    """Per actor: compute seconds of its blocks over the span of the pipeline (first block start, taken
    as the earliest block's end minus its seconds, to the last block's end)."""
    blocks = [b for b in report["blocks"] if not b["resumed"]]
    start = min(b["finished_at"] - sum(b["seconds"].values()) for b in blocks)
    span = max(b["finished_at"] for b in blocks) - start
    out = []
    for actor in report["actors"]:
        busy = sum(actor["seconds"].get(p, 0.0) for p in COMPUTE_PHASES)
        out.append(busy / span if span > 0 else 0.0)
    return out


def run(n_gpus: int, ckpt: Path, calib: Path, args: argparse.Namespace) -> dict:
    out = Path(args.work) / f"out-scaling-{args.shape}-{n_gpus}gpu"
    cmd = [sys.executable, "-m", "jobs.quantize", "--model", str(ckpt), "--out", str(out), "--method", "gptq",
           "--bits", "4", "--group-size", "128", "--calib", str(calib), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--actors", str(n_gpus), "--gpus-per-actor", "1", "--overwrite",
           "--propagation", args.propagation]
    log = out.with_suffix(".log")
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout_s)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"wq failed on {n_gpus} GPU(s):\n{log.read_text()[-6000:]}")
    report = json.loads((out / "wq_report.json").read_text())
    return {"gpus": n_gpus, "wall_s": wall, "busy": busy_fractions(report),
            "phases": report["totals"]["phase_seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="comma list of GPU counts, one actor per GPU")
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--propagation", default="float", choices=["float", "quantized"])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--work", default="/tmp/wq-bench")
    p.add_argument("--timeout-s", dest="timeout_s", type=float, default=1800)
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.shape, work)
    calib = make_calibration(work, n_samples=args.samples, seq_len=args.seq_len,
                             vocab=SHAPES[args.shape]["vocab_size"])
    print(f"wq CUDA kernels built/loaded in {build_kernels():.1f} s (not part of any timed run)", flush=True)
    rows = []
    for n in (int(g) for g in args.gpus.split(",")):
        rows.append(run(n, ckpt, calib, args))
        print(f"[{n} GPU] {json.dumps(rows[-1])}", flush=True)
    base = next((r["wall_s"] for r in rows if r["gpus"] == 1), None)
    print(f"\n{args.shape} shape, GPTQ W4A16 g128, {args.samples} x {args.seq_len} tokens, "
          f"{args.propagation} propagation")
    print("| GPUs | wall (s) | speed-up vs 1 GPU | busy fraction per actor |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{base / r['wall_s']:.2f}x" if base else "-"
        print(f"| {r['gpus']} | {r['wall_s']:.1f} | {ratio} | {', '.join(f'{b:.2f}' for b in r['busy'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
