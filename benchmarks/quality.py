"""Perplexity of SmolLM2-135M quantized by wq: bf16 against RTN, GPTQ and AWQ at w4g64, w3g64 and w8g64,
and the presets that quantize activations (rows named by --scheme: W8A8, FP8_DYNAMIC, FP8; `jobs.eval`
quantizes each linear's input as the scheme says).

  python benchmarks/quality.py --model /tmp/smollm2-hf --work /tmp/wq-quality --write benchmarks/quality.md
  python benchmarks/quality.py --model /tmp/smollm2-hf --work /tmp/wq-quality --rows W8A8,FP8_DYNAMIC,FP8

Each row quantizes with the same calibration set (random windows of the tokenized WikiText-2 validation
split) on local CPU actors, loads the artifact with transformers (compressed-tensors installed; transformers'
own modules, no Hub kernels: wq_ops/evaluate/load.py) and
scores the first --eval-windows non-overlapping windows of raw/wiki.test.raw (lines joined by a blank line).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ROWS = [(m, b) for b in (4, 3, 8) for m in ("rtn", "gptq", "awq")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="folder for the artifacts")
    p.add_argument("--calib", default=str(SHARED / "assets/wikitext-2/tokenized/valid.txt"))
    p.add_argument("--text", default=str(SHARED / "assets/wikitext-2/raw/wiki.test.raw"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rows", help="comma list of method:bits or --scheme names to run, e.g. rtn:4,gptq:4,W8A8 "
                   "(default: every method:bits row)")
    p.add_argument("--write", help="write the markdown table here")
    p.add_argument("--wq-args", default="", help="more flags for every quantize job, e.g. '--awq-loss layer'")
    p.add_argument("--tag", default="", help="suffix of the artifact folders (keeps --wq-args variants apart)")
    p.add_argument("--model-free", dest="model_free", action="store_true", help="quantize with --model-free (no "
                   "calibration; the rows' folders get the suffix -mf)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def evaluate(model_dir: str) -> float:
        out = work / (Path(model_dir).name + ".ppl.json")
        if not out.exists():
            subprocess.run([sys.executable, "-m", "jobs.eval", "--model", model_dir, "--text", args.text,
                            "--seq-len", str(args.eval_seq_len), "--max-windows", str(args.eval_windows),
                            "--threads", str(args.cpus), "--device", "cpu", "--json", str(out)],
                           check=True, cwd=REPO, capture_output=True)
        return json.loads(out.read_text())["ppl"]

    results = [("bf16", "-", evaluate(args.model), 0.0)]
    base = evaluate(args.model)
    rows: list[tuple[str, int | None]] = list(ROWS) if not args.rows else [
        (r.split(":")[0], int(r.split(":")[1]) if ":" in r else None) for r in args.rows.split(",")]
    for method, bits in rows:
        # A row without bits is a --scheme preset: it sets method, bits and grid itself.
        grid = f"w{bits}g{args.group_size}" if bits is not None else method.lower()
        out = work / (grid if bits is None else f"{method}-{grid}")
        out = out.with_name(out.name + (f"-{args.tag}" if args.tag else "") + ("-mf" if args.model_free else ""))
        chosen = ["--method", method, "--bits", str(bits), "--group-size", str(args.group_size)] if bits is not None \
            else ["--scheme", method]
        start = time.perf_counter()
        if not (out / "model.safetensors.index.json").exists():
            data = ["--model-free"] if args.model_free else ["--calib", args.calib, "--samples", str(args.samples),
                                                             "--seq-len", str(args.seq_len)]
            subprocess.run([sys.executable, "-m", "jobs.quantize", "--model", args.model, "--out", str(out), *chosen,
                            *data, "--cpus-per-actor", str(args.cpus), "--log-level", "WARNING",
                            *shlex.split(args.wq_args)], check=True, cwd=REPO, capture_output=True)
        report = json.loads((out / "wq_report.json").read_text())
        if bits is None:                          # the preset's method, and SmoothQuant's alpha where it ran
            method = f"{report['job']['method']}" + (f", smoothquant {report['job']['smoothquant']}"
                                                      if report["job"].get("smoothquant") is not None else "")
        results.append((method, grid, evaluate(str(out)), report["totals"]["wall_seconds"]))
        print(f"{method} {grid}: ppl {results[-1][2]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    lines = [
        "# Quality: SmolLM2-135M, WikiText-2 perplexity",
        "",
        f"Measured {date.today().isoformat()} on CPU ({platform.processor() or platform.machine()}, "
        f"{args.cpus} threads) with `benchmarks/quality.py`:",
        "",
        "```",
        f"python benchmarks/quality.py --model {args.model} --work {args.work} --samples {args.samples} "
        f"--seq-len {args.seq_len} --eval-windows {args.eval_windows}"
        + (f" --rows {args.rows}" if args.rows else "")
        + (f" --wq-args '{args.wq_args}' --tag {args.tag}" if args.wq_args else "")
        + (" --model-free" if args.model_free else "") + " --write benchmarks/quality.md",
        "```",
        "",
        "- model: SmolLM2-135M-Instruct built by `../shared/tools/make-smollm2-checkpoint.sh` (bf16; its "
        "weights were Q4_1 upstream, see ../shared/assets/README.md)",
        f"- calibration: {args.samples} random windows of {args.seq_len} tokens (seed 0) from WikiText-2 "
        "`tokenized/valid.txt` (disjoint from test)",
        f"- evaluation: the first {args.eval_windows} non-overlapping windows of {args.eval_seq_len} tokens of "
        "`raw/wiki.test.raw`, lines joined by a blank line; ppl = exp(mean window NLL)",
        "- methods: symmetric grids, group size 64 (576 is not a multiple of 128); GPTQ with act-order (static "
        "groups) and damp 0.01; AWQ with a 20-point scale grid, the layer loss (unless --wq-args says "
        "otherwise) and clip search",
        "- every artifact loaded with `transformers.AutoModelForCausalLM.from_pretrained(..., use_kernels=False)` "
        "(`jobs.eval`)",
        "",
        "| weights | scheme | ppl | vs bf16 | quantize wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, scheme, ppl, seconds in results:
        rel = "-" if method == "bf16" else f"{(ppl / base - 1) * 100:+.1f}%"
        lines.append(f"| {method} | {scheme} | {ppl:.3f} | {rel} | {seconds:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        Path(args.write).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
