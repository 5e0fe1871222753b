"""Tokenizers: one `Tokenizer` for the three ways LLaMA-family checkpoints ship their vocabulary.

  - GGUF metadata, "llama" model: SentencePiece-style BPE by scores (LLaMA-1/2), as llama.cpp does it
  - GGUF metadata, "gpt2" model, or a Hugging Face tokenizer.json: byte-level BPE with merges
    (LLaMA-3, SmolLM2)
  - a SentencePiece tokenizer.model file, run by the `sentencepiece` library

    tok = load_tokenizer("tokenizer.json")   # or a tokenizer.model, a folder, or a GGUF's metadata dict
    ids = tok.encode("The capital of France is")
    text = tok.decode(ids)

The pure-Python paths reproduce llama.cpp's reference tokenizations exactly (tests/test_tokenizer.py).
We use the `regex` package because the pre-tokenizer patterns need Unicode classes (\\p{L}, \\p{N})
that Python's `re` lacks.
"""
import heapq
import json
from pathlib import Path

import regex
import sentencepiece

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
PLAIN_BYTES = [9, 10, 13, *range(32, 127)]  # tab, newline, CR, printable ASCII: what any text is made of


def missing_bytes(vocab):
    """-> a message naming the plain-text bytes a byte-level vocabulary has no token for ('' when it has them all).
    Other bytes may be missing (SmolLM2 lacks 21, \\x04 among them): encode drops those, as llama.cpp does."""
    missing = [chr(b) for b in PLAIN_BYTES if BYTE_CHARS[b] not in vocab]
    return f"byte-level BPE vocabulary without the byte tokens of {''.join(missing)[:20]!r}" if missing else ""


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
        ids, vocab = [], self.token_to_id
        for p in parts:  # a piece the vocab lacks falls back to its single bytes (a byte it lacks too: dropped)
            ids += [vocab[p]] if p in vocab else [vocab[c] for c in p if c in vocab]
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
    """From GGUF metadata (gguf.read_gguf(path, tensors=False)[0])."""
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
        if missing := missing_bytes(set(tokens)):
            raise ValueError(f"GGUF {missing}")
        pre = meta.get("tokenizer.ggml.pre", "default")
        return Tokenizer("bpe", tokens, specials, bos, eos, merges=meta["tokenizer.ggml.merges"],
                         patterns=PRE_TOKENIZERS.get(pre, [GPT2_SPLIT]), ignore_merges=pre in ("llama-bpe", "llama3"),
                         add_bos=meta.get("tokenizer.ggml.add_bos_token", False))
    raise ValueError(f"GGUF tokenizer model {model!r} is not supported (llama or gpt2)")


def tokenizer_from_sentencepiece(path):
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
    if missing := missing_bytes(vocab):
        raise ValueError(f"{path}: {missing}")
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
        raise ValueError(f"{p}: pass a GGUF's metadata (gguf.read_gguf(path, tensors=False)[0])")
    return tokenizer_from_sentencepiece(p)


# ----------------------------------------------------------------------------------------------------
# Writing a vocabulary for other runtimes: GGUF metadata for llama.cpp, tokenizer.json for Hugging Face

def merges_in_order(tok):
    return [" ".join(pair) for pair in sorted(tok.ranks, key=tok.ranks.get)]


def pre_tokenizer_name(tok):
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE tokenizer's pre-tokenizer patterns."""
    patterns = [p.pattern for p in tok.patterns]
    names = {"smollm": PRE_TOKENIZERS["smollm"], "llama-bpe": [LLAMA3_SPLIT], "gpt-2": [GPT2_SPLIT]}
    for name, known in names.items():
        if patterns == known:
            return name
    raise ValueError(f"pre-tokenizer patterns {patterns} have no llama.cpp name ({', '.join(names)})")


def gguf_tokenizer(tok, vocab_size=None):
    """-> the tokenizer.* metadata of a GGUF file. A GGUF source's is carried over as it was; a tokenizer.json
    or tokenizer.model is written the way llama.cpp's convert_hf_to_gguf.py writes it. Ids the embedding has
    beyond the vocabulary get unused [PAD{i}] tokens, as there."""
    src = getattr(tok, "source", None)
    if isinstance(src, dict):
        meta = {k: v for k, v in src.items() if k.startswith("tokenizer.")}
    elif tok.kind == "bpe":
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(tok),
                "tokenizer.ggml.tokens": list(tok.tokens),
                "tokenizer.ggml.token_type": [CONTROL if t in tok.specials else 1 for t in tok.tokens],
                "tokenizer.ggml.merges": merges_in_order(tok), "tokenizer.ggml.add_bos_token": bool(tok.add_bos)}
    else:  # a SentencePiece model: its pieces, scores and piece types
        sp, n = tok.sp, tok.vocab_size
        kind = lambda i: 2 if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(tok.tokens),
                "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
                "tokenizer.ggml.token_type": [kind(i) for i in range(n)], "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        if i is not None and i >= 0 and not isinstance(src, dict):
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    extra = (vocab_size or 0) - len(meta["tokenizer.ggml.tokens"])
    if extra > 0:
        meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + [f"[PAD{i}]" for i in range(extra)]
        meta["tokenizer.ggml.token_type"] = list(meta.get("tokenizer.ggml.token_type", [])) + [5] * extra
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [-1e9] * extra
    return meta


def hf_tokenizer_files(tok):
    """-> {file name: JSON} for a byte-level BPE vocabulary: a tokenizer.json and tokenizer_config.json that
    Hugging Face's AutoTokenizer loads and that give our ids (each pre-tokenizer pattern an isolated Split, then
    the byte-level map without its own regex)."""
    if tok.kind != "bpe":
        raise ValueError("a tokenizer.json is written for byte-level BPE vocabularies only")
    split = lambda p: {"type": "Split", "pattern": {"Regex": p.pattern}, "behavior": "Isolated", "invert": False}
    name = lambda i: None if i is None else tok.tokens[i]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tok.specials.items(), key=lambda x: x[1])]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(p) for p in tok.patterns] + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges, "vocab": {t: i for i, t in enumerate(tok.tokens)},
                  "merges": merges_in_order(tok)}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tok.add_bos),
              "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}
