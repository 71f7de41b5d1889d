"""llm-compressor's artifacts of the same presets, scored by the same evaluation as wq's (`benchmarks/quality.py`):
SmolLM2-135M, the same 64 calibration windows of 512 tokens (wq's own sampling, handed to llm-compressor as
pre-tokenized rows), WikiText-2 test perplexity by `jobs.eval` (activations quantized as each scheme serves them).

llm-compressor runs in a venv of its own (its pins differ from wq's): `--llmc-python /tmp/llmc-venv/bin/python`
after `python -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1`.

    python benchmarks/llmc_quality.py --model /tmp/smollm2-hf --work /tmp/wq-quality-s \\
        --llmc-python /tmp/llmc-venv/bin/python --schemes W8A8,FP8_DYNAMIC,FP8,NVFP4A16,NVFP4

Prints one table: each scheme's wq perplexity (from quality.py's artifacts in --work, where present) and
llm-compressor's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

LLMC_CHILD = r"""
import sys, torch, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
ckpt, calib, out, scheme = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))
ds = datasets.Dataset.from_parquet(calib)
ds = ds.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(ckpt)
if scheme == "W8A8":        # its own example's recipe, at wq's default alpha
    recipe = [SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(targets="Linear", scheme="W8A8",
                                                                        ignore=["lm_head"])]
else:
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=len(ds[0]["input_ids"]),
        num_calibration_samples=len(ds))
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--llmc-python", required=True, help="the python of a venv with llm-compressor")
    p.add_argument("--schemes", default="W8A8,FP8_DYNAMIC,FP8,NVFP4A16,NVFP4")
    p.add_argument("--calib", default=str(SHARED / "assets/wikitext-2/tokenized/valid.txt"))
    p.add_argument("--text", default=str(SHARED / "assets/wikitext-2/raw/wiki.test.raw"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from wq_ops.calib.data import calibration_tokens

    ids = calibration_tokens(args.calib, lambda: AutoTokenizer.from_pretrained(args.model), n_samples=args.samples,
                             seq_len=args.seq_len, seed=0)
    calib = work / f"calib-{args.samples}x{args.seq_len}.parquet"
    pq.write_table(pa.table({"input_ids": ids.tolist()}), calib)

    def evaluate(model_dir: Path) -> float:
        out = work / (model_dir.name + ".ppl.json")
        if not out.exists():
            subprocess.run([sys.executable, "-m", "jobs.eval", "--model", str(model_dir), "--text", args.text,
                            "--seq-len", "2048", "--max-windows", str(args.eval_windows), "--threads",
                            str(args.cpus), "--device", "cpu", "--json", str(out)], check=True, cwd=REPO,
                           capture_output=True)
        return float(json.loads(out.read_text())["ppl"])

    rows = []
    for scheme in args.schemes.split(","):
        out = work / f"llmc-{scheme.lower()}"
        start = time.perf_counter()
        if not (out / "config.json").exists():
            done = subprocess.run([args.llmc_python, "-c", LLMC_CHILD, args.model, str(calib), str(out), scheme,
                                   str(args.cpus)], capture_output=True, text=True)
            if done.returncode:
                print(f"{scheme}: llm-compressor failed:\n{done.stderr[-2000:]}", flush=True)
                continue
        seconds = time.perf_counter() - start
        theirs = evaluate(out)
        ours_dir = work / scheme.lower()
        ours = evaluate(ours_dir) if (ours_dir / "model.safetensors.index.json").exists() else float("nan")
        rows.append((scheme, ours, theirs, seconds))
        print(f"{scheme}: wq {ours:.3f}, llm-compressor {theirs:.3f} ({seconds:.0f} s)", flush=True)
    print()
    print("| scheme | wq ppl | llm-compressor ppl | wq vs llm-compressor |")
    print("| --- | --- | --- | --- |")
    for scheme, ours, theirs, _ in rows:
        print(f"| {scheme} | {ours:.3f} | {theirs:.3f} | {(ours / theirs - 1) * 100:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
