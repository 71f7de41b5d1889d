"""Run a driver again when it dies: `python -m jobs.retry --attempts 3 -- python -m jobs.quantize [...]`.

What KubeRay's `backoffLimit` would do for a RayJob that brings its own cluster, for one that runs on an
existing cluster (`clusterSelector`), where KubeRay refuses retries (they would delete the shared cluster). The
command runs again after an exit that a rerun can make good: killed (an OOM kill, SIGKILL), crashed, or 75
(wq's "actors lost more often than --max-actor-restarts allows"). Exit 0 and exit 2 (a usage or input error,
which a rerun repeats) end it. A rerun of `jobs.quantize` resumes from the staged blocks and takes over the
output lease of the driver that died."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

__all__ = ["main", "NOT_RETRIED"]

NOT_RETRIED = (0, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wq-retry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attempts", type=int, default=3, help="runs at most (default: 3)")
    p.add_argument("--delay-s", type=float, default=5.0, help="seconds between runs (default: 5)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.attempts < 1 or not args.delay_s >= 0:
        p.error("give --attempts >= 1, --delay-s >= 0, and the command after --")
    code = 1
    for attempt in range(1, args.attempts + 1):
        code = subprocess.call(command)
        if code in NOT_RETRIED:
            return code
        print(f"wq-retry: attempt {attempt} of {args.attempts} ended with exit code {code}"
              + ("; running it again" if attempt < args.attempts else "; no attempts left"), file=sys.stderr)
        if attempt < args.attempts:
            time.sleep(args.delay_s)
    return code if code > 0 else 128 - code    # killed by signal N (subprocess gives -N): 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main())
