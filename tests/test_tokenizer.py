"""Tests for formats/tokenizer.py: exact tokenization against llama.cpp's reference ids (tests/data/tokenizers, from
llama.cpp's models/ folder; the vocabularies from `python data.py fetch --vocabs`), Hugging Face tokenizer.json and
SentencePiece files, and clear errors for files that are not tokenizers."""
import io
import json
from pathlib import Path

import pytest

import data
from formats import tokenizer
from formats.gguf import read_gguf
from helpers import make_tiny, tiny_tokenizer

REFERENCES = Path(__file__).parent / "data" / "tokenizers"
SEP = "\n__ggml_vocab_test__\n"


def reference_cases(name):
    """llama.cpp's test format: strings joined by SEP (one after the last too), ids one line each."""
    inp = (REFERENCES / f"{name}.inp").read_text(encoding="utf-8")
    out = (REFERENCES / f"{name}.out").read_text(encoding="utf-8")
    texts, lines = inp.split(SEP), out.split("\n")
    assert texts[-1] == "" and lines[-1] == ""  # both files end with a separator / newline
    assert len(texts) == len(lines)
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts[:-1], lines[:-1])]


def gguf_meta(path):
    return read_gguf(path, tensors=False)[0]


VOCABS = {  # reference name -> GGUF holding the vocabulary
    "ggml-vocab-llama-spm.gguf": lambda: data.vocab_path("ggml-vocab-llama-spm.gguf"),
    "ggml-vocab-llama-bpe.gguf": lambda: data.vocab_path("ggml-vocab-llama-bpe.gguf"),
    "smollm2": data.default_model_path,
}


@pytest.fixture(scope="module")
def vocab_meta():
    cache = {}

    def get(name):
        path = VOCABS[name]()
        if not path.exists():
            pytest.skip(f"{path} not found; run `python data.py fetch --vocabs`")
        if name not in cache:
            cache[name] = gguf_meta(path)
        return cache[name]
    return get


@pytest.mark.parametrize("name", VOCABS)
def test_gguf_tokenizer_matches_llama_cpp(vocab_meta, name):
    tok = tokenizer.load_tokenizer(vocab_meta(name))
    cases = reference_cases(name)
    assert len(cases) >= 46
    for text, want in cases:
        assert tok.encode(text) == want, repr(text)
        assert tok.decode(want) == text, repr(text)  # byte fallback makes every string round-trip


def test_tokenizer_attributes(vocab_meta):
    tok = tokenizer.load_tokenizer(vocab_meta("smollm2"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_start") != [1]
    assert tok.decode([1, 2]) == "<|im_start|><|im_end|>"
    spm = tokenizer.load_tokenizer(vocab_meta("ggml-vocab-llama-spm.gguf"))
    assert (spm.vocab_size, spm.bos_id, spm.eos_id, spm.add_bos) == (32000, 1, 2, True)
    assert spm.encode("\n") == [29871, 13]  # "▁" (the space prefix), then byte fallback <0x0A>


def hf_json(meta, pre_tokenizer, tmp_path, pairs=False, ignore_merges=False):
    """Write a tokenizer.json holding a GGUF's byte-level vocabulary, in Hugging Face's layout."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = meta["tokenizer.ggml.merges"]
    cfg = {"normalizer": None, "pre_tokenizer": pre_tokenizer,
           "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if types[i] == 3],
           "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "ignore_merges": ignore_merges,
                     "merges": [m.split(" ") for m in merges] if pairs else merges}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tmp_path


def test_hf_tokenizer_json_smollm2(vocab_meta, tmp_path):
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    tok = tokenizer.load_tokenizer(hf_json(vocab_meta("smollm2"), pre, tmp_path, pairs=True))  # a directory
    for text, want in reference_cases("smollm2"):
        assert tok.encode(text) == want, repr(text)


def test_hf_tokenizer_json_llama3(vocab_meta, tmp_path):
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tokenizer.LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    path = hf_json(vocab_meta("ggml-vocab-llama-bpe.gguf"), pre, tmp_path, ignore_merges=True) / "tokenizer.json"
    tok = tokenizer.load_tokenizer(path)
    for text, want in reference_cases("ggml-vocab-llama-bpe.gguf"):
        assert tok.encode(text) == want, repr(text)


def write_hf_files(tok, folder):
    for name, content in tokenizer.hf_tokenizer_files(tok).items():
        (folder / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", ["smollm2", "ggml-vocab-llama-bpe.gguf"])
def test_written_vocabularies_give_the_reference_ids(vocab_meta, name, tmp_path):
    """A GGUF vocabulary written as tokenizer.json (for Hugging Face), read back, and written again as GGUF
    metadata (for llama.cpp): both give llama.cpp's reference ids."""
    meta = vocab_meta(name)
    from_json = tokenizer.load_tokenizer(write_hf_files(tokenizer.load_tokenizer(meta), tmp_path) / "tokenizer.json")
    written = tokenizer.gguf_tokenizer(from_json)
    for key in ("tokens", "merges", "pre", "bos_token_id", "eos_token_id"):
        assert written[f"tokenizer.ggml.{key}"] == meta[f"tokenizer.ggml.{key}"], key
    from_gguf = tokenizer.load_tokenizer(written)
    for text, want in reference_cases(name):
        assert from_json.encode(text) == from_gguf.encode(text) == want, repr(text)


@pytest.mark.parametrize("name", ["smollm2", "ggml-vocab-llama-bpe.gguf"])
def test_autotokenizer_loads_the_written_vocabulary(vocab_meta, name, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional peer)")
    hf = transformers.AutoTokenizer.from_pretrained(write_hf_files(tokenizer.load_tokenizer(vocab_meta(name)), tmp_path))
    for text, want in reference_cases(name):
        assert hf.encode(text, add_special_tokens=False) == want, repr(text)


def test_sentencepiece_model(tmp_path):
    """A tokenizer.model runs through the sentencepiece library; our own llama.cpp-style SPM
    algorithm, given the same pieces and scores, must produce the same ids."""
    import sentencepiece
    lines = [f"The quick brown fox jumps over the lazy dog number {i}." for i in range(300)]
    lines += ["Hello world, hello tokenizer; naïve café."] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=3)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = tokenizer.load_tokenizer(tmp_path)
    assert tok.kind == "sp" and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    sp = tok.sp
    ours = tokenizer.Tokenizer("spm", tok.tokens, ["<s>", "</s>"], 1, 2,
                          scores=[sp.get_score(i) for i in range(sp.get_piece_size())],
                          byte_ids=[i for i in range(sp.get_piece_size()) if sp.is_byte(i)])
    from_gguf = tokenizer.load_tokenizer(tokenizer.gguf_tokenizer(tok, vocab_size=402))  # what save_gguf writes
    assert from_gguf.tokens[400:] == ["[PAD0]", "[PAD1]"] and from_gguf.bos_id == 1
    for text in ["Hello world", " Hello  world 42", "the lazy dog jumped", "naïve ½ 🦙\n\tx", ""]:
        ids = tok.encode(text)
        assert ids == sp.encode(text) == ours.encode(text) == from_gguf.encode(text), repr(text)
        assert tok.decode(ids) == ours.decode(ids) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        tokenizer.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenizer.load_tokenizer({"general.architecture": "llama"})
    with pytest.raises(ValueError, match="not supported"):
        tokenizer.load_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tokenizer.load_tokenizer(tmp_path / "bad.model")


def test_tiny_bpe():
    tok = tiny_tokenizer()
    assert tok.encode(" the") == [258]
    assert tok.encode("the") == [ord("t"), 257]
    assert tok.encode("a<|endoftext|>é") == [ord("a"), 259, 0xC3, 0xA9]  # é: two byte tokens
    assert tok.decode(tok.encode("x the é<|endoftext|>")) == "x the é<|endoftext|>"


def test_hf_tokenizer_json_without_its_byte_tokens_is_refused_at_load(tmp_path):
    """Byte-level BPE falls back to single bytes for any piece the vocabulary lacks: a vocabulary without the byte
    tokens of plain text (here 'a'..'z') is refused at load, naming the file, not a KeyError at the first encode."""
    from formats import checkpoint
    folder = make_tiny(tmp_path / "ckpt", n_layers=1)
    cfg = json.loads((folder / "tokenizer.json").read_text())
    cfg["model"]["vocab"] = {t: i for t, i in cfg["model"]["vocab"].items() if not "a" <= t <= "z"}
    (folder / "tokenizer.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer.json.*byte") as e:
        tokenizer.load_tokenizer(folder / "tokenizer.json")
    assert str(folder / "tokenizer.json") in str(e.value)
    with pytest.raises(checkpoint.LoadError, match="tokenizer.json.*byte"):
        checkpoint.load(str(folder))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(cfg["model"]["vocab"]), "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="byte"):  # the same vocabulary in GGUF metadata
        tokenizer.load_tokenizer(meta)


def test_bpe_drops_a_byte_the_vocabulary_lacks_like_llama_cpp():
    """SmolLM2's vocabulary lacks 21 byte tokens (control characters such as \\x04, and bytes UTF-8 never or rarely
    uses); llama.cpp and Hugging Face drop such a byte, where a KeyError used to stop the run."""
    tok = tiny_tokenizer()
    tokens = [t if t != tokenizer.BYTE_CHARS[4] else "<unused>" for t in tok.tokens]
    tok = tokenizer.Tokenizer("bpe", tokens, ["<|endoftext|>"], None, 259, merges=["Ġ t", "h e", "Ġt he"],
                              patterns=[tokenizer.GPT2_SPLIT])
    assert tok.encode("a\x04b the") == [ord("a"), ord("b"), 258]
