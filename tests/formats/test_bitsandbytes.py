"""bitsandbytes 4-bit checkpoints: a tiny Llama quantized by wq is, tensor for tensor and byte for byte, what
transformers + bitsandbytes save for the same model on the CPU, with the same quantization_config, and
transformers loads it into the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.factory import write_checkpoint
from wq_ops.formats.bitsandbytes import decode_linear, encode_linear, quantization_config, tensor_names
from wq_ops.quant.bnb4 import Bnb4Type, dequantize_bnb4, quantize_bnb4

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f"{linear}.weight" for linear in LINEARS))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("quant_type,double_quant", [(Bnb4Type.NF4, True), (Bnb4Type.FP4, False)])
def test_checkpoint_is_what_transformers_writes_and_loads(tmp_path, seed, gen, quant_type, double_quant):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = write_checkpoint(tmp_path / "source", "llama", seed=seed)
    skip = ["lm_head"]                        # every Linear left unquantized (a list replaces transformers' default)

    # transformers + bitsandbytes quantize the source on the CPU and save it.
    reference = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type.value,
                                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16,
                                   llm_int8_skip_modules=skip)
    theirs_model = AutoModelForCausalLM.from_pretrained(source, quantization_config=reference, device_map="cpu")
    theirs_model.save_pretrained(tmp_path / "theirs")
    theirs = load_file(str(tmp_path / "theirs" / "model.safetensors"))

    # wq: every decoder linear through quantize_bnb4 and the format; the rest as it was.
    ours: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        for name, value in load_file(str(shard)).items():
            if _is_decoder_linear(name):
                module = name.removesuffix(".weight")
                result = quantize_bnb4(value, quant_type=quant_type, double_quant=double_quant)
                encoded = encode_linear(module, result, dtype=value.dtype)
                assert sorted(encoded) == sorted(tensor_names(module, quant_type=quant_type,
                                                              double_quant=double_quant))
                back = decode_linear(module, encoded)
                assert torch.equal(dequantize_bnb4(back, torch.bfloat16), dequantize_bnb4(result, torch.bfloat16))
                ours.update(encoded)
            else:
                ours[name] = value
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant_type=quant_type, double_quant=double_quant,
                                                        compute_dtype=torch.bfloat16, skip_modules=skip)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    save_file(ours, str(tmp_path / "ours" / "model.safetensors"), metadata={"format": "pt"})

    # The same tensors, name by name, dtype, shape and bytes; the same quantization_config, field by field.
    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape), name
        assert _bytes(ours[name]) == _bytes(theirs[name]), name
    theirs_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert config["quantization_config"] == theirs_config

    # transformers loads ours as a 4-bit model (lm_head left as it was) and computes the same logits.
    ours_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert isinstance(ours_model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(ours_model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 256, (2, 24), generator=gen)
    with torch.no_grad():
        ours_logits = ours_model(ids).logits
        theirs_logits = theirs_model(ids).logits
    # Equal, not close: the same bytes through the same kernels on the same machine.
    assert torch.equal(ours_logits, theirs_logits)
