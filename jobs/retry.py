"""Run a driver again when it dies: `python -m jobs.retry --attempts 3 -- python -m jobs.quantize [...]`.

Runs the command again after an exit that a rerun can make good: killed (an OOM kill, SIGKILL), crashed, or 75
(wq's "actors lost more often than --max-actor-restarts allows"). Exit 0 and exit 2 (a usage or input error,
which a rerun repeats) end it. See `wq_ops.schedule.rerun`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from wq_ops.schedule.rerun import run_with_retries


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
    logging.basicConfig(level="INFO", format="wq-retry: %(message)s")
    return run_with_retries(command, attempts=args.attempts, delay_s=args.delay_s)


if __name__ == "__main__":
    sys.exit(main())
