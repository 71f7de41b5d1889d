"""HfHubSource through the real huggingface_hub client, against the fake Hub; and the model card parser
against the card wq_ops.report.model_card actually writes."""

from __future__ import annotations

import pytest

from tests.factory import write_checkpoint
from tests.schedule.listing_hub import card_for, publish_revision, put_card, start_listing_hub
from wq_ops.errors import CheckpointError
from wq_ops.schedule.hub import CardFacts, HfHubSource, parse_model_card


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = start_listing_hub()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    assert server.server is not None
    server.server.shutdown()


def test_listing_revisions_and_cards(hub, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", num_hidden_layers=1)
    sha1 = publish_revision(hub, "org/tiny", ckpt)
    publish_revision(hub, "org/other", ckpt)
    publish_revision(hub, "someone/else", ckpt)
    source = HfHubSource(cache_dir=str(tmp_path / "cache"))
    assert source.list_models("org") == ["org/other", "org/tiny"]
    assert source.current_revision("org/tiny") == sha1
    sha2 = publish_revision(hub, "org/tiny", ckpt, note="v2")
    assert sha2 != sha1 and source.current_revision("org/tiny") == sha2
    assert source.current_revision("org/gone") is None
    assert source.model_card("quant/tiny-rtn") is None                    # no such repo
    assert source.model_card("org/tiny") is None                          # a repo without README.md
    put_card(hub, "quant/tiny-rtn", card_for("org/tiny", sha2))
    assert source.model_card("quant/tiny-rtn") == card_for("org/tiny", sha2)


def test_a_hub_error_is_a_checkpoint_error(hub, tmp_path):
    assert hub.server is not None
    hub.server.shutdown()
    hub.server.server_close()                                             # connection refused from here on
    source = HfHubSource(cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError):
        source.current_revision("org/tiny")


@pytest.mark.parametrize("group_size", [64, None])
def test_the_card_wq_writes_parses_back(group_size):
    card = card_for("org/tiny", "ab" * 20, method="gptq", bits=3, group_size=group_size)
    assert parse_model_card(card) == CardFacts(base_model="org/tiny", revision="ab" * 20, method="gptq", bits=3,
                                               group=str(group_size or "per-channel"), format="compressed-tensors")


def test_a_card_not_made_by_wq_is_ignored():
    assert parse_model_card("# My model\n\nSome text.\n") is None
    assert parse_model_card("---\nlicense: mit\n---\n# Model\n") is None
