"""DeepSeek-V3 (671B) GPTQ W4A16 g128 planned for clusters that are not at hand, from its config.json and a
generated index (`tests/fixtures/deepseek_v3/make_index.py`): for each cluster, the plan's memory per block
actor and per expert actor, whether it fits, and the time estimate from measured rates
(`wq_ops/cluster/estimate.py`). Prints a markdown table (docs/scaling.md holds the last one).

    python benchmarks/deepseek_plan.py --work /tmp/dsv3
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wq_ops.cluster.driver import run_job  # noqa: E402
from wq_ops.cluster.plan import GIB, check_fits  # noqa: E402
from wq_ops.config import JobConfig  # noqa: E402
from wq_ops.errors import WqError  # noqa: E402

# (name, GPUs, GiB per GPU, block actors): every GPU but the block actors' runs an expert actor.
CLUSTERS = [("1 x H100 80 GB", 1, 80, 1), ("1 x H200 141 GB", 1, 141, 1), ("8 x H100 80 GB", 8, 80, 1),
            ("8 x H200 141 GB", 8, 141, 1),
            ("16 x H100 80 GB", 16, 80, 1), ("16 x H100 80 GB, 2 block actors", 16, 80, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = importlib.util.spec_from_file_location("make_index", REPO / "tests/fixtures/deepseek_v3/make_index.py")
    assert spec is not None and spec.loader is not None
    make_index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_index)
    model = make_index.write(args.work / "DeepSeek-V3")
    print("| cluster | flags | block actor | expert actor | fits | estimate (min): total = dense + experts + "
          "expert loads + transfers + start-up |")
    print("|---|---|---|---|---|---|")
    for name, gpus, gib, block_actors in CLUSTERS:
        flags = {"actors": block_actors, "expert_actors": gpus - block_actors, "gpus_per_actor": 1,
                 "actor_memory_gib": gib}
        job = JobConfig.from_dict({"model": str(model), "calib": str(model / "calib-ids.parquet"),
                                   "out": str(args.work / "out"), "dry_run": True, "method": "gptq",
                                   "group_size": 128, **flags})
        plan = run_job(job, cache_dir=args.work / "cache").plan
        try:
            check_fits(plan)
            fits = "yes"
        except WqError as e:
            fits = "no: " + str(e).split(";")[0]
        block = max(a.memory.total for a in plan.actors) / GIB
        expert = f"{plan.experts.total / GIB:.1f} GiB ({plan.experts_per_actor} experts)" if plan.experts else "-"
        shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
        e = plan.estimate
        estimate = "-" if e is None else (f"{e['total'] / 60:.0f} = {e['dense'] / 60:.1f} + {e['experts'] / 60:.1f} + "
                                          f"{e['expert_loads'] / 60:.1f} + {e['transfers'] / 60:.1f} + "
                                          f"{e['startup'] / 60:.1f}")
        print(f"| {name} | `{shown}` | {block:.1f} GiB | {expert} | {fits} | {estimate} |", flush=True)


if __name__ == "__main__":
    main()
