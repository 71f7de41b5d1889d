"""--calib hf://ORG/NAME[:CONFIG][@SPLIT]: a Hub dataset through the real huggingface_hub client, served from
local files by tests/hub_server.py; only the chosen config's and split's files are downloaded."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.io.test_hub_download import hub  # noqa: F401  (fixture)
from wq_ops.calib.data import load_texts
from wq_ops.calib.hub_dataset import HubDataset, parse_hub_dataset
from wq_ops.errors import ConfigError


def test_the_source_names_repo_config_and_split():
    assert parse_hub_dataset("hf://wikitext/wikitext:wikitext-2-raw-v1@validation") == \
        HubDataset("wikitext/wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hub_dataset("hf://datasets/allenai/c4") == HubDataset("allenai/c4", None, "train")
    assert parse_hub_dataset("/data/calib.txt") is None
    with pytest.raises(ConfigError, match=r"expected hf://ORG/NAME\[:CONFIG\]\[@SPLIT\]"):
        parse_hub_dataset("hf://just-a-name")


@pytest.fixture
def dataset_repo(hub, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))    # tests write under tmp_path
    root = tmp_path / "ds"
    for config in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        for split in ("train", "validation"):
            folder = root / config
            folder.mkdir(parents=True, exist_ok=True)
            rows = [f"{config} {split} row {i}: " + "the quick brown fox " * 5 for i in range(3)] + [""]
            pq.write_table(pa.table({"text": rows}), folder / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nlicense: cc-by-sa-3.0\n---\n")
    (root / "chat.jsonl").write_text(json.dumps({"text": "not a split file"}) + "\n")
    hub.add_repo_from_dir("datasets/org/wiki", root)
    return hub


def test_the_chosen_config_and_split_are_read_and_nothing_else_is_downloaded(dataset_repo):
    texts = load_texts("hf://org/wiki:wikitext-2-raw-v1@validation")
    assert texts == [f"wikitext-2-raw-v1 validation row {i}: " + "the quick brown fox " * 5 for i in range(3)]
    fetched = [p for p in dataset_repo.fetched() if p.endswith(".parquet")]
    assert fetched and all("wikitext-2-raw-v1/validation-" in p for p in fetched)


def test_without_a_config_every_config_of_the_split_and_train_by_default(dataset_repo):
    texts = load_texts("hf://org/wiki")
    assert len(texts) == 6 and all(" train row " in t for t in texts)


def test_a_missing_split_or_dataset_is_a_clear_error(dataset_repo):
    with pytest.raises(ConfigError, match=r"no data file of config 'wikitext-2-raw-v1', split 'test' in org/wiki@"
                                          r"\w+; its data files: chat.jsonl, wikitext-103"):
        load_texts("hf://org/wiki:wikitext-2-raw-v1@test")
    with pytest.raises(ConfigError, match="hf://org/nothing@train: no such dataset on the Hub"):
        load_texts("hf://org/nothing")
