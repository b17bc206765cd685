"""The project's own local stand-in for the Hugging Face Hub, so the Hub round-trip tests run in any clone.

A loopback HTTP server (stdlib ``http.server``, one thread per request) that answers the calls the real
``huggingface_hub`` client makes to publish and fetch a model:

==========================================================  ==================================================
client call                                                 endpoint
==========================================================  ==================================================
``create_repo``                                             ``POST /api/repos/create`` (409 when it exists)
``delete_repo``                                             ``DELETE /api/repos/delete``
``upload_folder`` / ``upload_file`` / ``create_commit``     ``POST /api/models/<id>/preupload/<rev>`` (every
(``push_to_hub`` of hf_collapse, transformers, diffusers)   file is "regular": sent inline, no LFS) and
                                                            ``POST /api/models/<id>/commit/<rev>`` (ndjson)
card metadata validation (``ModelCard.validate``, commits)  ``POST /api/validate-yaml``
``model_info`` / ``repo_info``                              ``GET /api/models/<id>[/revision/<rev>]``
``list_repo_tree`` / ``list_repo_files``                    ``GET /api/models/<id>/tree/<rev>[/<path>]``
(``snapshot_download``, ``DiffusionPipeline.from_pretrained``)
``hf_hub_download`` / ``from_pretrained``                   ``HEAD`` and ``GET /<id>/resolve/<rev>/<file>``
``whoami``                                                  ``GET /api/whoami-v2``
``list_models(author=..., search=...)``                     ``GET /api/models``
==========================================================  ==================================================

Every commit gets its own id; a revision is ``main`` or a commit id, so a cached tree or file of an older commit
is never served for a newer one. ETags are the git blob ids the real Hub gives regular files, so re-uploading an
unchanged file is skipped by the client as it is on the Hub. Writes need a token (any ``Authorization`` header);
a private repository is invisible without one. Anything else answers 404 with ``not served by the local hub:``
and the method and path. The files of each repository's ``main`` are mirrored under ``STORE/<repo_id>/`` so a
test can compare what arrived with what it saved. Commits are kept in memory: this is for small test models.

Command line (the first line on stdout is the port; it stops by itself after ``--max-seconds``)::

    python tests/local_hub.py STORE [PORT] [--max-seconds 600]

Point a client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` and ``HF_HUB_OFFLINE=0``, set before
``huggingface_hub`` is imported (it reads the endpoint at import), and pass any token. From Python,
:func:`running_hub` starts it in a subprocess and stops it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"  # loopback only, never another interface
USER = "local-user"  # whoami's answer, and the namespace of a repository created without one
REPO_TYPES = ("models", "datasets", "spaces")

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPE = r"(?P<kind>models|datasets|spaces)"
ROUTES = [  # (method, pattern on the still-quoted path, handler name)
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("DELETE", re.compile(r"^/api/repos/delete$"), "delete_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(r"^/api/models$"), "list_models"),
    ("POST", re.compile(rf"^/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/(?:(?P<kind>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/(?:(?P<kind>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a namespace or repository name, as the Hub accepts


def checked_path(path: str) -> str:
    """A file path inside a repository: relative, without '..' (the store must not be written outside)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"invalid path in repository: {path!r}")
    return path


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class Repo:
    def __init__(self, repo_id: str, kind: str, private: bool):
        self.repo_id, self.kind, self.private = repo_id, kind, private
        self.commits: list[tuple[str, dict[str, bytes]]] = []  # oldest first; (commit id, path -> content)
        self.add_commit({}, "initial commit")

    def add_commit(self, files: dict[str, bytes], message: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        digest = hashlib.sha1(f"{self.repo_id}\n{parent}\n{message}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_id(files[path])}\n".encode())
        commit_id = digest.hexdigest()
        self.commits.append((commit_id, files))
        return commit_id

    def at(self, revision: str) -> tuple[str, dict[str, bytes]]:
        if revision == "main":
            return self.commits[-1]
        for commit_id, files in self.commits:
            if commit_id == revision:
                return commit_id, files
        raise HubError(
            404, f"Invalid rev id: {revision} (the local hub knows main and its commit ids)", "RevisionNotFound"
        )


class LocalHub:
    """The state behind the server: repositories, their commits, and the mirror of each ``main`` on disk."""

    def __init__(self, store: str | os.PathLike):
        self.store = Path(store).resolve()
        self.store.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()

    def repo(self, kind: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository not found: {kind[:-1]} {repo_id}", "RepoNotFound")
        return repo

    def mirror(self, repo: Repo) -> None:
        folder = self.store / repo.repo_id if repo.kind == "models" else self.store / repo.kind / repo.repo_id
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in repo.at("main")[1].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server: Server

    def log_message(self, *args):  # quiet: the tests read stdout for the port only
        pass

    # --- plumbing -------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        raw_path = urlsplit(self.path).path
        self.query = urlsplit(self.path).query
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.match(raw_path)
                if match and route_method == method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.server.hub.lock:
                        return getattr(self, name)(**args)
            raise HubError(404, f"not served by the local hub: {method} {unquote(raw_path)}")
        except HubError as error:
            self._send(
                error.status,
                json.dumps({"error": error.message}).encode(),
                "application/json",
                {"X-Error-Code": error.code, "X-Error-Message": error.message, "X-Repo-Commit": error.commit},
                head=method == "HEAD",
            )
        except Exception as error:  # a bug here, or a request it cannot parse: say so rather than hang up
            message = f"local hub error on {method} {unquote(raw_path)}: {type(error).__name__}: {error}"
            self._send(
                500,
                json.dumps({"error": message}).encode(),
                "application/json",
                {"X-Error-Message": message[:500]},
                head=method == "HEAD",
            )

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None, head: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            if value is not None:  # header values are latin-1, one line
                self.send_header(key, " ".join(str(value).encode("latin-1", "replace").decode("latin-1").split()))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    @property
    def authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _need_token(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header (the local hub takes any token)")

    def _url(self, rest: str) -> str:
        return f"http://{self.headers.get('Host') or HOST}/{rest}"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    # --- repositories ---------------------------------------------------------------------------------
    def create_repo(self):
        self._need_token()
        request = json.loads(self.body or b"{}")
        if not request.get("name"):
            raise HubError(400, "create_repo needs a name")
        repo_id = f"{request.get('organization') or USER}/{request['name']}"
        if not all(NAME.match(part) and ".." not in part for part in repo_id.split("/")):
            raise HubError(400, f"invalid repository id {repo_id!r}: letters, digits, '.', '_' and '-' only")
        kind = request.get("type", "model") + "s"
        if kind not in REPO_TYPES:
            raise HubError(400, f"invalid repository type {kind[:-1]!r}: model, dataset or space")
        prefix = "" if kind == "models" else f"{kind}/"
        url = self._url(prefix + repo_id)
        if (kind, repo_id) in self.hub.repos:
            return self._json({"error": f"You already created this {kind[:-1]} repo", "url": url}, 409)
        private = request.get("visibility", "private" if request.get("private") else "public") != "public"
        self.hub.repos[(kind, repo_id)] = repo = Repo(repo_id, kind, private)
        self.hub.mirror(repo)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self):
        self._need_token()
        request = json.loads(self.body or b"{}")
        repo_id = f"{request.get('organization') or USER}/{request.get('name')}"
        repo = self.hub.repo(request.get("type", "model") + "s", repo_id, True)
        del self.hub.repos[(repo.kind, repo_id)]
        shutil.rmtree(
            self.hub.store / repo_id if repo.kind == "models" else self.hub.store / repo.kind / repo_id,
            ignore_errors=True,
        )
        self._json({})

    def whoami(self):
        self._need_token()
        self._json(
            {
                "type": "user",
                "name": USER,
                "fullname": USER,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def list_models(self):
        query = parse_qs(self.query)
        author, search = query.get("author", [""])[0], query.get("search", [""])[0]
        self._json(
            [
                {"id": repo.repo_id, "modelId": repo.repo_id, "private": repo.private}
                for (kind, repo_id), repo in sorted(self.hub.repos.items())
                if kind == "models"
                and (self.authorized or not repo.private)
                and (not author or repo_id.split("/")[0] == author)
                and search in repo_id.split("/")[1]
            ]
        )

    def repo_info(self, kind, repo, rev="main"):
        repository = self.hub.repo(kind, repo, self.authorized)
        commit_id, files = repository.at(rev)
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit_id,
                "private": repository.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(files)],
            }
        )

    def tree(self, kind, repo, rev, path=""):
        commit_id, files = self.hub.repo(kind, repo, self.authorized).at(rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = "recursive=true" in self.query.lower() or "recursive=1" in self.query
        under = {p[len(prefix) :]: data for p, data in files.items() if p.startswith(prefix)}
        if prefix and not under:
            raise HubError(404, f"{path} does not exist in {repo} at {commit_id}", "EntryNotFound", commit_id)
        entries, folders = [], set()
        for rest in sorted(under):
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add("/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                data = under[rest]
                entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data), "path": prefix + rest})
        for folder in sorted(folders):
            entries.append(
                {
                    "type": "directory",
                    "oid": hashlib.sha1(f"{commit_id}/{prefix}{folder}".encode()).hexdigest(),
                    "path": prefix + folder,
                }
            )
        self._json(entries)

    # --- publishing -----------------------------------------------------------------------------------
    def validate_yaml(self):
        content = json.loads(self.body or b"{}").get("content", "")
        errors, warnings = [], []
        lines = content.splitlines()
        if not lines or lines[0].strip() != "---":
            warnings.append({"message": "empty or missing yaml metadata in repo card"})
        elif "---" not in (line.strip() for line in lines[1:]):
            errors.append({"message": "the metadata block is not closed by a line '---'"})
        else:
            end = [line.strip() for line in lines[1:]].index("---") + 1
            try:
                import yaml

                metadata = yaml.safe_load("\n".join(lines[1:end]))
            except ImportError:  # nothing to check the syntax with: accept, as the client would not know better
                metadata = {}
            except Exception as error:  # a YAML syntax error
                errors.append({"message": f"invalid YAML in the metadata block: {error}"})
                metadata = {}
            if metadata is not None and not isinstance(metadata, dict):
                errors.append({"message": "the metadata block must be a YAML mapping"})
        self._json({"errors": errors, "warnings": warnings}, 400 if errors else 200)

    def preupload(self, kind, repo, rev):
        self._need_token()
        _, files = self.hub.repo(kind, repo, True).at(rev)
        request = json.loads(self.body or b"{}")
        self._json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in request.get("files", [])
                ]
            }
        )

    def commit(self, kind, repo, rev):
        self._need_token()
        repository = self.hub.repo(kind, repo, True)
        if rev != "main":
            raise HubError(400, f"the local hub commits to main only, not to {rev!r}")
        files = dict(repository.at("main")[1])
        message = ""
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            operation = json.loads(line)
            key, value = operation.get("key"), operation.get("value", {})
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repository.at("main")[0]:
                    raise HubError(412, f"parent commit {parent} is not the head of main")
            elif key == "file":
                content = value["content"]
                files[checked_path(value["path"])] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            else:  # lfsFile and anything newer: the preupload answer never asks for them
                raise HubError(400, f"not served by the local hub: commit operation {key!r} (files go inline)")
        commit_id = repository.add_commit(files, message)
        self.hub.mirror(repository)
        prefix = "" if kind == "models" else f"{kind}/"
        self._json(
            {
                "commitUrl": self._url(f"{prefix}{repo}/commit/{commit_id}"),
                "commitOid": commit_id,
                "pullRequestUrl": None,
                "success": True,
            }
        )

    # --- downloads ------------------------------------------------------------------------------------
    def resolve(self, repo, rev, path, kind="models"):
        commit_id, files = self.hub.repo(kind, repo, self.authorized).at(rev)
        if path not in files:
            raise HubError(404, f"Entry not found: {path} in {repo} at {commit_id}", "EntryNotFound", commit_id)
        data = files[path]
        self._send(
            200,
            data,
            "application/octet-stream",
            {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": commit_id, "Accept-Ranges": "none"},
            head=self.command == "HEAD",
        )


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: str | os.PathLike, port: int = 0):
        super().__init__((HOST, port), Handler)
        self.hub = LocalHub(store)


def serve(store: str | os.PathLike, port: int = 0, max_seconds: float = 600.0) -> None:
    """Serve until ``max_seconds`` have passed (or the process is stopped); print the port first."""
    server = Server(store, port)
    print(server.server_address[1], flush=True)
    timer = threading.Timer(max_seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever()
    finally:
        timer.cancel()
        server.server_close()


@contextlib.contextmanager
def running_hub(store: str | os.PathLike, max_seconds: float = 600.0):
    """Start the local hub in a subprocess storing under ``store``; yield its endpoint URL; stop it."""
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen(
        [sys.executable, __file__, str(store), "0", "--max-seconds", str(max_seconds)],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    try:
        line = process.stdout.readline().strip()
        if not line.isdigit():
            process.kill()
            process.wait()
            errors.seek(0)
            raise RuntimeError(f"the local hub did not start: {line!r} {errors.read()[-2000:]}")
        yield f"http://{HOST}:{int(line)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        errors.close()


REAL_HUB_SWITCH = "HF_COLLAPSE_REAL_HUB"  # =1 (with HF_TOKEN): the round-trip tests publish to the real Hub
REPO_PREFIX = "HF_COLLAPSE_REPO_PREFIX"  # set by the tests' `hub` fixture: names this run's real-Hub repositories


class HubTarget:
    """Where a round-trip script publishes, read from the environment its test set.

    By default the local hub: namespace ``tester``, any token, public repositories, and what arrived is read from
    the hub's store. With ``HF_COLLAPSE_REAL_HUB=1``: the Hub at ``HF_ENDPOINT`` (default the real one), the
    namespace of ``HF_TOKEN``, private repositories named ``<prefix><name>``, and what arrived is fetched back with
    ``snapshot_download`` (less the ``.gitattributes`` the Hub adds to every new repository).
    """

    def __init__(self) -> None:
        self.real = os.environ.get(REAL_HUB_SWITCH) == "1"
        self.private = self.real
        if self.real:
            from huggingface_hub import HfApi

            self.token = os.environ["HF_TOKEN"]
            self.namespace = HfApi(token=self.token).whoami()["name"]
            self.prefix = os.environ.get(REPO_PREFIX, "hf-collapse-test-")
        else:
            self.token, self.namespace, self.prefix = "hf_test", "tester", ""

    def repo(self, name: str) -> str:
        return f"{self.namespace}/{self.prefix}{name}"

    def pushed(self, store: str | os.PathLike, repo_id: str) -> Path:
        """The files the Hub holds for ``repo_id``'s main branch, as a folder."""
        if not self.real:
            return Path(store) / repo_id
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, token=self.token, cache_dir=tempfile.mkdtemp(), ignore_patterns=[".gitattributes"]
            )
        )


def delete_test_repos(prefix: str) -> list[str]:
    """Delete the repositories of ``HF_TOKEN``'s namespace whose names start with ``prefix`` (a real-Hub run's)."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    namespace = api.whoami()["name"]
    deleted = []
    for model in api.list_models(author=namespace, search=prefix):
        if model.id.split("/")[1].startswith(prefix):
            api.delete_repo(model.id)
            deleted.append(model.id)
    return deleted


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A local stand-in for the Hugging Face Hub, on 127.0.0.1.")
    parser.add_argument("store", help="folder where each repository's main branch is mirrored")
    parser.add_argument("port", nargs="?", type=int, default=0, help="0 (default) picks a free port")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    serve(args.store, args.port, args.max_seconds)


if __name__ == "__main__":
    main(sys.argv[1:])
