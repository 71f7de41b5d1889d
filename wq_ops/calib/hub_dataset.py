"""Calibration text from a Hub dataset: `--calib hf://ORG/NAME[:CONFIG][@SPLIT]`, resolved with huggingface_hub
(HF_ENDPOINT and HF_TOKEN as it reads them), pinned to one commit, and only the data files of that config and
split downloaded (parquet, JSON lines, Arrow or text, as `data.load_texts` reads them). Without a split, the
`train` split; without a config, every data file of the split. Entry points: `parse_hub_dataset`,
`download_hub_dataset`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wq_ops.errors import ConfigError

__all__ = ["HubDataset", "parse_hub_dataset", "download_hub_dataset", "HUB_PREFIX"]

HUB_PREFIX = "hf://"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".txt")
_SPEC = re.compile(r"^(?:datasets/)?(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)"
                   r"(?::(?P<config>[\w.\-]+))?(?:@(?P<split>[\w.\-]+))?$")


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    config: str | None       # a subset (the dataset's folder or file-name part); None: any
    split: str               # "train", "validation", "test", ...

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f":{self.config}" if self.config else "") + f"@{self.split}"


def parse_hub_dataset(source: str) -> HubDataset | None:
    """The dataset an `hf://` source names; None for any other source; a ConfigError for a malformed one."""
    if not source.startswith(HUB_PREFIX):
        return None
    m = _SPEC.match(source[len(HUB_PREFIX):])
    if m is None:
        raise ConfigError(f"--calib {source}: expected hf://ORG/NAME[:CONFIG][@SPLIT], e.g. "
                          "hf://wikitext/wikitext:wikitext-2-raw-v1@train")
    return HubDataset(repo_id=m["repo"], config=m["config"], split=m["split"] or "train")


def _words(path: str) -> set[str]:
    """A data file's path split into its words: `wikitext-2-raw-v1/train-00000-of-00001.parquet` gives
    {wikitext, 2, raw, v1, train, 00000, of, 00001, parquet} and, whole, each folder name."""
    parts = path.split("/")
    return set(re.split(r"[/_.\-]", path)) | set(parts[:-1]) | {parts[-1].rsplit(".", 1)[0]}


def _matching(files: list[str], dataset: HubDataset) -> list[str]:
    """The data files of the dataset's config and split, in name order."""
    data = sorted(f for f in files if f.lower().endswith(DATA_SUFFIXES) and not f.startswith("."))
    if dataset.config:                   # a folder of that name, or a file name that starts with it
        config = dataset.config
        data = [f for f in data if config in f.split("/")[:-1]
                or re.match(rf"{re.escape(config)}[-_.]", f.split("/")[-1]) is not None]
    return [f for f in data if dataset.split in _words(f)]


def download_hub_dataset(dataset: HubDataset, *, revision: str | None = None) -> list[Path]:
    """The local paths of the dataset's data files for its config and split, downloaded at one commit."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = constants.ENDPOINT            # honours HF_ENDPOINT
    try:
        info = HfApi(endpoint=endpoint).dataset_info(dataset.repo_id, revision=revision, files_metadata=False)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConfigError(f"--calib {dataset}: no such dataset on the Hub ({type(e).__name__}); check the name, "
                          "and HF_TOKEN for a gated or private one") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConfigError(f"--calib {dataset}: cannot reach the Hub ({' '.join(str(e).split())[:200]}); check "
                          "the network and HF_ENDPOINT, or give a local file") from None
    files = [s.rfilename for s in info.siblings or []]
    chosen = _matching(files, dataset)
    if not chosen:
        shown = ", ".join(sorted(f for f in files if f.lower().endswith(DATA_SUFFIXES))[:12]) or "none"
        raise ConfigError(f"--calib {dataset}: no data file of " + (f"config {dataset.config!r}, " if dataset.config
                          else "") + f"split {dataset.split!r} in {dataset.repo_id}@{info.sha}; its data files: "
                          f"{shown}")
    try:
        return [Path(hf_hub_download(dataset.repo_id, name, repo_type="dataset", revision=info.sha,
                                     endpoint=endpoint)) for name in chosen]
    except (HfHubHTTPError, OSError) as e:
        raise ConfigError(f"--calib {dataset}: downloading its data failed ({' '.join(str(e).split())[:200]})") \
            from None
