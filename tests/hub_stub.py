"""A local stand-in for the parts of the Hugging Face hub API that ``HfApi.create_repo`` and
``HfApi.upload_folder`` call, so pushing is tested without the network.

Endpoints (as huggingface_hub 0.3x-2.x calls them):

* ``POST /api/repos/create``: ``{"name", "organization", "visibility"|"private", "type"}`` -> ``{"url"}``
* ``POST /api/{type}s/{org}/{name}/preupload/{revision}``: ``{"files": [{"path", "size", "sample"}]}``
  -> every file ``"uploadMode": "regular"`` (inline in the commit, so no LFS / xet storage is needed)
* ``POST /api/{type}s/{org}/{name}/commit/{revision}``: NDJSON lines ``{"key": "header" | "file" |
  "deletedFile" ..., "value": {...}}``; regular files carry base64 ``content``
* ``POST /api/validate-yaml``: a README.md's front matter, ``{"content", "repoType"}``
* ``GET /api/{type}s/{org}/{name}[/revision/{revision}]``: the repository's info (sha, siblings)
* ``GET /api/{type}s/{org}/{name}/tree/{revision}``: its files (``snapshot_download`` lists them)
* ``HEAD`` / ``GET /{org}/{name}/resolve/{revision}/{path}``: a file's metadata / bytes (downloads)

``add_repo`` puts a repository there to download; ``downloads`` records the files served.

Every request is recorded; ``repos[repo_id]`` holds ``{"private": bool, "files": {path: bytes}}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"


class HubStub:
    """Run with ``with HubStub() as hub: ...``; ``hub.url`` is the endpoint to put in ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens: list[str | None] = []
        self.cards: list[dict[str, Any]] = []  # the validated YAML front matter of README.md files
        self.downloads: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                stub._handle(self, "GET")

            def do_POST(self) -> None:
                stub._handle(self, "POST")

            def do_HEAD(self) -> None:
                stub._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        path = req.path.split("?", 1)[0]
        self.requests.append((method, path))
        self.tokens.append(req.headers.get("Authorization"))
        if method == "POST" and path == "/api/repos/create":
            return self._create(req, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(req, json.loads(body))
        m = re.fullmatch(_REPO + r"/preupload/(?P<rev>[^/]+)", path)
        if method == "POST" and m:
            files = json.loads(body)["files"]
            return self._send(req, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files], "commitOid": self._sha(m["repo"])})
        m = re.fullmatch(_REPO + r"/commit/(?P<rev>[^/]+)", path)
        if method == "POST" and m:
            return self._commit(req, m["repo"], body)
        m = re.fullmatch(_REPO + r"/tree/(?P<rev>[^/]+)", path)
        if method == "GET" and m and m["repo"] in self.repos:
            files = self.repos[m["repo"]]["files"]
            return self._send(req, 200, [{"type": "file", "path": name, "size": len(data),
                                          "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if method in ("GET", "HEAD") and m and m["file"] in self.repos.get(m["repo"], {"files": {}})["files"]:
            return self._file(req, m["repo"], m["file"])
        m = re.fullmatch(_REPO + r"(?:/revision/(?P<rev>[^/]+))?", path)
        if method == "GET" and m and m["repo"] in self.repos:
            repo = self.repos[m["repo"]]
            return self._send(req, 200, {"id": m["repo"], "sha": self._sha(m["repo"]), "private": repo["private"],
                                         "siblings": [{"rfilename": p} for p in repo["files"]]})
        return self._send(req, 404, {"error": f"stub hub: no route for {method} {path}"})

    def _create(self, req: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        private = payload.get("private", payload.get("visibility") == "private")
        if repo_id in self.repos:
            return self._send(req, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = {"private": bool(private), "files": {}, "commits": []}
        return self._send(req, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, req: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        """The README's YAML front matter (between ``---`` lines) must parse to a mapping (the hub checks more)."""
        match = re.match(r"^---\n(.*?)\n---\n", payload["content"], re.DOTALL)
        if match is None:
            return self._send(req, 400, {"errors": [{"message": "no YAML front matter"}]})
        try:
            meta = yaml.safe_load(match[1])
        except yaml.YAMLError as e:
            return self._send(req, 400, {"errors": [{"message": str(e)}]})
        if not isinstance(meta, dict):
            return self._send(req, 400, {"errors": [{"message": "metadata must be a mapping"}]})
        self.cards.append(meta)
        return self._send(req, 200, {"errors": [], "warnings": []})

    def _commit(self, req: BaseHTTPRequestHandler, repo_id: str, body: bytes) -> None:
        if repo_id not in self.repos:
            return self._send(req, 404, {"error": "Repository not found"})
        repo = self.repos[repo_id]
        header = None
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                content = value["content"]
                repo["files"][value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                                else content.encode())
        repo["commits"].append(header)
        sha = self._sha(repo_id)
        return self._send(req, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                     "success": True})

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Serve a repository for download; returns its commit hash."""
        self.repos[repo_id] = {"private": private, "files": dict(files), "commits": [{"summary": "initial"}]}
        return self._sha(repo_id)

    def _file(self, req: BaseHTTPRequestHandler, repo_id: str, name: str) -> None:
        data = self.repos[repo_id]["files"][name]
        if req.command == "GET":
            self.downloads.append(name)
        req.send_response(200)
        req.send_header("Content-Length", str(len(data)))
        req.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        req.send_header("X-Repo-Commit", self._sha(repo_id))
        req.end_headers()
        if req.command == "GET":
            req.wfile.write(data)

    def _sha(self, repo_id: str) -> str:
        repo = self.repos.get(repo_id, {"commits": []})
        return hashlib.sha1(f"{repo_id}{len(repo['commits'])}".encode()).hexdigest()

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, payload: dict[str, Any] | list[Any]) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
