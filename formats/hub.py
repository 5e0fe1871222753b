"""`--ckpt ORG/NAME[@REV]`: a checkpoint from the Hugging Face hub, with the standard library only.

    folder = resolve("huggyllama/llama-7b")          # -> a local folder that checkpoint.load reads
    folder = resolve("meta-llama/Llama-2-7b-hf@main")  # gated: export HF_TOKEN=hf_...

A model already in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)
is used as it is. Otherwise config.json, the safetensors (one file, or the shards its index lists) and
the tokenizer files are downloaded from $HF_ENDPOINT (default https://huggingface.co) into
$NUTE_CACHE/hub/ORG--NAME/REV/, each to a `.part` file that a later call continues (an HTTP Range
request) and renames when complete.
"""
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
    return hf_cache_snapshot(repo, rev or "main") or download(repo, rev or "main")


def hf_cache_snapshot(repo, rev):
    """The snapshot folder huggingface_hub made for repo at rev, if it holds a whole checkpoint, else None."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    folder = hub.expanduser() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / rev  # a branch or tag names a commit; a commit hash names itself
    snapshot = folder / "snapshots" / (ref.read_text().strip() if ref.is_file() else rev)
    return str(snapshot) if (snapshot / "config.json").is_file() and weight_files(snapshot) else None


def weight_files(folder):
    """The safetensors files a checkpoint folder needs, or None when some are missing."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    return files if all((Path(folder) / f).is_file() for f in files) else None


def download(repo, rev):
    """config.json, the safetensors (one file, or the index and its shards) and the tokenizer files of
    repo at rev into $NUTE_CACHE/hub/ORG--NAME/REV -> that folder."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    cache = Path(os.environ.get("NUTE_CACHE", "~/.cache/nute")).expanduser()
    folder = cache / "hub" / repo.replace("/", "--") / rev.replace("/", "--")
    url = lambda name: f"{endpoint}/{repo}/resolve/{urllib.parse.quote(rev, safe='')}/{name}"
    if (folder / ".complete").exists():  # downloaded before: no request at all
        return str(folder)
    try:
        fetch(url("config.json"), folder / "config.json")
    except HubError as e:
        raise HubError(f"{repo}@{rev}: not a local path, and the hub did not give its config.json ({e})") from None
    if not fetch(url("model.safetensors.index.json"), folder / "model.safetensors.index.json", optional=True):
        fetch(url("model.safetensors"), folder / "model.safetensors", optional=True)
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values() \
        if (folder / "model.safetensors.index.json").exists() else []
    for name in sorted(set(names)):
        fetch(url(name), folder / name)
    if not weight_files(folder):
        raise HubError(f"{repo}@{rev}: no model.safetensors or model.safetensors.index.json (only safetensors "
                       "checkpoints are downloaded)")
    for name in TOKENIZER_FILES:  # whichever of them the repository has
        fetch(url(name), folder / name, optional=True)
    (folder / ".complete").touch()
    return str(folder)


def fetch(url, dest, optional=False):
    """Downloads url to dest unless it is there, continuing dest.part -> True, or False for a file the
    repository does not have (404) when optional."""
    if dest.exists():
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the part is already whole
            os.replace(part, dest)
            return True
        if e.code == 404 and optional:
            return False
        hint = {401: "set HF_TOKEN", 403: "gated: accept its license on the hub and set HF_TOKEN",
                404: "no such repository, revision or file"}.get(e.code, e.reason)
        raise HubError(f"{url}: HTTP {e.code} ({hint})") from None
    except (urllib.error.URLError, OSError) as e:
        raise HubError(f"{url}: cannot connect ({getattr(e, 'reason', e)}); set HF_ENDPOINT for a mirror") from None
    with response:
        if response.status != 206:  # the server sent the whole file: start over
            have = 0
        total = have + int(response.headers.get("Content-Length") or 0) or None
        try:
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # a broken connection: the part is kept
            raise HubError(f"{url}: download interrupted ({e}); run again to continue it") from None
    if total and part.stat().st_size != total:
        raise HubError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to continue")
    os.replace(part, dest)
    return True
