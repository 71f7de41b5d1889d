"""`python -m jobs.eval`: perplexity of a checkpoint in the dtype asked for."""

import json
from pathlib import Path

import pytest

from jobs import eval as wq_eval
from wq_ops.bundled.tiny_model import ensure_tiny_checkpoint

TEXT = Path(wq_eval.__file__).resolve().parents[1] / "wq_ops" / "bundled" / "text" / "gettysburg_address.txt"


def run(tmp_path: Path, model: Path, *flags: str) -> dict:
    out = tmp_path / f"ppl{len(list(tmp_path.glob('ppl*')))}.json"
    assert wq_eval.main(["--model", str(model), "--text", str(TEXT), "--seq-len", "128", "--device", "cpu",
                         "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_float32_scores_the_bfloat16_checkpoint_as_bfloat16_does(tmp_path):
    """The bundled model is stored in bfloat16; float32 holds its weights exactly, so only the arithmetic
    differs: the two perplexities agree closely (random weights: about the vocabulary size)."""
    model = ensure_tiny_checkpoint(tmp_path / "cache")
    auto, f32 = run(tmp_path, model), run(tmp_path, model, "--dtype", "float32")
    assert auto["windows"] == f32["windows"] > 1 and auto["tokens"] == f32["tokens"]
    assert f32["ppl"] == pytest.approx(auto["ppl"], rel=0.02)
    assert f32["ppl"] != auto["ppl"]          # float32 arithmetic really ran (bfloat16 rounds differently)


def test_an_unknown_dtype_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        wq_eval.main(["--model", "m", "--text", str(TEXT), "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--seq-len", "1"], "a window needs at least 2 tokens"),
    (["--seq-len", "0"], "a window needs at least 2 tokens"),
    (["--max-windows", "0"], "at least 1 window is scored"),
    (["--seq-len", "100000"], "seq_len=100000: longer than the model's max_position_embeddings="),
])
def test_windows_that_cannot_be_scored_are_refused(tmp_path, capsys, flags, message):
    model = ensure_tiny_checkpoint(tmp_path / "cache")
    assert wq_eval.main(["--model", str(model), "--text", str(TEXT), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("wq-eval: error:") and message in last and "nan" not in err
