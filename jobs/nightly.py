"""Nightly requantization: `python -m jobs.nightly --watch-list watch.yaml --state /data/state/nightly.json
--artifacts /data/artifacts --address http://HEAD:8265 [--dry-run]`.

Asks the Hub for the current revision of every watched model, submits one `jobs.quantize` job to the Ray
cluster per (model, revision, recipe) not made yet, waits for them, and records each outcome (job logs
are saved beside the state file). A failed job is retried on the next runs, up to the watch list's
max_attempts. The watch list format is `wq_ops.schedule.watchlist.WatchList`; HF_TOKEN reaches the Hub.

Exit codes: 0 every job succeeded (or nothing was new); 1 a job failed; 2 the run could not start (bad
watch list, unreachable cluster, unreadable state); 3 the jobs succeeded but a watched repo is missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from wq_ops.errors import ConfigError, WqError
from wq_ops.schedule.hub import HfHubSource
from wq_ops.schedule.nightly import ExitCode, run_nightly
from wq_ops.schedule.state import StateStore
from wq_ops.schedule.submit import RayJobSubmitter
from wq_ops.schedule.watchlist import WatchList


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wq-nightly", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch-list", dest="watch_list", required=True, help="YAML: recipes, watched repos, policy")
    p.add_argument("--state", required=True, help="state file on a durable volume; job logs go to logs/ beside it")
    p.add_argument("--artifacts", required=True, help="artifacts root, mounted at this path on every Ray node")
    p.add_argument("--address", help="Ray job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                   "then $RAY_ADDRESS)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the jobs it would submit; "
                   "submits and writes nothing")
    p.add_argument("--poll-s", dest="poll_s", type=float, default=10.0, help="seconds between job status polls")
    p.add_argument("--log-level", dest="log_level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="(default: INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        watch = WatchList.from_dict(yaml.safe_load(Path(args.watch_list).read_text()))
        from_env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
        address: str = args.address or from_env
        if not args.dry_run and not address:
            raise ConfigError("--address: missing; give the Ray job server (http://HEAD:8265) or set RAY_ADDRESS")
        if from_env and address != from_env:   # Ray's job client would quietly use the environment's instead
            raise ConfigError(f"--address {address}: $RAY_API_SERVER_ADDRESS/$RAY_ADDRESS say {from_env}, and Ray's "
                              "job client prefers them; unset them or pass the same address")
        report = run_nightly(watch, hub=HfHubSource(), submitter=None if args.dry_run else RayJobSubmitter(address),
                             store=StateStore(Path(args.state)), artifacts_root=args.artifacts,
                             dry_run=args.dry_run, poll_s=args.poll_s)
    except (WqError, OSError, yaml.YAMLError) as e:
        print(f"wq-nightly: error: {e}", file=sys.stderr)
        return int(ExitCode.ERROR)
    print(report.describe())
    return int(report.exit_code)


if __name__ == "__main__":
    sys.exit(main())
