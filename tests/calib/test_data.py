import json

import pytest
import torch

from wq_ops.calib.data import load_texts, sample_windows, tokenize_corpus
from wq_ops.errors import ConfigError


def test_bundled_text_is_used_by_default():
    texts = load_texts(None)
    assert len(texts) >= 4 and any("Four score and seven years ago" in t for t in texts)


def test_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_texts(str(tmp_path)) == ["first", "second"]
    assert load_texts(str(tmp_path / "b.txt")) == ["second"]


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha", "", "beta"], "id": [1, 2, 3]})
    pq.write_table(table, tmp_path / "data.parquet")
    assert load_texts(str(tmp_path / "data.parquet")) == ["alpha", "beta"]
    ds = tmp_path / "ds"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "dataset_info.json").write_text("{}")
    assert load_texts(str(ds)) == ["alpha", "beta"]
    with pytest.raises(ConfigError, match="no column 'body'"):
        load_texts(str(tmp_path / "data.parquet"), text_column="body")


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]) + "\n")
    assert load_texts(str(p)) == ["x y", "z"]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_texts(str(tmp_path / "empty.txt"))


def test_windows_are_seeded_and_in_range(seed):
    ids = torch.arange(1000)
    a = sample_windows(ids, n_samples=16, seq_len=64, seed=seed)
    b = sample_windows(ids, n_samples=16, seq_len=64, seed=seed)
    assert torch.equal(a, b) and a.shape == (16, 64)
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())          # contiguous windows of the stream
    with pytest.raises(ConfigError, match="fewer than seq_len=2000"):
        sample_windows(ids, n_samples=1, seq_len=2000, seed=0)


def test_tokenize_corpus_joins_with_blank_lines():
    from wq_ops.bundled.tiny_model import _byte_level_tokenizer

    ids = tokenize_corpus(["ab", "c"], _byte_level_tokenizer())
    assert ids.tolist() == [97, 98, 10, 10, 99]


def test_pretokenized_parquet_rows_are_used_as_given(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wq_ops.calib.data import calibration_tokens

    rows = [[i * 100 + j for j in range(12)] for i in range(5)]
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "ids.parquet")
    ids = calibration_tokens(str(tmp_path / "ids.parquet"), _no_tokenizer, n_samples=3, seq_len=10, seed=0)
    assert ids.tolist() == [r[:10] for r in rows[:3]]


def test_pretokenized_rows_too_short_or_too_few_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from wq_ops.calib.data import calibration_tokens
    from wq_ops.errors import ConfigError

    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), tmp_path / "ids.parquet")
    with pytest.raises(ConfigError, match="row 1 has fewer than seq_len=3"):
        calibration_tokens(str(tmp_path), _no_tokenizer, n_samples=2, seq_len=3, seed=0)
    with pytest.raises(ConfigError, match="2 pre-tokenized rows, fewer than samples=4"):
        calibration_tokens(str(tmp_path), _no_tokenizer, n_samples=4, seq_len=2, seed=0)


def _no_tokenizer():
    raise AssertionError("pre-tokenized rows need no tokenizer")


@pytest.mark.parametrize("name,data,message", [
    ("nul.txt", b"\x00" * 5000, "5000 of its 5000 characters are control characters"),
    ("binary.json", bytes(range(256)) * 8, "not UTF-8 JSON lines"),
    ("binary.parquet", b"PAR1" + bytes(range(256)) * 4, "not a readable parquet file"),
    ("rows.jsonl", b'{"text": 5}\n', r"rows.jsonl:1: field 'text' is a int, not text"),
    ("rows.jsonl", b'{"text": "fine"}\n[1, 2]\n', r"rows.jsonl:2: no field 'text'"),
    ("rows.jsonl", b'{"text": "fine"}\n{oops\n', r"rows.jsonl:2: not a JSON line"),
])
def test_calibration_that_is_not_text_is_one_clear_error(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        load_texts(str(tmp_path / name))


def test_parquet_with_a_non_text_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(ConfigError, match="column 'text' holds int values"):
        load_texts(str(tmp_path / "n.parquet"))


def test_text_too_short_for_the_windows_is_refused_unless_allowed():
    ids = torch.arange(200)
    with pytest.raises(ConfigError, match=r"200 tokens for 8 windows of 128: only \d+ of their 1024 token "
                                          r"positions \(\d+%\) are distinct text.*--calib-allow-repeats"):
        sample_windows(ids, n_samples=8, seq_len=128, seed=0, allow_repeats=False)
    assert sample_windows(ids, n_samples=8, seq_len=128, seed=0, allow_repeats=True).shape == (8, 128)
    assert sample_windows(torch.arange(4000), n_samples=8, seq_len=128, seed=0, allow_repeats=False).shape == (8, 128)


def test_distinct_positions_counts_the_union_of_windows(gen):
    from wq_ops.calib.data import distinct_positions

    for _ in range(50):
        starts = torch.randint(0, 100, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        length = int(torch.randint(1, 30, (1,), generator=gen))
        assert distinct_positions(starts, length) == len({p for s in starts for p in range(s, s + length)})
