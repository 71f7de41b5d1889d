"""The watch list: a complete example loads; every mistake is refused with a message naming the field."""

from __future__ import annotations

import re

import pytest
import yaml

from jobs.quantize import parser as quantize_parser
from wq_ops.config import Format, Method
from wq_ops.errors import ConfigError
from wq_ops.schedule.watchlist import Recipe, WatchList, render_destination

EXAMPLE = """
destination: "my-org/{name}-{recipe}"
publish: true
private: true
max_attempts: 3
max_concurrent_jobs: 2
resources: {actors: 4, gpus_per_actor: 1, cpus_per_actor: 8}
recipes:
  gptq-w4-g128:
    method: gptq
    bits: 4
    group_size: 128
    format: compressed-tensors
    calib: /data/calib/wikitext-2-valid.txt
    samples: 128
    seq_len: 2048
  rtn-w8-channel: {method: rtn, bits: 8, group_size: channel, sym: false, calib: /data/calib/c4.jsonl}
watch:
  - repo: meta-llama/Llama-3.1-8B
    recipes: [gptq-w4-g128, rtn-w8-channel]
  - author: Qwen
    pattern: "Qwen3-*B"
    recipes: [gptq-w4-g128]
    destination: "my-org/qwen-{name}-{method}-w{bits}g{group_size}"
"""


def test_example_loads_and_its_recipes_are_quantize_command_lines():
    watch = WatchList.from_dict(yaml.safe_load(EXAMPLE))
    gptq, rtn = watch.recipes
    assert gptq.method is Method.GPTQ and gptq.format is Format.COMPRESSED_TENSORS and gptq.samples == 128
    assert rtn.group_size is None and rtn.sym is False
    assert watch.watch[1].pattern == "Qwen3-*B" and watch.resources.actors == 4
    assert watch.destination_for(watch.watch[0], "meta-llama/Llama-3.1-8B", rtn) == \
        "my-org/Llama-3.1-8B-rtn-w8-channel"
    assert watch.destination_for(watch.watch[1], "Qwen/Qwen3-8B", gptq) == "my-org/qwen-Qwen3-8B-gptq-w4g128"
    for recipe in watch.recipes:
        args = quantize_parser().parse_args([*recipe.flags(), *watch.resources.flags()])
        assert args.method == recipe.method.value and args.bits == recipe.bits
    assert quantize_parser().parse_args(rtn.flags()).group_size == "channel"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(retries=3), "watch list: unknown key(s) retries"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(grup_size=64), "recipes.rtn-w8-channel: unknown key(s) grup_size"),
    (lambda d: d["watch"][0].update(revision="main"), "watch[0]: unknown key(s) revision"),
    (lambda d: d["resources"].update(gpus=1), "resources: unknown key(s) gpus"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(bits=5), "recipes.rtn-w8-channel: bits=5: expected one of"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(group_size=100), "group_size=100: must be a multiple of 32"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(method="sparsegpt"), "method='sparsegpt': expected one of gptq, "
                                                                          "awq, rtn, hqq"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(scheme="FP8"), "rtn-w8-channel: scheme=FP8: its weights are "
                                                                    "symmetric"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(model_free=True), "--model-free: --calib: it uses no calibration"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(format="gguf"), "format='gguf': expected one of"),
    (lambda d: d["recipes"]["rtn-w8-channel"].update(samples=0), "samples=0: expected a positive integer"),
    (lambda d: d["resources"].update(actors=0), "resources: actors=0: expected a positive integer"),
    (lambda d: d["watch"][0].update(recipes=["awq-w4"]), "no recipe named awq-w4"),
    (lambda d: d["watch"][0].update(recipes=[]), "expected a non-empty list of recipe names"),
    (lambda d: d["watch"][0].update(author="meta-llama"), "give exactly one of 'repo'"),
    (lambda d: d["watch"][0].update(pattern="Llama*"), "pattern: only with 'author'"),
    (lambda d: d["watch"][0].update(repo="Llama-3.1-8B"), "expected a Hub repo id"),
    (lambda d: d.update(destination="my-org/{model}"), "unknown placeholder(s) {model}"),
    (lambda d: d.update(destination="my-org/all-{recipe}"), "must contain {name}"),
    (lambda d: d.update(max_attempts=0), "max_attempts=0: expected a positive integer"),
    (lambda d: d.update(publish="yes"), "publish='yes': expected true or false"),
    (lambda d: d.update(watch=[]), "watch: empty"),
    (lambda d: d["recipes"]["rtn-w8-channel"].pop("calib"), "recipes.rtn-w8-channel.calib: missing; give the "
                                                             "calibration text"),
])
def test_mistakes_are_refused_naming_the_field(edit, message):
    data = yaml.safe_load(EXAMPLE)
    edit(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        WatchList.from_dict(data)


def test_a_destination_must_be_a_repo_id():
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        render_destination("{name}-{recipe}", repo_id="org/a", recipe=Recipe(name="r", calib="c.txt"))


def test_the_fingerprint_follows_every_option_but_the_name():
    base = Recipe(name="a", method=Method.GPTQ, bits=4, group_size=128, calib="/a.txt")
    assert base.fingerprint == Recipe(name="b", method="gptq", bits=4, group_size=128, calib="/a.txt").fingerprint
    for other in (Recipe(name="a", bits=3, calib="/a.txt"), Recipe(name="a", group_size=64, calib="/a.txt"),
                  Recipe(name="a", calib="/c.txt"), Recipe(name="a", sym=False, calib="/a.txt"),
                  Recipe(name="a", format="gptq", calib="/a.txt"), Recipe(name="a", samples=64, calib="/a.txt")):
        assert other.fingerprint != base.fingerprint


def test_a_recipe_written_before_schemes_keeps_its_fingerprint():
    """The hash wq computed before recipes took a scheme (measured at fce29ff): an old watch list's state stays
    up to date, with nothing requantized."""
    assert Recipe(name="a", calib="/a.txt").fingerprint == "1332750da48eb113"


def test_a_recipe_names_a_scheme_or_the_model_free_path():
    data = yaml.safe_load(EXAMPLE)
    data["recipes"]["fp8-day0"] = {"scheme": "FP8_DYNAMIC", "model_free": True}
    data["recipes"]["w4-g64"] = {"scheme": "W4A16_ASYM", "group_size": 64, "calib": "/c.txt"}
    data["watch"][0]["recipes"] += ["fp8-day0", "w4-g64"]
    watch = WatchList.from_dict(data)
    fp8, w4 = watch.recipes[2:]
    assert fp8.flags() == ["--scheme", "FP8_DYNAMIC", "--model-free", "--format", "compressed-tensors"]
    args = quantize_parser().parse_args([*w4.flags(), *watch.resources.flags()])
    assert (args.scheme, args.group_size, args.calib) == ("W4A16_ASYM", "64", "/c.txt")
    assert not hasattr(args, "sym") and not hasattr(args, "method")        # the scheme's defaults apply
    assert (w4.quant.sym, w4.quant.bits, w4.quant.method) == (False, 4, Method.GPTQ)
    assert fp8.quant.method is Method.RTN and fp8.fingerprint != Recipe(name="x", scheme="FP8_DYNAMIC",
                                                                        calib="/c.txt").fingerprint
    assert watch.destination_for(watch.watch[0], "meta-llama/Llama-3.1-8B", fp8) == \
        "my-org/Llama-3.1-8B-fp8-day0"


def test_a_recipe_can_score_its_artifacts():
    """eval, eval_baseline, eval_max_windows: the quantize job's --eval flags, checked by its own rules."""
    data = yaml.safe_load(EXAMPLE)
    data["recipes"]["rtn-w8-channel"].update(eval="/data/eval/wiki.test.raw", eval_baseline=True, eval_max_windows=40)
    rtn = WatchList.from_dict(data).recipes[1]
    args = quantize_parser().parse_args(rtn.flags())
    assert (args.eval, args.eval_baseline, args.eval_max_windows) == ("/data/eval/wiki.test.raw", True, 40)
    assert "--eval" not in WatchList.from_dict(yaml.safe_load(EXAMPLE)).recipes[1].flags()
    data["recipes"]["rtn-w8-channel"].update(eval=None)
    with pytest.raises(ConfigError, match="eval_baseline: nothing to compare with"):
        WatchList.from_dict(data)
