"""The model card: huggingface_hub's metadata (base model, quantized relation, the source's license, tags once),
the facts table the nightly scheduler reads back, and how to run the artifact."""

import yaml
from huggingface_hub import ModelCard

from wq_ops.io.checkpoint import Checkpoint
from wq_ops.io.source_license import SourceLicense, source_license
from wq_ops.report.model_card import render_model_card
from wq_ops.schedule.hub import CardFacts, parse_model_card


def report(**source):
    return {
        "wq_version": "0.1.0",
        "job": {"method": "gptq", "bits": 4, "group_size": 128, "sym": True, "act_order": True,
                "format": "compressed-tensors", "samples": 128, "seq_len": 2048, "calib": "wiki.txt", "seed": 0,
                "push_to_hub": "me/Llama-w4"},
        "source": {"model": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16", **source},
        "totals": {"layers_quantized": 224, "layers_kept": 0, "mean_output_error": 2e-3,
                   "geomean_output_error": 1.5e-3, "worst_layer": {"name": "model.layers.1.mlp.down_proj",
                                                                   "output_error": 9e-3}, "wall_seconds": 20.0},
    }


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_hub_model_card_names_its_base_model_relation_and_license():
    card = render_model_card(report(repo_id="meta-llama/Llama-3.1-8B", revision="ab" * 20,
                                    license={"license": "llama3.1"}), command="wq --model meta-llama/Llama-3.1-8B")
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "llama3.1" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["wq", "compressed-tensors", "gptq", "w4a16"] and card.count("tags:") == 1
    assert ModelCard(card).data.base_model == "meta-llama/Llama-3.1-8B"        # huggingface_hub reads it back
    assert parse_model_card(card) == CardFacts(base_model="meta-llama/Llama-3.1-8B", revision="ab" * 20,
                                               method="gptq", bits=4, group="128", format="compressed-tensors")
    assert 'vllm serve me/Llama-w4' in card and 'LLM("me/Llama-w4")' in card
    assert 'AutoModelForCausalLM.from_pretrained("me/Llama-w4"' in card


def test_a_local_model_has_no_base_model_and_an_other_license_keeps_its_name_and_link():
    card = render_model_card(report(license={"license": "other", "license_name": "deepseek",
                                             "license_link": "LICENSE"}), command="")
    meta = front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "deepseek", "LICENSE")
    assert card.count("tags:") == 1


def test_gptq_cards_say_float16_and_an_evaluated_job_shows_its_perplexity():
    r = report(repo_id="org/m")
    r["job"] = {**r["job"], "format": "gptq"}
    r["eval"] = {"perplexity": 37.4123, "baseline_perplexity": 29.9011, "text": "wiki.test.raw", "windows": 40,
                 "seq_len": 2048}
    card = render_model_card(r, command="")
    assert "vllm serve me/Llama-w4 --dtype float16" in card and "`optimum` and `gptqmodel`" in card
    assert "| quality | perplexity 37.4123 on wiki.test.raw (40 windows of 2048 tokens); the source: 29.9011 |" in card


def test_the_source_license_and_its_files_come_from_the_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# A model\n")
    (tmp_path / "LICENSE").write_text("Apache License 2.0 ...")
    checkpoint = Checkpoint(local_dir=tmp_path, weight_map={})
    assert source_license(checkpoint) == SourceLicense(license="apache-2.0")
    assert "LICENSE" in checkpoint.side_files()
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert source_license(checkpoint) == SourceLicense()
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert source_license(checkpoint) == SourceLicense()          # unreadable metadata: warned, nothing carried


def test_an_activation_scheme_card_names_the_scheme_its_activations_and_format():
    r = report(repo_id="meta-llama/Llama-3.1-8B", revision="ab" * 20)
    r["job"] = {**r["job"], "scheme": "FP8_DYNAMIC", "method": "rtn", "bits": 8, "group_size": None, "act_order": False}
    r["compatibility"] = {"loader": {"checkpoint_format": "float-quantized"}}
    card = render_model_card(r, command="")
    assert front_matter(card)["tags"] == ["wq", "compressed-tensors", "rtn", "fp8_dynamic"]
    assert "# Llama-3.1-8B - FP8_DYNAMIC" in card and "Weight-only" not in card
    assert "| activations | FP8 E4M3 per token, scales computed by the engine from each input |" in card
    assert "| format | compressed-tensors (float-quantized) |" in card
    assert parse_model_card(card).group == "per-channel" and parse_model_card(card).bits == 8
    r["job"] = {**r["job"], "scheme": "W4A16"}                         # a weight-only preset keeps the old card
    assert "Weight-only 4-bit" not in render_model_card(r, command="")  # bits stay the job's (8 here)
    assert "Weight-only 8-bit quantization" in render_model_card(r, command="")
