import pytest
import torch

from tests.factory import ARCHS, tiny_config
from wq_ops.errors import CheckpointError
from wq_ops.model.architecture import describe_model


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_finds_blocks_and_linears(arch):
    layout = describe_model(tiny_config(arch))
    assert layout.n_blocks == 3 and layout.block_prefix == "model.layers"
    names = [s.name for s in layout.linears]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert layout.outer_linears == ("lm_head",)
    assert "model.embed_tokens.weight" in layout.outer_params and "lm_head.weight" in layout.outer_params
    if arch == "qwen2":
        assert [s.has_bias for s in layout.linears][:3] == [True, True, True]
    if arch == "qwen3":
        assert "self_attn.q_norm.weight" in layout.block_params


def test_tied_embeddings_have_no_lm_head_tensor():
    layout = describe_model(tiny_config("llama", tie_word_embeddings=True))
    assert "lm_head.weight" not in layout.outer_params
    assert layout.outer_linears == ("lm_head",)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(CheckpointError, match="unsupported architecture GPT2LMHeadModel") as e:
        describe_model(config)
    assert "--model-free quantizes any safetensors checkpoint" in str(e.value) and "\n" not in str(e.value)


def test_a_moe_architecture_wq_does_not_know_is_refused():
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config.architectures = ["Qwen2MoeForCausalLM"]
    with pytest.raises(CheckpointError, match="unsupported architecture Qwen2MoeForCausalLM"):
        describe_model(config)


def test_importing_transformers_for_a_job_leaves_unused_backends_alone(tmp_path):
    """transformers imports scikit-learn (up to about 5.20) and scipy at import time wherever they are
    installed, for features a quantization job never uses (about 1.8 s a job on the H100 machine); wq's
    import must not, up to the Llama, Qwen2 and Mistral modeling code. Stand-ins that fail on import
    replace them; afterwards the checks see them again, and transformers' image and audio processing still
    import (hiding their packages too had broken that)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for package in ("sklearn", "scipy"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"raise ImportError('{package} was imported')\n")
    (tmp_path / "sklearn" / "metrics").mkdir()
    (tmp_path / "sklearn" / "metrics" / "__init__.py").write_text("")
    code = ("import sys; from wq_ops.model.architecture import import_transformers; import_transformers(); "
            "import transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2, "
            "transformers.models.mistral.modeling_mistral; "
            "hit = [m for m in ('sklearn', 'scipy') if m in sys.modules]; assert not hit, hit; "
            "import transformers.utils as u; assert u.is_sklearn_available() and u.is_scipy_available(); "
            "import transformers.image_processing_utils, transformers.feature_extraction_sequence_utils; "
            "print('ok')")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_native_llama_job_never_imports_transformers_models(tmp_path):
    """The point of the native modules: a plain Llama job on pre-tokenized data runs start to end without
    transformers' model machinery (4 s of start-up on the H100 machine), nor torch._dynamo, which torch
    imports for some arithmetic on the meta device (0.9 s holding the GIL, beside the actor's warm-up)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.factory import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    pq.write_table(pa.table({"input_ids": [row.tolist() for row in ids]}), tmp_path / "ids.parquet")
    code = ("import sys; from jobs.quantize import main; "
            f"rc = main(['--model', {str(model)!r}, '--out', {str(tmp_path / 'out')!r}, '--calib', "
            f"{str(tmp_path / 'ids.parquet')!r}, '--samples', '4', '--seq-len', '32', '--group-size', '32', "
            "'--runtime', 'local']); "
            "hit = sorted(m for m in sys.modules if m in ('transformers.modeling_utils', 'torch._dynamo') "
            "or m.startswith('transformers.models.')); assert rc == 0 and not hit, (rc, hit); print('ok')")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
