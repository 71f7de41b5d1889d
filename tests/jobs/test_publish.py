"""The whole path a nightly job takes: quantize the bundled model into the GPTQ format, check the Hub
token before the work, publish, and put the tensor-parallel verdict in the report and the model card."""

import json

import pytest
from safetensors import safe_open

from jobs import quantize as cli
from tests.io.test_hub_push import READ_TOKEN, TOKEN, hub  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
SMALL = ["--samples", "4", "--seq-len", "64", "--method", "rtn"]


def test_gptq_format_is_quantized_and_published(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "tiny-gptq"
    rc = cli.main(["--out", str(out), "--format", "gptq", "--push-to-hub", "org/tiny-w4", "--tp-sizes", "1",
                   "--commit-message", "nightly", *SMALL])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    qweights = [n for n in index["weight_map"] if n.endswith(".qweight")]
    assert qweights and all(n.replace(".qweight", ".g_idx") in index["weight_map"] for n in qweights)
    with safe_open(str(out / index["weight_map"][qweights[0]]), "pt") as f:
        assert str(f.get_tensor(qweights[0].replace(".qweight", ".scales")).dtype) == "torch.float16"
    report = json.loads((out / "wq_report.json").read_text())
    assert [c["tp"] for c in report["compatibility"]["tensor_parallel"]] == [1]
    assert "| vLLM tensor parallel | loads at 1 with the default kernels" in (out / "README.md").read_text()
    stored = hub.repos["org/tiny-w4"].files
    for name in ("config.json", "model.safetensors.index.json", "README.md", *set(index["weight_map"].values())):
        assert stored[name] == (out / name).read_bytes(), name
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_a_read_only_token_is_refused_before_any_work(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "never"
    assert cli.main(["--out", str(out), "--push-to-hub", "org/tiny-w4", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "push" in err.lower() or "write" in err.lower()
    assert READ_TOKEN not in err
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / ".wq-staging").exists()


def test_an_unloadable_tp_size_is_refused_with_the_layers_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["--out", str(tmp_path / "o"), "--tp-sizes", "1,64", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "tp_sizes" in err and "64" in err


def test_gptq_format_refuses_an_asymmetric_grid(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "o"), "--format", "gptq", "--asym", *SMALL]) == 2
    assert "zero point of 0" in capsys.readouterr().err


def test_tp_policy_pad_makes_a_refused_size_load_with_unchanged_outputs(tmp_path, monkeypatch, capsys):
    """intermediate 320 splits into 160 per rank at tp=2: not whole groups of 64. Padding to 384 makes
    it load; the padded rows and columns are exact zeros, so the logits match the unpadded artifact's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.factory import write_checkpoint, write_text

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    model = write_checkpoint(tmp_path / "m", "llama", intermediate_size=320)
    base = ["--model", str(model), "--calib", str(write_text(tmp_path / "calib.txt")), "--group-size", "64", *SMALL]
    assert cli.main(["--out", str(tmp_path / "refused"), "--tp-sizes", "1,2", *base]) == 2
    err = capsys.readouterr().err
    assert "mlp.down_proj" in err and "--tp-policy pad" in err and "384" in err
    plain, padded = tmp_path / "plain", tmp_path / "padded"
    assert cli.main(["--out", str(plain), "--tp-sizes", "1", *base]) == 0
    assert cli.main(["--out", str(padded), "--tp-sizes", "1,2", "--tp-policy", "pad", *base]) == 0
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 384
    compat = json.loads((padded / "wq_report.json").read_text())["compatibility"]
    assert compat["padding_applied"]["padded_size"] == 384
    assert [c["loadable"] for c in compat["tensor_parallel"]] == [True, True]
    assert "| Padding | pad intermediate_size 320 -> 384" in (padded / "README.md").read_text()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    logits = []
    for out in (plain, padded):
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.config.intermediate_size == (384 if out == padded else 320)
        with torch.no_grad():
            logits.append(loaded(ids).logits)
    assert torch.equal(logits[0], logits[1])
