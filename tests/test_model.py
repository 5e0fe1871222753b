"""Tests for model.py: masks, LoRA, KV cache, export slicing and the three checkpoint loaders.

Most tests build a tiny random model in float64 and compare two ways of computing the same thing to a
tight tolerance, so a wrong index, a wrong RoPE layout or a mask in the wrong place fails loudly.
The last few run the real SmolLM2-135M checkpoint and skip where it has not been downloaded.
"""
import copy
import dataclasses
import io
import json
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
from model import LoadError, ModelArgs, Transformer, generate

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Tiny random models and adapters

def tiny_args(**kw):
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=24, vocab_size=50,
                norm_eps=2.0 ** -16, rope_theta=500.0, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def make_model(args, seed=0, dtype=F64):
    """A frozen Transformer with random weights of a scale that keeps activations O(1) (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in Transformer(args).state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.3 * torch.randn(p.shape, generator=g)
        else:  # x1.5 so that attention is far from uniform
            state[name] = 1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
    return M.build(args, {k: v.to(dtype) for k, v in state.items()})  # RoPE tables in the weights' precision


def new_like(model, args, state):
    """A model with `args` holding a copy of `state` (all keys must fit), in the dtype of `model`."""
    return M.build(args, {k: v.to(model.tok_embeddings.weight.dtype).clone() for k, v in state.items()})


def tokens_for(args, B=2, T=7, seed=1):
    return torch.randint(0, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


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


def soft_masks(args, seed=3, dtype=F64):
    """Masks with values in (0.2, 1): every unit matters, so a mask applied in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.2 + 0.8 * torch.rand(*s, generator=g)).to(dtype)
    return {"z_head": r(args.n_layers, args.n_heads), "z_int": r(args.n_layers, args.ffn_dim), "z_hid": r(args.dim)}


def close(a, b, rtol, what=""):
    """Max abs difference relative to the scale of b."""
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


# ----------------------------------------------------------------------------------------------------
# Removing units by hand (written independently of model.slice_model)

def remove_heads(model, drop):
    """drop {layer: [query heads]} -> a smaller model; a kv head whose whole group is gone loses its rows."""
    a, hd = model.args, model.args.head_dim
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rows = lambda heads: [h * hd + t for h in heads for t in range(hd)]
    kv_of_head = []
    for i, old in enumerate(a.kv_of_head):
        keep = [h for h in range(len(old)) if h not in drop.get(i, ())]
        kv_used = sorted({old[h] for h in keep})
        kv_of_head.append([kv_used.index(old[h]) for h in keep])
        p = f"layers.{i}.attention."
        if keep:
            sd[p + "wq.weight"] = sd[p + "wq.weight"][rows(keep)]
            sd[p + "wk.weight"] = sd[p + "wk.weight"][rows(kv_used)]
            sd[p + "wv.weight"] = sd[p + "wv.weight"][rows(kv_used)]
            sd[p + "wo.weight"] = sd[p + "wo.weight"][:, rows(keep)]
        else:
            for w in ("wq", "wk", "wv", "wo"):
                del sd[p + w + ".weight"]
    return new_like(model, dataclasses.replace(a, kv_of_head=kv_of_head), sd)


def remove_units(model, drop):
    """drop {layer: [FFN units]}: rows of w1/w3 and columns of w2 go."""
    a = model.args
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ffn_dims = []
    for i, n in enumerate(a.ffn_dims):
        keep = [u for u in range(n) if u not in drop.get(i, ())]
        ffn_dims.append(len(keep))
        p = f"layers.{i}.feed_forward."
        for w in ("w1", "w3"):
            sd[p + w + ".weight"] = sd[p + w + ".weight"][keep]
        sd[p + "w2.weight"] = sd[p + "w2.weight"][:, keep]
        if not keep:
            for w in ("w1", "w2", "w3"):
                del sd[p + w + ".weight"]
    return new_like(model, dataclasses.replace(a, ffn_dims=ffn_dims), sd)


def remove_dims(model, drop):
    """Hidden dims removed everywhere; RMSNorm over k of d dims: weight * sqrt(d/k), eps * d/k (method.md)."""
    a = model.args
    keep = [j for j in range(a.dim) if j not in drop]
    d, k = a.dim, len(keep)
    sd = {}
    for key, v in model.state_dict().items():
        name = key.rsplit(".", 2)[-2] if key.startswith("layers.") else key.split(".")[0]
        if key.endswith("norm.weight"):
            sd[key] = v[keep] * math.sqrt(d / k)
        elif name in ("wq", "wk", "wv", "w1", "w3", "tok_embeddings", "output"):
            sd[key] = v[:, keep]  # the input side is the hidden size
        elif name in ("wo", "w2"):
            sd[key] = v[keep]  # the output side is the hidden size
        else:
            raise AssertionError(key)
    return new_like(model, dataclasses.replace(a, dim=k, norm_eps=a.norm_eps * d / k), sd)


# ----------------------------------------------------------------------------------------------------
# Masks (Eq. 1-2)

def test_all_ones_masks_equal_the_intact_model():
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    ones = {"z_head": torch.ones(2, 4, dtype=F64), "z_int": torch.ones(2, 24, dtype=F64), "z_hid": torch.ones(32, dtype=F64)}
    assert torch.equal(m(tok, ones), m(tok))
    assert torch.equal(m(tok, {}), m(tok))


@pytest.mark.parametrize("n_kv, drop, kv_left", [
    (4, {0: [1], 1: [0, 3]}, [3, 2]),  # multi-head attention: a head takes its k and v rows along
    (2, {0: [1], 1: [2]}, [2, 2]),  # GQA: one query head of a group, the kv head stays
    (2, {0: [0, 1], 1: [3]}, [1, 2]),  # GQA: a whole group goes, and with it kv head 0 of layer 0
    (2, {0: [0, 1, 2, 3]}, [0, 2]),  # every head of layer 0: no attention left in that layer
])
def test_zero_head_mask_equals_removing_the_head(n_kv, drop, kv_left):
    args = tiny_args(n_kv_heads=n_kv)
    m, tok = make_model(args), tokens_for(args)
    z_head = torch.ones(args.n_layers, args.n_heads, dtype=F64)
    for i, heads in drop.items():
        z_head[i, heads] = 0
    small = remove_heads(m, drop)
    for i, n in enumerate(kv_left):  # the smaller model really is smaller
        att = small.layers[i].attention
        assert (0 if att is None else att.wk.weight.shape[0] // args.head_dim) == n
    close(m(tok, {"z_head": z_head}), small(tok), 1e-12, "z_head = 0 vs head removed")
    assert (m(tok, {"z_head": z_head}) - m(tok)).abs().max() > 1e-2  # the mask did something


@pytest.mark.parametrize("drop", [{0: [0, 5, 23], 1: list(range(10))}, {1: list(range(24))}])
def test_zero_ffn_mask_equals_removing_the_units(drop):
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    z_int = torch.ones(args.n_layers, args.ffn_dim, dtype=F64)
    for i, units in drop.items():
        z_int[i, units] = 0
    small = remove_units(m, drop)
    assert small.args.ffn_dims == [args.ffn_dim - len(drop.get(i, [])) for i in range(args.n_layers)]
    close(m(tok, {"z_int": z_int}), small(tok), 1e-12, "z_int = 0 vs units removed")
    assert (m(tok, {"z_int": z_int}) - m(tok)).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_zero_hidden_mask_equals_removing_the_dims(tied):
    args = tiny_args(tie_embeddings=tied)
    m, tok = make_model(args), tokens_for(args)
    drop = [0, 3, 4, 17, 31]
    z_hid = torch.ones(args.dim, dtype=F64)
    z_hid[drop] = 0
    small = remove_dims(m, drop)
    close(m(tok, {"z_hid": z_hid}), small(tok), 1e-12, "z_hid = 0 vs dims removed")
    # dividing by k instead of the full d inside RMSNorm would be a different model
    wrong = copy.deepcopy(small)
    for mod in wrong.modules():
        if isinstance(mod, M.RMSNorm):
            mod.eps = args.norm_eps
            mod.weight.data /= math.sqrt(args.dim / (args.dim - len(drop)))
    assert (wrong(tok) - small(tok)).abs().max() > 1e-3


def test_hidden_mask_zeroes_the_hidden_states():
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    z_hid = torch.ones(args.dim, dtype=F64)
    z_hid[[2, 9]] = 0
    _, hidden = m(tok, {"z_hid": z_hid}, return_hidden=True)
    assert len(hidden) == args.n_layers
    for h in hidden:
        assert h.shape == (2, 7, args.dim) and h[..., [2, 9]].abs().max() == 0 and h.abs().max() > 0


def test_mask_gradients_flow_through_every_mask():
    args = tiny_args()
    m, tok = make_model(args, dtype=torch.float32).requires_grad_(False), tokens_for(args)
    masks = {k: v.float().requires_grad_() for k, v in soft_masks(args).items()}
    m(tok, masks).logsumexp(-1).sum().backward()
    for k, v in masks.items():
        assert v.grad is not None and (v.grad != 0).all(), k


# ----------------------------------------------------------------------------------------------------
# Grouped-query attention

def test_gqa_equals_mha_with_repeated_kv_heads():
    args = tiny_args(n_heads=6, n_kv_heads=2)
    m, tok = make_model(args), tokens_for(args)
    mha_args = tiny_args(n_heads=6, n_kv_heads=6)
    sd, hd = m.state_dict(), args.head_dim
    for i in range(args.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = torch.cat([sd[key][(h // 3) * hd:(h // 3 + 1) * hd] for h in range(6)])
    mha = new_like(m, mha_args, sd)
    close(m(tok), mha(tok), 1e-12, "GQA vs MHA")
    z_head = soft_masks(args)["z_head"]
    close(m(tok, {"z_head": z_head}), mha(tok, {"z_head": z_head}), 1e-12, "GQA vs MHA with head masks")


def test_kv_of_head_is_honoured_when_it_is_not_the_identity():
    """kv_of_head may name any kv head (ModelArgs' comment); here head 1 reads kv head 0, kv head 1 is unused."""
    args = tiny_args(n_heads=3, n_kv_heads=3, n_layers=1, kv_of_head=[[0, 0, 2]])
    m, tok = make_model(args), tokens_for(args)
    sd, hd = m.state_dict(), args.head_dim
    for w in ("wk", "wv"):  # the same model as MHA: kv head 1's rows replaced by kv head 0's
        key = f"layers.0.attention.{w}.weight"
        sd[key] = torch.cat([sd[key][:hd], sd[key][:hd], sd[key][2 * hd:]])
    mha = new_like(m, tiny_args(n_heads=3, n_kv_heads=3, n_layers=1), sd)
    close(m(tok), mha(tok), 1e-12, "kv_of_head [0, 0, 2]")


# ----------------------------------------------------------------------------------------------------
# An independent float64 reference: Meta-style RoPE on complex numbers, plain loops for attention

def reference_forward(model, tokens, adapter):
    """Logits and hidden states computed from the weights alone, without any code of model.py."""
    a = model.args
    W = {k: v.double() for k, v in model.state_dict().items()}
    Z = {k: (v.double() if torch.is_tensor(v) else v) for k, v in adapter.items()}
    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    z_head = Z.get("z_head", torch.ones(a.n_layers, H, dtype=F64))
    z_int = Z.get("z_int", torch.ones(a.n_layers, a.ffn_dim, dtype=F64))
    z_hid = Z.get("z_hid", torch.ones(a.dim, dtype=F64))

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        if name + ".lora_A" in Z:
            y = y + Z["lora_scale"] * ((x @ Z[name + ".lora_A"].T) @ Z[name + ".lora_B"].T)
        return y

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps) * w

    # The weights are in the rotate-half layout (dims i and i + hd/2 form a pair); Meta's code pairs
    # dims 2i and 2i+1. Moving the rows to Meta's layout leaves q.k unchanged, so we can rotate there.
    to_meta = [(j % 2) * (hd // 2) + j // 2 for j in range(hd)]
    freqs = 1.0 / a.rope_theta ** (torch.arange(0, hd, 2, dtype=F64) / hd)

    def rope(x):  # x [T, heads, hd]
        T = x.shape[0]
        xc = torch.view_as_complex(x[..., to_meta].reshape(T, x.shape[1], hd // 2, 2).contiguous())
        angle = torch.outer(torch.arange(T, dtype=F64), freqs)  # [T, hd/2]
        rot = torch.polar(torch.ones_like(angle), angle)
        return torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape)

    all_logits, all_hidden = [], []
    for seq in tokens.tolist():
        T = len(seq)
        h = W["tok_embeddings.weight"][seq] * z_hid
        hidden = []
        for l in range(a.n_layers):
            p = f"layers.{l}."
            x = rms(h, W[p + "attention_norm.weight"])
            q = rope(lin(x, p + "attention.wq").view(T, H, hd))
            k = rope(lin(x, p + "attention.wk").view(T, KV, hd))
            v = lin(x, p + "attention.wv").view(T, KV, hd)
            heads = []
            for hh in range(H):
                g = hh // (H // KV)  # query heads 0..H/KV-1 share kv head 0, and so on
                o = torch.zeros(T, hd, dtype=F64)
                for i in range(T):
                    s = torch.stack([q[i, hh] @ k[j, g] for j in range(i + 1)]) / math.sqrt(hd)
                    e = torch.exp(s - s.max())
                    o[i] = sum(e[j] / e.sum() * v[j, g] for j in range(i + 1))
                heads.append(o * z_head[l, hh])
            h = h + lin(torch.cat(heads, -1), p + "attention.wo") * z_hid
            x = rms(h, W[p + "ffn_norm.weight"])
            gate = lin(x, p + "feed_forward.w1")
            f = gate / (1 + torch.exp(-gate)) * lin(x, p + "feed_forward.w3") * z_int[l]
            h = h + lin(f, p + "feed_forward.w2") * z_hid
            hidden.append(h)
        out = W["output.weight"] if "output.weight" in W else W["tok_embeddings.weight"]
        all_logits.append(rms(h, W["norm.weight"]) @ out.T)
        all_hidden.append(hidden)
    return torch.stack(all_logits), [torch.stack([hs[l] for hs in all_hidden]) for l in range(a.n_layers)]


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_independent_reference(tied):
    args = tiny_args(n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    m, tok = make_model(args), tokens_for(args, B=2, T=9)
    adapter = {**soft_masks(args), **lora_adapter(m)}
    logits, hidden = m(tok, adapter, return_hidden=True)
    ref_logits, ref_hidden = reference_forward(m, tok, adapter)
    close(logits, ref_logits, 1e-10, "logits vs reference")
    for l in range(args.n_layers):
        close(hidden[l], ref_hidden[l], 1e-10, f"hidden state {l}")
    close(m(tok), reference_forward(m, tok, {})[0], 1e-10, "intact logits vs reference")


def test_rope_layout_is_rotate_half():
    """The position-0 query is not rotated; at position 1 dims (i, i + hd/2) rotate by angle theta^(-2i/hd)."""
    hd = 8
    cos, sin = M.rope_tables(hd, 4, 500.0)
    x = torch.randn(1, 4, 1, hd, dtype=F64)
    y = M.apply_rope(x, cos[:, None, :], sin[:, None, :])  # cos, sin [T, 1, hd/2]
    assert torch.allclose(y[0, 0], x[0, 0])
    ang = 1.0 / 500.0 ** (torch.arange(0, hd, 2, dtype=F64) / hd)
    x1, x2 = x[0, 1, 0, :4], x[0, 1, 0, 4:]
    expect = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()])
    assert torch.allclose(y[0, 1, 0], expect, atol=1e-6)


def test_too_long_sequence_raises():
    args = tiny_args(max_seq_len=8)
    with pytest.raises(ValueError):
        make_model(args)(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# LoRA (Eq. 4)

def test_lora_with_zero_B_changes_nothing():
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    assert torch.equal(m(tok, lora_adapter(m, zero_B=True)), m(tok))
    assert (m(tok, lora_adapter(m)) - m(tok)).abs().max() > 1e-2


def merged(model, adapter):
    """A copy of the model with W + scale * B @ A folded into each adapted weight."""
    out = copy.deepcopy(model)
    sd = out.state_dict()
    for key, A in adapter.items():
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            sd[name + ".weight"] += adapter["lora_scale"] * adapter[name + ".lora_B"] @ A
    out.load_state_dict(sd)
    return out


def test_lora_merged_equals_unmerged():
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    adapter = lora_adapter(m, scale=0.75)
    close(m(tok, adapter), merged(m, adapter)(tok), 1e-12, "merged vs unmerged LoRA")
    # only q and v, as in the pruning stage
    qv = lora_adapter(m, targets=[("attention", "wq"), ("attention", "wv")])
    close(m(tok, qv), merged(m, qv)(tok), 1e-12, "merged vs unmerged LoRA on q, v")


def test_switching_adapters_leaves_no_state_behind():
    args = tiny_args()
    m, tok = make_model(args), tokens_for(args)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    A = {**soft_masks(args, seed=5), **lora_adapter(m, seed=6)}
    B = {**soft_masks(args, seed=7), **lora_adapter(m, seed=8, scale=2.0)}
    fresh_A, fresh_B = copy.deepcopy(m)(tok, A), copy.deepcopy(m)(tok, B)
    a1, b1, a2, none = m(tok, A), m(tok, B), m(tok, A), m(tok)
    assert torch.equal(a1, fresh_A) and torch.equal(a2, fresh_A) and torch.equal(b1, fresh_B)
    assert torch.equal(none, copy.deepcopy(m)(tok))
    assert (a1 - b1).abs().max() > 1e-2
    close(a1, merged(m, A)(tok, {k: v for k, v in A.items() if k.startswith("z_")}), 1e-12, "adapter A vs merged A")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradients_reach_lora_and_masks_not_the_base_weights():
    args = tiny_args()
    m, tok = make_model(args, dtype=torch.float32).requires_grad_(False), tokens_for(args)
    adapter = {k: (v.requires_grad_() if torch.is_tensor(v) else v)
               for k, v in {**soft_masks(args, dtype=torch.float32), **lora_adapter(m)}.items()}
    F.cross_entropy(m(tok, adapter).flatten(0, 1), tok.roll(-1, 1).flatten()).backward()
    for k, v in adapter.items():
        if torch.is_tensor(v):
            assert v.grad is not None and v.grad.abs().max() > 0, k
    assert all(p.grad is None for p in m.parameters())


# ----------------------------------------------------------------------------------------------------
# KV cache and generation

def cached_logits(model, tok, chunks, adapter=None):
    """Runs tok [B, T] through the KV cache in chunks of the given lengths; returns the logits of all."""
    model.setup_cache(tok.shape[0], tok.shape[1] + 3)
    out, pos = [], 0
    for n in chunks:
        out.append(model(tok[:, pos:pos + n], adapter, start_pos=pos))
        pos += n
    assert pos == tok.shape[1]
    return torch.cat(out, 1)


UNEVEN = dict(n_layers=4, kv_of_head=[[0, 0, 1], [], [0], [0, 1, 1, 1]], ffn_dims=[24, 0, 7, 0])


@pytest.mark.parametrize("kind", ["intact", "masked", "uneven"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 4, 1, 2], [12]], ids=["one-by-one", "chunks", "prefill"])
def test_kv_cache_equals_full_forward(kind, chunks):
    args = tiny_args(**(UNEVEN if kind == "uneven" else {}))
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args, B=2, T=12)
    if kind == "uneven":  # layers 1 and 3 have no FFN, layer 1 no attention: they pass their input through
        assert m.layers[1].attention is None and m.layers[1].feed_forward is None and m.layers[3].feed_forward is None
    adapter = {**soft_masks(args, dtype=torch.float32), **lora_adapter(m)} if kind == "masked" else (
        lora_adapter(m) if kind == "uneven" else None)
    with torch.no_grad():
        full = m(tok, adapter)
        close(cached_logits(m, tok, chunks, adapter), full, 1e-5, f"{kind} {chunks}")


def test_kv_cache_of_a_smaller_batch_and_a_reused_cache():
    args = tiny_args()
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args, B=3, T=10)
    with torch.no_grad():
        m.setup_cache(4, 16)
        m(tokens_for(args, B=4, T=10, seed=9), start_pos=0)  # stale entries from an earlier prompt
        out = torch.cat([m(tok[:, :6], start_pos=0), m(tok[:, 6:], start_pos=6)], 1)
        close(out, m(tok), 1e-5, "batch 3 in a cache for 4, after another prompt")


def test_uneven_pruned_model_with_empty_layers_is_a_pass_through():
    args = tiny_args(n_layers=1, kv_of_head=[[]], ffn_dims=[0])
    m, tok = make_model(args), tokens_for(args)
    _, hidden = m(tok, return_hidden=True)
    assert torch.equal(hidden[0], m.tok_embeddings(tok))


def greedy_by_full_forward(model, prompt, n, adapter=None):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), adapter)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["intact", "masked", "uneven"])
def test_generate_greedy_equals_argmax_of_full_forwards(kind):
    args = tiny_args(**(UNEVEN if kind == "uneven" else {}))
    m = make_model(args, seed=4)
    adapter = {**soft_masks(args), **lora_adapter(m)} if kind == "masked" else None
    prompt = [3, 17, 5, 41, 8]
    with torch.no_grad():
        expect = greedy_by_full_forward(m, prompt, 10, adapter)
        assert generate(m, prompt, 10, adapter) == expect
        assert generate(m, prompt, 10, adapter, eos_id=expect[2]) == expect[:expect.index(expect[2]) + 1]
        assert generate(m, [7], 3, adapter) == greedy_by_full_forward(m, [7], 3, adapter)  # one-token prompt


def test_generate_with_temperature_samples_valid_tokens():
    args = tiny_args()
    m = make_model(args)
    torch.manual_seed(0)
    out = generate(m, [1, 2, 3], 20, temperature=1.0)
    assert len(out) == 20 and all(0 <= t < args.vocab_size for t in out)
    assert len(set(out)) > 1


# ----------------------------------------------------------------------------------------------------
# Export: slice_model must compute exactly what the masked model computes

@pytest.mark.skipif(not hasattr(M, "slice_model"), reason="model.slice_model not written yet")
@pytest.mark.parametrize("tied", [False, True])
def test_slice_model_equals_masked_model(tied):
    args = tiny_args(n_heads=6, n_kv_heads=3, n_layers=3, tie_embeddings=tied)
    m, tok = make_model(args), tokens_for(args)
    adapter = {**soft_masks(args), **lora_adapter(m)}
    adapter["z_head"][0, [0, 1]] = 0  # layer 0 loses kv group 0 entirely
    adapter["z_head"][1, [2, 5]] = 0  # layer 1 loses one head of two groups
    adapter["z_head"][2] = 0  # layer 2 has no attention left
    adapter["z_int"][1, :10] = 0
    adapter["z_int"][2] = 0
    adapter["z_hid"][[1, 5, 30]] = 0
    small = M.slice_model(m, adapter)
    assert small.args.dim == 29 and small.args.ffn_dims == [24, 14, 0]
    assert small.args.kv_of_head == [[0, 0, 1, 1], [0, 0, 1, 2], []]
    assert small.layers[0].attention.wk.weight.shape == (2 * args.head_dim, 29)
    assert small.layers[2].attention is None and small.layers[2].feed_forward is None
    close(small(tok), m(tok, adapter), 1e-12, "sliced vs masked")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in make_model(args).state_dict().items())  # untouched


@pytest.mark.skipif(not hasattr(M, "slice_model"), reason="model.slice_model not written yet")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_slice_model_keeps_the_dtype(dtype):
    args = tiny_args()
    m = make_model(args, dtype=dtype)
    assert M.slice_model(m, {"z_hid": torch.ones(args.dim)}).tok_embeddings.weight.dtype == dtype


# ----------------------------------------------------------------------------------------------------
# Checkpoint writers for the loader tests: Hugging Face, Meta, GGUF (each written from scratch here)

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
    sd, a = {k: v.clone() for k, v in model.state_dict().items()}, model.args
    for i in range(a.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = half_to_interleaved(sd[f"layers.{i}.attention.wq.weight"], a.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = half_to_interleaved(sd[f"layers.{i}.attention.wk.weight"], a.n_kv_heads)
    return sd


def hf_config_dict(a):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "intermediate_size": a.ffn_dim, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta, "tie_word_embeddings": a.tie_embeddings,
            "max_position_embeddings": a.max_seq_len, "torch_dtype": "float32"}


def write_hf(folder, model, shards=1, extra=None):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.args), f)
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
    a = model.args
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                   "multiple_of": 8, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "vocab_size": -1}, f)
    sd = to_interleaved_state(model)
    for s in range(shards):
        part = {"rope.freqs": torch.ones(a.head_dim // 2)}
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


def gguf_args(**kw):
    """Sizes that GGUF's 32-element blocks divide: every matrix's input dim is 64."""
    return tiny_args(**{**dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, vocab_size=len(GGUF_TOKENS),
                               max_seq_len=128), **kw})


def write_gguf(path, model, kind="F32", alignment=None, tokenizer_size=None, extra_kvs=()):
    """-> a copy of `model` holding exactly the weights the file decodes to (norms stay F32, as llama.cpp does)."""
    a = model.args
    kvs = [("general.architecture", STR, "llama"), ("general.name", STR, "tiny test"),
           ("llama.block_count", U32, a.n_layers), ("llama.context_length", U32, a.max_seq_len),
           ("llama.embedding_length", U32, a.dim), ("llama.feed_forward_length", U32, a.ffn_dim),
           ("llama.attention.head_count", U32, a.n_heads), ("llama.attention.head_count_kv", U32, a.n_kv_heads),
           ("llama.rope.freq_base", F32_, a.rope_theta), ("llama.rope.dimension_count", U32, a.head_dim),
           ("llama.attention.layer_norm_rms_epsilon", F32_, a.norm_eps)]
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
    for i in range(a.n_layers):
        for w, n in (("wq", a.n_heads), ("wk", a.n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            decoded[key] = interleaved_to_half_ref(decoded[key], n)
    return new_like(model, a, decoded)


# ----------------------------------------------------------------------------------------------------
# Loaders: write each layout, load it back, compare logits

@pytest.fixture
def fake_tokenizer(monkeypatch):
    """Stands in for data.load_tokenizer so loader tests check the weights alone; records its argument."""
    state = {"vocab_size": 0, "calls": []}

    def load_tokenizer(src):
        state["calls"].append(src)
        return types.SimpleNamespace(vocab_size=state["vocab_size"])

    fake = types.ModuleType("data")
    fake.load_tokenizer = load_tokenizer
    monkeypatch.setitem(sys.modules, "data", fake)
    return state


def assert_loaded(loaded, original, tok, exact=True):
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert loaded.args.kv_of_head == original.args.kv_of_head and loaded.args.ffn_dims == original.args.ffn_dims
    for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "tie_embeddings"):
        assert getattr(loaded.args, f) == getattr(original.args, f), f
    assert loaded.args.norm_eps == pytest.approx(original.args.norm_eps)
    assert loaded.args.rope_theta == original.args.rope_theta
    with torch.no_grad():
        got, want = loaded(tok), original(tok)
    if exact:
        assert torch.equal(got, want)
    else:
        close(got, want, 1e-6, "loaded vs original")


@pytest.mark.parametrize("tied, shards", [(False, 1), (True, 1), (False, 2), (True, 3)])
def test_load_hf_safetensors(tmp_path, fake_tokenizer, tied, shards):
    args = tiny_args(tie_embeddings=tied)
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    write_hf(tmp_path, m, shards=shards)
    a, state = M.read_hf(str(tmp_path))
    assert sorted(state) == sorted(m.state_dict())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())  # HF is already rotate-half
    loaded, tokenizer = M.load(str(tmp_path))
    assert fake_tokenizer["calls"] == [str(tmp_path)]
    assert_loaded(loaded, m, tok)
    bf, _ = M.load(str(tmp_path), dtype=torch.bfloat16, max_seq_len=16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters()) and bf.args.max_seq_len == 16
    assert bf.rope_cos.shape[0] == 16


def test_load_hf_pruned_model_with_uneven_layers(tmp_path, fake_tokenizer):
    """An exported (sliced) model: per-layer sizes travel in config.json (hf_config)."""
    from safetensors.torch import save_file
    args = tiny_args(**UNEVEN)
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(M.hf_config(args), f)
    save_file({external_name(k, TO_HF, "model.layers.{}."): v for k, v in m.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    loaded, _ = M.load(str(tmp_path))
    assert loaded.layers[1].attention is None and loaded.layers[3].feed_forward is None
    assert_loaded(loaded, m, tok)


def test_load_hf_ignores_stored_rotary_inv_freq(tmp_path, fake_tokenizer):
    """Older conversions (e.g. huggyllama/llama-7b) store self_attn.rotary_emb.inv_freq buffers."""
    args = tiny_args()
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
    write_hf(tmp_path, m, extra={f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone()
                                 for i in range(args.n_layers)})
    loaded, _ = M.load(str(tmp_path))
    assert_loaded(loaded, m, tok)


@pytest.mark.parametrize("shards", [1, 2])
def test_load_meta_pth(tmp_path, fake_tokenizer, shards):
    args = tiny_args()  # head_dim = dim / n_heads, as Meta's params.json implies
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    write_meta(tmp_path, m, shards=shards)
    a, state = M.read_meta(str(tmp_path))
    want = to_interleaved_state(m)  # read_meta returns Meta's layout; load() converts q/k
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], v) for k, v in want.items())
    assert M.interleaved_to_half(want["layers.0.attention.wq.weight"], 4).equal(m.layers[0].attention.wq.weight)
    loaded, _ = M.load(str(tmp_path))
    assert fake_tokenizer["calls"] == [str(tmp_path)]
    assert_loaded(loaded, m, tok)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_load_gguf(tmp_path, fake_tokenizer, kind):
    args = gguf_args(tie_embeddings=kind in ("F16", "Q4_1"))
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    path = str(tmp_path / "tiny.gguf")
    expected = write_gguf(path, m, kind, alignment=64 if kind == "Q4_0" else None)
    if kind == "F32":
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in expected.state_dict().items())
    else:  # the test really is about quantized weights
        err = (expected.layers[0].feed_forward.w1.weight - m.layers[0].feed_forward.w1.weight).abs().max()
        assert 0 < err < 0.2
    a, state, meta = M.read_gguf_model(path)
    assert meta["tokenizer.ggml.tokens"] == GGUF_TOKENS and meta["general.name"] == "tiny test"
    interleaved = to_interleaved_state(expected)
    assert sorted(state) == sorted(interleaved) and all(torch.equal(state[k], v) for k, v in interleaved.items())
    loaded, _ = M.load(path)
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
        got = M.dequantize(np.frombuffer(blocks, np.uint8), kind, 96)
        assert len(blocks) == 3 * nbytes and np.array_equal(got, np.array(want, np.float32)), kind
    x = rng.standard_normal(64).astype(np.float32)
    assert np.array_equal(M.dequantize(np.frombuffer(x.tobytes(), np.uint8), "F32", 64), x)
    assert np.array_equal(M.dequantize(np.frombuffer(x.astype(np.float16).tobytes(), np.uint8), "F16", 64),
                          x.astype(np.float16).astype(np.float32))
    bf = np.frombuffer(struct.pack("<4H", 0x3F80, 0xC000, 0x4049, 0x0000), np.uint8)  # 1, -2, 3.140625, 0
    assert M.dequantize(bf, "BF16", 4).tolist() == [1.0, -2.0, 3.140625, 0.0]


def test_quantizer_round_trip_is_close():
    """Our writer's quantizers against the data: a 4-bit block is within half a step of the input."""
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for kind, step in (("Q8_0", 1 / 127), ("Q4_0", 1 / 8), ("Q4_1", 2 / 15)):
        raw, deq = quantize(x, kind)
        b, dq = x.reshape(-1, 32), deq.reshape(-1, 32)
        scale = np.abs(b).max(1, keepdims=True) if kind != "Q4_1" else b.max(1, keepdims=True) - b.min(1, keepdims=True)
        assert (np.abs(b - dq) <= step * scale * 1.01 + 1e-3).all(), kind
        assert np.array_equal(M.dequantize(np.frombuffer(raw, np.uint8), kind, x.size).reshape(x.shape), deq)


def test_read_gguf_metadata_types(tmp_path):
    kvs = [("a.u8", U8, 200), ("a.i8", I8, -3), ("a.u16", U16, 60000), ("a.i16", I16, -300), ("a.u32", U32, 4_000_000_000),
           ("a.i32", I32, -70000), ("a.f32", F32_, 0.5), ("a.bool", BOOL, True), ("a.str", STR, "héllo"),
           ("a.u64", U64, 2 ** 40), ("a.i64", I64, -(2 ** 40)), ("a.f64", F64_, 0.1),
           ("a.arr_i32", ARR, (I32, [1, -2, 3])), ("a.arr_str", ARR, (STR, ["x", "", "ÿz"])),
           ("a.arr_f32", ARR, (F32_, [0.25, 1.5])), ("a.arr_arr", ARR, (ARR, [(U8, [1, 2]), (U8, [])]))]
    path = tmp_path / "meta.gguf"
    path.write_bytes(gguf_bytes(kvs, []))
    meta, tensors = M.read_gguf(str(path))
    assert tensors == {}
    want = {k: v for k, _, v in kvs}
    want.update({"a.arr_i32": [1, -2, 3], "a.arr_str": ["x", "", "ÿz"], "a.arr_f32": [0.25, 1.5],
                 "a.arr_arr": [[1, 2], []]})
    assert meta == want


# ----------------------------------------------------------------------------------------------------
# Bad checkpoints raise LoadError (one line for the command line), never a traceback from deep inside

def test_load_errors_missing_and_empty(tmp_path, fake_tokenizer):
    with pytest.raises(LoadError):
        M.load(str(tmp_path / "nope"))
    with pytest.raises(LoadError):  # a folder with nothing in it
        M.load(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError):  # a file that is neither a folder nor a GGUF
        M.load(str(tmp_path / "notes.txt"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(tiny_args())))
    with pytest.raises(LoadError):  # config.json but no weights
        M.load(str(hf))
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(LoadError):  # params.json but no consolidated.*.pth
        M.load(str(meta))


def test_load_error_truncated_safetensors(tmp_path, fake_tokenizer):
    m = make_model(tiny_args(), dtype=torch.float32)
    write_hf(tmp_path, m)
    f = tmp_path / "model.safetensors"
    full = f.read_bytes()
    for cut in (len(full) // 2, len(full) - 1, 100, 5):
        f.write_bytes(full[:cut])
        with pytest.raises(LoadError):
            M.load(str(tmp_path))


def test_load_error_weights_that_do_not_fit_the_config(tmp_path, fake_tokenizer):
    m = make_model(tiny_args(), dtype=torch.float32)
    write_hf(tmp_path, m)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 30
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError):
        M.load(str(tmp_path))


def test_load_error_truncated_gguf(tmp_path, fake_tokenizer):
    args = gguf_args()
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(args, dtype=torch.float32), "Q8_0")
    full = path.read_bytes()
    header_end = full.index(b"blk.0.attn_q") - 8  # somewhere inside the tensor infos
    # cut everywhere in the first bytes, every few bytes through the metadata (strings, string arrays,
    # the int32 token_type array), inside the tensor infos and inside the data
    cuts = list(range(0, 64)) + list(range(64, header_end + 400, 3)) + [len(full) - 1, len(full) - 4000]
    for cut in cuts:
        path.write_bytes(full[:cut])
        try:
            M.load(str(path))
        except LoadError:
            continue
        except Exception as e:  # noqa: BLE001 - the point is which exception
            raise AssertionError(f"GGUF cut at byte {cut} of {len(full)}: {type(e).__name__}: {e}") from None
        raise AssertionError(f"GGUF cut at byte {cut} of {len(full)} loaded without error")


def test_load_error_unsupported_gguf(tmp_path, fake_tokenizer):
    args = gguf_args()
    path = tmp_path / "t.gguf"
    write_gguf(str(path), make_model(args, dtype=torch.float32), "Q8_0")
    full = bytearray(path.read_bytes())
    # ggml type 12 is Q4_K (a k-quant): patch the type of the first tensor (just after its 2 dims)
    name = full.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    assert struct.unpack_from("<I", full, name + 4 + 16)[0] == 8
    struct.pack_into("<I", full, name + 4 + 16, 12)
    path.write_bytes(bytes(full))
    with pytest.raises(LoadError, match="12"):
        M.load(str(path))
    gpt2 = tmp_path / "gpt2.gguf"  # an architecture we do not run
    gpt2.write_bytes(gguf_bytes([("general.architecture", STR, "gpt2")], []))
    with pytest.raises(LoadError):
        M.load(str(gpt2))
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(LoadError):
        M.load(str(v1))


def test_load_error_tokenizer_larger_than_embedding(tmp_path, fake_tokenizer):
    m = make_model(tiny_args(), dtype=torch.float32)
    write_hf(tmp_path, m)
    fake_tokenizer["vocab_size"] = 50
    M.load(str(tmp_path))  # the same size is fine (smaller is fine too: padded embeddings)
    fake_tokenizer["vocab_size"] = 51
    with pytest.raises(LoadError, match="51"):
        M.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# Loaders with the real tokenizer code (data.load_tokenizer)

def data_module():
    try:
        import data
    except ImportError as e:
        pytest.skip(f"data.py cannot be imported ({e})")
    if not hasattr(data, "load_tokenizer"):
        pytest.skip("data.load_tokenizer not written yet")
    return data


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
    data_module()
    args = tiny_args(vocab_size=64)
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    (write_hf if layout == "hf" else write_meta)(tmp_path, m)
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    loaded, tokenizer = M.load(str(tmp_path))
    assert tokenizer.vocab_size == 60
    ids = tokenizer.encode("the quick fox")
    assert ids and max(ids) < 60 and tokenizer.decode(ids) == "the quick fox"
    assert_loaded(loaded, m, tok)


def test_load_error_real_tokenizer_larger_than_embedding(tmp_path, sp_model_bytes):
    data_module()
    write_hf(tmp_path, make_model(tiny_args(vocab_size=59), dtype=torch.float32))
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    with pytest.raises(LoadError):
        M.load(str(tmp_path))


def test_load_gguf_with_its_tokenizer(tmp_path):
    data_module()
    args = gguf_args(vocab_size=len(GGUF_TOKENS) + 2)  # embedding padded past the vocabulary
    m, tok = make_model(args, dtype=torch.float32), tokens_for(args)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, m, "F32")
    loaded, tokenizer = M.load(path)
    assert tokenizer.vocab_size == len(GGUF_TOKENS)
    the = GGUF_TOKENS.index("Ġthe")
    assert tokenizer.encode(" the") == [the] and tokenizer.decode([the]) == " the"
    assert_loaded(loaded, m, tok)
    small = tmp_path / "small.gguf"  # tokenizer with more tokens than the embedding has rows
    write_gguf(str(small), m, "F32", tokenizer_size=len(GGUF_TOKENS) + 3)
    with pytest.raises(LoadError):
        M.load(str(small))


# ----------------------------------------------------------------------------------------------------
# The real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF, grouped-query attention, tied embeddings)

SENTENCE_TEXT = "The capital of France is Paris, and the capital of Germany is Berlin. The largest city in the world is"
SENTENCE = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ",", "Ġand", "Ġthe", "Ġcapital", "Ġof",
            "ĠGermany", "Ġis", "ĠBerlin", ".", "ĠThe", "Ġlargest", "Ġcity", "Ġin", "Ġthe", "Ġworld", "Ġis"]


@pytest.fixture(scope="module")
def smollm(smollm_path):
    """(model fp32, tokenizer or None, GGUF vocabulary): load() with data.py's tokenizer when it exists."""
    try:
        import data
        real_tokenizer = hasattr(data, "load_tokenizer")
    except ImportError:
        real_tokenizer = False
    with pytest.MonkeyPatch.context() as mp:
        if not real_tokenizer:
            fake = types.ModuleType("data")
            fake.load_tokenizer = lambda src: types.SimpleNamespace(vocab_size=len(src["tokenizer.ggml.tokens"]))
            mp.setitem(sys.modules, "data", fake)
        model, tokenizer = M.load(smollm_path)
    vocab = M.read_gguf(smollm_path, tensors=False)[0]["tokenizer.ggml.tokens"]
    return model, (tokenizer if real_tokenizer else None), vocab


def test_real_model_says_paris(smollm):
    model, tokenizer, vocab = smollm
    prompt = [vocab.index(t) for t in SENTENCE[:5]]  # "The capital of France is"
    assert model.args.n_kv_heads == 3 and model.args.tie_embeddings
    out = generate(model, prompt, 3)
    assert vocab[out[0]] == "ĠParis", [vocab[t] for t in out]
    if tokenizer is not None:
        assert tokenizer.encode("The capital of France is") == prompt
        assert tokenizer.decode(out).startswith(" Paris")
        assert tokenizer.encode(SENTENCE_TEXT) == [vocab.index(t) for t in SENTENCE]


def test_real_model_perplexity_and_rope_layout(smollm):
    """Next-token loss on a plain sentence: low with the right RoPE layout, much higher with the wrong one."""
    model, _, vocab = smollm
    ids = torch.tensor([[vocab.index(t) for t in SENTENCE]])
    with torch.no_grad():
        loss = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
        sd = model.state_dict()  # the same tensors, except q/k rows left in GGUF's interleaved layout
        for key in sd:
            if key.endswith(("wq.weight", "wk.weight")):
                sd[key] = half_to_interleaved(sd[key], 9 if "wq" in key else 3)
        wrong = M.build(model.args, sd)
        wrong_loss = F.cross_entropy(wrong(ids)[0, :-1], ids[0, 1:]).item()
    assert math.exp(loss) < 8, math.exp(loss)  # 6.5 seen with the correct loader
    assert wrong_loss > loss + 0.3, (loss, wrong_loss)


def test_real_model_bf16_agrees_with_fp32(smollm):
    model, _, vocab = smollm
    ids = torch.tensor([[vocab.index(t) for t in SENTENCE]])
    bf16 = M.build(model.args, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    with torch.no_grad():
        lp32 = model(ids).float().log_softmax(-1)
        lp16 = bf16(ids).float().log_softmax(-1)
    kl = (lp32.exp() * (lp32 - lp16)).sum(-1).mean().item()
    agree = (lp32.argmax(-1) == lp16.argmax(-1)).float().mean().item()
    assert kl < 0.02 and agree >= 0.9, (kl, agree)


def test_real_model_kv_cache_equals_full_forward(smollm):
    model, _, vocab = smollm
    ids = torch.tensor([[vocab.index(t) for t in SENTENCE]])
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(1, ids.shape[1])
        steps = [model(ids[:, :10], start_pos=0), model(ids[:, 10:16], start_pos=10)]
        steps += [model(ids[:, p:p + 1], start_pos=p) for p in range(16, ids.shape[1])]
    close(torch.cat(steps, 1), full, 1e-4, "real model: cache vs full")
