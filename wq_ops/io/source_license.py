"""The license a source checkpoint's model card declares, which the artifact's card carries on (a quantized
model keeps its base's terms). Entry point: `source_license`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from wq_ops.io.checkpoint import CARD_NAME, Checkpoint

__all__ = ["SourceLicense", "source_license"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceLicense:
    """A model card's license metadata: an SPDX-like id or `other` with a name and a link (None: not given)."""

    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None


def source_license(checkpoint: Checkpoint) -> SourceLicense:
    """The license the checkpoint's model card metadata declares (nothing where it has no card or no license)."""
    card = checkpoint.local_dir / CARD_NAME
    if not card.is_file():
        return SourceLicense()
    import yaml
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(card) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:     # not worth failing a job over
        log.warning("%s: its model card's metadata is unreadable (%s); no license carried", card, e)
        return SourceLicense()

    if not isinstance(meta, dict):
        return SourceLicense()

    def text(key: str) -> str | None:
        value = meta.get(key)
        return str(value) if isinstance(value, (str, int, float)) and str(value) else None

    return SourceLicense(license=text("license"), license_name=text("license_name"),
                         license_link=text("license_link"))
