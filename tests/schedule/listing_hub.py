"""tests/hub_server.py's fake Hub plus the model listing (`/api/models?author=...`) the scheduler asks for,
and helpers to publish a new revision, delete a repo, and give a destination repo a wq model card."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

from tests.hub_server import FakeHub, Repo, _handler
from wq_ops.report.model_card import render_model_card


def start_listing_hub() -> FakeHub:
    hub = FakeHub()

    class Handler(_handler(hub)):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:  # noqa: N802
            path, _, query = self.path.partition("?")
            if unquote(path) != "/api/models":
                return super().do_GET()
            hub.log.append(("GET", self.path))
            author = parse_qs(query).get("author", [None])[0]
            body = [{"id": r, "modelId": r} for r in sorted(hub.repos) if author in (None, r.split("/")[0])]
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    hub.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=hub.server.serve_forever, daemon=True).start()
    return hub


def publish_revision(hub: FakeHub, repo_id: str, checkpoint: Path, *, note: str = "") -> str:
    """Put `checkpoint` at `repo_id` as its latest commit and return the sha. `note` adds a file, as a README
    edit would: a new commit, the same weights."""
    hub.add_repo_from_dir(repo_id, checkpoint)
    if note:
        repo = hub.repos[repo_id]
        sha = hashlib.sha1(repo.sha.encode() + note.encode()).hexdigest()
        hub.repos[repo_id] = Repo(files={**repo.files, "NOTE.md": note.encode()}, sha=sha)
    return hub.repos[repo_id].sha


def card_for(base_model: str, revision: str, *, method: str = "rtn", bits: int = 4, group_size: int | None = 64,
             fmt: str = "compressed-tensors") -> str:
    """The model card wq writes for an artifact of `base_model` at `revision`."""
    report = {
        "wq_version": "0.1.0",
        "job": {"method": method, "bits": bits, "group_size": group_size, "sym": True, "act_order": False,
                "format": fmt, "samples": 4, "seq_len": 64, "calib": None, "seed": 0},
        "source": {"repo_id": base_model, "model": base_model, "revision": revision, "dtype": "bfloat16"},
        "totals": {"layers_quantized": 14, "layers_kept": 5, "mean_output_error": 1e-3,
                   "geomean_output_error": 1e-3, "worst_layer": {"name": "x", "output_error": 2e-3},
                   "wall_seconds": 1.0},
    }
    return render_model_card(report, command="wq --model " + base_model)


def put_card(hub: FakeHub, repo_id: str, card: str) -> None:
    hub.repos[repo_id] = Repo(files={"README.md": card.encode()}, sha="c" * 40)
