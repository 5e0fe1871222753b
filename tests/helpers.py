"""Shared by the tests: tiny random models and adapters, and checkpoint writers written from scratch here
(Hugging Face, Meta, GGUF with ggml's reference quantizers), so every loader is tested on files it did not write."""
import json
import math
import os
import struct

import numpy as np
import torch
from safetensors.torch import save_file

import model as M
from formats import tokenizer
from formats.checkpoint import save
from model import ModelConfig, Transformer

# ----------------------------------------------------------------------------------------------------
# Tiny random models and adapters

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Tiny random models and adapters

def tiny_config(**kw):
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=24, vocab_size=50,
                norm_eps=2.0 ** -16, rope_theta=500.0, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def make_model(config, seed=0, dtype=F64):
    """A frozen Transformer with random weights of a scale that keeps activations O(1) (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in Transformer(config).state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.3 * torch.randn(p.shape, generator=g)
        else:  # x1.5 so that attention is far from uniform
            state[name] = 1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
    return M.build(config, {k: v.to(dtype) for k, v in state.items()})  # RoPE tables in the weights' precision


def new_like(model, config, state):
    """A model with `config` holding a copy of `state` (all keys must fit), in the dtype of `model`."""
    return M.build(config, {k: v.to(model.tok_embeddings.weight.dtype).clone() for k, v in state.items()})


def tokens_for(config, B=2, T=7, seed=1):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


LORA_TARGETS = [("attention", w) for w in ("wq", "wk", "wv", "wo")] + [("feed_forward", w) for w in ("w1", "w2", "w3")]


def lora_adapter(model, rank=3, scale=0.5, seed=2, zero_B=False, targets=LORA_TARGETS, dtype=None):
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or model.tok_embeddings.weight.dtype
    adapter = {"lora_scale": scale}
    for i, layer in enumerate(model.layers):
        for part, w in targets:
            mod = getattr(layer, part)
            if mod is None:
                continue
            out_f, in_f = getattr(mod, w).weight.shape
            adapter[f"layers.{i}.{part}.{w}.lora_A"] = (torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)).to(dtype)
            B = torch.zeros(out_f, rank) if zero_B else 0.5 * torch.randn(out_f, rank, generator=g)
            adapter[f"layers.{i}.{part}.{w}.lora_B"] = B.to(dtype)
    return adapter


def soft_masks(config, seed=3, dtype=F64):
    """Masks with values in (0.2, 1): every unit matters, so a mask applied in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.2 + 0.8 * torch.rand(*s, generator=g)).to(dtype)
    return {"z_head": r(config.n_layers, config.n_heads), "z_int": r(config.n_layers, config.ffn_dim), "z_hid": r(config.dim)}


def close(a, b, rtol, what=""):
    """Max abs difference relative to the scale of b."""
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def make_tiny(folder, seed=0, **kw):
    """A random tiny checkpoint folder: HF safetensors + a byte-level tokenizer.json (256 bytes + <|endoftext|>)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tokenizer.BYTE_CHARS[b]: b for b in range(256)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [{"id": 256, "content": "<|endoftext|>"}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=96,
                                     vocab_size=257, max_seq_len=256), **kw})
    m = Transformer(config)
    for p in m.parameters():
        p.data.normal_(0, 0.15)
    save(m, None, folder)
    return folder


def tiny_tokenizer():
    """Byte-level BPE with three merges: ' the' is one token (258), <|endoftext|> is 259."""
    tokens = [tokenizer.BYTE_CHARS[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    return tokenizer.Tokenizer("bpe", tokens, ["<|endoftext|>"], None, 259, merges=["Ġ t", "h e", "Ġt he"],
                          patterns=[tokenizer.GPT2_SPLIT])


# ----------------------------------------------------------------------------------------------------
# Checkpoint writers: Hugging Face, Meta, GGUF (header, metadata, tensor infos, aligned data)

TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
         "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
         "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
         "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TO_GGUF = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
           "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
           "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def external_name(key, table, layer_fmt):
    """'layers.3.attention.wq.weight' -> layer_fmt.format(3) + table['wq'] + '.weight'."""
    parts = key.split(".")
    if parts[0] == "layers":
        return layer_fmt.format(parts[1]) + table[parts[-2]] + ".weight"
    return table[parts[0]] + ".weight"


def interleave_index(rows, n_heads):
    """Row 2i+c of a head in Meta/GGUF's interleaved layout is row c*hd/2 + i of the rotate-half layout."""
    hd = rows // n_heads
    return torch.tensor([h * hd + (j % 2) * (hd // 2) + j // 2 for h in range(n_heads) for j in range(hd)])


def half_to_interleaved(w, n_heads):
    return w[interleave_index(w.shape[0], n_heads)]


def interleaved_to_half_ref(w, n_heads):
    return w[torch.argsort(interleave_index(w.shape[0], n_heads))]


def to_interleaved_state(model):
    sd, c = {k: v.clone() for k, v in model.state_dict().items()}, model.config
    for i in range(c.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = half_to_interleaved(sd[f"layers.{i}.attention.wq.weight"], c.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = half_to_interleaved(sd[f"layers.{i}.attention.wk.weight"], c.n_kv_heads)
    return sd


def hf_config_dict(c):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len, "torch_dtype": "float32"}


def write_hf(folder, model, shards=1, extra=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config), f)
    sd = {external_name(k, TO_HF, "model.layers.{}."): v.contiguous() for k, v in model.state_dict().items()}
    sd.update(extra or {})
    if shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"))
        return
    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: sd[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_meta(folder, model, shards=1):
    """Meta's layout: interleaved q/k, model-parallel shards split like fairscale's parallel layers."""
    c = model.config
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                   "multiple_of": 8, "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "vocab_size": -1}, f)
    sd = to_interleaved_state(model)
    for s in range(shards):
        part = {"rope.freqs": torch.ones(c.head_dim // 2)}
        for k, v in sd.items():
            kind = k.split(".")[-2]
            if v.dim() == 1:
                part[k] = v.clone()  # norms are replicated
            elif kind in ("wo", "w2", "tok_embeddings"):  # RowParallelLinear / ParallelEmbedding: columns
                part[k] = v.chunk(shards, dim=1)[s].clone()
            else:  # ColumnParallelLinear (wq wk wv w1 w3 output): rows
                part[k] = v.chunk(shards, dim=0)[s].clone()
        torch.save(part, os.path.join(folder, f"consolidated.{s:02d}.pth"))


# GGUF: header, metadata, tensor infos, aligned data (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
U8, I8, U16, I16, U32, I32, F32_, BOOL, STR, ARR, U64, I64, F64_ = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32_: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64_: "<d"}
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(t, v):
    if t == STR:
        return gguf_str(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gguf_value(et, x) for x in items)
    return struct.pack(PACK[t], v)


def gguf_bytes(kvs, tensors, alignment=32):
    """kvs [(key, type, value)]; tensors [(name, shape in PyTorch order, ggml type id, raw bytes)]."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, t, v in kvs:
        head += gguf_str(key) + struct.pack("<I", t) + gguf_value(t, v)
    offsets, off = [], 0
    for name, shape, t, raw in tensors:
        dims = b"".join(struct.pack("<Q", n) for n in reversed(shape))  # GGUF lists the fastest dim first
        head += gguf_str(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", t, off)
        offsets.append(off)
        off += -(-len(raw) // alignment) * alignment
    head += b"\0" * (-len(head) % alignment)
    start = len(head)
    for o, (_, _, _, raw) in zip(offsets, tensors):
        head += b"\0" * (start + o - len(head)) + raw
    return bytes(head)


def quantize(x, kind):
    """x float32 [..., n] -> (raw bytes as ggml stores them, the float32 values they decode to).

    Follows ggml's reference quantizers (quantize_row_*_ref); blocks of 32 along the last dim.
    """
    x = np.ascontiguousarray(x, np.float32)
    if kind == "F32":
        return x.tobytes(), x.copy()
    if kind == "F16":
        h = x.astype(np.float16)
        return h.tobytes(), h.astype(np.float32)
    if kind == "BF16":
        u = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine: we only need what it decodes to
        return u.tobytes(), (u.astype(np.uint32) << 16).view(np.float32).reshape(x.shape)
    b = x.reshape(-1, 32)
    inv = lambda d: np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    f16 = lambda d: d.astype(np.float16)
    if kind == "Q8_0":
        d = np.abs(b).max(1, keepdims=True) / 127
        q = np.round(b * inv(d)).astype(np.int8)
        raw = np.concatenate([f16(d).view(np.uint8), q.view(np.uint8)], 1)
        deq = f16(d).astype(np.float32) * q.astype(np.float32)
    elif kind == "Q4_0":
        big = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None]  # the value of largest magnitude, signed
        d = big / -8
        q = np.minimum(15, np.trunc(b * inv(d) + 8.5)).astype(np.uint8)
        raw = np.concatenate([f16(d).view(np.uint8), q[:, :16] | (q[:, 16:] << 4)], 1)
        deq = f16(d).astype(np.float32) * (q.astype(np.float32) - 8)
    elif kind == "Q4_1":
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d = (hi - lo) / 15
        q = np.minimum(15, np.trunc((b - lo) * inv(d) + 0.5)).astype(np.uint8)
        raw = np.concatenate([f16(d).view(np.uint8), f16(lo).view(np.uint8), q[:, :16] | (q[:, 16:] << 4)], 1)
        deq = f16(d).astype(np.float32) * q.astype(np.float32) + f16(lo).astype(np.float32)
    else:
        raise ValueError(kind)
    return raw.tobytes(), deq.reshape(x.shape)


def byte_chars():
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
GGUF_TOKENS = ["<|endoftext|>"] + byte_chars() + ["Ġt", "he", "Ġthe", "in", "Ġa"]  # 262 tokens


def gguf_tokenizer_kvs(n_tokens=None):
    tokens = GGUF_TOKENS + [f"<extra_{i}>" for i in range((n_tokens or len(GGUF_TOKENS)) - len(GGUF_TOKENS))]
    return [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "smollm"),
            ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
            ("tokenizer.ggml.token_type", ARR, (I32, [3] + [1] * (len(tokens) - 1))),
            ("tokenizer.ggml.merges", ARR, (STR, GGUF_MERGES)),
            ("tokenizer.ggml.bos_token_id", U32, 0), ("tokenizer.ggml.eos_token_id", U32, 0)]


def gguf_config(**kw):
    """Sizes that GGUF's 32-element blocks divide: every matrix's input dim is 64."""
    return tiny_config(**{**dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, vocab_size=len(GGUF_TOKENS),
                               max_seq_len=128), **kw})


def write_gguf(path, model, kind="F32", alignment=None, tokenizer_size=None, extra_kvs=()):
    """-> a copy of `model` holding exactly the weights the file decodes to (norms stay F32, as llama.cpp does)."""
    c = model.config
    kvs = [("general.architecture", STR, "llama"), ("general.name", STR, "tiny test"),
           ("llama.block_count", U32, c.n_layers), ("llama.context_length", U32, c.max_seq_len),
           ("llama.embedding_length", U32, c.dim), ("llama.feed_forward_length", U32, c.ffn_dim),
           ("llama.attention.head_count", U32, c.n_heads), ("llama.attention.head_count_kv", U32, c.n_kv_heads),
           ("llama.rope.freq_base", F32_, c.rope_theta), ("llama.rope.dimension_count", U32, c.head_dim),
           ("llama.attention.layer_norm_rms_epsilon", F32_, c.norm_eps)]
    kvs += gguf_tokenizer_kvs(tokenizer_size) + list(extra_kvs)
    tensors, decoded = [], {}
    for key, v in to_interleaved_state(model).items():
        k = "F32" if v.dim() == 1 else kind
        raw, deq = quantize(v.float().numpy(), k)
        tensors.append((external_name(key, TO_GGUF, "blk.{}."), list(v.shape), GGML[k], raw))
        decoded[key] = torch.from_numpy(deq)
    if alignment:  # pad the header so that a reader that ignores general.alignment (uses 32) reads garbage
        kvs.append(("general.alignment", U32, alignment))
        infos = [(name, shape, t, b"") for name, shape, t, _ in tensors]
        pad = next(n for n in range(alignment)
                   if -(-len(gguf_bytes(kvs + [("test.padding", STR, "x" * n)], infos, 1)) // 32) * 32 % alignment)
        kvs.append(("test.padding", STR, "x" * pad))
    with open(path, "wb") as f:
        f.write(gguf_bytes(kvs, tensors, alignment or 32))
    # back to the rotate-half layout of our model for the expected copy
    for i in range(c.n_layers):
        for w, n in (("wq", c.n_heads), ("wk", c.n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            decoded[key] = interleaved_to_half_ref(decoded[key], n)
    return new_like(model, c, decoded)


# The real SmolLM2's tokens for a sentence (checked against its GGUF vocabulary)
SENTENCE_TEXT = "The capital of France is Paris, and the capital of Germany is Berlin. The largest city in the world is"
SENTENCE = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ",", "Ġand", "Ġthe", "Ġcapital", "Ġof",
            "ĠGermany", "Ġis", "ĠBerlin", ".", "ĠThe", "Ġlargest", "Ġcity", "Ġin", "Ġthe", "Ġworld", "Ġis"]
