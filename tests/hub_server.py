"""A small Hugging Face Hub-protocol HTTP server for tests (stdlib only).

It speaks enough of the Hub's HTTP API for huggingface_hub's real client code
(`HfApi(endpoint=server.url)`, `snapshot_download(..., endpoint=server.url)`,
`hf_hub_download`) to create repos, commit files (regular, non-LFS uploads), create
branches and download files again.

Storage (under `root`, nothing else is written; request headers are never stored):

    root/<type>s/<org>/<name>/repo.json          {"private": bool, "createdAt": ...}
    root/<type>s/<org>/<name>/refs.json          {"branches": {"main": sha, ...}, "tags": {}}
    root/<type>s/<org>/<name>/commits/<sha>.json {"parents", "summary", "description", "date",
                                                  "files": {path: {"oid": sha1, "size": n}}}
    root/<type>s/<org>/<name>/blobs/<git-sha1>   file contents, content-addressed

Repo ids must be "org/name". Only "regular" uploads are offered (no LFS, no Xet): tests
using `upload_folder` should set `huggingface_hub.constants.HF_HUB_DISABLE_XET = True` if
`hf_xet` is installed, since the Xet upload pipeline needs a Xet CAS server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(content: bytes) -> str:
    """The git blob id of `content` (what the Hub reports as a regular file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


class HubServer:
    """Hub-protocol server on 127.0.0.1:<ephemeral port>. Use as a context manager.

    Attributes:
        url: base URL to pass as `endpoint=`.
        requests: (method, path with query, Authorization header or None) for every request.
        fail_commits: the next N commit POSTs answer 500.
        echo_auth_in_errors: injected failures quote the request's Authorization header in
            their message, as a careless proxy or mirror might.
        write_token: if set, write requests must carry `Bearer <write_token>` (else 401) and
            private repos can only be read with it. If None, writes need any Bearer token.
        auto_create_branches: committing to an unknown branch creates it from main (the real
            Hub answers 404 RevisionNotFound instead, which is the default here too).
    """

    def __init__(self, root: Path, write_token: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_token = write_token
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail_commits = 0
        self.echo_auth_in_errors = False
        self.auto_create_branches = False
        self._fail_rules: list[list[Any]] = []  # [substring, status, remaining, method]
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers
    def fail_next(
        self, path_substring: str, status: int = 500, count: int = 1, method: str | None = None
    ) -> None:
        """The next `count` requests whose path contains `path_substring` answer `status`."""
        with self._lock:
            self._fail_rules.append([path_substring, status, count, method])

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict:
        """Stored content of `repo_id` at `revision` (branch, tag or commit sha): {path: bytes}."""
        repo = self._repo_dir(repo_type, repo_id)
        if not repo.is_dir():
            raise KeyError(repo_id)
        commit = self._read_commit(repo, self._resolve(repo, revision))
        return {p: (repo / "blobs" / m["oid"]).read_bytes() for p, m in commit["files"].items()}

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        return dict(self._refs(self._repo_dir(repo_type, repo_id))["branches"])

    def tokens_seen(self) -> set[str | None]:
        return {auth for _, _, auth in self.requests}

    # ----------------------------------------------------------------- storage
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'org/name'")
        return self.root / f"{repo_type}s" / parts[0] / parts[1]

    def _existing_repo(self, repo_type: str, repo_id: str) -> Path:
        repo = self._repo_dir(repo_type, repo_id)
        if not (repo / "repo.json").is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _refs(repo: Path) -> dict:
        return json.loads((repo / "refs.json").read_text())

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)

    @staticmethod
    def _read_commit(repo: Path, sha: str) -> dict:
        return json.loads((repo / "commits" / f"{sha}.json").read_text())

    def _resolve(self, repo: Path, revision: str) -> str:
        refs = self._refs(repo)
        rev = revision.removeprefix("refs/heads/")
        if rev in refs["branches"]:
            return refs["branches"][rev]
        rev = revision.removeprefix("refs/tags/")
        if rev in refs["tags"]:
            return refs["tags"][rev]
        if len(revision) == 40 and (repo / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(
        self, repo: Path, parent: str | None, files: dict, summary: str, description: str
    ) -> str:
        with self._lock:
            self._counter += 1
            date = _now()
            text = json.dumps(
                [parent, files, summary, description, date, self._counter, time.time()]
            )
            sha = hashlib.sha1(text.encode()).hexdigest()
            meta = {
                "parents": [parent] if parent else [],
                "summary": summary,
                "description": description,
                "date": date,
                "files": files,
            }
            (repo / "commits").mkdir(exist_ok=True)
            self._write_json(repo / "commits" / f"{sha}.json", meta)
            return sha

    def _store_blob(self, repo: Path, content: bytes) -> dict:
        oid = git_blob_sha1(content)
        blob = repo / "blobs" / oid
        if not blob.exists():
            blob.parent.mkdir(exist_ok=True)
            tmp = blob.with_name(oid + f".tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            tmp.replace(blob)
        return {"oid": oid, "size": len(content)}

    # ----------------------------------------------------------------- auth
    def _check_write(self, auth: str | None) -> None:
        if auth is None or not auth.startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        if self.write_token is not None and auth != f"Bearer {self.write_token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _check_read(self, repo: Path, auth: str | None) -> None:
        meta = json.loads((repo / "repo.json").read_text())
        if not meta.get("private"):
            return
        ok = auth is not None and auth.startswith("Bearer ")
        if self.write_token is not None:
            ok = auth == f"Bearer {self.write_token}"
        if not ok:  # the Hub hides private repos from anonymous users
            raise HubError(404, "Repository not found", "RepoNotFound")

    def _consume_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._fail_rules:
                sub, status, remaining, meth = rule
                if remaining > 0 and sub in path and (meth is None or meth == method):
                    rule[2] -= 1
                    return status
            self._fail_rules = [r for r in self._fail_rules if r[2] > 0]
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/0.1"

    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging
        pass

    # ----------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype=None):
        self.send_response(status)
        hdrs = {"Content-Type": ctype or "application/json", "Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        hub = self.hub
        auth = self.headers.get("Authorization")
        hub.requests.append((self.command, self.path, auth))
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segments = split.path.strip("/").split("/")  # still URL-quoted
        try:
            status = hub._consume_fault(self.command, self.path)
            if status is not None:
                echo = f" for Authorization: {auth}" if hub.echo_auth_in_errors else ""
                raise HubError(status, f"Injected failure ({status}){echo}")
            if segments[0] == "api":
                self._api(segments[1:], body, auth)
            else:
                self._resolve_file(segments, auth)
        except HubError as err:
            self._error(err)
        except Exception as err:  # pragma: no cover - surfaces server bugs to the client
            self._json(500, {"error": f"{type(err).__name__}: {err}"})

    # ----------------------------------------------------------------- /api
    def _api(self, seg: list[str], body: bytes, auth: str | None):
        hub, method = self.hub, self.command
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), auth)
        if seg == ["repos", "delete"] and method == "DELETE":
            hub._check_write(auth)
            data = json.loads(body or b"{}")
            repo = hub._existing_repo(data.get("type") or "model", _repo_id(data))
            _rmtree(repo)
            return self._json(200, {})
        if seg == ["validate-yaml"] and method == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if seg == ["whoami-v2"] and method == "GET":
            if auth is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._json(200, _whoami())
        if len(seg) < 3 or seg[0].removesuffix("s") not in REPO_TYPES:
            raise HubError(404, "Not found")
        repo_type = seg[0].removesuffix("s")
        repo_id = f"{unquote(seg[1])}/{unquote(seg[2])}"
        action, rest = (seg[3], [unquote(s) for s in seg[4:]]) if len(seg) > 3 else (None, [])
        with hub._lock:
            repo = hub._existing_repo(repo_type, repo_id)
            if method in ("GET", "HEAD"):
                hub._check_read(repo, auth)
            else:
                hub._check_write(auth)
            if action is None and method == "GET":
                return self._info(repo_type, repo_id, repo, "main")
            if action == "revision" and method == "GET" and rest:
                return self._info(repo_type, repo_id, repo, "/".join(rest))
            if action == "tree" and method == "GET" and rest:
                return self._tree(repo, rest[0], "/".join(rest[1:]))
            if action == "paths-info" and method == "POST" and rest:
                return self._paths_info(repo, rest[0], body)
            if action == "refs" and method == "GET":
                return self._list_refs(repo)
            if action == "commits" and method == "GET" and rest:
                return self._list_commits(repo, "/".join(rest))
            if action == "preupload" and method == "POST" and rest:
                return self._preupload(repo, "/".join(rest), json.loads(body or b"{}"))
            if action == "commit" and method == "POST" and rest:
                return self._commit(repo_type, repo_id, repo, "/".join(rest), body)
            if action == "branch" and rest and method in ("POST", "DELETE"):
                return self._branch(repo, "/".join(rest), json.loads(body or b"{}"))
        raise HubError(404, f"Unsupported route {method} {self.path}")

    def _create_repo(self, data: dict, auth: str | None):
        hub = self.hub
        hub._check_write(auth)
        repo_type = data.get("type") or "model"
        repo_id = _repo_id(data)
        url = _repo_url(hub.url, repo_type, repo_id)
        with hub._lock:
            repo = hub._repo_dir(repo_type, repo_id)
            if (repo / "repo.json").is_file():
                return self._json(409, {"error": "You already created this repo", "url": url})
            repo.mkdir(parents=True, exist_ok=True)
            private = data.get("visibility", "public") != "public" or bool(data.get("private"))
            hub._write_json(repo / "refs.json", {"branches": {}, "tags": {}})
            files = {".gitattributes": hub._store_blob(repo, GITATTRIBUTES)}
            sha = hub._new_commit(repo, None, files, "initial commit", "")
            hub._write_json(repo / "refs.json", {"branches": {"main": sha}, "tags": {}})
            hub._write_json(repo / "repo.json", {"private": private, "createdAt": _now()})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo_type: str, repo_id: str, repo: Path, revision: str):
        hub = self.hub
        sha = hub._resolve(repo, revision)
        commit = hub._read_commit(repo, sha)
        meta = json.loads((repo / "repo.json").read_text())
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, m in sorted(commit["files"].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=m["size"], blobId=m["oid"])
            siblings.append(sib)
        self._json(
            200,
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": meta["createdAt"],
                "private": meta["private"],
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            },
        )

    def _tree(self, repo: Path, revision: str, path_in_repo: str):
        hub = self.hub
        commit = hub._read_commit(repo, hub._resolve(repo, revision))
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = _tree_entries(commit["files"])
        prefix = path_in_repo.strip("/")
        if prefix and (prefix not in entries or entries[prefix]["type"] != "directory"):
            raise HubError(404, f"{path_in_repo} does not exist", "EntryNotFound")
        base = prefix + "/" if prefix else ""
        out = []
        for path, entry in sorted(entries.items()):
            if not path.startswith(base) or path == prefix:
                continue
            if not recursive and "/" in path[len(base) :]:
                continue
            out.append(entry)
        self._json(200, out)

    def _paths_info(self, repo: Path, revision: str, body: bytes):
        hub = self.hub
        commit = hub._read_commit(repo, hub._resolve(repo, revision))
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        entries = _tree_entries(commit["files"])
        self._json(200, [entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _list_refs(self, repo: Path):
        refs = self.hub._refs(repo)

        def fmt(kind, name, sha):
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        branches = [
            fmt("heads", n, s) for n, s in refs["branches"].items() if not n.startswith("refs/")
        ]
        prs = [
            {"name": n, "ref": n, "targetCommit": s}
            for n, s in refs["branches"].items()
            if n.startswith("refs/pr/")
        ]
        tags = [fmt("tags", n, s) for n, s in refs["tags"].items()]
        include_prs = self.query.get("include_prs", ["0"])[0] in ("1", "true", "True")
        data = {"branches": branches, "converts": [], "tags": tags}
        data["pullRequests"] = prs if include_prs else []
        self._json(200, data)

    def _list_commits(self, repo: Path, revision: str):
        hub = self.hub
        sha: str | None = hub._resolve(repo, revision)
        out = []
        while sha:
            c = hub._read_commit(repo, sha)
            out.append(
                {
                    "id": sha,
                    "title": c["summary"],
                    "message": c["description"],
                    "authors": [{"user": "test-user"}],
                    "date": c["date"],
                }
            )
            sha = c["parents"][0] if c["parents"] else None
        self._json(200, out)

    def _preupload(self, repo: Path, revision: str, data: dict):
        hub = self.hub
        try:
            sha = hub._resolve(repo, revision)
            files = hub._read_commit(repo, sha)["files"]
        except HubError:
            if not hub.auto_create_branches and "create_pr" not in self.query:
                raise
            sha, files = None, {}
        out = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": files.get(f["path"], {}).get("oid"),
            }
            for f in data.get("files", [])
        ]
        self._json(200, {"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, repo: Path, revision: str, body: bytes):
        hub = self.hub
        if hub.fail_commits > 0:
            hub.fail_commits -= 1
            echo = f" for Authorization: {self.headers.get('Authorization')}"
            raise HubError(500, "Injected commit failure" + echo * hub.echo_auth_in_errors)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        refs = hub._refs(repo)
        branch = revision.removeprefix("refs/heads/")
        pr_url = None
        if self.query.get("create_pr", ["0"])[0] in ("1", "true"):
            parent = hub._resolve(repo, revision)
            number = 1 + sum(1 for b in refs["branches"] if b.startswith("refs/pr/"))
            branch = f"refs/pr/{number}"
            pr_url = f"{_repo_url(hub.url, repo_type, repo_id)}/discussions/{number}"
        elif branch in refs["branches"]:
            parent = refs["branches"][branch]
        elif hub.auto_create_branches and len(branch) != 40:
            parent = refs["branches"].get("main")
        else:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(hub._read_commit(repo, parent)["files"]) if parent else {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    data = base64.b64decode(content)
                else:
                    data = content.encode()
                files[path] = hub._store_blob(repo, data)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                files = {p: m for p, m in files.items() if not p.startswith(path + "/")}
            elif key == "lfsFile":
                raise HubError(400, "This test hub only accepts regular (non-LFS) uploads")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        sha = hub._new_commit(
            repo, parent, files, header.get("summary", ""), header.get("description", "")
        )
        refs["branches"][branch] = sha
        hub._write_json(repo / "refs.json", refs)
        self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{_repo_url(hub.url, repo_type, repo_id)}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    def _branch(self, repo: Path, branch: str, data: dict):
        hub = self.hub
        refs = hub._refs(repo)
        if self.command == "DELETE":
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del refs["branches"][branch]
        else:
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = hub._resolve(repo, data.get("startingPoint") or "main")
        hub._write_json(repo / "refs.json", refs)
        self._json(200, {})

    # ----------------------------------------------------------------- /{repo}/resolve
    def _resolve_file(self, seg: list[str], auth: str | None):
        hub = self.hub
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0].removesuffix("s"), seg[1:]
        if len(seg) < 5 or seg[2] != "resolve" or self.command not in ("GET", "HEAD"):
            raise HubError(404, f"Unsupported route {self.command} {self.path}")
        repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
        revision = unquote(seg[3])
        path = unquote("/".join(seg[4:]))
        with hub._lock:
            repo = hub._existing_repo(repo_type, repo_id)
            hub._check_read(repo, auth)
            sha = hub._resolve(repo, revision)
            meta = hub._read_commit(repo, sha)["files"].get(path)
            if meta is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            content = (repo / "blobs" / meta["oid"]).read_bytes()
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{meta["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            start_s, _, end_s = rng[len("bytes=") :].split(",")[0].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(content) - 1
            if start >= len(content) and len(content) > 0:
                raise HubError(
                    416, "Range not satisfiable", None, {"Content-Range": f"bytes */{len(content)}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, ctype="application/octet-stream")


def _repo_id(data: dict) -> str:
    org, name = data.get("organization"), data.get("name")
    if not name:
        raise HubError(400, "Missing repo name")
    if not org:
        raise HubError(400, "This test hub needs repo ids of the form 'org/name'")
    return f"{org}/{name}"


def _repo_url(base: str, repo_type: str, repo_id: str) -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{base}/{prefix}{repo_id}"


def _tree_entries(files: dict) -> dict[str, dict]:
    """Files and (implicit) directories of a commit, as the Hub's tree API lists them."""
    entries: dict[str, dict] = {}
    for path, m in files.items():
        entries[path] = {"type": "file", "oid": m["oid"], "size": m["size"], "path": path}
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            oid = hashlib.sha1(f"tree {d}".encode()).hexdigest()
            entries.setdefault(d, {"type": "directory", "oid": oid, "size": 0, "path": d})
    return entries


def _whoami() -> dict:
    return {
        "type": "user",
        "id": "0" * 24,
        "name": "test-user",
        "fullname": "Test User",
        "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
    }


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
