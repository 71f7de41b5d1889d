"""DeepSeek-V3 (671B) planned from its config.json and index alone (`tests/fixtures/deepseek_v3`), for clusters
that are not here: --dry-run with --actor-memory-gib starts no Ray and reads no shard; the plan places the
routed experts on expert actors and states each actor's memory, and refuses a cluster that cannot hold them
with the fewest expert actors that would fit."""

import importlib.util
import json
from pathlib import Path

import pytest

from wq_ops.cluster.driver import run_job
from wq_ops.cluster.plan import GIB, check_fits
from wq_ops.config import JobConfig
from wq_ops.errors import CheckpointError, ResourceError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek_v3"


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_index", FIXTURE / "make_index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(tmp_path_factory.mktemp("dsv3") / "DeepSeek-V3")


def plan(tmp_path, model, **options):
    job = JobConfig.from_dict({"model": str(model), "calib": str(model / "calib-ids.parquet"),
                               "out": str(tmp_path / "o"), "dry_run": True, "gpus_per_actor": 1, **options})
    return run_job(job, cache_dir=tmp_path / "cache")


def test_a_cluster_not_at_hand_is_planned_from_the_index_alone(tmp_path, deepseek_v3, monkeypatch):
    from wq_ops.cluster import driver

    # No runtime started, no actor asked for its memory.
    monkeypatch.setattr(driver, "choose_runtime", lambda run: pytest.fail("a dry run on paper chose a runtime"))
    result = plan(tmp_path, deepseek_v3, actors=1, expert_actors=15, actor_memory_gib=80)
    p = result.plan
    assert len(p.blocks) == 61 and p.expert_actors == 15 and p.experts_per_actor == 18
    check_fits(p)
    block_actor, experts = p.actors[0].memory, p.experts
    assert block_actor.total < 60 * GIB and experts is not None and experts.total < 12 * GIB
    # The block actor holds no routed expert: its weights are those of a dense block (3 x 7168 x 18432) and the
    # next one, plus the embedding table, not 256 x 3 x 7168 x 2048 x 2 B = 22.5 GB.
    assert block_actor.weights < 8 * GIB
    # An expert actor: 18 experts as read (bf16) and packed, the routed inputs of 128 x 2048 tokens.
    assert experts.weights > 18 * 3 * 7168 * 2048 * 2 and experts.activations > 128 * 2048 * 7168 * 2
    text = p.describe()
    assert "x0-14  18 experts" in text and "61 blocks on 1 cuda actor(s)" in text
    assert not (tmp_path / "o").exists()


def test_too_few_expert_actors_are_refused_with_the_fewest_that_fit(tmp_path, deepseek_v3):
    """32 GiB devices: one actor cannot hold a routed block's 256 experts; the refusal names how many expert
    actors would each fit, and that many fit."""
    with pytest.raises(ResourceError, match=r"--expert-actors N spreads them over N more actors \((\d+) would"):
        check_fits(plan(tmp_path, deepseek_v3, actors=1, actor_memory_gib=32, samples=16).plan)
    fits = plan(tmp_path, deepseek_v3, actors=1, expert_actors=4, actor_memory_gib=32, samples=16).plan
    check_fits(fits)


def test_the_index_alone_is_refused_outside_a_dry_run(tmp_path, deepseek_v3):
    job = JobConfig.from_dict({"model": str(deepseek_v3), "calib": str(deepseek_v3 / "calib-ids.parquet"),
                               "out": str(tmp_path / "o"), "actor_memory_gib": 80})
    with pytest.raises(CheckpointError, match="model-00001-of-000163.safetensors: missing"):
        run_job(job, cache_dir=tmp_path / "cache")


def test_the_fixture_names_what_the_release_holds():
    """The rule-written index against the release's counts: 61 blocks (3 dense) plus the multi-token
    prediction layer; every routed block 256 experts x 3 linears, each with its FP8 scale."""
    config = json.loads((FIXTURE / "config.json").read_text())
    spec = importlib.util.spec_from_file_location("make_index", FIXTURE / "make_index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = module.tensor_names(config)
    assert len(names) == len(set(names))
    experts = [n for n in names if ".mlp.experts." in n]
    assert len(experts) == (61 - 3 + 1) * 256 * 3 * 2
    assert sum(n.endswith("weight_scale_inv") for n in names) * 2 < len(names) + 2000
    assert "model.layers.61.eh_proj.weight" in names and "model.layers.60.mlp.gate.e_score_correction_bias" in names


def test_the_plan_estimates_the_time_from_measured_rates(tmp_path, deepseek_v3):
    """GPTQ on GPU actors: the estimate's parts add up; the experts' part shrinks with more expert actors, the
    transfers are the ones spreading them adds; none on CPU actors (no rates for them)."""
    from wq_ops.cluster.estimate import H100

    one = plan(tmp_path, deepseek_v3, actors=1, actor_memory_gib=141).plan.estimate
    eight = plan(tmp_path, deepseek_v3, actors=1, expert_actors=7, actor_memory_gib=80).plan.estimate
    sixteen = plan(tmp_path, deepseek_v3, actors=1, expert_actors=15, actor_memory_gib=80).plan.estimate
    assert one is not None and eight is not None and sixteen is not None
    for e in (one, eight, sixteen):
        assert e["total"] == pytest.approx(sum(v for k, v in e.items() if k != "total"))
    assert one["transfers"] == 0 and eight["transfers"] == sixteen["transfers"] > 0
    # 58 routed blocks of 256 experts, each at the measured DeepSeek-V3 expert's seconds.
    deepseek = next(m for m in H100.experts if m[:2] == (7168, 2048))
    assert one["experts"] == pytest.approx(58 * 256 * (deepseek[3] * (262144 * 8 / 256) / deepseek[2] + deepseek[4]))
    assert sixteen["experts"] < eight["experts"] < one["experts"] / 6
    cpu = JobConfig.from_dict({"model": str(deepseek_v3), "calib": str(deepseek_v3 / "calib-ids.parquet"),
                               "out": str(tmp_path / "o"), "dry_run": True, "actor_memory_gib": 80})
    assert run_job(cpu, cache_dir=tmp_path / "cache").plan.estimate is None
