"""`--ckpt ORG/NAME[@REV]`: a checkpoint from the Hugging Face hub, with the standard library only.

    folder = resolve("huggyllama/llama-7b")          # -> a local folder that checkpoint.load reads
    folder = resolve("meta-llama/Llama-2-7b-hf@main")  # gated: export HF_TOKEN=hf_...

A model already in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)
is used as it is. Otherwise config.json, the safetensors (one file, or the shards its index lists) and
the tokenizer files are downloaded from $HF_ENDPOINT (default https://huggingface.co) into
$NUTE_CACHE/hub/ORG--NAME/REV/, each to a `.part` file that a later call continues (an HTTP Range
request) and renames only once its size (Content-Length, X-Linked-Size) and sha256 (X-Linked-Etag, which the
hub gives with an LFS file) are right. HF_TOKEN goes to the endpoint's host only, never to a CDN it redirects to.
"""
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


class HubError(Exception):
    """A hub name that cannot be resolved; the command line prints it as one line."""


def resolve(ckpt):
    """A local path stays as it is; ORG/NAME[@REV] -> a local folder with the checkpoint in it."""
    if os.path.exists(ckpt) or not REPO_ID.fullmatch(ckpt):
        return ckpt
    repo, _, rev = ckpt.partition("@")
    if "--" in repo or ".." in repo or repo.endswith("/."):  # ORG--NAME is the folder: it must name one repo
        raise HubError(f"{ckpt}: {repo!r} is not a hub name ORG/NAME ('--', '..' and '.' are not allowed)")
    if not plain(rev or "main"):
        raise HubError(f"{ckpt}: revision {rev!r} is not a plain branch, tag or commit (no '.', '..' or empty part)")
    return hf_cache_snapshot(repo, rev or "main") or download(repo, rev or "main")


def hf_cache_snapshot(repo, rev):
    """The snapshot folder huggingface_hub made for repo at rev, if it holds a whole checkpoint, else None."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    folder = hub.expanduser() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / rev  # a branch or tag names a commit; a commit hash names itself
    snapshot = folder / "snapshots" / (ref.read_text().strip() if ref.is_file() else rev)
    return str(snapshot) if (snapshot / "config.json").is_file() and weight_files(snapshot) else None


def plain(name):
    """A relative path that stays in its folder: no '.', '..' or empty part, no backslash or control character."""
    return isinstance(name, str) and not re.search(r"[\\\x00-\x1f\x7f]", name) \
        and all(part not in ("", ".", "..") for part in name.split("/"))


def weight_files(folder):
    """The safetensors files a checkpoint folder needs, or None when some are missing."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    return files if all(plain(f) and (Path(folder) / f).is_file() for f in files) else None


def download(repo, rev):
    """config.json, the safetensors (one file, or the index and its shards) and the tokenizer files of
    repo at rev into $NUTE_CACHE/hub/ORG--NAME/REV -> that folder."""
    cache = Path(os.environ.get("NUTE_CACHE", "~/.cache/nute")).expanduser()
    rev_q = urllib.parse.quote(rev, safe="")  # one folder, and one URL part: branch a/b is not branch a--b
    folder = cache / "hub" / repo.replace("/", "--") / rev_q
    url = lambda name: f"{endpoint()}/{repo}/resolve/{rev_q}/{urllib.parse.quote(name)}"
    if (folder / ".complete").exists():  # downloaded before: no request at all
        return str(folder)
    try:
        fetch(url("config.json"), folder / "config.json")
    except HubError as e:
        raise HubError(f"{repo}@{rev}: not a local path, and the hub did not give its config.json ({e})") from None
    index = folder / "model.safetensors.index.json"
    if not fetch(url(index.name), index, optional=True):
        fetch(url("model.safetensors"), folder / "model.safetensors", optional=True)
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    if bad := [name for name in names if not plain(name)]:
        index.unlink()  # not kept: a later run asks the hub again
        raise HubError(f"{url(index.name)}: lists {bad[0]!r}, a file outside the checkpoint's folder")
    for name in names:
        fetch(url(name), folder / name)
    if not weight_files(folder):
        raise HubError(f"{repo}@{rev}: no model.safetensors or model.safetensors.index.json (only safetensors "
                       "checkpoints are downloaded)")
    for name in TOKENIZER_FILES:  # whichever of them the repository has
        fetch(url(name), folder / name, optional=True)
    (folder / ".complete").touch()
    return str(folder)


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def origin(url):
    u = urllib.parse.urlsplit(url)
    return u.scheme, u.hostname, u.port or {"http": 80, "https": 443}.get(u.scheme)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):  # a redirect comes back as an HTTPError, which get() follows
        return None


def get(url, have):
    """GET url from byte `have` on -> (response, the X-Linked-Size/-Etag the hub sent). It follows redirects
    itself: the token goes to the endpoint's host only (an LFS file redirects to a CDN), and the X-Linked-*
    headers come with the hub's redirect, not with the CDN's answer."""
    linked = {}
    for _ in range(10):
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        if os.environ.get("HF_TOKEN") and origin(url) == origin(endpoint()):
            request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
        try:
            response = urllib.request.build_opener(NoRedirect).open(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code not in (301, 302, 303, 307, 308):
                raise
            response = e
        linked = {k: response.headers[k] for k in ("X-Linked-Size", "X-Linked-Etag") if response.headers[k]} | linked
        if response.status not in (301, 302, 303, 307, 308):
            return response, linked
        response.close()
        url = urllib.parse.urljoin(url, response.headers["Location"])
    raise HubError(f"{url}: more than 10 redirects")


def fetch(url, dest, optional=False):
    """Downloads url to dest unless it is there, continuing dest.part -> True, or False for a file the
    repository does not have (404) when optional."""
    if dest.exists():
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        response, linked = get(url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is as long as the file, or longer: fetch it again, to check it
            part.unlink()
            return fetch(url, dest, optional)
        if e.code == 404 and optional:
            return False
        hint = {401: "set HF_TOKEN", 403: "gated: accept its license on the hub and set HF_TOKEN",
                404: "no such repository, revision or file"}.get(e.code, e.reason)
        raise HubError(f"{url}: HTTP {e.code} ({hint})") from None
    except (urllib.error.URLError, OSError) as e:
        raise HubError(f"{url}: cannot connect ({getattr(e, 'reason', e)}); set HF_ENDPOINT for a mirror") from None
    with response:
        kind = response.headers.get_content_type()
        if kind == "text/html":  # a login page or a proxy's error, not the file
            raise HubError(f"{url}: an HTML page came back ({response.read(60)!r}...), not {dest.name}; "
                           "check HF_ENDPOINT")
        if response.status != 206:  # the server sent the whole file: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        try:
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # a broken connection: the part is kept
            raise HubError(f"{url}: download interrupted ({e!r}); run again to continue it") from None
    check(url, part, total, linked, kind)
    os.replace(part, dest)  # atomic: dest is there only when whole
    return True


def check(url, part, total, linked, kind):
    """Raises HubError unless the part has the size and sha256 the server gave (a JSON file: parses); deletes a
    part that continuing cannot make right."""
    size, size_hub = part.stat().st_size, linked.get("X-Linked-Size", "")
    for want, said in ((total, "Content-Length"), (int(size_hub) if size_hub.isdigit() else None, "X-Linked-Size")):
        if want is not None and size != want:
            if size > want:
                part.unlink()
            raise HubError(f"{url}: got {size} of {want} bytes ({said}); run again to "
                           + ("continue" if size < want else "download it anew"))
    sha = linked.get("X-Linked-Etag", "").removeprefix("W/").strip('"')  # an LFS file's sha256
    if re.fullmatch(r"[0-9a-f]{64}", sha):  # (a plain file's ETag is its git sha1: not checked)
        with open(part, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        if got != sha:
            part.unlink()
            raise HubError(f"{url}: sha256 {got} is not the hub's {sha} (X-Linked-Etag); deleted, run again")
    if part.name.endswith(".json.part"):
        try:
            json.loads(part.read_bytes())
        except ValueError:
            head = part.read_bytes()[:60]
            part.unlink()
            raise HubError(f"{url}: not JSON ({kind}, {head!r}...); check HF_ENDPOINT") from None
