"""A small stand-in for the Hugging Face Hub, serving what huggingface_hub's download and upload paths ask for.

Download: model and dataset info (`/api/models|datasets/{repo}[/revision/{rev}]`) and files
(`/[datasets/]{repo}/resolve/{rev}/{path}`; a dataset repo is added as "datasets/ORG/NAME").
Upload (the LFS path, Xet disabled): `/api/whoami-v2`, `/api/repos/create`, `/api/models/{repo}/auth-check/write`,
`/api/models/{repo}/branch/{name}`, `/api/models/{repo}/preupload/{rev}`, the LFS batch endpoint
`/{repo}.git/info/lfs/objects/batch`, `PUT /lfs-upload/{oid}`, `/api/validate-yaml` and the ndjson
`/api/models/{repo}/commit/{rev}`.
Repos live in memory; every request is logged. Faults can be injected: an HTTP status on the Nth request to an
endpoint, a connection cut halfway through an upload's body, and tokens that are rejected (401) or refused (403).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_MIN_SIZE = 10_000        # bytes; the real Hub's threshold is 10 MB, small here so tests stay small


def _commit_sha(files: dict[str, bytes], parent: str) -> str:
    digest = sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())
    return hashlib.sha1(json.dumps([parent, digest]).encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Branch:
    files: dict[str, bytes]
    sha: str


@dataclass
class Repo:
    files: dict[str, bytes]          # the main branch
    sha: str
    private: bool = False
    branches: dict[str, Branch] = field(default_factory=dict)     # branches other than main
    lfs_paths: set[str] = field(default_factory=set)              # paths committed as LFS pointers
    commits: list[dict[str, Any]] = field(default_factory=list)   # header of every commit received

    def state(self, revision: str | None) -> Branch | None:
        if revision in (None, "main", self.sha):
            return Branch(self.files, self.sha)
        branch = self.branches.get(revision)
        if branch is not None:
            return branch
        return next((b for b in self.branches.values() if b.sha == revision), None)


@dataclass
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)     # org name -> roleInOrg
    role: str = "write"                                    # the token's role: read | write | fineGrained
    denied: set[str] = field(default_factory=set)          # repo ids this token gets 403 on


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    tokens: dict[str, User] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)             # sha256 hex -> content
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    # Faults: (method, path regex) -> [skip, count, status]: let `skip` matching requests through, then answer
    # `status` to the next `count` ones.
    status_faults: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    cut_uploads: dict[str, int] = field(default_factory=dict)       # lfs oid -> uploads still to cut halfway
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_repo_from_dir(self, repo_id: str, directory: Path) -> str:
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
                 if p.is_file()}
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                           .encode()).hexdigest()
        self.repos[repo_id] = Repo(files=files, sha=sha)
        return sha

    def add_user(self, token: str, name: str, *, orgs: dict[str, str] | None = None, role: str = "write",
                 denied: set[str] | None = None) -> None:
        self.tokens[token] = User(name=name, orgs=dict(orgs or {}), role=role, denied=set(denied or ()))

    def fail(self, method: str, path_regex: str, *, status: int = 500, after: int = 0, times: int = 1) -> None:
        """Answer `status` to `times` requests matching (method, path_regex), after letting `after` through."""
        self.status_faults[(method, path_regex)] = [after, times, status]

    def cut_upload(self, data: bytes, *, times: int = 1) -> None:
        """Close the connection halfway through the next `times` uploads of `data`'s LFS object."""
        self.cut_uploads[hashlib.sha256(data).hexdigest()] = times

    def fetched(self) -> list[str]:
        return [path for method, path in self.log if method == "GET" and "/resolve/" in path]

    def requests(self, method: str, pattern: str = "") -> list[str]:
        return [path for m, path in self.log if m == method and re.search(pattern, path)]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:   # quiet
            pass

        # -- plumbing ---------------------------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str, head: bool = False, message: str | None = None) -> None:
            headers = {"X-Error-Code": code, "Content-Type": "application/json"}
            if message is not None:
                headers["X-Error-Message"] = message
            self._send(status, json.dumps({"error": message or code}).encode(), headers, head)

        def _body(self, cut_at: int | None = None) -> bytes | None:
            """The request body (Content-Length or chunked). With cut_at, read that many bytes and return None."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if cut_at is not None and sum(map(len, chunks)) >= cut_at:
                        return None
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            if cut_at is not None:
                self.rfile.read(min(cut_at, length))
                return None
            return self.rfile.read(length)

        def _cut(self) -> None:
            self.close_connection = True
            self.connection.shutdown(2)       # no response: the client sees the connection drop mid-request

        def _user(self) -> User | None:
            auth = self.headers.get("Authorization", "")
            return hub.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

        def _token(self) -> str:
            return self.headers.get("Authorization", "")[len("Bearer "):]

        def _injected(self, method: str, path: str) -> int | None:
            with hub.lock:
                for (m, pattern), fault in hub.status_faults.items():
                    if m == method and re.search(pattern, path) and fault[1] > 0:
                        if fault[0] > 0:
                            fault[0] -= 1
                            return None
                        fault[1] -= 1
                        return fault[2]
            return None

        def _can_write(self, repo_id: str) -> bool | None:
            """None: no valid token (401); False: refused (403)."""
            user = self._user()
            if user is None:
                return None
            namespace = repo_id.split("/")[0]
            member = namespace == user.name or user.orgs.get(namespace) not in (None, "read")
            return member and user.role != "read" and repo_id not in user.denied

        def _refuse(self, repo_id: str) -> bool:
            allowed = self._can_write(repo_id)
            if allowed is None:
                self._error(401, "Unauthorized", message="Invalid credentials in Authorization header")
                return True
            if not allowed:
                # The real Hub does not echo tokens; this one does (in the body, which clients relay in their
                # exceptions), so tests prove wq scrubs what it relays.
                body = json.dumps({"error": f"token {self._token()} cannot write to {repo_id}"}).encode()
                self._send(403, body, {"X-Error-Code": "Forbidden", "Content-Type": "application/json"})
                return True
            return False

        # -- routes -----------------------------------------------------------------------------------------

        def _route(self, method: str) -> None:
            path = unquote(self.path.split("?")[0])
            with hub.lock:
                hub.log.append((method, path))
                hub.headers_seen.append(dict(self.headers))
            status = self._injected(method, path)
            if status is not None:
                self._body()
                return self._error(status, "Injected", message=f"injected {status}")
            head = method == "HEAD"
            if method in ("GET", "HEAD"):
                return self._get(path, head)
            if method == "PUT":
                return self._put(path)
            return self._post(path)

        def _get(self, path: str, head: bool) -> None:
            if path == "/api/whoami-v2":
                user = self._user()
                if user is None:
                    return self._error(401, "Unauthorized", head, "Invalid credentials in Authorization header")
                return self._json(200, {
                    "type": "user", "name": user.name,
                    "orgs": [{"name": org, "roleInOrg": role} for org, role in user.orgs.items()],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}}})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/auth-check/write$", path)
            if m:
                if m.group(1) not in hub.repos:
                    return self._error(404, "RepoNotFound", head)
                if not self._refuse(m.group(1)):
                    self._json(200, {})
                return None
            m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                # A dataset repo is kept under "datasets/ORG/NAME", as its file URLs name it.
                repo_id = m.group(2) if m.group(1) == "models" else f"datasets/{m.group(2)}"
                rev = m.group(3)
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", head)
                repo = hub.repos[repo_id]
                state = repo.state(rev)
                if state is None:
                    return self._error(404, "RevisionNotFound", head)
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": state.sha, "private": repo.private,
                                   "siblings": [{"rfilename": f} for f in sorted(state.files)]}).encode()
                return self._send(200, body, {"Content-Type": "application/json"}, head)
            m = re.match(r"^/((?:datasets/)?[^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                repo_id, rev, filename = m.groups()
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", head)
                state = hub.repos[repo_id].state(rev)
                if state is None:
                    return self._error(404, "RevisionNotFound", head)
                if filename not in state.files:
                    return self._error(404, "EntryNotFound", head)
                data = state.files[filename]
                etag = hashlib.sha256(data).hexdigest()
                return self._send(200, data, {"X-Repo-Commit": state.sha, "ETag": f'"{etag}"',
                                              "Content-Type": "application/octet-stream"}, head)
            return self._error(404, "RepoNotFound", head)

        def _put(self, path: str) -> None:
            m = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
            if not m:
                self._body()
                return self._error(404, "NotFound")
            oid = m.group(1)
            with hub.lock:
                cut = hub.cut_uploads.get(oid, 0) > 0
                if cut:
                    hub.cut_uploads[oid] -= 1
            if cut:
                self._body(cut_at=int(self.headers.get("Content-Length") or 2) // 2 or 1)
                return self._cut()
            data = self._body() or b""
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "BadContent", message="content does not match its sha256")
            hub.lfs[oid] = data
            return self._send(200)

        def _post(self, path: str) -> None:
            body = self._body() or b""
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or (self._user().name if self._user() else '')}/" \
                          f"{payload['name']}"
                if self._refuse(repo_id):
                    return None
                if repo_id in hub.repos:     # the Hub's 409 still carries the url, which exist_ok clients read
                    return self._send(409, json.dumps({"error": "You already created this model repo",
                                                       "url": f"{hub.endpoint}/{repo_id}"}).encode(),
                                      {"X-Error-Message": "You already created this model repo",
                                       "Content-Type": "application/json"})
                files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                private = payload.get("private") or payload.get("visibility") == "private"
                hub.repos[repo_id] = Repo(files=files, sha=_commit_sha(files, ""), private=bool(private))
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":           # create_commit checks a README.md's metadata first
                return self._json(200, {"errors": [], "warnings": []})
            m = re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
            if m:
                if self._refuse(m.group(1)):
                    return None
                objects = []
                for obj in json.loads(body)["objects"]:
                    entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}}
                    objects.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objects})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", path)
            if not m:
                return self._error(404, "NotFound")
            repo_id, action, rev = m.groups()
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            if self._refuse(repo_id):
                return None
            repo = hub.repos[repo_id]
            if action == "branch":
                if rev in repo.branches or rev == "main":
                    return self._error(409, "Conflict", message="Reference already exists")
                start = repo.state(json.loads(body or b"{}").get("startingPoint"))
                assert start is not None
                repo.branches[rev] = Branch(dict(start.files), start.sha)
                return self._json(200, {})
            state = repo.state(rev)
            if state is None:
                return self._error(404, "RevisionNotFound")
            if action == "preupload":
                files = []
                for f in json.loads(body)["files"]:
                    lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                    old = state.files.get(f["path"])
                    oid = None
                    if old is not None:
                        oid = hashlib.sha256(old).hexdigest() if f["path"] in repo.lfs_paths else git_blob_sha1(old)
                    files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                  "shouldIgnore": False, "oid": oid})
                return self._json(200, {"files": files, "commitOid": state.sha})
            return self._commit(repo_id, repo, rev, state, body)

        def _commit(self, repo_id: str, repo: Repo, rev: str, state: Branch, body: bytes) -> None:
            files = dict(state.files)
            header: dict[str, Any] = {}
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    header = value
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    repo.lfs_paths.discard(value["path"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(422, "LfsObjectMissing", message=f"no LFS object {value['oid']}")
                    files[value["path"]] = hub.lfs[value["oid"]]
                    repo.lfs_paths.add(value["path"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            sha = _commit_sha(files, state.sha)
            if rev in (None, "main", repo.sha):
                repo.files, repo.sha = files, sha
            else:
                repo.branches[rev] = Branch(files, sha)
            repo.commits.append({**header, "revision": rev, "oid": sha})
            return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("HEAD")

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._route("PUT")

    return Handler


def start_hub() -> FakeHub:
    hub = FakeHub()
    hub.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.server.daemon_threads = True
    threading.Thread(target=hub.server.serve_forever, daemon=True).start()
    return hub
