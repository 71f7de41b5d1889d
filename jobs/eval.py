"""Perplexity of a model or an artifact on a text file:
`python -m jobs.eval --model out/smollm2-w4 --text wiki.test.raw --seq-len 2048 [--max-windows 16]`.

Join and windows are stated in `wq_ops.evaluate.perplexity`: lines joined by a blank line (--join
wikitext, the HF-rows convention) or the file as is (--join raw); non-overlapping windows of seq-len.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from wq_ops.errors import WqError
from wq_ops.evaluate.load import load_causal_lm, load_tokenizer
from wq_ops.evaluate.perplexity import Join, join_text, perplexity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wq-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint or artifact directory (or Hub repo id)")
    p.add_argument("--text", required=True, help="text file, e.g. wikitext-2 raw/wiki.test.raw")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--join", choices=[j.value for j in Join], default=Join.WIKITEXT.value)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (auto: the checkpoint's; float32 is several times faster on a CPU "
                   "without bfloat16 instructions)")
    p.add_argument("--json", help="also write the result here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seq_len < 2 or (args.max_windows is not None and args.max_windows < 1):   # before loading anything
        print(f"wq-eval: error: --seq-len {args.seq_len} --max-windows {args.max_windows}: a window needs at least 2 "
              "tokens and at least 1 window is scored", file=sys.stderr)
        return 2
    try:
        text = join_text(Path(args.text).read_text(encoding="utf-8"), Join(args.join))
        ids = load_tokenizer(args.model)(text, return_tensors="pt", verbose=False)["input_ids"][0]
        model = load_causal_lm(args.model, device=args.device,
                               dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
        result = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.max_windows, device=args.device)
    except (WqError, OSError) as e:
        print(f"wq-eval: error: {e}", file=sys.stderr)
        return 2
    line = {"model": args.model, "ppl": round(result.ppl, 4), "windows": result.n_windows, "tokens": result.n_tokens,
            "seq_len": result.seq_len, "join": args.join}
    print(" ".join(f"{k}={v}" for k, v in line.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
