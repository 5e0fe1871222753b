"""A from-scratch LLaMA with NutePrune's masks and LoRA built in, a KV cache, and checkpoint loaders.

One set of frozen base weights runs the intact model, the masked student, any teacher snapshot and
(after export) a physically smaller model. Masks and LoRA never live inside the model: they arrive
with each forward as an *adapter*, a flat dict of tensors (see `Transformer.forward`).
"""
import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


class LoadError(Exception):
    """A checkpoint or tokenizer that cannot be loaded; the command line prints it as one line."""


# ----------------------------------------------------------------------------------------------------
# GGUF: a ~80-line reader for the formats real checkpoints use (F32, F16, BF16, Q8_0, Q4_0, Q4_1)

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}


def read_gguf(path, tensors=True):
    """Returns (metadata dict, {name: np.ndarray float32 in PyTorch [out, in] order})."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:4] != b"GGUF":
        raise LoadError(f"{path}: not a GGUF file")
    pos = 4

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(t):
        nonlocal pos
        if t == GGUF_STRING:
            return string()
        if t == GGUF_ARRAY:
            et, n = take("<I"), take("<Q")
            if et in GGUF_SCALAR:  # read numeric arrays in one go
                dt = np.dtype(GGUF_SCALAR[et])
                arr = np.frombuffer(buf, dt, n, pos)
                pos += n * dt.itemsize
                return arr.tolist()
            return [value(et) for _ in range(n)]
        return take(GGUF_SCALAR[t])

    try:
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise LoadError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, shape, take("<I"), take("<Q")))
    except (struct.error, ValueError, KeyError):  # a cut inside an array, or an unknown value type
        raise LoadError(f"{path}: GGUF header is truncated or corrupt") from None
    if not tensors:
        return meta, {}
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    out = {}
    for name, shape, t, offset in infos:
        if t not in GGML_TYPES:
            raise LoadError(f"{path}: tensor {name} has ggml type {t}; supported: "
                            + ", ".join(v[0] for v in GGML_TYPES.values()))
        kind, block, nbytes = GGML_TYPES[t]
        n = math.prod(shape)
        size = n // block * nbytes
        if start + offset + size > len(buf):
            raise LoadError(f"{path}: file is truncated (tensor {name} runs past the end)")
        raw = np.frombuffer(buf, np.uint8, size, start + offset)
        out[name] = dequantize(raw, kind, n).reshape(shape[::-1])  # GGUF lists dims fastest-first
    return meta, out


def dequantize(raw, kind, n):
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(n // 32, -1)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1] scale
    if kind == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8)).reshape(-1)
    qs = blocks[:, -16:]  # 16 bytes: low nibbles are elements 0..15, high nibbles 16..31
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    if kind == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # Q4_1: x = d * q + m
    return (d * q + m).reshape(-1)


# ----------------------------------------------------------------------------------------------------
# The model

@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9  # query heads per layer of the intact model
    n_kv_heads: int = 3  # grouped-query attention when < n_heads
    head_dim: int = 64
    ffn_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    # Per-layer structure, so a pruned model with uneven layers is the same class. kv_of_head[l] lists,
    # for each query head of layer l, which of that layer's kv heads it reads (an empty list: no
    # attention in layer l); ffn_dims[l] is layer l's FFN width (0: no FFN). None = intact, uniform.
    kv_of_head: list = None
    ffn_dims: list = None

    def __post_init__(self):
        if self.kv_of_head is None:
            group = self.n_heads // self.n_kv_heads
            self.kv_of_head = [[h // group for h in range(self.n_heads)] for _ in range(self.n_layers)]
        if self.ffn_dims is None:
            self.ffn_dims = [self.ffn_dim] * self.n_layers


def linear(x, weight, adapter, name):
    """y = W x, plus the LoRA branch B A x * scale when the adapter has one for this weight (Eq. 4)."""
    y = F.linear(x, weight)
    A = adapter.get(name + ".lora_A")  # [r, in]
    if A is not None:
        y = y + F.linear(F.linear(x, A.to(x.dtype)), adapter[name + ".lora_B"].to(x.dtype)) * adapter["lora_scale"]
    return y


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The mean runs over all dims, masked ones included: the masked model still divides by the full d.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32 for the mean of squares
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, head_dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x [B, T, heads, head_dim] in the rotate-half layout (Hugging Face); cos, sin [T, 1, head_dim/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, args, layer):
        super().__init__()
        kv_of_head = args.kv_of_head[layer]
        self.n_heads, self.n_kv = len(kv_of_head), (max(kv_of_head) + 1 if kv_of_head else 0)
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * args.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * args.head_dim, args.dim, bias=False)
        self.register_buffer("kv_index", torch.tensor(kv_of_head, dtype=torch.long), persistent=False)
        group = self.n_heads // max(1, self.n_kv)
        # uniform groups: SDPA repeats the kv heads itself; a pruned layer reads them by index instead
        self.uniform_gqa = kv_of_head == [h // group for h in range(self.n_heads)]
        self.cache_k = self.cache_v = None

    def forward(self, x, cos, sin, adapter, name, z_head, start_pos):
        B, T, _ = x.shape
        q = linear(x, self.wq.weight, adapter, name + "wq").view(B, T, self.n_heads, self.head_dim)
        k = linear(x, self.wk.weight, adapter, name + "wk").view(B, T, self.n_kv, self.head_dim)
        v = linear(x, self.wv.weight, adapter, name + "wv").view(B, T, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if start_pos is not None:  # KV cache: write this step's keys and values, attend over all so far
            self.cache_k[:B, start_pos:start_pos + T] = k
            self.cache_v[:B, start_pos:start_pos + T] = v
            k, v = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
            if start_pos > 0:  # query i sits at position start_pos + i
                causal = False
                if T > 1:
                    mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        if not self.uniform_gqa:  # each query head reads its own kv head
            k, v = k.index_select(2, self.kv_index), v.index_select(2, self.kv_index)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=causal and T > 1, enable_gqa=self.uniform_gqa)
        y = y.transpose(1, 2)  # [B, T, heads, head_dim]
        if z_head is not None:  # Eq. 1: each head's output scaled by its mask before the output projection
            y = y * z_head.to(y.dtype)[:, None]
        return linear(y.reshape(B, T, -1), self.wo.weight, adapter, name + "wo")


class FeedForward(nn.Module):
    def __init__(self, args, layer):
        super().__init__()
        hidden = args.ffn_dims[layer]
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x, adapter, name, z_int):
        h = F.silu(linear(x, self.w1.weight, adapter, name + "w1")) * linear(x, self.w3.weight, adapter, name + "w3")
        if z_int is not None:  # Eq. 2: mask the intermediate units
            h = h * z_int.to(h.dtype)
        return linear(h, self.w2.weight, adapter, name + "w2")


class Block(nn.Module):
    def __init__(self, args, layer):
        super().__init__()
        self.attention = Attention(args, layer) if args.kv_of_head[layer] else None
        self.feed_forward = FeedForward(args, layer) if args.ffn_dims[layer] else None
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h, cos, sin, adapter, layer, start_pos):
        name, z_hid = f"layers.{layer}.", adapter.get("z_hid")
        z_head, z_int = adapter.get("z_head"), adapter.get("z_int")
        if self.attention is not None:  # a layer that lost every head passes its input through
            out = self.attention(self.attention_norm(h), cos, sin, adapter, name + "attention.",
                                 None if z_head is None else z_head[layer], start_pos)
            h = h + (out if z_hid is None else out * z_hid.to(out.dtype))  # Eq. 1: z_hid on the output
        if self.feed_forward is not None:
            out = self.feed_forward(self.ffn_norm(h), adapter, name + "feed_forward.",
                                    None if z_int is None else z_int[layer])
            h = h + (out if z_hid is None else out * z_hid.to(out.dtype))  # Eq. 2
        return h


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)  # fp64; cast where used
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, adapter=None, start_pos=None, return_hidden=False):
        """tokens [B, T] -> logits [B, T, vocab] (and the hidden state after each layer if asked).

        adapter: None runs the intact model. Otherwise a flat dict of tensors, all optional:
          "z_head" [n_layers, n_heads], "z_int" [n_layers, ffn_dim], "z_hid" [dim]  masks (Eq. 1-2);
          "layers.{i}.attention.wq.lora_A" [r, in], "...lora_B" [out, r] (any of wq wk wv wo w1 w2 w3)
          and "lora_scale" (alpha / r)                                               LoRA (Eq. 4).
        The student passes trainable tensors, a teacher a frozen snapshot: same base weights, no copy.
        start_pos: None for a plain causal forward; an int to read and extend the KV cache (setup_cache).
        """
        adapter = adapter or {}
        B, T = tokens.shape
        pos = start_pos or 0
        if pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        cos, sin = (t[pos:pos + T, None, :].to(h.dtype) for t in (self.rope_cos, self.rope_sin))  # once, not per layer
        z_hid = adapter.get("z_hid")
        if z_hid is not None:
            h = h * z_hid.to(h.dtype)
        hidden = []
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, adapter, i, start_pos)
            hidden.append(h)
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight if self.output is None else self.output.weight)
        return (logits, hidden) if return_hidden else logits

    def setup_cache(self, batch, max_len=None):
        """Pre-allocates the KV cache (like gpt-fast) in the model's dtype and device."""
        max_len = max_len or self.args.max_seq_len
        w = self.tok_embeddings.weight
        for layer in self.layers:
            if layer.attention is not None:
                shape = (batch, max_len, layer.attention.n_kv, self.args.head_dim)
                layer.attention.cache_k = torch.zeros(shape, dtype=w.dtype, device=w.device)
                layer.attention.cache_v = torch.zeros(shape, dtype=w.dtype, device=w.device)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, adapter=None, temperature=0.0, eos_id=None):
    """prompt: list of token ids -> list of new ids. Prefill once, then decode one token at a time."""
    device = model.tok_embeddings.weight.device
    model.setup_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), adapter, start_pos=0)
    out = []
    for i in range(max_new_tokens):
        last = logits[0, -1].float()
        nxt = int(last.argmax()) if temperature == 0 else int(torch.multinomial((last / temperature).softmax(-1), 1))
        out.append(nxt)
        if nxt == eos_id or i == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[nxt]], device=device), adapter, start_pos=len(prompt) + i)
    return out



# ----------------------------------------------------------------------------------------------------
# Export: masks alone save nothing; slicing out what the masks zero gives a smaller dense model.

@torch.no_grad()
def slice_model(model, adapter):
    """-> a new, smaller Transformer that computes exactly what `model(tokens, adapter)` computes.

    LoRA is merged into the weights, units whose mask is 0 are removed and the soft mask values of the
    kept ones (about 0.996) are folded into the weights. Hidden dims: an RMSNorm over k kept dims
    equals the masked one over all d dims with weight * sqrt(d/k) and eps * d/k.
    """
    a = model.args
    dtype = torch.promote_types(model.tok_embeddings.weight.dtype, torch.float32)  # slice in fp32 (or fp64)
    sd = {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}
    for key in adapter:  # Eq. 4 merged: W + scale * B A
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            W = sd[name + ".weight"]
            W += adapter["lora_scale"] * (adapter[name + ".lora_B"].to(W) @ adapter[key].to(W))
    dev = sd["tok_embeddings.weight"].device
    def mask(key, i, n):  # an absent mask keeps everything
        return adapter[key][i].to(dev, dtype) if key in adapter else torch.ones(n, device=dev, dtype=dtype)
    z_hid = mask("z_hid", slice(None), a.dim)
    hid = z_hid.nonzero()[:, 0]  # kept hidden dims
    k, d, hd = len(hid), a.dim, a.head_dim
    norm = lambda w: w[hid] * math.sqrt(d / k)
    new, kv_of_head, ffn_dims = {}, [], []
    for i in range(a.n_layers):
        p = f"layers.{i}."
        z_head, z_int = mask("z_head", i, len(a.kv_of_head[i])), mask("z_int", i, a.ffn_dims[i])
        heads = z_head.nonzero()[:, 0].tolist()
        groups = sorted({a.kv_of_head[i][h] for h in heads})  # a kv head survives while one of its query heads does
        kv_of_head.append([groups.index(a.kv_of_head[i][h]) for h in heads])
        rows = lambda idx: torch.tensor([j * hd + t for j in idx for t in range(hd)], dtype=torch.long, device=dev)
        q_rows, kv_rows = rows(heads), rows(groups)
        if heads:
            new[p + "attention.wq.weight"] = sd[p + "attention.wq.weight"][q_rows][:, hid]
            new[p + "attention.wk.weight"] = sd[p + "attention.wk.weight"][kv_rows][:, hid]
            new[p + "attention.wv.weight"] = sd[p + "attention.wv.weight"][kv_rows][:, hid]
            wo = sd[p + "attention.wo.weight"] * z_head.repeat_interleave(hd)[None, :] * z_hid[:, None]
            new[p + "attention.wo.weight"] = wo[hid][:, q_rows]
        units = z_int.nonzero()[:, 0]
        ffn_dims.append(len(units))
        if len(units):
            new[p + "feed_forward.w1.weight"] = sd[p + "feed_forward.w1.weight"][units][:, hid]
            new[p + "feed_forward.w3.weight"] = sd[p + "feed_forward.w3.weight"][units][:, hid]
            w2 = sd[p + "feed_forward.w2.weight"] * z_int[None, :] * z_hid[:, None]
            new[p + "feed_forward.w2.weight"] = w2[hid][:, units]
        new[p + "attention_norm.weight"] = norm(sd[p + "attention_norm.weight"])
        new[p + "ffn_norm.weight"] = norm(sd[p + "ffn_norm.weight"])
    new["tok_embeddings.weight"] = (sd["tok_embeddings.weight"] * z_hid)[:, hid]
    new["norm.weight"] = norm(sd["norm.weight"])
    if a.tie_embeddings:  # the shared matrix now carries z_hid, which the lm_head must not see: undo it in the norm
        new["norm.weight"] = new["norm.weight"] / z_hid[hid]
    else:
        new["output.weight"] = sd["output.weight"][:, hid]
    small = ModelArgs(**{**asdict(a), "dim": k, "norm_eps": a.norm_eps * d / k,
                         "kv_of_head": kv_of_head, "ffn_dims": ffn_dims})
    return build(small, {key: v.to(model.tok_embeddings.weight.dtype).contiguous() for key, v in new.items()})


# ----------------------------------------------------------------------------------------------------
# Loading real checkpoints: Hugging Face folders, Meta's original release, GGUF. Our parameter names
# are Meta's; the other two layouts are renamed to them.

HF_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
            "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm", "model.layers": "layers"}
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "blk": "layers",
              "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
              "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def rename(name, table):
    for old, new in table.items():  # longest keys first would matter only for prefixes; none overlap
        if name.startswith(old + ".") or ("." + old + ".") in name:
            name = name.replace(old, new, 1)
    return name


def interleaved_to_half(w, n_heads):
    """Meta and GGUF store q/k rows for interleaved RoPE (pairs 2i, 2i+1); we use rotate-half (i, i+d/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def args_from_hf(cfg):
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                     ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
                     tie_embeddings=cfg.get("tie_word_embeddings", False),
                     max_seq_len=min(cfg.get("max_position_embeddings", 2048), 8192),
                     kv_of_head=cfg.get("kv_of_head"), ffn_dims=cfg.get("ffn_dims"))


def hf_config(args):
    """The config.json an exported model is saved with: Hugging Face's keys plus our per-layer sizes."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "intermediate_size": args.ffn_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_embeddings,
            "max_position_embeddings": args.max_seq_len, "kv_of_head": args.kv_of_head,
            "ffn_dims": args.ffn_dims}


def read_hf(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("rope_scaling"):
        raise LoadError(f"{path}: rope_scaling {cfg['rope_scaling']} is not supported")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise LoadError(f"{path}: config.json but no model.safetensors or model.safetensors.index.json")
    args, state = args_from_hf(cfg), {}
    for file in files:  # one tensor at a time, so peak memory stays about one copy of the weights
        try:
            with safe_open(os.path.join(path, file), "pt") as f:
                for key in f.keys():
                    if not key.endswith("rotary_emb.inv_freq"):  # older HF files store RoPE tables
                        state[rename(key, HF_NAMES)] = f.get_tensor(key)
        except Exception as e:  # truncated or corrupt file
            raise LoadError(f"{os.path.join(path, file)}: cannot read safetensors ({e})") from None
    if args.tie_embeddings:
        state.pop("output.weight", None)  # some tied checkpoints store the shared matrix twice
    return args, state


def read_meta(path):
    with open(os.path.join(path, "params.json")) as f:
        p = json.load(f)
    files = sorted(f for f in os.listdir(path) if f.startswith("consolidated.") and f.endswith(".pth"))
    if not files:
        raise LoadError(f"{path}: params.json but no consolidated.*.pth")
    try:
        shards = [torch.load(os.path.join(path, f), map_location="cpu", mmap=True, weights_only=True) for f in files]
    except Exception as e:
        raise LoadError(f"{path}: cannot read {files} ({e})") from None
    state = {}
    for key in shards[0]:  # model-parallel shards: columns split for wo, w2, embeddings; rows otherwise
        parts = [s[key] for s in shards]
        if parts[0].dim() == 1 or len(parts) == 1:
            state[key] = parts[0]
        else:
            state[key] = torch.cat(parts, dim=1 if key.split(".")[-2] in ("wo", "w2", "tok_embeddings") else 0)
    state.pop("rope.freqs", None)
    n_heads = p["n_heads"]
    args = ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=n_heads, n_kv_heads=p.get("n_kv_heads") or n_heads,
                     head_dim=p["dim"] // n_heads, ffn_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                     vocab_size=state["tok_embeddings.weight"].shape[0], norm_eps=p.get("norm_eps", 1e-5),
                     rope_theta=p.get("rope_theta", 10000.0), tie_embeddings="output.weight" not in state)
    return args, state


def read_gguf_model(path):
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)
    n_heads = g("attention.head_count")
    state = {rename(k, GGUF_NAMES): torch.from_numpy(v) for k, v in tensors.items()}
    args = ModelArgs(dim=g("embedding_length"), n_layers=g("block_count"), n_heads=n_heads,
                     n_kv_heads=g("attention.head_count_kv", n_heads),
                     head_dim=g("rope.dimension_count", g("embedding_length") // n_heads),
                     ffn_dim=g("feed_forward_length"), vocab_size=state["tok_embeddings.weight"].shape[0],
                     norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
                     tie_embeddings="output.weight" not in state, max_seq_len=min(g("context_length", 2048), 8192))
    return args, state, meta


def read_checkpoint(path):
    """-> (args, state, tokenizer source, whether q/k rows are in the interleaved RoPE layout)."""
    tok_source = path
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LoadError(f"{path}: unknown format (expected a .gguf file or a checkpoint folder)")
        args, state, tok_source = read_gguf_model(path)
        interleaved = True
    elif os.path.exists(os.path.join(path, "config.json")):
        args, state = read_hf(path)
        interleaved = False
        if os.path.exists(os.path.join(path, "tokenizer.gguf")):  # an export of a GGUF model
            tok_source = read_gguf(os.path.join(path, "tokenizer.gguf"), tensors=False)[0]
    elif os.path.exists(os.path.join(path, "params.json")):
        args, state = read_meta(path)
        interleaved = True
    else:
        raise LoadError(f"{path}: no config.json, params.json or .gguf: not a checkpoint")
    return args, state, tok_source, interleaved


def load(path, dtype=torch.float32, device="cpu", max_seq_len=None):
    """Loads a checkpoint (HF folder, Meta folder or .gguf file) -> (Transformer, Tokenizer)."""
    import data
    if not os.path.exists(path):
        raise LoadError(f"{path}: no such file or folder")
    try:
        args, state, tok_source, interleaved = read_checkpoint(path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{path}: malformed checkpoint config ({type(e).__name__}: {e})") from None
    if max_seq_len:
        args.max_seq_len = max_seq_len
    for i in range(args.n_layers):  # RoPE layout: interleaved pairs -> rotate-half
        n_q = len(args.kv_of_head[i])
        for w, heads in (("wq", n_q), ("wk", max(args.kv_of_head[i]) + 1 if n_q else 0)):
            key = f"layers.{i}.attention.{w}.weight"
            if interleaved and key in state:
                state[key] = interleaved_to_half(state[key], heads)
    try:
        tokenizer = data.load_tokenizer(tok_source)
    except (ValueError, OSError) as e:
        raise LoadError(f"{path}: tokenizer: {e}") from None
    tokenizer.source = tok_source  # save() writes it next to an exported model
    if tokenizer.vocab_size > args.vocab_size:
        raise LoadError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                        f"{args.vocab_size}: tokenizer and weights do not belong together")
    for key in state:  # one tensor at a time: peak memory stays about one copy of the weights
        state[key] = state[key].to(dtype)
    return build(args, state).to(device), tokenizer


def build(args, state):
    """A Transformer around existing tensors (no copy, no random init), frozen, in eval mode."""
    with torch.device("meta"):  # no memory for weights until the given tensors are assigned
        model = Transformer(args)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise LoadError(f"weights do not fit the config: {str(e).splitlines()[1:2]}") from None
    w = state["tok_embeddings.weight"]
    device, dtype = w.device, torch.promote_types(w.dtype, torch.float32)
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    for i, layer in enumerate(model.layers):  # buffers made on the meta device hold no data
        if layer.attention is not None:
            layer.attention.kv_index = torch.tensor(args.kv_of_head[i], dtype=torch.long, device=device)
    return model.eval().requires_grad_(False)


def save(model, tokenizer, folder):
    """Writes model.safetensors + config.json (Hugging Face names, rotate-half RoPE) + the tokenizer."""
    os.makedirs(folder, exist_ok=True)
    to_hf = {v: k for k, v in HF_NAMES.items()}
    state = {rename(key, to_hf): value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(model.args), f, indent=1)
    src = getattr(tokenizer, "source", None)
    if isinstance(src, dict):  # the tokenizer lived in a GGUF's metadata: keep just that metadata
        meta = {k: v for k, v in src.items() if k.startswith("tokenizer.")}
        write_gguf_metadata(os.path.join(folder, "tokenizer.gguf"), meta)
    elif src is not None:
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(src_dir, name)) and os.path.abspath(src_dir) != os.path.abspath(folder):
                shutil.copy(os.path.join(src_dir, name), folder)


def write_gguf_metadata(path, meta):
    """A GGUF file with metadata and no tensors (how llama.cpp ships bare vocabularies)."""
    def value(v):
        if isinstance(v, str):
            b = v.encode()
            return struct.pack("<IQ", GGUF_STRING, len(b)) + b
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, int):
            return struct.pack("<Iq", 11, v)
        if isinstance(v, float):
            return struct.pack("<Id", 12, v)
        items = [value(x) for x in v]  # a list: element type from the first element's tag, then bare values
        etype = struct.unpack_from("<I", items[0])[0] if items else 11
        return struct.pack("<IIQ", GGUF_ARRAY, etype, len(v)) + b"".join(x[4:] for x in items)
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(meta))]
    for k, v in meta.items():
        kb = k.encode()
        out += [struct.pack("<Q", len(kb)), kb, value(v)]
    with open(path, "wb") as f:
        f.write(b"".join(out))
