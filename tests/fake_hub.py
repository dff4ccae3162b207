"""A local HTTP server standing in for the Hugging Face Hub (set HF_ENDPOINT to its URL).

It answers the few endpoints huggingface_hub calls for a push, a checkpoint mirror and a
download (whoami, auth-check, repo create, branch, preupload, commit, tree, revision, resolve),
keeping files in memory, and can play the error cases: unknown token (401), read-only token,
gated model (403 GatedRepo), no write access (403), missing repo (404 RepoNotFound). Every
upload is a "regular" (base64 in the commit) file, so no LFS or xet transfer is involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


@dataclass
class FakeHub:
    # token -> (user name, token role, organisations)
    tokens: dict = field(
        default_factory=lambda: {
            "hf_write": ("alice", "write", ["team"]),
            "hf_read": ("alice", "read", []),
        }
    )
    gated: set = field(default_factory=set)  # repos whose license the user has not accepted
    read_only: set = field(default_factory=set)  # repos the user may read but not write
    # repo id -> {"private": bool, "branches": {name: {path: bytes}}, "commits": int}
    repos: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    # --- request handling ---
    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        path = unquote(url.path)
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        auth = req.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or None
        self.requests.append((method, path))
        self._recursive = "recursive=true" in (url.query or "").lower()
        user = self.tokens.get(token) if token else None
        if token and user is None:
            return _send(req, 401, {"error": "Invalid credentials in Authorization header"})
        for pattern, (verb, handler) in self._routes():
            match = re.fullmatch(pattern, path)
            if match and verb == method:
                return handler(req, user, body, *match.groups())
            if match and method == "HEAD" and verb == "GET":
                return handler(req, user, body, *match.groups(), head=True)
        return _send(req, 404, {"error": f"fake hub: no route {method} {path}"})

    def _routes(self):
        repo = r"([^/]+/[^/]+)"
        return [
            (r"/api/whoami-v2", ("GET", self._whoami)),
            (rf"/api/models/{repo}/auth-check(/write)?", ("GET", self._auth_check)),
            (r"/api/repos/create", ("POST", self._create_repo)),
            (r"/api/validate-yaml", ("POST", self._validate_yaml)),
            (rf"/api/models/{repo}/branch/([^/]+)", ("POST", self._create_branch)),
            (rf"/api/models/{repo}/preupload/([^/]+)", ("POST", self._preupload)),
            (rf"/api/models/{repo}/commit/([^/]+)", ("POST", self._commit)),
            (rf"/api/models/{repo}/tree/([^/]+)(?:/(.*))?", ("GET", self._tree)),
            (rf"/api/models/{repo}/revision/([^/]+)", ("GET", self._revision)),
            (rf"/api/models/{repo}", ("GET", self._revision_main)),
            (rf"/{repo}/resolve/([^/]+)/(.+)", ("GET", self._resolve)),
        ]

    def _whoami(self, req, user, body, head=False):
        if user is None:
            return _send(req, 401, {"error": "no token"})
        name, role, orgs = user
        return _send(
            req,
            200,
            {
                "name": name,
                "type": "user",
                "orgs": [{"name": o} for o in orgs],
                "auth": {"type": "access_token", "accessToken": {"role": role}},
            },
        )

    def _auth_check(self, req, user, body, repo, write, head=False):
        if repo in self.gated:
            return _send(req, 403, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
        if repo not in self.repos:
            return _send(req, 404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        if write and (repo in self.read_only or user is None):
            return _send(req, 403, {"error": "You don't have write access to this repo"})
        return _send(req, 200, {})

    def _validate_yaml(self, req, user, body):
        """Like the Hub: README.md front matter must parse as a YAML mapping."""
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            ok = match is not None and isinstance(yaml.safe_load(match.group(1)), dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            return _send(req, 400, {"errors": [{"message": "invalid YAML metadata"}]})
        return _send(req, 200, {"errors": [], "warnings": []})

    def _create_repo(self, req, user, body):
        data = json.loads(body)
        repo = f"{data.get('organization') or user[0]}/{data['name']}"
        if repo in self.repos:
            return _send(
                req,
                409,
                {"error": "You already created this model repo", "url": f"{self.url}/{repo}"},
            )
        self.repos[repo] = {
            "private": data.get("visibility") == "private" or bool(data.get("private")),
            "branches": {"main": {}},
            "commits": 0,
        }
        return _send(req, 200, {"url": f"{self.url}/{repo}", "name": repo})

    def _create_branch(self, req, user, body, repo, branch):
        branches = self.repos[repo]["branches"]
        if branch in branches:
            return _send(req, 409, {"error": "Reference already exists"})
        branches[branch] = dict(branches["main"])
        return _send(req, 200, {})

    def _preupload(self, req, user, body, repo, revision):
        files = json.loads(body)["files"]
        return _send(
            req,
            200,
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
            },
        )

    def _commit(self, req, user, body, repo, revision):
        if repo in self.read_only:
            return _send(req, 403, {"error": "no write access"})
        files = self.repos[repo]["branches"].setdefault(revision, {})
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        self.repos[repo]["commits"] += 1
        oid = self._sha(repo, revision)
        return _send(req, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid})

    def _branch_files(self, repo, revision) -> dict | None:
        """The files of a branch, named by the branch or by its current commit sha."""
        branches = self.repos[repo]["branches"]
        if revision in branches:
            return branches[revision]
        return next((f for b, f in branches.items() if self._sha(repo, b) == revision), None)

    def _sha(self, repo, revision) -> str:
        count = self.repos[repo]["commits"]
        return hashlib.sha1(f"{repo}@{revision}#{count}".encode()).hexdigest()

    def _tree(self, req, user, body, repo, revision, folder, head=False):
        if repo not in self.repos:
            return _send(req, 404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        files = self._branch_files(repo, revision)
        if files is None:
            return _send(req, 404, {"error": "rev"}, {"X-Error-Code": "RevisionNotFound"})
        prefix = (folder or "").rstrip("/")
        if self._recursive:
            listed = [
                {"type": "file", "path": n, "oid": hashlib.sha1(c).hexdigest(), "size": len(c)}
                for n, c in sorted(files.items())
                if not prefix or n.startswith(prefix + "/")
            ]
            return _send(req, 200, listed)
        entries = {}
        for name, content in files.items():
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1 :] if prefix else name
            first = rest.split("/")[0]
            full = f"{prefix}/{first}" if prefix else first
            if "/" in rest:
                entries[full] = {"type": "directory", "path": full, "oid": "0" * 40, "size": 0}
            else:
                entries[full] = {
                    "type": "file",
                    "path": full,
                    "oid": hashlib.sha1(content).hexdigest(),
                    "size": len(content),
                }
        if prefix and not entries:
            return _send(req, 404, {"error": "entry"}, {"X-Error-Code": "EntryNotFound"})
        return _send(req, 200, list(entries.values()))

    def _revision_main(self, req, user, body, repo, head=False):
        return self._revision(req, user, body, repo, "main", head)

    def _revision(self, req, user, body, repo, revision, head=False):
        if repo not in self.repos:
            return _send(req, 404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        files = self.repos[repo]["branches"].get(revision)
        if files is None:
            return _send(req, 404, {"error": "rev"}, {"X-Error-Code": "RevisionNotFound"})
        return _send(
            req,
            200,
            {
                "id": repo,
                "sha": self._sha(repo, revision),
                "private": self.repos[repo]["private"],
                "siblings": [{"rfilename": n, "size": len(c)} for n, c in sorted(files.items())],
            },
        )

    def _resolve(self, req, user, body, repo, revision, name, head=False):
        branches = self.repos.get(repo, {}).get("branches", {})
        files = self._branch_files(repo, revision)
        if files is None or name not in files:
            return _send(req, 404, {"error": "entry"}, {"X-Error-Code": "EntryNotFound"})
        content = files[name]
        headers = {
            "X-Repo-Commit": self._sha(repo, revision) if revision in branches else revision,
            "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        return _send_bytes(req, content, headers, head)


def _send(req, status: int, payload, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        req.send_header(key, value)
    req.end_headers()
    req.wfile.write(data)


def _send_bytes(req, content: bytes, headers: dict, head: bool) -> None:
    req.send_response(200)
    req.send_header("Content-Length", str(len(content)))
    for key, value in headers.items():
        req.send_header(key, value)
    req.end_headers()
    if not head:
        req.wfile.write(content)
