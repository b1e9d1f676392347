"""A small Hugging Face Hub stand-in on loopback: the endpoints an upload uses, and nothing else.

Implements repo creation, branch creation, the pre-upload check, the LFS batch / PUT /
verify protocol and the NDJSON commit endpoint, keeps what arrives in memory (per
repository and branch), checks the bearer token, and can fail chosen endpoints with a
503 to test retries. Point huggingface_hub at it with HF_ENDPOINT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo -> {"private": bool, "branches": {name: {path: bytes}}, "commits": [...]}
        self.lfs: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # endpoint kind -> number of 503 answers still to give
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.headers_seen: list[tuple[str, dict]] = []  # (path, request headers)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _send(self, code: int, payload=None):
                hub.log.append((self.command, self.path, code))  # before answering: the client may look right after
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self):
                hub.headers_seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = self._body()
                path = self.path.split("?")[0]
                kind, handler, args = hub._match(self.command, path)
                if handler is None:
                    return self._send(404, {"error": f"no route {self.command} {path}"})
                if not kind.startswith("lfs-") and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if hub.fail.get(kind, 0) > 0:
                    hub.fail[kind] -= 1
                    return self._send(503, {"error": "temporarily unavailable"})
                code, payload = handler(body, *args)
                self._send(code, payload)

            do_GET = do_POST = do_PUT = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- routing ---------------------------------------------------------------------

    def _match(self, method: str, path: str):
        routes = [
            ("POST", r"/api/repos/create", "create", self._create),
            ("POST", r"/api/validate-yaml", "validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/([^/]+/[^/]+)/branch/(.+)", "branch", self._branch),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/(.+)", "preupload", self._preupload),
            ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", "batch", self._batch),
            ("PUT", r"/lfs-upload/([0-9a-f]{64})", "lfs-upload", self._put),
            ("POST", r"/lfs-verify/([0-9a-f]{64})", "lfs-verify", self._verify),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/(.+)", "commit", self._commit),
        ]
        for m, pattern, kind, handler in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return kind, handler, match.groups()
        return None, None, ()

    def _create(self, body):
        req = json.loads(body)
        repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if repo in self.repos:
            return 409, {"error": "You already created this model repo"}
        self.repos[repo] = {"private": req.get("visibility") == "private" or req.get("private", False),
                            "branches": {"main": {}}, "commits": []}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def _validate_yaml(self, body):
        """The model card's front matter must be a YAML mapping with well-typed known fields."""
        import yaml

        content = json.loads(body)["content"]
        if not content.startswith("---\n"):
            return 200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}
        errors = [f"{k} must be a list of strings" for k in ("tags",) if k in meta and not isinstance(meta[k], list)]
        errors += [f"{k} must be a string" for k in ("license", "library_name", "pipeline_tag", "base_model")
                   if k in meta and not isinstance(meta[k], str)]
        self.validated = getattr(self, "validated", []) + [meta]
        return (400, {"errors": [{"message": m} for m in errors]}) if errors else (200, {"warnings": []})

    def _branch(self, body, repo, branch):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if branch in self.repos[repo]["branches"]:
            return 409, {"error": "Branch already exists"}
        self.repos[repo]["branches"][branch] = dict(self.repos[repo]["branches"]["main"])
        return 200, {}

    def _preupload(self, body, repo, revision):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        return 200, {"files": [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 1_000_000 else "regular",
             "shouldIgnore": False}
            for f in files
        ]}

    def _batch(self, body, repo):
        req = json.loads(body)
        assert req["operation"] == "upload", req
        return 200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "actions": {
                "upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                "verify": {"href": f"{self.url}/lfs-verify/{o['oid']}"},
            }}
            for o in req["objects"]
        ]}

    def _put(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        self.lfs[oid] = body
        return 200, {}

    def _verify(self, body, oid):
        req = json.loads(body)
        ok = oid in self.lfs and len(self.lfs[oid]) == req["size"]
        return (200, {}) if ok else (404, {"error": "object not uploaded"})

    def _commit(self, body, repo, revision):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        branch = self.repos[repo]["branches"].get(revision)
        if branch is None:
            return 404, {"error": f"Revision {revision} not found"}
        staged, header = dict(branch), None
        for line in body.splitlines():
            item = json.loads(line)
            v = item["value"]
            if item["key"] == "header":
                header = v
            elif item["key"] == "file":
                staged[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {v['oid']} was not uploaded"}
                staged[v["path"]] = self.lfs[v["oid"]]
        branch.clear()
        branch.update(staged)
        oid = hashlib.sha1(body).hexdigest()
        self.repos[repo]["commits"].append({"oid": oid, "summary": header["summary"], "revision": revision})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
