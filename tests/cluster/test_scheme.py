"""--scheme: llm-compressor's preset names set the grid; the artifact is the preset's, as compressed-tensors
describes it, and loads with transformers."""

import json

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.evaluate.load import load_causal_lm


@pytest.mark.parametrize("scheme,bits,sym", [("W8A16", 8, True), ("W4A16_ASYM", 4, False)])
def test_a_scheme_writes_its_preset(tmp_path, scheme, bits, sym):
    model = write_checkpoint(tmp_path / "m", "llama")
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": scheme})
    result = run_job(job, cache_dir=tmp_path / "cache")
    weights = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    grid = (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["type"])
    assert grid == (bits, 128, sym, "int")
    assert result.report["job"]["scheme"] == scheme
    names = json.loads((result.out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith(".weight_zero_point") for n in names) is not sym
    if not sym:
        return                  # transformers cannot load asymmetric pack-quantized yet (llm-compressor#1618)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_causal_lm(model, dtype=torch.float32)(ids).logits
        got = load_causal_lm(result.out_dir, dtype=torch.float32)(ids).logits
    # 8-bit groups of 128 on this random 3-block model: 3.4% of the logits' norm.
    assert float((got - want).norm() / want.norm()) < 0.05
