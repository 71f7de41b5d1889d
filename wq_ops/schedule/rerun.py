"""Run a driver again when it dies (`run_with_retries`): what KubeRay's `backoffLimit` would do for a RayJob on
its own cluster, for one attached to a shared cluster with `clusterSelector`, where KubeRay refuses retries
(they would delete the shared RayCluster). A rerun of `jobs.quantize` resumes from the staged blocks and takes
over the output lease of the driver that died."""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Callable, Sequence

__all__ = ["run_with_retries", "NOT_RETRIED"]

log = logging.getLogger(__name__)

# Exit codes a rerun would only repeat: success, and a usage or input error (wq's 2). Everything else (a crash,
# a kill by signal, 75: actors lost more often than --max-actor-restarts allows) is run again.
NOT_RETRIED = (0, 2)


def run_with_retries(command: Sequence[str], *, attempts: int, delay_s: float,
                     sleep: Callable[[float], None] = time.sleep) -> int:
    """Run `command` up to `attempts` times, until it exits with a code in NOT_RETRIED; returns the last exit
    code (128 + N for a kill by signal N, as a shell reports it)."""
    code = 1
    for attempt in range(1, attempts + 1):
        code = subprocess.call(list(command))
        if code in NOT_RETRIED:
            return code
        log.warning("attempt %d of %d ended with exit code %d; %s", attempt, attempts, code,
                    "running it again" if attempt < attempts else "no attempts left")
        if attempt < attempts:
            sleep(delay_s)
    return code if code > 0 else 128 - code       # subprocess gives -N for signal N
