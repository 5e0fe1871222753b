"""hub.py: `--ckpt ORG/NAME[@REV]` against a local server in the hub's /{repo}/resolve/{rev}/{file} layout."""
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from formats import checkpoint, hub
from conftest import ROOT
from helpers import make_tiny, write_hf


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/repos/{ORG}/{NAME}/{rev}/{file} (Range requests honoured); records every request."""
    root, log = tmp_path / "repos", []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
            org, name, resolve, rev, *file = self.path.lstrip("/").split("/")
            path = root / org / name / rev / "/".join(file)
            if resolve != "resolve" or not path.is_file():
                return self.send_error(404)
            if "gated" in name and self.headers.get("Authorization") != "Bearer hf_secret":
                return self.send_error(401)
            body, start = path.read_bytes(), 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    monkeypatch.setenv("NUTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield root, log
    httpd.shutdown()


def publish(root, repo, rev="main", shards=1):
    """A tiny checkpoint in the server's folder for repo at rev -> the local original."""
    src = make_tiny(root.parent / "src" / repo / rev)
    if shards > 1:  # the same weights, as an index and shards
        model, _ = checkpoint.load(str(src))
        (src / "model.safetensors").unlink()
        write_hf(src, model, shards=shards)
    shutil.copytree(src, root / repo / rev)
    return src


def same_model(a, b):
    (ma, ta), (mb, tb) = checkpoint.load(str(a)), checkpoint.load(str(b))
    x = torch.tensor([ta.encode("the cat sat")])
    assert ta.encode("the cat sat") == tb.encode("the cat sat")
    torch.testing.assert_close(ma(x), mb(x), rtol=0, atol=0)


def test_sharded_checkpoint_downloads_and_loads(server):
    root, log = server
    src = publish(root, "org/tiny", shards=3)
    folder = hub.resolve("org/tiny")
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted([".complete", *(p.name for p in src.iterdir())])
    same_model(folder, src)
    n = len(log)
    assert hub.resolve("org/tiny") == folder and len(log) == n  # the second time: no request at all
    model, _ = checkpoint.load("org/tiny")  # what every --ckpt goes through
    assert model.config.n_layers == 3


def test_interrupted_download_continues_with_a_range_request(server, tmp_path):
    root, log = server
    src = publish(root, "org/tiny", rev="v1")
    dest = tmp_path / "cache" / "hub" / "org--tiny" / "v1"  # $NUTE_CACHE/hub/ORG--NAME/REV
    dest.mkdir(parents=True)
    whole = (src / "model.safetensors").read_bytes()
    (dest / "model.safetensors.part").write_bytes(whole[:1000])  # a download cut after 1000 bytes
    folder = hub.resolve("org/tiny@v1")
    assert (Path(folder) / "model.safetensors").read_bytes() == whole
    assert ("/org/tiny/resolve/v1/model.safetensors", "bytes=1000-", None) in log
    same_model(folder, src)


def test_hf_home_cache_used_without_downloading(server, tmp_path):
    root, log = server
    src = make_tiny(tmp_path / "src")
    snap = tmp_path / "hf_home" / "hub" / "models--org--cached" / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    assert hub.resolve("org/cached") == str(snap) and hub.resolve("org/cached@abc123") == str(snap)
    assert log == []


def test_gated_model_needs_hf_token(server, monkeypatch):
    root, _ = server
    publish(root, "org/gated-model")
    with pytest.raises(hub.HubError, match="HTTP 401 .*HF_TOKEN"):
        hub.resolve("org/gated-model")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert (Path(hub.resolve("org/gated-model")) / "model.safetensors").is_file()


def test_unknown_names_fail_with_one_line(server, tmp_path):
    for ckpt, message in (("org/missing", r"config.json \(.*HTTP 404"), ("llama-7b", "nor a hub name")):
        r = subprocess.run([sys.executable, "nute.py", "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--no-eval"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert re.search(message, r.stderr), r.stderr
    assert hub.resolve(str(tmp_path)) == str(tmp_path)  # a local path is never a hub name
