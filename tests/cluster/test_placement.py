"""Where the actors run is a decision: on a simulated three-node Ray cluster (ray.cluster_utils.Cluster, in a
process of its own), one placement group puts each of three one-CPU actors on its own node, ranks in node
order, and the artifact equals the one made by a single in-process actor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factory import write_checkpoint, write_text

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig

options, cache = json.loads(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, logging_level="WARNING")
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    result = run_job(JobConfig.from_dict({**options, "address": cluster.address}), cache_dir=cache)
    print("RESULT " + json.dumps({"nodes": nodes, "startup": result.report["startup"]["actors"]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_three_actors_on_three_nodes_make_the_one_process_artifact(tmp_path):
    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4)
    calib = write_text(tmp_path / "calib.txt")
    base = {"model": str(model), "calib": str(calib), "samples": 6, "seq_len": 64, "micro_batch_samples": 4}
    options = {**base, "out": str(tmp_path / "three"), "actors": 3, "cpus_per_actor": 1}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options), str(tmp_path / "cache")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    found = json.loads(line.removeprefix("RESULT "))
    placed = [actor["node"] for actor in found["startup"]]
    assert sorted(placed) == sorted(found["nodes"]) and len(set(placed)) == 3, found

    from wq_ops.cluster.driver import run_job
    from wq_ops.config import JobConfig

    one = run_job(JobConfig.from_dict({**base, "out": str(tmp_path / "one"), "runtime": "local"}),
                  cache_dir=tmp_path / "cache")
    shards = sorted(p.name for p in one.out_dir.glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "three").glob("*.safetensors")) and len(shards) == 6
    for name in shards:
        assert (tmp_path / "three" / name).read_bytes() == (one.out_dir / name).read_bytes(), name


@pytest.mark.usefixtures("ray_session")
def test_neighbouring_ranks_share_a_node(tmp_path):
    """On one node every bundle lands on it, and ranks keep their bundles' order (the plan's spans)."""
    from wq_ops.cluster.ray_runtime import RayRuntime
    from wq_ops.config import JobConfig

    runtime = RayRuntime()
    job = JobConfig.from_dict({"out": str(tmp_path / "o"), "actors": 2})
    runtime.start(job)
    order = runtime._place(job.run)
    try:
        assert order == [0, 1] and len(set(runtime.placement)) == 1
    finally:
        runtime.stop([])
