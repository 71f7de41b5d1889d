import pytest

from wq_ops.config import OPTION_FIELDS, CalibConfig, JobConfig, Method, QuantConfig, RunConfig, default_options
from wq_ops.errors import ConfigError


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
])
def test_bad_values_name_the_field(options, field):
    with pytest.raises(ConfigError) as e:
        JobConfig.from_dict({"out": "x", **options})
    assert field in str(e.value)


def test_unknown_keys_are_listed():
    with pytest.raises(ConfigError, match="unknown option.*group_szie.*known options"):
        JobConfig.from_dict({"out": "x", "group_szie": 64})


def test_out_is_required():
    with pytest.raises(ConfigError, match="out: missing"):
        JobConfig.from_dict({"model": "m"})


def test_round_trip_through_options():
    job = JobConfig.from_dict({"out": "o", "model": "m", "method": "awq", "bits": 3, "group_size": "channel",
                               "sym": False, "ignore": "a.*,b", "samples": 4, "actors": 2, "gpus_per_actor": 1})
    assert job.quant.method is Method.AWQ and job.quant.group_size is None and job.quant.ignore == ("a.*", "b")
    assert JobConfig.from_dict(job.to_dict()) == job
    assert set(job.to_dict()) == set(OPTION_FIELDS)


def test_defaults_depend_on_method():
    gptq = default_options({"model": "m"})
    assert gptq["act_order"] is True and gptq["sym"] is True and gptq["out"] == "out/m-gptq-w4"
    awq = default_options({"model": "org/name", "method": "awq", "bits": 3})
    assert awq["act_order"] is False and awq["out"] == "out/name-awq-w3"
    demo = default_options({})
    assert demo["samples"] == 32 and demo["seq_len"] == 512
    assert default_options({"model": "m", "sym": False})["sym"] is False


def test_dataclasses_validate_directly():
    with pytest.raises(ConfigError, match="bits=1"):
        QuantConfig(bits=1)
    with pytest.raises(ConfigError, match="seed=-3"):
        CalibConfig(seed=-3)
    with pytest.raises(ConfigError, match="actor_memory_gib=0"):
        RunConfig(actor_memory_gib=0)


def test_only_the_replayed_awq_search_keeps_samples():
    assert QuantConfig(method="awq", awq_search_samples=7, awq_loss="module").kept_search_samples == 7
    assert QuantConfig(method="awq", awq_search_samples=7).kept_search_samples == 0      # layer, the default
    assert QuantConfig(method="gptq").kept_search_samples == 0
