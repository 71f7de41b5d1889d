"""Fuzzing the readers of untrusted input (bounded in time): the safetensors header, the index, config.json and
the YAML job file. Arbitrary bytes and arbitrary JSON/YAML values give a WqError with a message or a valid
result, never another exception, and an accepted index never names a file outside the checkpoint."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.quantize import _read_yaml
from tests.factory import write_checkpoint
from wq_ops.config import OPTIONS, JobConfig
from wq_ops.errors import WqError
from wq_ops.io.checkpoint import open_checkpoint, read_config, shard_header

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)

tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "bogus"]) | json_values,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | json_values,
})


def _expect_wq_error_or(fn, *args):
    try:
        return fn(*args)
    except WqError as e:
        assert str(e)
        return None


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_safetensors_file(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    _expect_wq_error_or(shard_header, path)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=8), tensor_entries, max_size=3) | json_values,
       payload=st.integers(0, 300))
def test_any_json_as_a_safetensors_header(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(payload))
    result = _expect_wq_error_or(shard_header, path)
    if result is not None:                 # accepted: every tensor's bytes lie inside the file
        for entry in result.values():
            start, end = entry["data_offsets"]
            assert 0 <= start <= end <= payload


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "m", "llama", num_hidden_layers=1)


shard_names = st.sampled_from(["../x.safetensors", "/etc/passwd", "a/../../b", "..", "model.safetensors",
                               "C:\\x", "sub/ok.safetensors", "\0"]) | st.text(max_size=20)


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=10), shard_names | json_values,
                                                                  max_size=3)}) | json_values)
def test_any_index(tmp_path, checkpoint, index):
    d = tmp_path / "m"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(checkpoint, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = _expect_wq_error_or(open_checkpoint, str(d))
    if opened is not None:
        for shard in opened.shards:
            assert (d / shard).resolve().is_relative_to(d.resolve())


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_config_json(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    config = _expect_wq_error_or(read_config, path)
    assert config is None or isinstance(config, dict)


option_names = st.sampled_from([o.name for o in OPTIONS]) | st.text(max_size=10)


@FUZZ
@given(document=st.dictionaries(option_names, json_values, max_size=4) | json_values)
def test_any_yaml_job_file(tmp_path, document):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    options = _expect_wq_error_or(_read_yaml, path)
    if options is not None:
        _expect_wq_error_or(JobConfig.from_dict, {**options, "out": str(tmp_path / "o")})


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_as_a_yaml_job_file(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    options = _expect_wq_error_or(_read_yaml, path)
    if options is not None:
        _expect_wq_error_or(JobConfig.from_dict, {**options, "out": str(tmp_path / "o")})


def test_the_fuzzed_readers_are_the_ones_the_job_uses():
    """The job reads config.json, the index and headers with these functions (a refactor must keep the fuzzing
    pointed at what runs)."""
    import wq_ops.cluster.prepare as prepare

    assert prepare.read_config is read_config and prepare.open_checkpoint is open_checkpoint
    assert Path(_read_yaml.__code__.co_filename).name == "quantize.py"
