"""Byte identity of artifacts across commits: run a matrix of quantize jobs (GPTQ, AWQ, RTN; 1 and 3 actors;
quantized and float propagation; stream and block span modes) on CPU, and record the sha256 of every shard and
of config.json. With --against REV the same matrix runs from a git worktree of REV too, in the same run, and
every case is compared: a refactor that must not change behaviour shows "same" everywhere.

  python benchmarks/artifact_hashes.py --smollm2 /tmp/smollm2-hf --work /tmp/wq-hashes --against d6fcda5
  python benchmarks/artifact_hashes.py --work /tmp/wq-hashes --json now.json --compare before.json

Jobs run through the command line (`python -m jobs.quantize`), whose flags stay stable across refactors of
the library; small calibration sets keep the matrix to minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
METHODS = ("gptq", "awq", "rtn")
# (name, flags): where the actors run and how activations flow; every one must give the same bytes as before.
LAYOUTS = (
    ("1actor-quantized", ["--actors", "1", "--propagation", "quantized"]),
    ("3actors-quantized", ["--actors", "3", "--propagation", "quantized", "--runtime", "ray"]),
    ("1actor-float", ["--actors", "1", "--propagation", "float"]),
    ("3actors-float-stream", ["--actors", "3", "--propagation", "float", "--span-mode", "stream"]),
    ("3actors-float-block", ["--actors", "3", "--propagation", "float", "--span-mode", "block"]),
)


def models(args: argparse.Namespace) -> dict[str, list[str]]:
    out = {"tiny": ["--samples", "8", "--seq-len", "128"]}
    if args.smollm2:
        out["smollm2"] = ["--model", args.smollm2, "--group-size", "64", "--calib",
                          str(SHARED / "assets/wikitext-2/tokenized/valid.txt"), "--samples", "8", "--seq-len", "128"]
    return out


def artifact_hashes(out: Path) -> dict[str, str]:
    files = sorted(out.glob("*.safetensors")) + [out / "config.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_matrix(checkout: Path, work: Path, args: argparse.Namespace) -> dict[str, dict[str, str]]:
    results: dict[str, dict[str, str]] = {}
    for model, model_flags in models(args).items():
        for method in METHODS:
            for layout, flags in LAYOUTS:
                case = f"{model}/{method}/{layout}"
                if args.only and not any(part in case for part in args.only.split(",")):
                    continue
                if model == "smollm2" and args.smollm2_layouts and layout not in args.smollm2_layouts.split(","):
                    continue
                out = work / case.replace("/", "-")
                if args.reuse and (out / "model.safetensors.index.json").exists():
                    results[case] = artifact_hashes(out)          # a complete artifact of an earlier run
                    print(f"{checkout.name}: {case} reused", flush=True)
                    continue
                command = [sys.executable, "-m", "jobs.quantize", "--out", str(out), "--overwrite", "--method", method,
                           "--cpus-per-actor", "1", "--log-level", "WARNING", *model_flags, *flags]
                start = time.perf_counter()
                done = subprocess.run(command, cwd=checkout, capture_output=True, text=True,
                                      env={**_env(), "WQ_CACHE_DIR": str(work / "cache")})
                if done.returncode:
                    results[case] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
                else:
                    results[case] = artifact_hashes(out)
                print(f"{checkout.name}: {case} {time.perf_counter() - start:.0f} s"
                      + (f" FAILED: {results[case]['error']}" if "error" in results[case] else ""), flush=True)
    return results


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def compare(before: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> int:
    differ = 0
    for case in sorted(set(before) | set(now)):
        a, b = before.get(case), now.get(case)
        same = a is not None and a == b and "error" not in a
        differ += not same
        print(f"{'same ' if same else 'DIFF '} {case}" + ("" if same else f"  before={a} now={b}"))
    print(f"{len(set(before) | set(now)) - differ} same, {differ} different")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the artifacts (and the worktree of --against)")
    p.add_argument("--smollm2", help="SmolLM2 checkpoint (../shared/tools/make-smollm2-checkpoint.sh); else tiny only")
    p.add_argument("--only", help="comma list of substrings: run the cases that contain one")
    p.add_argument("--smollm2-layouts", help="comma list of the layouts to run on SmolLM2 (all)")
    p.add_argument("--reuse", action="store_true", help="hash a complete artifact already in --work, not rerun it")
    p.add_argument("--against", help="a git revision: run the matrix there too and compare")
    p.add_argument("--compare", help="a JSON of an earlier run to compare with")
    p.add_argument("--json", help="write this run's hashes here")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    if args.against:
        tree = work / f"worktree-{args.against}"
        if not tree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.against], cwd=REPO, check=True)
        before = run_matrix(tree, work / "before", args)
    now = run_matrix(REPO, work / "now", args)
    if args.json:
        Path(args.json).write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    return compare(before, now) if before is not None else 0


if __name__ == "__main__":
    sys.exit(main())
