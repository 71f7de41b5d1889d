"""End to end on a real model: SmolLM2-135M (LlamaForCausalLM, 30 blocks, hidden 576) from the shared
assets, quantized by 2 CPU actors, loaded back with plain transformers, scored on WikiText-2.

Calibration: 16 random windows of 512 tokens from the tokenized WikiText-2 validation split (disjoint
from test). Evaluation: the first 8 non-overlapping windows of 512 tokens of raw/wiki.test.raw, lines
joined by a blank line (4,096 tokens: a small slice, but every model sees the same tokens, so the order
of the methods is what the test checks, not the absolute numbers; benchmarks/quality.md has the full table).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs import eval as jobs_eval
from tests.conftest import SHARED
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ConfigError
from wq_ops.evaluate.load import load_causal_lm, load_tokenizer
from wq_ops.evaluate.perplexity import Join, join_text, perplexity

pytestmark = [pytest.mark.checkpoint, pytest.mark.usefixtures("ray_session")]

CALIB = SHARED / "assets" / "wikitext-2" / "tokenized" / "valid.txt"
TEST_TEXT = SHARED / "assets" / "wikitext-2" / "raw" / "wiki.test.raw"


def quantize(model: Path, out: Path, **options) -> JobConfig:
    base = {"model": str(model), "out": str(out), "calib": str(CALIB), "samples": 16, "seq_len": 512, "bits": 4,
            "group_size": 64, "actors": 2, "cpus_per_actor": 2}
    job = JobConfig.from_dict({**base, **options})
    run_job(job, cache_dir=out.parent / "cache")
    return job


def ppl(model_dir: Path) -> float:
    torch.set_num_threads(2)
    text = join_text(TEST_TEXT.read_text(encoding="utf-8"), Join.WIKITEXT)
    ids = load_tokenizer(model_dir)(text, return_tensors="pt", verbose=False)["input_ids"][0]
    # float32: this CPU class has no bfloat16 instructions (bfloat16 ran 3 to 4x slower); it holds the
    # bfloat16 and dequantized weights exactly.
    return perplexity(load_causal_lm(model_dir, dtype=torch.float32), ids, seq_len=512, max_windows=8).ppl


@pytest.fixture(scope="module")
def artifacts(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-runs")
    for method in ("rtn", "gptq", "awq"):
        # The GPTQ job also scores its artifact and the source on the actors (--eval, --eval-baseline).
        evaluation = {"eval": str(TEST_TEXT), "eval_seq_len": 512, "eval_max_windows": 4, "eval_baseline": True}
        quantize(smollm2_dir, root / method, method=method, **(evaluation if method == "gptq" else {}))
    return root


def test_artifacts_load_and_methods_rank(smollm2_dir, artifacts):
    scores = {"bf16": ppl(smollm2_dir), **{m: ppl(artifacts / m) for m in ("rtn", "gptq", "awq")}}
    print("SmolLM2-135M w4g64 WikiText-2 ppl (8 x 512 tokens):",
          json.dumps({k: round(v, 3) for k, v in scores.items()}))
    assert scores["bf16"] < scores["gptq"] < scores["rtn"], scores
    assert scores["awq"] < scores["rtn"], scores
    report = json.loads((artifacts / "gptq" / "wq_report.json").read_text())
    assert report["totals"]["layers_quantized"] == 210
    assert {a["rank"] for a in report["actors"]} == {0, 1}


def test_eval_on_the_actors_gives_jobs_eval_number(smollm2_dir, artifacts, tmp_path):
    """--eval ran block-pipelined on the two actors, in bfloat16 as the job computes; jobs.eval loads the
    written artifact (and the source) whole with transformers: the same perplexity to its 4 decimals."""
    section = json.loads((artifacts / "gptq" / "wq_report.json").read_text())["eval"]
    assert (section["windows"], section["seq_len"]) == (4, 512)
    for model, key in ((artifacts / "gptq", "perplexity"), (smollm2_dir, "baseline_perplexity")):
        out = tmp_path / f"{key}.json"
        assert jobs_eval.main(["--model", str(model), "--text", str(TEST_TEXT), "--seq-len", "512", "--max-windows",
                               "4", "--threads", "2", "--device", "cpu", "--json", str(out)]) == 0
        assert round(section[key], 4) == json.loads(out.read_text())["ppl"], key
    assert section["baseline_perplexity"] < section["perplexity"]
    assert f"perplexity {section['perplexity']:.4f}" in (artifacts / "gptq" / "README.md").read_text()


def test_group_size_128_stops_before_work_naming_layers(smollm2_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        quantize(smollm2_dir, tmp_path / "out", group_size=128)
    message = str(e.value)
    for layer in ("self_attn.q_proj (in=576)", "mlp.gate_proj (in=576)"):
        assert layer in message
    assert "mlp.down_proj" not in message            # 1536 = 12 x 128: that one divides
    assert "--group-size 64" in message and "--ignore" in message
    assert not (tmp_path / "out").exists()


def test_one_and_three_actors_give_the_same_tensors(smollm2_dir, tmp_path):
    small = {"samples": 4, "seq_len": 128, "method": "gptq", "cpus_per_actor": 1}
    quantize(smollm2_dir, tmp_path / "one", actors=1, **small)
    quantize(smollm2_dir, tmp_path / "three", actors=3, **small)
    one = sorted((tmp_path / "one").glob("model-*.safetensors"))
    three = sorted((tmp_path / "three").glob("model-*.safetensors"))
    assert [p.name for p in one] == [p.name for p in three] and len(one) == 32
    for a, b in zip(one, three):
        assert a.read_bytes() == b.read_bytes(), a.name
