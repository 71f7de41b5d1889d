import re

import pytest

from wq_ops.config import OPTIONS, AWQParams, CalibConfig, GPTQParams, JobConfig, Method, QuantConfig, RunConfig
from wq_ops.errors import ConfigError


def cli_options(argv: list[str]) -> dict:
    """The options the command line's parser sets from argv (those not given are left to the table)."""
    import argparse

    from wq_ops.config.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


@pytest.mark.parametrize("options,field", [
    ({"bits": 5}, "bits=5"),
    ({"group_size": 48}, "group_size=48"),
    ({"group_size": "lots"}, "group_size='lots'"),
    ({"damp": 0.0}, "damp_frac=0.0"),
    ({"damp": 2.0}, "damp_frac=2.0"),
    ({"method": "smoothquant"}, "method='smoothquant'"),
    ({"samples": 0}, "samples=0"),
    ({"seq_len": -1}, "seq_len=-1"),
    ({"actors": 0}, "actors=0"),
    ({"gpus_per_actor": -1}, "gpus_per_actor=-1"),
    ({"method": "awq", "act_order": True}, "act_order=True"),
    ({"sym": "yes"}, "sym='yes'"),
    ({"format": "gguf"}, "format='gguf'"),
    ({"propagation": "sideways"}, "propagation='sideways'"),
    ({"awq_max_shrink": 1.0}, "awq_max_shrink=1.0"),
    ({"awq_loss": "output"}, "awq_loss='output'"),
    ({"gpus_per_actor": "nan"}, "gpus_per_actor='nan': expected a finite number"),
    ({"group_size": -1}, "group_size=-1: write 'channel'"),
    ({"ignore": "re:(unclosed"}, "ignore='re:(unclosed': not a regular expression"),
    ({"damp": float("inf")}, "damp=inf: expected a finite number"),
    ({"actor_memory_gib": "-inf"}, "actor_memory_gib='-inf': expected a finite number"),
    ({"ignore": 5}, "ignore=5: expected a pattern or a list of patterns"),
    ({"ignore": ["lm_head", 3]}, "expected a pattern or a list of patterns"),
    ({"calib": 5}, "calib=5: expected a string"),
    ({"model": ["a"]}, "model=['a']: expected a string"),
    ({"expert_actors": -2}, "expert_actors=-2: expected an integer >= 0"),
    ({"expert_actors": 2, "propagation": "float"}, "expert_actors with propagation=float"),
    ({"expert_actors": 2, "runtime": "local"}, "expert_actors with runtime=local"),
    ({"expert_actors": 2, "method": "awq"}, "expert_actors with method=awq"),
    ({"expert_actors": 2, "model_free": True, "scheme": "FP8_DYNAMIC", "model": "m"}, "expert_actors with model_free"),
])
def test_bad_values_name_the_field(options, field):
    with pytest.raises(ConfigError) as e:
        JobConfig.from_dict({"out": "x", **options})
    assert field in str(e.value)


def test_unknown_keys_are_listed():
    with pytest.raises(ConfigError, match=r"unknown option.*group_szie \(did you mean group_size\?\).*known options"):
        JobConfig.from_dict({"out": "x", "group_szie": 64})


def test_out_left_empty_is_an_error():
    with pytest.raises(ConfigError, match="out: missing"):
        JobConfig.from_dict({"model": "m", "out": None})


def test_round_trip_through_options():
    job = JobConfig.from_dict({"out": "o", "model": "m", "calib": "c.txt", "method": "awq", "bits": 3,
                               "group_size": "channel", "sym": False, "ignore": "a.*,b", "samples": 4, "actors": 2,
                               "gpus_per_actor": 1})
    assert job.quant.method is Method.AWQ and job.quant.group_size is None and job.quant.ignore == ("a.*", "b")
    assert JobConfig.from_dict(job.to_dict()) == job
    # Every option but GPTQ's, which an AWQ job does not take.
    assert set(job.to_dict()) == {o.name for o in OPTIONS if o.method in (None, Method.AWQ)}


def test_only_the_bundled_model_calibrates_on_the_bundled_text_by_default():
    assert JobConfig.from_dict({}).calib.source is None
    with pytest.raises(ConfigError, match="calib: none given for org/m; the text bundled with wq"):
        JobConfig.from_dict({"model": "org/m"})
    assert JobConfig.from_dict({"model": "org/m", "calib": "wq:bundled"}).calib.source == "wq:bundled"


def test_the_python_entry_takes_the_command_lines_defaults():
    gptq = JobConfig.from_dict({"model": "m", "calib": "c.txt"})
    assert gptq.quant.act_order is True and gptq.quant.sym is True and gptq.out == "out/m-gptq-w4"
    assert gptq.calib.n_samples == 128 and gptq.calib.seq_len == 2048 and gptq.quant.backend.value == "reference"
    awq = JobConfig.from_dict({"model": "org/name", "calib": "c.txt", "method": "awq", "bits": 3})
    assert awq.quant.act_order is False and awq.out == "out/name-awq-w3"
    demo = JobConfig.from_dict({})
    assert demo.calib.n_samples == 32 and demo.calib.seq_len == 512
    assert JobConfig.from_dict({"model": "m", "calib": "c.txt", "sym": False}).quant.sym is False
    gpu = JobConfig.from_dict({"model": "m", "calib": "c.txt", "gpus_per_actor": 1})
    assert gpu.quant.backend.value == "cuda"


@pytest.mark.parametrize("options,named", [
    ({"method": "awq", "damp": 0.02}, "damp=0.02: only gptq uses it"),
    ({"method": "rtn", "no_such": 1}, "unknown option(s) no_such"),
    ({"method": "gptq", "awq_loss": "module"}, "awq_loss='module': only awq uses it"),
])
def test_an_option_of_another_method_is_an_error(options, named):
    with pytest.raises(ConfigError) as e:
        JobConfig.from_dict({"out": "x", **options})
    assert named in str(e.value)


def test_every_option_has_one_definition_that_the_dataclasses_take():
    """The dataclasses' defaults are the table's, and every option sets a field that exists."""
    job = JobConfig(out="o")
    for o in OPTIONS:
        holder = job
        *path, name = o.target.split(".")
        for part in path:
            holder = holder if part == "job" else getattr(holder, part)
        assert hasattr(holder, name), o.target
    assert QuantConfig().gptq == GPTQParams() and GPTQParams().damp_frac == 0.01 and GPTQParams().act_order is True
    assert AWQParams().grid == 20 and AWQParams().loss.value == "layer"


def test_dataclasses_validate_directly():
    with pytest.raises(ConfigError, match="bits=1"):
        QuantConfig(bits=1)
    with pytest.raises(ConfigError, match="seed=-3"):
        CalibConfig(seed=-3)
    with pytest.raises(ConfigError, match="actor_memory_gib=0"):
        RunConfig(actor_memory_gib=0)


def test_only_the_replayed_awq_search_keeps_samples():
    assert QuantConfig(method="awq", awq=AWQParams(search_samples=7, loss="module")).kept_search_samples == 7
    assert QuantConfig(method="awq", awq=AWQParams(search_samples=7)).kept_search_samples == 0      # layer, the default
    assert QuantConfig(method="gptq").kept_search_samples == 0


def test_a_null_leaves_an_option_at_its_default_where_none_is_not_a_value():
    """A YAML key with nothing after it (`ignore:`): the default where None means nothing for the option; for
    options whose None means something (a group per row) or whose default depends on others, it is checked."""
    job = JobConfig.from_dict({"out": "x", "ignore": None, "block_size": None, "group_size": None})
    assert job.quant.ignore == () and job.quant.gptq.block_size == 128 and job.quant.group_size is None
    with pytest.raises(ConfigError, match="samples=None"):
        JobConfig.from_dict({"out": "x", "samples": None})
    with pytest.raises(ConfigError, match="bits=None"):         # its default depends on --scheme
        JobConfig.from_dict({"out": "x", "bits": None})


@pytest.mark.parametrize("scheme,bits,sym", [("W4A16", 4, True), ("W4A16_ASYM", 4, False), ("W8A16", 8, True)])
def test_a_scheme_sets_the_grid_and_flags_still_override(scheme, bits, sym):
    quant = JobConfig.from_dict({"out": "o", "scheme": scheme}).quant
    assert (quant.bits, quant.sym, quant.group_size, quant.scheme.value) == (bits, sym, 128, scheme)
    assert JobConfig.from_dict({"out": "o", "scheme": scheme, "bits": 3}).quant.bits == 3
    assert JobConfig.from_dict({"out": "o", "scheme": scheme, "group_size": "channel"}).quant.group_size is None
    # SmoothQuant: on (alpha 0.5) where activations are INT8 and the method folds no scales of its own.
    assert quant.smoothquant == (0.5 if scheme == "W8A8" else None)
    if scheme == "W8A8":
        assert JobConfig.from_dict({"out": "o", "scheme": scheme, "method": "awq"}).quant.smoothquant is None
    off = cli_options(["--scheme", scheme, "--smoothquant", "off"])
    assert JobConfig.from_dict({"out": "o", **off}).quant.smoothquant is None
    assert JobConfig.from_dict({"scheme": scheme}).out.endswith(f"-gptq-w{bits}")
    # The same through the command line: the preset's defaults, the flag's override.
    args = cli_options(["--scheme", scheme, "--asym"])
    assert JobConfig.from_dict({"out": "o", **args}).quant.sym is False


def test_a_scheme_wq_does_not_know_is_refused_naming_the_ones_it_writes():
    with pytest.raises(ConfigError, match="scheme='W4A4': expected one of W4A16, W4A16_ASYM, W8A16, W8A8, "
                                          "FP8_DYNAMIC, FP8, FP8_BLOCK, NVFP4, NVFP4A16"):
        JobConfig.from_dict({"out": "o", "scheme": "W4A4"})


@pytest.mark.parametrize("scheme,method,weights,layout,activations", [
    ("W8A8", "gptq", "int", "group", ("int", "token", True, None)),
    ("FP8_DYNAMIC", "rtn", "float", "group", ("float", "token", True, None)),
    ("FP8", "rtn", "float", "tensor", ("float", "tensor", False, None)),
    ("FP8_BLOCK", "rtn", "float", "block", ("float", "group", True, 128)),
    ("NVFP4", "rtn", "float", "tensor_group", ("float", "tensor_group", False, 16)),
    ("NVFP4A16", "rtn", "float", "tensor_group", None),
])
def test_an_activation_scheme_sets_its_method_layout_and_activations(scheme, method, weights, layout, activations):
    job = JobConfig.from_dict({"scheme": scheme})
    quant = job.quant
    bits = 4 if scheme.startswith("NVFP4") else 8
    assert (quant.method.value, quant.bits, quant.sym, quant.group_size) == (method, bits, True, None)
    assert (quant.weight_type.value, quant.layout.value) == (weights, layout)
    a = quant.activations
    assert (None if a is None else (a.type.value, a.strategy.value, a.dynamic, a.group_size)) == activations
    assert job.out.endswith(f"-{scheme.lower()}")
    assert "scheme" in job.fingerprint_options()         # the scheme changes the artifact beyond bits and sym
    assert JobConfig.from_dict({"out": "o", "scheme": scheme, "group_size": "channel"}).quant.group_size is None


@pytest.mark.parametrize("options,message", [
    ({"scheme": "FP8_DYNAMIC", "method": "gptq"}, "scheme=FP8_DYNAMIC: method=gptq solves for an integer grid"),
    ({"scheme": "FP8", "method": "awq"}, "scheme=FP8: method=awq solves for an integer grid"),
    ({"scheme": "W8A8", "group_size": 128}, "scheme=W8A8: group_size=128: the scheme stores one scale per output "
                                            "channel"),
    ({"scheme": "FP8_BLOCK", "group_size": 64}, "one scale per 128x128 block"),
    ({"scheme": "NVFP4", "group_size": 32}, "scheme=NVFP4: group_size=32: the scheme stores one scale per 16 "
                                            "columns"),
    ({"scheme": "NVFP4A16", "method": "gptq"}, "NVFP4 and bitsandbytes weights are rounded to nearest"),
    ({"scheme": "W8A8", "bits": 4}, "scheme=W8A8: bits=4: the scheme's weights are 8-bit"),
    ({"scheme": "FP8", "sym": False}, "scheme=FP8: its weights are symmetric"),
    ({"scheme": "FP8_DYNAMIC", "format": "gptq"}, "format=gptq stores integer weight-only schemes; "
                                                  "scheme=FP8_DYNAMIC"),
    ({"scheme": "W8A8", "format": "gptq"}, "format=gptq stores integer weight-only schemes"),
    ({"scheme": "FP8_BLOCK", "tp_sizes": [2], "tp_policy": "pad"}, "tp_policy=pad pads integer codes"),
    ({"scheme": "W8A16", "smoothquant": 0.5}, "smoothquant=0.5: smoothing eases quantizing activations; "
                                              "scheme=W8A16 leaves them in 16 bits"),
    ({"scheme": "FP8_DYNAMIC", "smoothquant": 0.5}, "scheme=FP8_DYNAMIC quantizes to FP8"),
    ({"scheme": "W8A8", "method": "awq", "smoothquant": 0.5}, "method=awq folds its own searched input scales"),
    ({"scheme": "W8A8", "smoothquant": 1.5}, "smoothquant=1.5: expected a number in [0, 1] or 'off'"),
    ({"scheme": "W8A8", "smoothquant": "half"}, "smoothquant='half': expected a number in [0, 1] or 'off'"),
])
def test_an_activation_scheme_refuses_what_it_fixes_by_name(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig.from_dict({"out": "o", **options})


def test_a_scheme_that_cannot_combine_with_an_option_names_both():
    with pytest.raises(ConfigError, match=r"format=gptq with an asymmetric grid \(scheme=W4A16_ASYM\)"):
        JobConfig.from_dict({"out": "o", "scheme": "W4A16_ASYM", "format": "gptq"})
