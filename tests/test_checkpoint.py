"""Tests for formats/checkpoint.py and formats/gguf.py: each layout (Hugging Face, Meta, GGUF) written by tests/helpers.py, loaded back
and compared logit for logit; the GGUF reader against ggml's block formulas; bad files give LoadError."""
import errno
import io
import json
import os
import struct
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import baselines
import masks
import model as M
from formats import checkpoint as C
from formats import gguf, layout
from formats import tokenizer as tokenizer_module
from formats.checkpoint import LoadError
from formats.run import save_adapter
from helpers import (ARR, BOOL, F32_, F64_, GGUF_TOKENS, I8, I16, I32, I64, STR, TO_HF, U8, U16, U32, U64, close,
                     external_name, gguf_bytes, gguf_config, gguf_tokenizer_kvs, hf_config_dict, make_model, make_tiny,
                     quantize, SENTENCE_TEXT, tiny_config, to_interleaved_state, tokens_for, write_gguf, write_hf,
                     write_meta)

UNEVEN = dict(n_layers=4, kv_of_head=[[0, 0, 1], [], [0], [0, 1, 1, 1]], ffn_dims=[24, 0, 7, 0])


@pytest.fixture
def fake_tokenizer(monkeypatch):
    """Stands in for tokenizer.load_tokenizer so loader tests check the weights alone; records its argument."""
    state = {"vocab_size": 0, "calls": []}

    def load_tokenizer(src):
        state["calls"].append(src)
        return types.SimpleNamespace(vocab_size=state["vocab_size"])

    monkeypatch.setattr(C, "load_tokenizer", load_tokenizer)
    return state


def assert_loaded(loaded, original, tok, exact=True):
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert loaded.config.kv_of_head == original.config.kv_of_head and loaded.config.ffn_dims == original.config.ffn_dims
    for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "tie_embeddings"):
        assert getattr(loaded.config, f) == getattr(original.config, f), f
    assert loaded.config.norm_eps == pytest.approx(original.config.norm_eps)
    assert loaded.config.rope_theta == original.config.rope_theta
    with torch.no_grad():
        got, want = loaded(tok), original(tok)
    if exact:
        assert torch.equal(got, want)
    else:
        close(got, want, 1e-6, "loaded vs original")


@pytest.mark.parametrize("tied, shards", [(False, 1), (True, 1), (False, 2), (True, 3)])
def test_load_hf_safetensors(tmp_path, fake_tokenizer, tied, shards):
    config = tiny_config(tie_embeddings=tied)
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    write_hf(tmp_path, m, shards=shards)
    _, state = C.read_hf(str(tmp_path))
    assert sorted(state) == sorted(m.state_dict())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())  # HF is already rotate-half
    loaded, tokenizer = C.load(str(tmp_path))
    assert fake_tokenizer["calls"] == [str(tmp_path)]
    assert_loaded(loaded, m, tok)
    bf, _ = C.load(str(tmp_path), dtype=torch.bfloat16, max_seq_len=16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters()) and bf.config.max_seq_len == 16
    assert bf.rope_cos.shape[0] == 16


def test_load_hf_pruned_model_with_uneven_layers(tmp_path, fake_tokenizer):
    """An exported (sliced) model: per-layer sizes travel in config.json (hf_config)."""
    config = tiny_config(**UNEVEN)
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(C.hf_config(config), f)
    save_file({external_name(k, TO_HF, "model.layers.{}."): v for k, v in m.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    loaded, _ = C.load(str(tmp_path))
    assert loaded.layers[1].attention is None and loaded.layers[3].feed_forward is None
    assert_loaded(loaded, m, tok)


def test_load_hf_ignores_stored_rotary_inv_freq(tmp_path, fake_tokenizer):
    """Older conversions (e.g. huggyllama/llama-7b) store self_attn.rotary_emb.inv_freq buffers."""
    config = tiny_config()
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    inv = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    write_hf(tmp_path, m, extra={f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone()
                                 for i in range(config.n_layers)})
    loaded, _ = C.load(str(tmp_path))
    assert_loaded(loaded, m, tok)


@pytest.mark.parametrize("shards", [1, 2])
def test_load_meta_pth(tmp_path, fake_tokenizer, shards):
    config = tiny_config()  # head_dim = dim / n_heads, as Meta's params.json implies
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    write_meta(tmp_path, m, shards=shards)
    _, state = C.read_meta(str(tmp_path))
    want = to_interleaved_state(m)  # read_meta returns Meta's layout; load() converts q/k
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], v) for k, v in want.items())
    assert C.interleaved_to_half(want["layers.0.attention.wq.weight"], 4).equal(m.layers[0].attention.wq.weight)
    loaded, _ = C.load(str(tmp_path))
    assert fake_tokenizer["calls"] == [str(tmp_path)]
    assert_loaded(loaded, m, tok)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_load_gguf(tmp_path, fake_tokenizer, kind):
    config = gguf_config(tie_embeddings=kind in ("F16", "Q4_1"))
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    path = str(tmp_path / "tiny.gguf")
    expected = write_gguf(path, m, kind, alignment=64 if kind == "Q4_0" else None)
    if kind == "F32":
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in expected.state_dict().items())
    else:  # the test really is about quantized weights
        err = (expected.layers[0].feed_forward.w1.weight - m.layers[0].feed_forward.w1.weight).abs().max()
        assert 0 < err < 0.2
    _, state, meta = C.read_gguf_model(path)
    assert meta["tokenizer.ggml.tokens"] == GGUF_TOKENS and meta["general.name"] == "tiny test"
    interleaved = to_interleaved_state(expected)
    assert sorted(state) == sorted(interleaved) and all(torch.equal(state[k], v) for k, v in interleaved.items())
    loaded, _ = C.load(path)
    assert fake_tokenizer["calls"][0]["tokenizer.ggml.model"] == "gpt2"  # the tokenizer comes from the metadata
    assert_loaded(loaded, expected, tok)


def test_dequantize_against_the_formulas():
    """Hand-made blocks decoded element by element, straight from ggml's block layouts."""
    rng = np.random.default_rng(0)
    half = lambda v: struct.pack("<e", v)
    for kind, nbytes in (("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)):
        blocks, want = b"", []
        for d, m in ((0.5, -1.25), (-0.0078125, 3.0), (1.5, 0.0)):
            body = bytes(rng.integers(0, 256, nbytes - (4 if kind == "Q4_1" else 2), dtype=np.uint8))
            blocks += half(d) + (half(m) if kind == "Q4_1" else b"") + body
            for j in range(32):
                if kind == "Q8_0":
                    want.append(d * struct.unpack("<b", body[j:j + 1])[0])
                else:
                    nib = (body[j % 16] >> (4 * (j // 16))) & 15  # low nibbles: 0..15, high: 16..31
                    want.append(d * (nib - 8) if kind == "Q4_0" else d * nib + m)
        got = gguf.dequantize(np.frombuffer(blocks, np.uint8), kind, 96)
        assert len(blocks) == 3 * nbytes and np.array_equal(got, np.array(want, np.float32)), kind
    x = rng.standard_normal(64).astype(np.float32)
    assert np.array_equal(gguf.dequantize(np.frombuffer(x.tobytes(), np.uint8), "F32", 64), x)
    assert np.array_equal(gguf.dequantize(np.frombuffer(x.astype(np.float16).tobytes(), np.uint8), "F16", 64),
                          x.astype(np.float16).astype(np.float32))
    bf = np.frombuffer(struct.pack("<4H", 0x3F80, 0xC000, 0x4049, 0x0000), np.uint8)  # 1, -2, 3.140625, 0
    assert gguf.dequantize(bf, "BF16", 4).tolist() == [1.0, -2.0, 3.140625, 0.0]


def test_quantizer_round_trip_is_close():
    """Our writer's quantizers against the data: a 4-bit block is within half a step of the input."""
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for kind, step in (("Q8_0", 1 / 127), ("Q4_0", 1 / 8), ("Q4_1", 2 / 15)):
        raw, deq = quantize(x, kind)
        b, dq = x.reshape(-1, 32), deq.reshape(-1, 32)
        scale = np.abs(b).max(1, keepdims=True) if kind != "Q4_1" else b.max(1, keepdims=True) - b.min(1, keepdims=True)
        assert (np.abs(b - dq) <= step * scale * 1.01 + 1e-3).all(), kind
        assert np.array_equal(gguf.dequantize(np.frombuffer(raw, np.uint8), kind, x.size).reshape(x.shape), deq)


def test_read_gguf_metadata_types(tmp_path):
    kvs = [("a.u8", U8, 200), ("a.i8", I8, -3), ("a.u16", U16, 60000), ("a.i16", I16, -300), ("a.u32", U32, 4_000_000_000),
           ("a.i32", I32, -70000), ("a.f32", F32_, 0.5), ("a.bool", BOOL, True), ("a.str", STR, "héllo"),
           ("a.u64", U64, 2 ** 40), ("a.i64", I64, -(2 ** 40)), ("a.f64", F64_, 0.1),
           ("a.arr_i32", ARR, (I32, [1, -2, 3])), ("a.arr_str", ARR, (STR, ["x", "", "ÿz"])),
           ("a.arr_f32", ARR, (F32_, [0.25, 1.5])), ("a.arr_arr", ARR, (ARR, [(U8, [1, 2]), (U8, [])]))]
    path = tmp_path / "meta.gguf"
    path.write_bytes(gguf_bytes(kvs, []))
    meta, tensors = gguf.read_gguf(str(path))
    assert tensors == {}
    want = {k: v for k, _, v in kvs}
    want.update({"a.arr_i32": [1, -2, 3], "a.arr_str": ["x", "", "ÿz"], "a.arr_f32": [0.25, 1.5],
                 "a.arr_arr": [[1, 2], []]})
    assert meta == want


# ----------------------------------------------------------------------------------------------------
# Bad checkpoints raise LoadError (one line for the command line), never a traceback from deep inside

def test_load_errors_missing_and_empty(tmp_path, fake_tokenizer):
    with pytest.raises(LoadError):
        C.load(str(tmp_path / "nope"))
    with pytest.raises(LoadError):  # a folder with nothing in it
        C.load(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError):  # a file that is neither a folder nor a GGUF
        C.load(str(tmp_path / "notes.txt"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(tiny_config())))
    with pytest.raises(LoadError):  # config.json but no weights
        C.load(str(hf))
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(LoadError):  # params.json but no consolidated.*.pth
        C.load(str(meta))


def test_load_error_truncated_safetensors(tmp_path, fake_tokenizer):
    m = make_model(tiny_config(), dtype=torch.float32)
    write_hf(tmp_path, m)
    f = tmp_path / "model.safetensors"
    full = f.read_bytes()
    for cut in (len(full) // 2, len(full) - 1, 100, 5):
        f.write_bytes(full[:cut])
        with pytest.raises(LoadError):
            C.load(str(tmp_path))


def test_load_error_weights_that_do_not_fit_the_config(tmp_path, fake_tokenizer):
    m = make_model(tiny_config(), dtype=torch.float32)
    write_hf(tmp_path, m)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 30
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError):
        C.load(str(tmp_path))


def test_load_error_truncated_gguf(tmp_path, fake_tokenizer):
    config = gguf_config()
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(config, dtype=torch.float32), "Q8_0")
    full = path.read_bytes()
    header_end = full.index(b"blk.0.attn_q") - 8  # somewhere inside the tensor infos
    # cut everywhere in the first bytes, every few bytes through the metadata (strings, string arrays,
    # the int32 token_type array), inside the tensor infos and inside the data
    cuts = list(range(0, 64)) + list(range(64, header_end + 400, 3)) + [len(full) - 1, len(full) - 4000]
    for cut in cuts:
        path.write_bytes(full[:cut])
        try:
            C.load(str(path))
        except LoadError:
            continue
        except Exception as e:  # noqa: BLE001 - the point is which exception
            raise AssertionError(f"GGUF cut at byte {cut} of {len(full)}: {type(e).__name__}: {e}") from None
        raise AssertionError(f"GGUF cut at byte {cut} of {len(full)} loaded without error")


def test_load_error_unsupported_gguf(tmp_path, fake_tokenizer):
    config = gguf_config()
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(config, dtype=torch.float32), "Q8_0")
    full = bytearray(path.read_bytes())
    # ggml type 12 is Q4_K (a k-quant): patch the type of the first tensor (just after its 2 dims)
    name = full.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    assert struct.unpack_from("<I", full, name + 4 + 16)[0] == 8
    struct.pack_into("<I", full, name + 4 + 16, 12)
    path.write_bytes(bytes(full))
    with pytest.raises(LoadError, match="12"):
        C.load(str(path))
    gpt2 = tmp_path / "gpt2.gguf"  # an architecture we do not run
    gpt2.write_bytes(gguf_bytes([("general.architecture", STR, "gpt2")], []))
    with pytest.raises(LoadError):
        C.load(str(gpt2))
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(LoadError):
        C.load(str(v1))


def test_load_error_gguf_counts_past_2_63(tmp_path):
    """A corrupt count in the header (an array of 2^63 + 1 floats) is a LoadError, not an OverflowError."""
    path = tmp_path / "o.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key"
                     + struct.pack("<IIQ", 9, 6, 2**63 + 1))
    with pytest.raises(LoadError, match="truncated or corrupt"):
        C.load(str(path))


@pytest.mark.parametrize("kvs, key", [
    ([("general.alignment", U32, 0)], "general.alignment"),
    ([("general.alignment", U32, 48)], "general.alignment"),  # llama.cpp: a power of two
    ([("llama.attention.head_count", U32, 0)], "llama.attention.head_count"),
    ([("llama.attention.head_count_kv", U32, 0)], "llama.attention.head_count_kv"),
    ([("llama.attention.head_count_kv", U32, 3)], "llama.attention.head_count_kv"),  # 4 heads in groups of 3
    ([("llama.block_count", U32, 0)], "llama.block_count"),
    ([("llama.block_count", U32, 3)], "llama.block_count"),  # the file holds 2 blocks
    ([("llama.embedding_length", STR, "64")], "llama.embedding_length"),
    ([("llama.feed_forward_length", ARR, (I32, [64]))], "llama.feed_forward_length"),  # a list, but of 1 layer
    ([("llama.attention.head_count", U32, 3), ("llama.attention.head_count_kv", U32, 1)], "llama.attention.head_count"),
    ([("llama.block_count", U32, 10**8)], "llama.block_count"),  # a list of 10^8 layers was built first
    ([("llama.attention.head_count", U32, 2**31)], "parameters"),  # 2^31 heads: refused before a list of them
])
def test_load_error_gguf_sizes_name_the_key(tmp_path, fake_tokenizer, kvs, key):
    """Metadata sizes that are 0, the wrong type, disagree with the tensors, or absurd: a LoadError naming the file
    and the key, before anything is allocated for them (no ZeroDivisionError, RuntimeError or MemoryError)."""
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(gguf_config(), dtype=torch.float32), "F32", extra_kvs=kvs)  # the last key wins
    with pytest.raises(LoadError, match=key) as e:
        C.load(str(path))
    assert str(path) in str(e.value)


def test_load_error_gguf_embedding_not_divisible_by_heads(tmp_path, fake_tokenizer):
    """With no key_length or rope.dimension_count the head size is embedding_length / head_count: 64 / 3 is refused."""
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(gguf_config(), dtype=torch.float32), "F32",
               extra_kvs=[("llama.attention.head_count", U32, 3), ("llama.attention.head_count_kv", U32, 1)])
    path.write_bytes(path.read_bytes().replace(b"llama.rope.dimension_count", b"llama.rope.dimension_cOunt"))
    with pytest.raises(LoadError, match="llama.embedding_length 64 .*llama.attention.head_count 3") as e:
        C.load(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("change, key", [
    ({"ffn_dims": [24, 0, 7]}, "ffn_dims"),  # 3 of 4 layers
    ({"kv_of_head": UNEVEN["kv_of_head"] + [[0]]}, "kv_of_head"),
    ({"ffn_dims": [24, "0", 7, 0]}, "ffn_dims"),
    ({"kv_of_head": [[0, 0, 1], [], 0, [0, 1, 1, 1]]}, "kv_of_head"),
    ({"kv_of_head": [[0, 0, 1], [], [0], [0, 1, 1, 7]]}, "kv_of_head"),  # 8 kv heads for 4 heads
    ({"hidden_size": "48"}, "hidden_size"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers"),
    ({"num_attention_heads": "4"}, "num_attention_heads"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    ({"num_attention_heads": 5, "head_dim": None}, "hidden_size 48 .*num_attention_heads 5"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"num_hidden_layers": 10**8, "kv_of_head": None, "ffn_dims": None}, "parameters"),  # before 10^8 layers are made
    ({"num_attention_heads": 2**31, "kv_of_head": None}, "parameters"),
])
def test_load_error_hf_config_values_name_the_key(tmp_path, fake_tokenizer, change, key):
    """config.json: per-layer lists of another length than num_hidden_layers, numbers given as strings, sizes the
    weight files cannot hold: one LoadError naming config.json and the key, before anything is allocated."""
    folder = make_tiny(tmp_path / "m", **UNEVEN)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(LoadError, match=f"config.json: .*{key}"):
        C.load(str(folder))
    (folder / "config.json").write_text("[1, 2]")  # JSON, but not an object
    with pytest.raises(LoadError, match="config.json"):
        C.load(str(folder))


def test_load_error_tokenizer_larger_than_embedding(tmp_path, fake_tokenizer):
    m = make_model(tiny_config(), dtype=torch.float32)
    write_hf(tmp_path, m)
    fake_tokenizer["vocab_size"] = 50
    C.load(str(tmp_path))  # the same size is fine (smaller is fine too: padded embeddings)
    fake_tokenizer["vocab_size"] = 51
    with pytest.raises(LoadError, match="51"):
        C.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# A run's adapter

def test_load_adapter(tmp_path):
    tiny = make_model(tiny_config(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128), dtype=torch.float32)
    good = {"z_head": torch.ones(2, 4), "z_int": torch.ones(2, 128), "z_hid": torch.ones(64),
            "layers.0.attention.wv.lora_A": torch.zeros(8, 64), "layers.0.attention.wv.lora_B": torch.zeros(32, 8),
            "lora_scale": torch.tensor(2.0)}
    save_file(good, tmp_path / "adapter.safetensors")
    adapter = C.load_adapter(tmp_path, tiny)
    assert adapter["lora_scale"] == 2.0 and adapter["z_int"].shape == (2, 128)
    for key, bad in [("z_head", torch.ones(3, 4)), ("layers.0.attention.wv.lora_B", torch.zeros(64, 8))]:
        save_file({**good, key: bad}, tmp_path / "adapter.safetensors")
        with pytest.raises(LoadError, match=f"{key} has shape"):
            C.load_adapter(tmp_path, tiny)
    save_file({k: v for k, v in good.items() if not k.endswith("lora_A")}, tmp_path / "adapter.safetensors")
    with pytest.raises(LoadError, match="no A/B partner"):
        C.load_adapter(tmp_path, tiny)
    with pytest.raises(LoadError, match="not found"):
        C.load_adapter(tmp_path / "nope", tiny)
    save_file({**good, "z_hid": torch.full((64,), float("nan"))}, tmp_path / "adapter.safetensors")
    with pytest.raises(LoadError, match="z_hid holds NaN"):
        C.load_adapter(tmp_path, tiny)
    save_file(good, tmp_path / "adapter.safetensors")
    (tmp_path / "adapter.safetensors").write_bytes((tmp_path / "adapter.safetensors").read_bytes()[:300])
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        C.load_adapter(tmp_path, tiny)


# ----------------------------------------------------------------------------------------------------
# Loaders with the real tokenizer code (tokenizer.load_tokenizer)

@pytest.fixture(scope="module")
def sp_model_bytes():
    """A 60-piece SentencePiece model trained on the spot (a fraction of a second)."""
    import sentencepiece as spm
    text = ["the quick brown fox jumps over the lazy dog", "pruning language models with progressive teachers",
            "hello world this is a tiny corpus for a tiny tokenizer"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=60, model_type="bpe",
                                   hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_load_with_sentencepiece_tokenizer(tmp_path, sp_model_bytes, layout):
    config = tiny_config(vocab_size=64)
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    (write_hf if layout == "hf" else write_meta)(tmp_path, m)
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    loaded, tokenizer = C.load(str(tmp_path))
    assert tokenizer.vocab_size == 60
    ids = tokenizer.encode("the quick fox")
    assert ids and max(ids) < 60 and tokenizer.decode(ids) == "the quick fox"
    assert_loaded(loaded, m, tok)


def test_load_error_real_tokenizer_larger_than_embedding(tmp_path, sp_model_bytes):
    write_hf(tmp_path, make_model(tiny_config(vocab_size=59), dtype=torch.float32))
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    with pytest.raises(LoadError):
        C.load(str(tmp_path))


def test_load_gguf_with_its_tokenizer(tmp_path):
    config = gguf_config(vocab_size=len(GGUF_TOKENS) + 2)  # embedding padded past the vocabulary
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, m, "F32")
    loaded, tokenizer = C.load(path)
    assert tokenizer.vocab_size == len(GGUF_TOKENS)
    the = GGUF_TOKENS.index("Ġthe")
    assert tokenizer.encode(" the") == [the] and tokenizer.decode([the]) == " the"
    assert_loaded(loaded, m, tok)
    small = tmp_path / "small.gguf"  # tokenizer with more tokens than the embedding has rows
    write_gguf(str(small), m, "F32", tokenizer_size=len(GGUF_TOKENS) + 3)
    with pytest.raises(LoadError):
        C.load(str(small))




# ----------------------------------------------------------------------------------------------------
# Writing GGUF for llama.cpp: ggml's quantizers, and files our reader (and llama.cpp) loads back

def gguf_tokenizer_of(n_tokens=None):
    """A Tokenizer whose source is GGUF metadata (as checkpoint.load makes it), from helpers' small vocabulary."""
    meta = {k: (v[1] if t == ARR else v) for k, t, v in gguf_tokenizer_kvs(n_tokens)}
    tok = tokenizer_module.load_tokenizer(meta)
    tok.source = meta
    return tok


def test_quantize_matches_ggml_reference():
    x = np.random.default_rng(4).standard_normal((6, 96)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    for kind in ("F32", "F16", "Q8_0", "Q4_0"):
        assert gguf.quantize(x, kind) == quantize(x, kind)[0], kind
    u = x.view(np.uint32).astype(np.uint64)  # bf16: round to nearest even, like ggml_fp32_to_bf16
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    assert gguf.quantize(x, "BF16") == want.tobytes()
    with pytest.raises(ValueError):
        gguf.quantize(x, "Q5_K")


def test_gguf_metadata_types_are_what_llama_cpp_asks_for(tmp_path):
    meta = {"a.u32": 7, "a.f32": 0.5, "a.str": "x", "a.bool": True, "a.i32s": [1, -2], "a.f32s": [0.5, 1],
            "a.strs": ["p", "q"], "a.big": -5}
    gguf.write_gguf(tmp_path / "m.gguf", meta, [])
    buf = (tmp_path / "m.gguf").read_bytes()
    tags, pos = {}, 24  # after magic, version, tensor count, key count
    for _ in meta:
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + n].decode()
        t = struct.unpack_from("<I", buf, pos + 8 + n)[0]
        tags[key] = (t, struct.unpack_from("<I", buf, pos + 12 + n)[0]) if t == 9 else t
        pos = pos + 12 + n + len(gguf.gguf_value(meta[key])) - 4
    assert tags == {"a.u32": U32, "a.f32": F32_, "a.str": STR, "a.bool": BOOL, "a.i32s": (ARR, I32),
                    "a.f32s": (ARR, F32_), "a.strs": (ARR, STR), "a.big": I64}
    assert gguf.read_gguf(str(tmp_path / "m.gguf"))[0] == meta


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_gguf_intact_model_is_llama(tmp_path, kind, tied):
    """Our writer against helpers' independent one: the same bytes decode to the same weights, so the loaded
    model equals helpers' decoded copy exactly."""
    config = gguf_config(tie_embeddings=tied)
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config)
    path = tmp_path / "m.gguf"
    C.save_gguf(m, gguf_tokenizer_of(), path, kind)
    expected = write_gguf(str(tmp_path / "ref.gguf"), m, kind)
    meta, _ = gguf.read_gguf(str(path), tensors=False)
    assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count"] == config.n_heads
    assert meta["tokenizer.ggml.tokens"] == GGUF_TOKENS
    loaded, _ = C.load(str(path))
    assert_loaded(loaded, expected, tok)


def pruned_tiny(config):
    """A model pruned unevenly: layer 0 loses every head, layer 1 its FFN, layer 2 both, layer 3 half a kv group;
    7 hidden dims go. -> (the intact model, the sliced one)."""
    m = make_model(config, dtype=torch.float32)
    z = {k: torch.ones(s) for k, s in masks.mask_shapes(config).items()}
    z["z_head"][0] = 0
    z["z_int"][1] = 0
    z["z_head"][2], z["z_int"][2] = 0, 0
    z["z_head"][3, [0, 3]] = 0
    z["z_int"][3, 5:20] = 0
    z["z_hid"][[0, 9, 17, 30, 41, 50, 63]] = 0
    return m, M.slice_model(m, z)


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_save_gguf_pruned_model_is_deci(tmp_path, kind):
    config = gguf_config(n_layers=4)
    _, small = pruned_tiny(config)
    tok = tokens_for(config)
    path = tmp_path / "p.gguf"
    C.save_gguf(small, gguf_tokenizer_of(), path, kind)
    meta, tensors = gguf.read_gguf(str(path))
    heads, kv, ffn = (meta[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    # llama.cpp's rules: layer 0 has a head (zero), a layer with attention has an FFN (zero), fixed GQA groups
    assert heads[0] == kv[0] == 1 and not tensors["blk.0.attn_q.weight"].any()
    assert heads[1] > 0 and ffn[1] == 32 and not tensors["blk.1.ffn_up.weight"].any()
    assert heads[2] == kv[2] == ffn[2] == 0 and not any(k.startswith("blk.2.") for k in tensors)
    assert all(n % k == 0 for n, k in zip(heads, kv) if k) and meta["general.architecture"] == "deci"
    dim = meta["deci.embedding_length"]
    assert dim == (57 if kind == "F32" else 64) and (kind == "F32" or all(f % 32 == 0 for f in ffn))
    loaded, _ = C.load(str(path))
    with torch.no_grad():
        close(loaded(tok), small(tok), 1e-5 if kind == "F32" else 0.05, "GGUF vs sliced")


def test_checkpoint_command_line_writes_gguf_and_hf_folders(tmp_path):
    """python -m formats.checkpoint --run R --out X: a run's pruned model as GGUF and as a uniform HF folder."""
    folder = make_tiny(tmp_path / "ckpt", n_layers=2)
    base, _ = C.load(str(folder))
    run = tmp_path / "run"
    run.mkdir()
    z = {k: torch.ones(s) for k, s in masks.mask_shapes(base.config).items()}
    z["z_head"][0, 1], z["z_int"][1, :40], z["z_hid"][:5] = 0, 0, 0
    save_adapter(z, run)
    (run / "settings.json").write_text(json.dumps({"ckpt": str(folder)}))
    C.main(["--run", str(run), "--out", str(tmp_path / "p.gguf"), "--type", "F32"])
    C.main(["--run", str(run), "--out", str(tmp_path / "hf"), "--uniform"])
    small = M.slice_model(base, z)
    tok = tokens_for(base.config)
    for out in ("p.gguf", "hf"):
        loaded, _ = C.load(str(tmp_path / out))
        with torch.no_grad():
            close(loaded(tok), small(tok), 1e-5, out)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["intermediate_size"], cfg["hidden_size"]) == (4, 96, 44)  # 43 -> 4 x 11
    with pytest.raises(ValueError):
        C.main(["--run", str(run), "--out", str(tmp_path / "x.gguf"), "--type", "Q5_K"])
    with pytest.raises(ValueError, match="--type"):  # a folder takes no GGUF type
        C.main(["--run", str(run), "--out", str(tmp_path / "hf2"), "--type", "BOGUS"])
    before = {f: (tmp_path / f).read_bytes() for f in ("p.gguf", "hf/model.safetensors")}
    for out, extra in (("p.gguf", ["--type", "Q4_0"]), ("hf", []), ("p.gguf", ["--ckpt", str(tmp_path / "p.gguf")])):
        with pytest.raises(ValueError, match="never overwritten"):  # another export, or its own source
            C.main(["--run", str(run), "--out", str(tmp_path / out), *extra])
    assert before == {f: (tmp_path / f).read_bytes() for f in before}


# ----------------------------------------------------------------------------------------------------
# The real llama.cpp (llama-cpp-python, an optional peer built from source) runs our GGUF files

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional; docs/guide.md: how to build it)")


def real_pruned(model, target):
    """SmolLM2 pruned the magnitude baseline's way plus every 9th hidden dim: uneven heads, kv groups and widths."""
    if target == 0:
        return model
    z = baselines.magnitude_masks(model, target)
    z["z_hid"][::9] = 0
    return M.slice_model(model, z)


def llama_cpp_logits(llama_cpp, path, ids, new_tokens=0):
    """-> (logits of every prompt position [T, vocab], greedy continuation) from llama.cpp, KV cache in F32."""
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    logits, out = torch.tensor(np.array(llm.scores[:len(ids)])), []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


@pytest.mark.parametrize("kind, tol", [("F32", 1e-5), ("Q8_0", 0.05)])
def test_llama_cpp_runs_every_pruned_layout(llama_cpp, tmp_path, kind, tol):
    """The layouts llama.cpp has rules about (layer 0 without heads, attention without FFN, an empty layer,
    uneven kv groups, hidden dims cut), in a tiny model: llama.cpp computes what our reader of the same file
    computes. Q8_0 differs by llama.cpp's 8-bit activations (measured 2.8%)."""
    small, path = pruned_tiny(gguf_config(n_layers=4))[1], tmp_path / "p.gguf"
    C.save_gguf(small, gguf_tokenizer_of(), path, kind)
    ids = torch.randint(1, len(GGUF_TOKENS), (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        close(llama_cpp_logits(llama_cpp, path, ids)[0], C.load(str(path))[0](torch.tensor([ids]))[0], tol, kind)


@pytest.mark.parametrize("target", [0, 0.2, 0.5])
def test_llama_cpp_runs_our_f32_gguf(smollm, llama_cpp, tmp_path, target):
    """SmolLM2 and two uneven prunings of it, F32: llama.cpp's logits are ours (measured 1.5e-6 dense, 1.4e-5
    pruned) and its tokenizer, built from our metadata, gives our ids; greedy text is the same."""
    model, tok, _ = smollm
    small, path = real_pruned(model, target), tmp_path / "m.gguf"
    C.save_gguf(small, tok, path, "F32")
    ids = tok.encode(SENTENCE_TEXT)
    assert llama_cpp.Llama(str(path), vocab_only=True, verbose=False).tokenize(SENTENCE_TEXT.encode(), add_bos=False) == ids
    theirs, their_text = llama_cpp_logits(llama_cpp, path, ids, 16)
    with torch.no_grad():
        close(theirs, small(torch.tensor([ids]))[0], 1e-4, "llama.cpp vs ours")
    assert their_text == M.generate(small, ids, 16)


def test_llama_cpp_runs_our_q8_0_gguf(smollm, llama_cpp, tmp_path):
    """Q8_0 of the real model: llama.cpp and our reader decode the same file alike, up to llama.cpp's 8-bit
    activations (relative RMS 4.4% measured), and agree on every next token of the sentence."""
    model, tok, _ = smollm
    path = tmp_path / "m.gguf"
    C.save_gguf(model, tok, path, "Q8_0")
    ids = tok.encode(SENTENCE_TEXT)
    theirs = llama_cpp_logits(llama_cpp, path, ids)[0]
    with torch.no_grad():
        ours = C.load(str(path))[0](torch.tensor([ids]))[0]
    assert (theirs - ours).norm() / ours.norm() < 0.08 and torch.equal(theirs.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("target", [0, 0.2])
def test_transformers_loads_a_uniform_export(smollm, tmp_path, target):
    """Hugging Face folders: AutoModelForCausalLM runs a pruned model padded to equal layers, AutoTokenizer
    gives our ids."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional peer)")
    model, tok, _ = smollm
    small = real_pruned(model, target)
    C.save(layout.pad_model(small, uniform=True), tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(SENTENCE_TEXT)
    assert hf_tok.encode(SENTENCE_TEXT, add_special_tokens=False) == ids
    with torch.no_grad():
        close(hf(torch.tensor([ids])).logits[0], small(torch.tensor([ids]))[0], 1e-4, "transformers vs ours")


def test_a_full_disk_mid_gguf_is_one_line_and_leaves_no_part(tmp_path):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=r"m.gguf: not written \(No space left on device\)"):
        gguf.write_gguf(str(tmp_path / "m.gguf"), {"general.architecture": "llama"}, [("t", (32,), "F32", full)])
    assert os.listdir(tmp_path) == []
