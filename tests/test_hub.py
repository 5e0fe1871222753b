"""hub.py: `--ckpt ORG/NAME[@REV]` against a local server in the hub's /{repo}/resolve/{rev}/{file} layout."""
import hashlib
import http.server
import json
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
def serve():
    """serve(respond) -> the URL of a local server whose GETs respond(handler) answers."""
    servers = []

    def start(respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            do_GET = respond

            def log_message(self, *args):
                pass

        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{servers[-1].server_port}"
    yield start
    for httpd in servers:
        httpd.shutdown()


def send(h, body, headers=()):
    """Answers h with body from its Range on; Content-Length is the length sent unless headers say (None: none)."""
    start = int(h.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
    h.send_response(206 if start else 200)
    for key, value in {"Content-Length": len(body) - start, **dict(headers)}.items():
        if value is not None:
            h.send_header(key, str(value))
    h.end_headers()
    h.wfile.write(body[start:])


def redirect(h, location, headers=()):
    h.send_response(302)
    for key, value in {"Location": location, **dict(headers)}.items():
        h.send_header(key, str(value))
    h.end_headers()


@pytest.fixture
def server(tmp_path, monkeypatch, serve):
    """Serves tmp_path/repos/{ORG}/{NAME}/{rev}/{file} (Range requests honoured, a .safetensors file with the
    X-Linked-Size and X-Linked-Etag of an LFS file); records every request."""
    root, log = tmp_path / "repos", []

    def respond(h):
        log.append((h.path, h.headers.get("Range"), h.headers.get("Authorization")))
        org, name, resolve, rev, *file = h.path.lstrip("/").split("/")
        path = root / org / name / rev / "/".join(file)
        if resolve != "resolve" or not path.is_file():
            return h.send_error(404)
        if "gated" in name and h.headers.get("Authorization") != "Bearer hf_secret":
            return h.send_error(401)
        body = path.read_bytes()
        lfs = {"X-Linked-Size": len(body), "X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"'}
        send(h, body, lfs if path.suffix == ".safetensors" else {})

    monkeypatch.setenv("HF_ENDPOINT", serve(respond))
    monkeypatch.setenv("NUTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return root, log


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


def one_line(e):
    assert "\n" not in str(e.value) and str(e.value).strip()
    return str(e.value)


def test_token_goes_to_the_endpoint_host_only(serve, monkeypatch, tmp_path):
    got = {}  # path -> the Authorization header it came with

    def cdn(h):
        got[h.path] = h.headers.get("Authorization")
        send(h, b"weights")

    def hub_(h):  # /a -> /b on the same host -> the CDN, as the hub does for an LFS file
        got[h.path] = h.headers.get("Authorization")
        redirect(h, "/b" if h.path == "/a" else f"{cdn_url}/c")

    cdn_url, endpoint = serve(cdn), serve(hub_)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub.fetch(f"{endpoint}/a", tmp_path / "f") and (tmp_path / "f").read_bytes() == b"weights"
    assert got == {"/a": "Bearer hf_secret", "/b": "Bearer hf_secret", "/c": None}


def test_names_and_revisions_must_be_plain(server, tmp_path):
    root, log = server
    publish(root, "org/m")
    for ckpt, value in (("org/m@..", "'..'"), ("org/m@.", "'.'"), ("org/m@a/../b", "'a/../b'"),
                        ("org/m@/etc", "'/etc'"), ("org/m@a//b", "'a//b'"), ("org/m@a/", "'a/'"),
                        ("org/..", "'org/..'"), ("org/.", "'org/.'"), ("a--b/c", "'a--b/c'")):
        with pytest.raises(hub.HubError, match=re.escape(f"{ckpt}: ") + ".*" + re.escape(value)) as e:
            hub.resolve(ckpt)
        one_line(e)
    for ckpt in ("org/m@a\\b", "org/m@a\x00b", "org/m@a\nb"):  # never hub names: local paths that do not exist
        assert hub.resolve(ckpt) == ckpt
    assert log == [] and not (tmp_path / "cache").exists()
    r = subprocess.run([sys.executable, "nute.py", "--ckpt", "org/m@..", "--out", str(tmp_path / "o"), "--no-eval"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "org/m@..: revision '..'" in r.stderr


def test_index_cannot_name_files_outside_the_folder(server, tmp_path):
    root, log = server
    src = publish(root, "org/tiny", shards=2)
    index = root / "org" / "tiny" / "main" / "model.safetensors.index.json"
    good = index.read_text()
    (root / "org" / "tiny" / "x.safetensors").write_bytes(b"not weights")  # what ../x.safetensors reaches
    for bad in ("../x.safetensors", str(tmp_path / "x.safetensors"), "a\\..\\x.safetensors", ""):
        weight_map = json.loads(good)["weight_map"]
        index.write_text(json.dumps({"weight_map": {**weight_map, next(iter(weight_map)): bad}}))
        with pytest.raises(hub.HubError, match=r"index\.json: .*" + re.escape(repr(bad))) as e:
            hub.resolve("org/tiny")
        one_line(e)
    assert not (tmp_path / "cache" / "hub" / "org--tiny" / "x.safetensors").exists()
    assert not (tmp_path / "x.safetensors").exists()
    index.write_text(good)  # the bad index was not kept: the fixed repository downloads
    same_model(hub.resolve("org/tiny"), src)


@pytest.mark.parametrize("content_type, body, said", [
    ("text/html; charset=utf-8", b"<html><body>Sign in</body></html>", "HTML"),  # a login page
    ("text/plain", b"502 Bad Gateway", "502 Bad Gateway"),  # a proxy's error
], ids=["html", "text"])
def test_a_page_instead_of_json_is_one_line_and_not_kept(server, serve, monkeypatch, content_type, body, said):
    root, log = server
    src = publish(root, "org/tiny")
    good = hub.os.environ["HF_ENDPOINT"]
    monkeypatch.setenv("HF_ENDPOINT", serve(lambda h: send(h, body, {"Content-Type": content_type})))
    with pytest.raises(hub.HubError, match=r"/org/tiny/resolve/main/config\.json: .*" + said) as e:
        hub.resolve("org/tiny")
    one_line(e)
    monkeypatch.setenv("HF_ENDPOINT", good)  # the good server afterwards: nothing of the page was kept
    same_model(hub.resolve("org/tiny"), src)


WHOLE = bytes(range(256)) * 8  # 2048 bytes
SHA = hashlib.sha256(WHOLE).hexdigest()


@pytest.mark.parametrize("body, headers, said", [
    (WHOLE[:1000], {"X-Linked-Size": 2048}, r"1000 of 2048 bytes \(X-Linked-Size\)"),  # Content-Length 1000 too
    (WHOLE[:1000], {"Content-Length": None, "X-Linked-Size": 2048}, "1000 of 2048 bytes"),  # none, early close
    (WHOLE[:1000], {"Content-Length": 2048}, "1000 of 2048 bytes"),  # closed before its Content-Length
    (b"3e8\r\n" + WHOLE[:1000] + b"\r\n", {"Content-Length": None, "Transfer-Encoding": "chunked"},
     "interrupted .*IncompleteRead"),  # closed before the last chunk
    (WHOLE, {"X-Linked-Size": 2049}, r"2048 of 2049 bytes \(X-Linked-Size\)"),
    (WHOLE[::-1], {"X-Linked-Etag": f'"{SHA}"'}, f"sha256 .* not .*{SHA}"),
], ids=["short-content-length", "no-content-length", "closed-early", "chunks-cut", "wrong-x-linked-size",
     "wrong-sha256"])
def test_download_is_checked_before_it_counts(serve, tmp_path, body, headers, said):
    url = "/org/m/resolve/main/model.safetensors"
    dest = tmp_path / "model.safetensors"
    with pytest.raises(hub.HubError, match=re.escape(url) + ": .*" + said) as e:
        hub.fetch(serve(lambda h: send(h, body, headers)) + url, dest)
    one_line(e)
    assert not dest.exists()
    good = serve(lambda h: send(h, WHOLE, {"X-Linked-Size": 2048, "X-Linked-Etag": SHA}))
    assert hub.fetch(good + url, dest) and dest.read_bytes() == WHOLE  # a right part continues, a wrong one restarts


def test_lfs_file_is_checked_against_the_hubs_redirect(serve, monkeypatch, tmp_path):
    cdn = serve(lambda h: send(h, WHOLE[::-1]))  # the CDN's bytes are not the ones the hub names
    endpoint = serve(lambda h: redirect(h, cdn + h.path, {"X-Linked-Size": 2048, "X-Linked-Etag": f'"{SHA}"'}))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(hub.HubError, match=f"model.safetensors: sha256 .*{SHA}") as e:
        hub.fetch(endpoint + "/model.safetensors", tmp_path / "model.safetensors")
    one_line(e)
    assert list(tmp_path.iterdir()) == []
