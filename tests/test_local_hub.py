"""The local Hub stand-in (tests/local_hub.py) answers the real huggingface_hub client as the Hub would."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from local_hub import Server, running_hub

CLIENT = r"""
import json, sys, tempfile, warnings
from pathlib import Path
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

store, folder = Path(sys.argv[1]), Path(sys.argv[2])
api = HfApi(token="hf_test")
found = {}

def error_of(call):
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None, None

url = api.create_repo("tester/demo")
found["repo_id"] = url.repo_id
found["create_again"] = error_of(lambda: api.create_repo("tester/demo"))[0]
found["create_exist_ok"] = api.create_repo("tester/demo", exist_ok=True).repo_id
found["bare_name"] = api.create_repo("bare", private=True).repo_id
found["no_token"] = error_of(lambda: HfApi(token=False).create_repo("tester/other"))[0]

first = api.upload_folder(repo_id="tester/demo", folder_path=str(folder), commit_message="first")
found["mirrored"] = sorted(p.relative_to(store / "tester/demo").as_posix()
                           for p in (store / "tester/demo").rglob("*") if p.is_file())
info = api.model_info("tester/demo")
found["siblings"] = sorted(s.rfilename for s in info.siblings)
found["sha_is_commit"] = info.sha == first.oid
found["top_level"] = sorted(e.path for e in api.list_repo_tree("tester/demo"))
found["sub_tree"] = sorted(e.path for e in api.list_repo_tree("tester/demo", "sub"))
cache = tempfile.mkdtemp()
found["downloaded"] = Path(hf_hub_download("tester/demo", "sub/b.txt", cache_dir=cache)).read_text()
found["missing_file"] = error_of(lambda: hf_hub_download("tester/demo", "nope.txt", cache_dir=cache))[0]
found["missing_repo"] = error_of(lambda: api.model_info("tester/nope"))[0]
found["missing_revision"] = error_of(lambda: api.model_info("tester/demo", revision="f" * 40))[0]
found["private_without_token"] = error_of(lambda: HfApi(token=False).model_info("local-user/bare"))[0]
found["private_with_token"] = api.model_info("local-user/bare").private

# A second commit: one file changed, one deleted, one unchanged. Snapshots in the same cache follow main, and
# the first commit stays readable by its id.
(folder / "a.txt").write_text("A2")
second = api.upload_folder(repo_id="tester/demo", folder_path=str(folder), delete_patterns=["c.txt"],
                           allow_patterns=["a.txt", "sub/*"])
snapshot = Path(snapshot_download("tester/demo", cache_dir=cache))
found["snapshot"] = {p.relative_to(snapshot).as_posix(): p.read_text() for p in snapshot.rglob("*") if p.is_file()}
found["old_commit_file"] = Path(hf_hub_download("tester/demo", "a.txt", revision=first.oid,
                                                cache_dir=tempfile.mkdtemp())).read_text()
found["new_commit"] = second.oid != first.oid
unchanged = api.upload_file(path_or_fileobj=b"A2", path_in_repo="a.txt", repo_id="tester/demo")
found["unchanged_skipped"] = unchanged.oid == second.oid

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ModelCard("---\nlicense: mit\ntags:\n- x\n---\n# card").validate()
    found["good_card_warnings"] = [str(w.message) for w in caught]
# create_commit validates a README's metadata on the Hub before uploading anything
def push_readme(text):
    return lambda: api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id="tester/demo")
found["list_metadata"] = error_of(push_readme("---\n- a\n- b\n---\n# card"))
found["bad_yaml"] = error_of(push_readme("---\nkey: [unclosed\n---\n# card"))[0]
found["refused_readme_absent"] = "README.md" not in api.list_repo_files("tester/demo")
found["not_served"] = error_of(lambda: api.list_repo_commits("tester/demo"))
api.delete_repo("tester/demo")
found["deleted"] = error_of(lambda: api.model_info("tester/demo"))[0]
found["store_after_delete"] = (store / "tester/demo").exists()
print(json.dumps(found))
"""


def test_the_real_client_publishes_to_and_fetches_from_the_local_hub(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "c.txt").write_text("C")
    (folder / "sub" / "b.txt").write_text("B")
    store = tmp_path / "store"
    with running_hub(store, max_seconds=300) as endpoint:
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        result = subprocess.run(
            [sys.executable, "-c", CLIENT, str(store), str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["repo_id"] == "tester/demo" == found["create_exist_ok"]
    assert found["create_again"] == "HfHubHTTPError"  # 409
    assert found["bare_name"] == "local-user/bare" and found["no_token"] == "HfHubHTTPError"
    assert found["mirrored"] == found["siblings"] == ["a.txt", "c.txt", "sub/b.txt"]
    assert found["sha_is_commit"]
    assert found["top_level"] == ["a.txt", "c.txt", "sub"] and found["sub_tree"] == ["sub/b.txt"]
    assert found["downloaded"] == "B"
    assert found["missing_file"] == "RemoteEntryNotFoundError"
    assert found["missing_repo"] == "RepositoryNotFoundError"
    assert found["missing_revision"] == "RevisionNotFoundError"
    assert found["private_without_token"] == "RepositoryNotFoundError" and found["private_with_token"]
    assert found["snapshot"] == {"a.txt": "A2", "sub/b.txt": "B"}  # the new main, not the cached first commit
    assert found["old_commit_file"] == "A" and found["new_commit"] and found["unchanged_skipped"]
    assert found["good_card_warnings"] == []
    assert found["list_metadata"][0] == "ValueError" and "YAML mapping" in found["list_metadata"][1]
    assert found["bad_yaml"] == "ValueError" and found["refused_readme_absent"]
    assert "not served by the local hub: GET /api/models/tester/demo/commits/main" in found["not_served"][1]
    assert found["deleted"] == "RepositoryNotFoundError" and not found["store_after_delete"]


PIPELINE = r"""
import json, sys, tempfile
from huggingface_hub import HfApi
from diffusers import DiffusionPipeline
from tiny_models import dit_pipeline, pipeline_images

pipe = dit_pipeline()
folder = tempfile.mkdtemp()
pipe.save_pretrained(folder)
HfApi(token="hf_test").create_repo("tester/pipe")
HfApi(token="hf_test").upload_folder(repo_id="tester/pipe", folder_path=folder)
again = DiffusionPipeline.from_pretrained("tester/pipe", cache_dir=tempfile.mkdtemp(), token="hf_test")
print(json.dumps({"class": type(again).__name__,
                  "error": (pipeline_images(again) - pipeline_images(pipe)).abs().max().item()}))
"""


def test_a_diffusers_pipeline_loads_by_repo_id_from_the_local_hub(tmp_path):
    """DiffusionPipeline.from_pretrained("<repo_id>") lists the tree (snapshot_download) and fetches each component."""
    with running_hub(tmp_path / "store", max_seconds=300) as endpoint:
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(Path(__file__).parent),
        }
        result = subprocess.run([sys.executable, "-c", PIPELINE], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["class"] == "DiTPipeline" and found["error"] == 0.0


def test_the_local_hub_listens_on_loopback_only_and_stops_by_itself(tmp_path):
    server = Server(tmp_path)
    try:
        assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0  # port 0: a free one
    finally:
        server.server_close()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "local_hub.py"), str(tmp_path), "0", "--max-seconds", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert int(process.stdout.readline()) > 0  # the port comes first
        start = time.monotonic()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - start < 30
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
