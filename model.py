"""A from-scratch LLaMA with NutePrune's masks and LoRA built in, a KV cache, generation and export.

One set of frozen base weights runs the intact model, the masked student, any teacher snapshot and
(after export) a physically smaller model. Masks and LoRA never live inside the model: they arrive
with each forward as an *adapter*, a flat dict of tensors (the contract is in `Transformer.forward`).
This file opens no file (formats/checkpoint.py reads and writes every format); the masks' own math is in
masks.py and the CPU fast paths in kernels.py, the only file it imports.

    model = build(config, state_dict)            # formats.checkpoint.load(path) does this for real checkpoints
    logits = model(tokens, adapter)              # [B, T] -> [B, T, vocab]
    ids = generate(model, prompt_ids, 32)        # greedy, KV-cached
    small = slice_model(model, adapter)          # the pruned model, really smaller
"""
import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import MIN_SKIP, base_linear, in_fp32, min_skip_for


@dataclass
class ModelConfig:
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


# ----------------------------------------------------------------------------------------------------
# LoRA (Eq. 4): W x + B A x * alpha / r, A random, B zero, so training starts from the intact model.
# Keys: "{weight name}.lora_A" [r, in] and ".lora_B" [out, r], e.g. "layers.3.attention.wq.lora_A"

LORA_TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
                "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}


def init_lora(model, targets, rank, gen, lora=None):
    """Adds LoRA pairs for `targets` (keeping pairs already in `lora`) -> {name: fp32 tensor}."""
    lora = dict(lora or {})
    for i, layer in enumerate(model.layers):
        for t in targets:
            name = f"layers.{i}.{LORA_TARGETS[t]}"
            out_dim, in_dim = layer.get_submodule(LORA_TARGETS[t]).weight.shape
            if name + ".lora_A" not in lora:  # A ~ U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear; B = 0
                lora[name + ".lora_A"] = (torch.rand(rank, in_dim, generator=gen) * 2 - 1) / math.sqrt(in_dim)
                lora[name + ".lora_B"] = torch.zeros(out_dim, rank)
    return lora


# ----------------------------------------------------------------------------------------------------
# The network

def linear(x, weight, adapter, name, rows=None, cols=None):
    """y = W x, plus the LoRA branch B A x * scale when the adapter has one for this weight (Eq. 4);
    rows / cols: only these outputs / inputs of W (the units a mask keeps, see kept_units)."""
    y = base_linear(x, weight, rows, cols)
    A = adapter.get(name + ".lora_A")  # [r, in]
    if A is not None:
        B = adapter[name + ".lora_B"]  # [out, r]
        A, B = (A if cols is None else A[:, cols]), (B if rows is None else B[rows])
        y = y + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * adapter["lora_scale"]
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
    # x [B, T, heads, head_dim] in the rotate-half layout (Hugging Face); cos, sin [T or B, T, 1, head_dim/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Pre-allocated keys and values of one attention layer (like gpt-fast): [batch, max_len, n_kv, head_dim]."""

    def __init__(self, batch, max_len, n_kv, head_dim, dtype, device):
        shape = (batch, max_len, n_kv, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        for t in (self.k, self.v):  # one compiled decode step (compile_decoding) for every cache length
            torch._dynamo.mark_dynamic(t, 1)

    def update(self, start_pos, k, v):
        """Writes this step's k, v [B, T, n_kv, head_dim] at start_pos -> all keys and values so far."""
        B, T = k.shape[:2]
        self.k[:B, start_pos:start_pos + T] = k
        self.v[:B, start_pos:start_pos + T] = v
        return self.k[:B, :start_pos + T], self.v[:B, :start_pos + T]


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        kv_of_head = config.kv_of_head[layer]
        self.n_heads, self.n_kv = len(kv_of_head), (max(kv_of_head) + 1 if kv_of_head else 0)
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv * config.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * config.head_dim, config.dim, bias=False)
        self.register_buffer("kv_index", torch.tensor(kv_of_head, dtype=torch.long), persistent=False)
        group = self.n_heads // max(1, self.n_kv)
        # uniform groups: SDPA repeats the kv heads itself; a pruned layer reads them by index instead
        self.uniform_gqa = kv_of_head == [h // group for h in range(self.n_heads)]
        self.kv_cache = None

    def forward(self, x, cos, sin, adapter, name, z_head, start_pos, heads=None, mask=None):
        y = self.attend(x, cos, sin, adapter, name, start_pos, heads, mask)  # [B, T, heads, head_dim]
        if z_head is not None:  # Eq. 1: each head's output scaled by its mask before the output projection
            y = y * (z_head if heads is None else z_head[heads]).to(y.dtype)[:, None]
        return linear(y.flatten(2), self.wo.weight, adapter, name + "wo", cols=self.rows_of(heads))

    def rows_of(self, heads):  # head indices [n] -> their rows of wq [n * head_dim]
        if heads is not None:
            return (heads[:, None] * self.head_dim + torch.arange(self.head_dim, device=heads.device)).flatten()

    def attend(self, x, cos, sin, adapter, name, start_pos, heads=None, mask=None):
        """x [B, T, dim] -> every head's output [B, T, heads, head_dim], before the output projection.
        heads: only these query heads (a forward without the cache; see kept_units). mask [B, 1, T, T]: which
        keys each query reads (Transformer.forward), instead of the causal ones."""
        B, T, _ = x.shape
        kv_rows, kv_index, uniform = None, self.kv_index, self.uniform_gqa
        if heads is not None and self.uniform_gqa and self.n_kv == self.n_heads:  # head h reads kv head h
            kv_rows = self.rows_of(heads)
        elif heads is not None:  # grouped-query (or another layout): every kv head, each kept head reads its own
            kv_index, uniform = self.kv_index[heads], False
        q = linear(x, self.wq.weight, adapter, name + "wq", rows=self.rows_of(heads)).view(B, T, -1, self.head_dim)
        k = linear(x, self.wk.weight, adapter, name + "wk", rows=kv_rows).view(B, T, -1, self.head_dim)
        v = linear(x, self.wv.weight, adapter, name + "wv", rows=kv_rows).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if not uniform:  # each query head reads its own kv head, copied before it enters the cache:
            k, v = k.index_select(2, kv_index), v.index_select(2, kv_index)  # O(1) per decoded token
        causal = mask is None
        if start_pos is not None:  # KV cache: attend over everything so far
            k, v = self.kv_cache.update(start_pos, k, v)
            if start_pos > 0:  # query i sits at position start_pos + i
                causal = False
                if T > 1:
                    mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        dtype = q.dtype
        if in_fp32(x):  # like the projections: PyTorch's 16-bit attention kernel is ~2x slower here
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=causal and T > 1, enable_gqa=self.uniform_gqa)
        return y.transpose(1, 2).to(dtype)


class FeedForward(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        hidden = config.ffn_dims[layer]
        self.w1 = nn.Linear(config.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, hidden, bias=False)  # up

    def forward(self, x, adapter, name, z_int, units=None):
        h = self.act(x, adapter, name, units)
        if z_int is not None:  # Eq. 2: mask the intermediate units
            h = h * (z_int if units is None else z_int[units]).to(h.dtype)
        return linear(h, self.w2.weight, adapter, name + "w2", cols=units)

    def act(self, x, adapter, name, units=None):
        """x [B, T, dim] -> the intermediate units [B, T, hidden], before the down projection
        (units: only these; see kept_units)."""
        w1, w3 = (linear(x, w.weight, adapter, name + n, rows=units) for w, n in ((self.w1, "w1"), (self.w3, "w3")))
        return F.silu(w1) * w3


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attention = Attention(config, layer) if config.kv_of_head[layer] else None
        self.feed_forward = FeedForward(config, layer) if config.ffn_dims[layer] else None
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, h, cos, sin, adapter, start_pos, mask=None):
        """adapter: this layer's part (layer_adapter): keys without "layers.{i}.", its rows of z_head and
        z_int. Nothing here depends on the layer's index, so one torch.compile serves every block."""
        z_hid = adapter.get("z_hid")
        if self.attention is not None:  # a layer that lost every head passes its input through
            out = self.attention(self.attention_norm(h), cos, sin, adapter, "attention.", adapter.get("z_head"),
                                 start_pos, adapter.get("heads"), mask)
            h = h + (out if z_hid is None else out * z_hid.to(out.dtype))  # Eq. 1: z_hid on the output
        if self.feed_forward is not None:
            out = self.feed_forward(self.ffn_norm(h), adapter, "feed_forward.", adapter.get("z_int"),
                                    adapter.get("units"))
            h = h + (out if z_hid is None else out * z_hid.to(out.dtype))  # Eq. 2
        return h


@functools.cache
def compiled_block():
    """Block.__call__ through torch.compile, for training (nute.py --compile): each block's norms, RoPE, SiLU,
    mask products and residual adds fuse, forward and backward. The blocks are alike and find their part of
    the adapter by names without the layer's index, so one graph serves all of them (one more for a forward
    without grad, as a teacher's). Built at its first call: about a minute on a CPU."""
    return torch.compile(Block.__call__)




def kept_units(z, min_skip=MIN_SKIP):
    """A mask [L, n] -> per layer the indices of its units with z != 0, or None to keep them all. A unit
    whose mask is exactly 0 adds nothing, and its sample (Eq. 10, clamped at 0) passes no gradient back to
    log_alpha: a forward can leave its rows out of the projections, with the same outputs and gradients
    (the gradient of such an entry of z itself is then 0, which the clamp discards; the one exception, a
    pre-clamp value of exactly 0.0, has the chance of one float). One transfer to the CPU for all layers."""
    keep = (z != 0).cpu()
    return [None if (~row).sum() < min_skip * len(row) else row.nonzero()[:, 0].to(z.device) for row in keep]


def layer_adapter(adapter, n_layers, min_skip=None):
    """A flat adapter -> one dict per layer: "layers.{i}.attention.wq.lora_A" becomes "attention.wq.lora_A"
    of layer i, z_head and z_int give layer i their row i, z_hid and lora_scale go to every layer; with
    min_skip also "heads" and "units", the kept_units of z_head and z_int."""
    per_layer = [{k: adapter[k] for k in ("z_hid", "lora_scale") if k in adapter} for _ in range(n_layers)]
    for k, v in adapter.items():
        if k.startswith("layers."):
            i, name = k[len("layers."):].split(".", 1)
            per_layer[int(i)][name] = v
        elif k in ("z_head", "z_int"):
            kept = [None] * len(v) if min_skip is None else kept_units(v, min_skip)
            for i, row in enumerate(v):
                per_layer[i][k] = row
                if kept[i] is not None:
                    per_layer[i]["heads" if k == "z_head" else "units"] = kept[i]
    return per_layer


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)  # fp64; cast where used
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False  # nute.py --grad-checkpoint
        self.compile_blocks = False  # nute.py --compile: the blocks run through compiled_block() (not decoding)
        self.skip_zeros = True  # an eager forward without the cache leaves out units whose mask is 0 (kept_units)

    def forward(self, tokens, adapter=None, start_pos=None, return_hidden=False, positions=None, mask=None,
                logits_at=None):
        """tokens [B, T] -> logits [B, T, vocab], and with return_hidden the states the layer loss compares:
        Hugging Face's hidden_states[1:], i.e. the outputs of layers 0..L-2 and then the final *normed* state.

        adapter: None runs the intact model. Otherwise a flat dict of tensors, all optional:
          "z_head" [n_layers, n_heads], "z_int" [n_layers, ffn_dim], "z_hid" [dim]  masks (Eq. 1-2);
          "layers.{i}.attention.wq.lora_A" [r, in], "...lora_B" [out, r] (any of wq wk wv wo w1 w2 w3)
          and "lora_scale" (alpha / r)                                               LoRA (Eq. 4).
        The student passes trainable tensors, a teacher a frozen snapshot: same base weights, no copy.
        Heads and units whose mask is exactly 0 are left out of the products (kept_units, skip_zeros).
        start_pos: None for a plain causal forward; an int to read and extend the KV cache (setup_cache).
        positions [B, T] and mask [B, 1, T, T] (bool, True where a query reads a key): each token's position
        and what it attends to, for packed sequences (evaluate.score_requests); default 0..T-1 and causal.
        logits_at: flat indices into the B * T positions -> logits [n, vocab] of those only.
        """
        adapter = adapter or {}
        B, T = tokens.shape
        pos = start_pos or 0
        n = pos + T if positions is None else int(positions.max()) + 1  # packed rows may be longer than their parts
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        if positions is None:  # once, not per layer: [T, 1, head_dim / 2]
            cos, sin = (t[pos:pos + T, None, :].to(h.dtype) for t in (self.rope_cos, self.rope_sin))
        else:  # [B, T, 1, head_dim / 2]
            cos, sin = (t[positions][:, :, None, :].to(h.dtype) for t in (self.rope_cos, self.rope_sin))
        z_hid = adapter.get("z_hid")
        if z_hid is not None:
            h = h * z_hid.to(h.dtype)
        compiled = self.compile_blocks and start_pos is None and mask is None
        hidden, run = [], compiled_block() if compiled else Block.__call__
        # compiled blocks keep every unit: the kept counts change every step, and each new set of shapes recompiles
        skip = self.skip_zeros and start_pos is None and not self.compile_blocks
        min_skip = min_skip_for(self.tok_embeddings.weight) if skip else None
        for layer, a in zip(self.layers, layer_adapter(adapter, len(self.layers), min_skip)):
            if self.grad_checkpoint and torch.is_grad_enabled():  # keep each block's input, redo its inside in backward
                h = torch.utils.checkpoint.checkpoint(run, layer, h, cos, sin, a, start_pos, mask, use_reentrant=False)
            else:
                h = run(layer, h, cos, sin, a, start_pos, mask)
            hidden.append(h)
        h = hidden[-1] = self.norm(h)  # [B, T, dim]
        if logits_at is not None:
            h = h.flatten(0, 1)[logits_at]  # [n, dim]
        logits = base_linear(h, self.tok_embeddings.weight if self.output is None else self.output.weight)
        return (logits, hidden) if return_hidden else logits

    def setup_cache(self, batch, max_len=None):
        """Pre-allocates a KVCache in every attention layer, in the model's dtype and device."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            if (a := layer.attention) is not None:  # uneven groups (a pruned layer) keep a kv head per query head
                a.kv_cache = KVCache(batch, max_len or self.config.max_seq_len, a.n_kv if a.uniform_gqa else a.n_heads,
                                     self.config.head_dim, w.dtype, w.device)


def build(config, state):
    """A Transformer around existing tensors (no copy, no random init), frozen, in eval mode."""
    with torch.device("meta"):  # no memory for weights until the given tensors are assigned
        model = Transformer(config)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights do not fit the config: {str(e).splitlines()[1:2]}") from None
    w = state["tok_embeddings.weight"]
    device, dtype = w.device, torch.promote_types(w.dtype, torch.float32)
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    for i, layer in enumerate(model.layers):  # buffers made on the meta device hold no data
        if layer.attention is not None:
            layer.attention.kv_index = torch.tensor(config.kv_of_head[i], dtype=torch.long, device=device)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Generation (gpt-fast style): prefill the prompt once, then one token per forward from the KV cache

def prefill(model, tokens, adapter=None):
    """tokens [B, T] -> logits of the last position [B, vocab]; fills the cache from position 0."""
    return model(tokens, adapter, start_pos=0)[:, -1]


def decode_one_token(model, token, pos, adapter=None):
    """token [B, 1] at position pos -> logits [B, vocab]."""
    return model(token, adapter, start_pos=pos)[:, -1]


def compile_decoding(step=decode_one_token):
    """torch.compile the one-token step, as gpt-fast does: the small ops between the matrix products (norms,
    RoPE, SiLU, residual adds) fuse and Python's cost per op goes. One compile (a minute or two on a CPU) serves
    every position and cache length; a model of other shapes compiles again. Pass the result as `step=`."""
    return torch.compile(step, dynamic=True)


def sample(logits, temperature=0.0):
    """logits [B, vocab] -> next token [B, 1], left on the device (no sync per token)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial((logits.float() / temperature).softmax(-1), 1)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, adapter=None, temperature=0.0, eos_id=None, step=decode_one_token):
    """prompt: list of token ids -> list of new ids (batch 1). step: decode_one_token or compile_decoding()."""
    device = model.tok_embeddings.weight.device
    model.setup_cache(1, len(prompt) + max_new_tokens)
    logits = prefill(model, torch.tensor([prompt], device=device), adapter)
    out = []
    for i in range(max_new_tokens):
        out.append(int(sample(logits.float(), temperature)))
        if out[-1] == eos_id or i == max_new_tokens - 1:
            break
        logits = step(model, torch.tensor([[out[-1]]], device=device), len(prompt) + i, adapter)
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
    c = model.config
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
    z_hid = mask("z_hid", slice(None), c.dim)
    hid = z_hid.nonzero()[:, 0]  # kept hidden dims
    k, d, hd = len(hid), c.dim, c.head_dim
    norm = lambda w: w[hid] * math.sqrt(d / k)
    rows = lambda idx: torch.tensor([j * hd + t for j in idx for t in range(hd)], dtype=torch.long, device=dev)
    new, kv_of_head, ffn_dims = {}, [], []
    for i in range(c.n_layers):
        p = f"layers.{i}."
        z_head, z_int = mask("z_head", i, len(c.kv_of_head[i])), mask("z_int", i, c.ffn_dims[i])
        heads = z_head.nonzero()[:, 0].tolist()
        groups = sorted({c.kv_of_head[i][h] for h in heads})  # a kv head survives while one of its query heads does
        kv_of_head.append([groups.index(c.kv_of_head[i][h]) for h in heads])
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
    if c.tie_embeddings:  # the shared matrix now carries z_hid, which the lm_head must not see: undo it in the norm
        new["norm.weight"] = new["norm.weight"] / z_hid[hid]
    else:
        new["output.weight"] = sd["output.weight"][:, hid]
    small = ModelConfig(**{**asdict(c), "dim": k, "norm_eps": c.norm_eps * d / k,
                           "kv_of_head": kv_of_head, "ffn_dims": ffn_dims})
    return build(small, {key: v.to(model.tok_embeddings.weight.dtype).contiguous() for key, v in new.items()})
