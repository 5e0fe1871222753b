"""Tests for model.py: masks, LoRA, KV cache, generation and export slicing.

Most tests build a tiny random model in float64 and compare two ways of computing the same thing to a
tight tolerance, so a wrong index, a wrong RoPE layout or a mask in the wrong place fails loudly.
The last few run the real SmolLM2-135M checkpoint and skip where it has not been downloaded.
"""
import copy
import dataclasses
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
import masks
import model as M
from conftest import ROOT
from helpers import (F64, SENTENCE, SENTENCE_TEXT, close, half_to_interleaved, lora_adapter, make_model, new_like,
                     soft_masks, tiny_config, tokens_for)
from model import generate


# ----------------------------------------------------------------------------------------------------
# Removing units by hand (written independently of model.slice_model)

def remove_heads(model, drop):
    """drop {layer: [query heads]} -> a smaller model; a kv head whose whole group is gone loses its rows."""
    c, hd = model.config, model.config.head_dim
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rows = lambda heads: [h * hd + t for h in heads for t in range(hd)]
    kv_of_head = []
    for i, old in enumerate(c.kv_of_head):
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
    return new_like(model, dataclasses.replace(c, kv_of_head=kv_of_head), sd)


def remove_units(model, drop):
    """drop {layer: [FFN units]}: rows of w1/w3 and columns of w2 go."""
    c = model.config
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ffn_dims = []
    for i, n in enumerate(c.ffn_dims):
        keep = [u for u in range(n) if u not in drop.get(i, ())]
        ffn_dims.append(len(keep))
        p = f"layers.{i}.feed_forward."
        for w in ("w1", "w3"):
            sd[p + w + ".weight"] = sd[p + w + ".weight"][keep]
        sd[p + "w2.weight"] = sd[p + "w2.weight"][:, keep]
        if not keep:
            for w in ("w1", "w2", "w3"):
                del sd[p + w + ".weight"]
    return new_like(model, dataclasses.replace(c, ffn_dims=ffn_dims), sd)


def remove_dims(model, drop):
    """Hidden dims removed everywhere; RMSNorm over k of d dims: weight * sqrt(d/k), eps * d/k (method.md)."""
    c = model.config
    keep = [j for j in range(c.dim) if j not in drop]
    d, k = c.dim, len(keep)
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
    return new_like(model, dataclasses.replace(c, dim=k, norm_eps=c.norm_eps * d / k), sd)


# ----------------------------------------------------------------------------------------------------
# Masks (Eq. 1-2)

def test_all_ones_masks_equal_the_intact_model():
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
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
    config = tiny_config(n_kv_heads=n_kv)
    m, tok = make_model(config), tokens_for(config)
    z_head = torch.ones(config.n_layers, config.n_heads, dtype=F64)
    for i, heads in drop.items():
        z_head[i, heads] = 0
    small = remove_heads(m, drop)
    for i, n in enumerate(kv_left):  # the smaller model really is smaller
        att = small.layers[i].attention
        assert (0 if att is None else att.wk.weight.shape[0] // config.head_dim) == n
    close(m(tok, {"z_head": z_head}), small(tok), 1e-12, "z_head = 0 vs head removed")
    assert (m(tok, {"z_head": z_head}) - m(tok)).abs().max() > 1e-2  # the mask did something


@pytest.mark.parametrize("drop", [{0: [0, 5, 23], 1: list(range(10))}, {1: list(range(24))}])
def test_zero_ffn_mask_equals_removing_the_units(drop):
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    z_int = torch.ones(config.n_layers, config.ffn_dim, dtype=F64)
    for i, units in drop.items():
        z_int[i, units] = 0
    small = remove_units(m, drop)
    assert small.config.ffn_dims == [config.ffn_dim - len(drop.get(i, [])) for i in range(config.n_layers)]
    close(m(tok, {"z_int": z_int}), small(tok), 1e-12, "z_int = 0 vs units removed")
    assert (m(tok, {"z_int": z_int}) - m(tok)).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_zero_hidden_mask_equals_removing_the_dims(tied):
    config = tiny_config(tie_embeddings=tied)
    m, tok = make_model(config), tokens_for(config)
    drop = [0, 3, 4, 17, 31]
    z_hid = torch.ones(config.dim, dtype=F64)
    z_hid[drop] = 0
    small = remove_dims(m, drop)
    close(m(tok, {"z_hid": z_hid}), small(tok), 1e-12, "z_hid = 0 vs dims removed")
    # dividing by k instead of the full d inside RMSNorm would be a different model
    wrong = copy.deepcopy(small)
    for mod in wrong.modules():
        if isinstance(mod, M.RMSNorm):
            mod.eps = config.norm_eps
            mod.weight.data /= math.sqrt(config.dim / (config.dim - len(drop)))
    assert (wrong(tok) - small(tok)).abs().max() > 1e-3


def test_hidden_mask_zeroes_the_hidden_states():
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    z_hid = torch.ones(config.dim, dtype=F64)
    z_hid[[2, 9]] = 0
    _, hidden = m(tok, {"z_hid": z_hid}, return_hidden=True)
    assert len(hidden) == config.n_layers
    for h in hidden:
        assert h.shape == (2, 7, config.dim) and h[..., [2, 9]].abs().max() == 0 and h.abs().max() > 0


def test_mask_gradients_flow_through_every_mask():
    config = tiny_config()
    m, tok = make_model(config, dtype=torch.float32).requires_grad_(False), tokens_for(config)
    masks = {k: v.float().requires_grad_() for k, v in soft_masks(config).items()}
    m(tok, masks).logsumexp(-1).sum().backward()
    for k, v in masks.items():
        assert v.grad is not None and (v.grad != 0).all(), k


# ----------------------------------------------------------------------------------------------------
# Grouped-query attention

def test_gqa_equals_mha_with_repeated_kv_heads():
    config = tiny_config(n_heads=6, n_kv_heads=2)
    m, tok = make_model(config), tokens_for(config)
    mha_args = tiny_config(n_heads=6, n_kv_heads=6)
    sd, hd = m.state_dict(), config.head_dim
    for i in range(config.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = torch.cat([sd[key][(h // 3) * hd:(h // 3 + 1) * hd] for h in range(6)])
    mha = new_like(m, mha_args, sd)
    close(m(tok), mha(tok), 1e-12, "GQA vs MHA")
    z_head = soft_masks(config)["z_head"]
    close(m(tok, {"z_head": z_head}), mha(tok, {"z_head": z_head}), 1e-12, "GQA vs MHA with head masks")


def test_kv_of_head_is_honoured_when_it_is_not_the_identity():
    """kv_of_head may name any kv head (ModelConfig's comment); here head 1 reads kv head 0, kv head 1 is unused."""
    config = tiny_config(n_heads=3, n_kv_heads=3, n_layers=1, kv_of_head=[[0, 0, 2]])
    m, tok = make_model(config), tokens_for(config)
    sd, hd = m.state_dict(), config.head_dim
    for w in ("wk", "wv"):  # the same model as MHA: kv head 1's rows replaced by kv head 0's
        key = f"layers.0.attention.{w}.weight"
        sd[key] = torch.cat([sd[key][:hd], sd[key][:hd], sd[key][2 * hd:]])
    mha = new_like(m, tiny_config(n_heads=3, n_kv_heads=3, n_layers=1), sd)
    close(m(tok), mha(tok), 1e-12, "kv_of_head [0, 0, 2]")


# ----------------------------------------------------------------------------------------------------
# An independent float64 reference: Meta-style RoPE on complex numbers, plain loops for attention

def reference_forward(model, tokens, adapter):
    """Logits and hidden states computed from the weights alone, without any code of model.py."""
    c = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    Z = {k: (v.double() if torch.is_tensor(v) else v) for k, v in adapter.items()}
    H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
    z_head = Z.get("z_head", torch.ones(c.n_layers, H, dtype=F64))
    z_int = Z.get("z_int", torch.ones(c.n_layers, c.ffn_dim, dtype=F64))
    z_hid = Z.get("z_hid", torch.ones(c.dim, dtype=F64))

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        if name + ".lora_A" in Z:
            y = y + Z["lora_scale"] * ((x @ Z[name + ".lora_A"].T) @ Z[name + ".lora_B"].T)
        return y

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w

    # The weights are in the rotate-half layout (dims i and i + hd/2 form a pair); Meta's code pairs
    # dims 2i and 2i+1. Moving the rows to Meta's layout leaves q.k unchanged, so we can rotate there.
    to_meta = [(j % 2) * (hd // 2) + j // 2 for j in range(hd)]
    freqs = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, dtype=F64) / hd)

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
        for l in range(c.n_layers):
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
        hidden[-1] = rms(h, W["norm.weight"])  # Hugging Face's hidden_states[1:]: the last one after the norm
        out = W["output.weight"] if "output.weight" in W else W["tok_embeddings.weight"]
        all_logits.append(hidden[-1] @ out.T)
        all_hidden.append(hidden)
    return torch.stack(all_logits), [torch.stack([hs[l] for hs in all_hidden]) for l in range(c.n_layers)]


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_independent_reference(tied):
    config = tiny_config(n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    m, tok = make_model(config), tokens_for(config, B=2, T=9)
    adapter = {**soft_masks(config), **lora_adapter(m)}
    logits, hidden = m(tok, adapter, return_hidden=True)
    ref_logits, ref_hidden = reference_forward(m, tok, adapter)
    close(logits, ref_logits, 1e-10, "logits vs reference")
    for l in range(config.n_layers):
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
    config = tiny_config(max_seq_len=8)
    with pytest.raises(ValueError):
        make_model(config)(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# LoRA (Eq. 4)

def test_lora_with_zero_B_changes_nothing():
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
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
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    adapter = lora_adapter(m, scale=0.75)
    close(m(tok, adapter), merged(m, adapter)(tok), 1e-12, "merged vs unmerged LoRA")
    # only q and v, as in the pruning stage
    qv = lora_adapter(m, targets=[("attention", "wq"), ("attention", "wv")])
    close(m(tok, qv), merged(m, qv)(tok), 1e-12, "merged vs unmerged LoRA on q, v")


def test_switching_adapters_leaves_no_state_behind():
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    A = {**soft_masks(config, seed=5), **lora_adapter(m, seed=6)}
    B = {**soft_masks(config, seed=7), **lora_adapter(m, seed=8, scale=2.0)}
    fresh_A, fresh_B = copy.deepcopy(m)(tok, A), copy.deepcopy(m)(tok, B)
    a1, b1, a2, none = m(tok, A), m(tok, B), m(tok, A), m(tok)
    assert torch.equal(a1, fresh_A) and torch.equal(a2, fresh_A) and torch.equal(b1, fresh_B)
    assert torch.equal(none, copy.deepcopy(m)(tok))
    assert (a1 - b1).abs().max() > 1e-2
    close(a1, merged(m, A)(tok, {k: v for k, v in A.items() if k.startswith("z_")}), 1e-12, "adapter A vs merged A")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradients_reach_lora_and_masks_not_the_base_weights():
    config = tiny_config()
    m, tok = make_model(config, dtype=torch.float32).requires_grad_(False), tokens_for(config)
    adapter = {k: (v.requires_grad_() if torch.is_tensor(v) else v)
               for k, v in {**soft_masks(config, dtype=torch.float32), **lora_adapter(m)}.items()}
    F.cross_entropy(m(tok, adapter).flatten(0, 1), tok.roll(-1, 1).flatten()).backward()
    for k, v in adapter.items():
        if torch.is_tensor(v):
            assert v.grad is not None and v.grad.abs().max() > 0, k
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("layout", ["multi-head", "grouped-query", "permuted"])
def test_skipping_zero_masked_units_gives_the_same_outputs_and_gradients(layout):
    """kept_units: the units whose sampled mask is exactly 0 are left out of the products (a layer losing every
    head or unit included). Float64: the logits, states and the gradients of log_alpha (through Eq. 10's clamp)
    and of LoRA on all seven projections are those of the full products, and the products cost fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    kv_of_head = {"multi-head": None, "grouped-query": None, "permuted": [[1, 0, 3, 2], [0, 0, 1, 1], [1, 1, 0, 0]]}
    config = tiny_config(n_layers=3, n_kv_heads=2 if layout == "grouped-query" else 4, kv_of_head=kv_of_head[layout])
    m, tok = make_model(config), tokens_for(config)
    log_alpha = {k: v.double() for k, v in masks.init_log_alpha(config, torch.Generator().manual_seed(0)).items()}
    log_alpha["z_head"][0, 1:3] = log_alpha["z_head"][1] = -30.0  # z = 0: two heads of layer 0, all of layer 1
    log_alpha["z_int"][0, ::2] = log_alpha["z_int"][2] = -30.0  # half the units of layer 0, all of layer 2
    log_alpha = {k: v.requires_grad_() for k, v in log_alpha.items()}
    lora = {k: (v.requires_grad_() if torch.is_tensor(v) else v) for k, v in lora_adapter(m).items()}
    runs = []
    for skip in (False, True):
        m.skip_zeros = skip
        z = {k: masks.sample_z(v, torch.Generator().manual_seed(1)) for k, v in log_alpha.items()}
        with FlopCounterMode(display=False) as flops:
            logits, hidden = m(tok, {**z, **lora}, return_hidden=True)
            (logits.logsumexp(-1).mean() + sum(h.square().mean() for h in hidden)).backward()
        runs.append({"logits": logits.detach(), **{f"state {i}": h.detach() for i, h in enumerate(hidden)},
                     **{k: v.grad.clone() for k, v in {**log_alpha, **lora}.items() if torch.is_tensor(v)},
                     "flops": flops.get_total_flops()})
        for v in (*log_alpha.values(), *lora.values()):
            if torch.is_tensor(v):
                v.grad = None
    assert (z["z_head"][1] == 0).all() and (z["z_int"][2] == 0).all() and (z["z_int"][0] != 0).sum() <= 12
    assert runs[1].pop("flops") < 0.8 * runs[0].pop("flops")
    z = torch.ones(2, 20)
    z[0, 0], z[1, [3, 7]] = 0, 0  # 5% and 10% of a layer's units: below MIN_SKIP all are kept, from it on not
    assert kernels.MIN_SKIP == 0.1 and [None if k is None else k.tolist() for k in M.kept_units(z)] == [None, [
        i for i in range(20) if i not in (3, 7)]]
    assert M.kept_units(z, 0.15) == [None, None]
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-12, atol=1e-13, msg=k)


def test_compiled_blocks_give_the_same_states_and_gradients():
    """nute.py --compile: every block through one torch.compile'd graph gives the eager model's logits,
    states and mask / LoRA gradients (float64: fusing reorders only rounding); decoding stays eager."""
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    adapter = {k: (v.requires_grad_() if torch.is_tensor(v) else v)
               for k, v in {**soft_masks(config), **lora_adapter(m)}.items()}
    torch._dynamo.reset()  # graphs compiled by earlier tests (other shapes) would add recompiles to the count
    runs, graphs = [], torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for flag in (False, True):
        m.compile_blocks = flag
        logits, hidden = m(tok, adapter, return_hidden=True)
        (logits.square().mean() + sum(h.square().mean() for h in hidden)).backward()
        runs.append({"logits": logits.detach(), **{f"state {i}": h.detach() for i, h in enumerate(hidden)},
                     **{k: v.grad.clone() for k, v in adapter.items() if torch.is_tensor(v)}})
        for v in adapter.values():
            if torch.is_tensor(v):
                v.grad = None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph for all the blocks
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-10, atol=1e-12, msg=k)
    ids = generate(m, tok[0, :3].tolist(), 4)  # still compile_blocks: the KV-cached path stays eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    m.compile_blocks = False
    assert ids == generate(m, tok[0, :3].tolist(), 4)


def test_activation_checkpointing_gives_the_same_gradients():
    """--grad-checkpoint recomputes each block in backward: the same masks' and LoRA's gradients (float64;
    the recomputation repeats the same ops, so they agree to rounding), and only where a graph is built."""
    config = tiny_config()
    m, tok = make_model(config), tokens_for(config)
    adapter = {k: (v.requires_grad_() if torch.is_tensor(v) else v)
               for k, v in {**soft_masks(config), **lora_adapter(m)}.items()}
    grads = []
    for flag in (False, True):
        m.grad_checkpoint = flag
        logits, hidden = m(tok, adapter, return_hidden=True)
        (logits.square().mean() + sum(h.square().mean() for h in hidden)).backward()  # the layer loss's states too
        grads.append({k: v.grad.clone() for k, v in adapter.items() if torch.is_tensor(v)})
        for v in grads[-1]:
            adapter[v].grad = None
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-12, atol=1e-14, msg=k)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        m(tok, adapter).sum()
    m.grad_checkpoint = False
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        m(tok, adapter).sum()
    kept, full = sum(n for n in saved if n > 0), -sum(n for n in saved if n < 0)
    assert kept < full / 2, (kept, full)  # fewer activations held for backward


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
    config = tiny_config(**(UNEVEN if kind == "uneven" else {}))
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config, B=2, T=12)
    if kind == "uneven":  # layers 1 and 3 have no FFN, layer 1 no attention: they pass their input through
        assert m.layers[1].attention is None and m.layers[1].feed_forward is None and m.layers[3].feed_forward is None
    adapter = {**soft_masks(config, dtype=torch.float32), **lora_adapter(m)} if kind == "masked" else (
        lora_adapter(m) if kind == "uneven" else None)
    with torch.no_grad():
        full = m(tok, adapter)
        close(cached_logits(m, tok, chunks, adapter), full, 1e-5, f"{kind} {chunks}")


def test_kv_cache_of_a_smaller_batch_and_a_reused_cache():
    config = tiny_config()
    m, tok = make_model(config, dtype=torch.float32), tokens_for(config, B=3, T=10)
    with torch.no_grad():
        m.setup_cache(4, 16)
        m(tokens_for(config, B=4, T=10, seed=9), start_pos=0)  # stale entries from an earlier prompt
        out = torch.cat([m(tok[:, :6], start_pos=0), m(tok[:, 6:], start_pos=6)], 1)
        close(out, m(tok), 1e-5, "batch 3 in a cache for 4, after another prompt")


def test_uneven_pruned_model_with_empty_layers_is_a_pass_through():
    config = tiny_config(n_layers=2, kv_of_head=[[], []], ffn_dims=[0, 0])
    m, tok = make_model(config), tokens_for(config)
    _, hidden = m(tok, return_hidden=True)
    assert torch.equal(hidden[0], m.tok_embeddings(tok)) and torch.equal(hidden[1], m.norm(hidden[0]))


def greedy_by_full_forward(model, prompt, n, adapter=None):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), adapter)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["intact", "masked", "uneven"])
def test_generate_greedy_equals_argmax_of_full_forwards(kind):
    config = tiny_config(**(UNEVEN if kind == "uneven" else {}))
    m = make_model(config, seed=4)
    adapter = {**soft_masks(config), **lora_adapter(m)} if kind == "masked" else None
    prompt = [3, 17, 5, 41, 8]
    with torch.no_grad():
        expect = greedy_by_full_forward(m, prompt, 10, adapter)
        assert generate(m, prompt, 10, adapter) == expect
        assert generate(m, prompt, 10, adapter, eos_id=expect[2]) == expect[:expect.index(expect[2]) + 1]
        assert generate(m, [7], 3, adapter) == greedy_by_full_forward(m, [7], 3, adapter)  # one-token prompt


@pytest.mark.parametrize("kind", ["masked", "uneven"])
def test_compiled_decoding_equals_eager_and_compiles_once(kind, monkeypatch):
    """model.compile_decoding (evaluate.py --compile): the same greedy tokens and decode logits as the eager step,
    and one compiled graph for every position and cache length (a recompile would raise here)."""
    config = tiny_config(**(UNEVEN if kind == "uneven" else {}))  # uneven: an export's shapes
    m = make_model(config, seed=4)
    adapter = {**soft_masks(config), **lora_adapter(m)} if kind == "masked" else None
    step = M.compile_decoding()
    with torch.no_grad():
        assert generate(m, [3, 17, 5], 6, adapter, step=step) == generate(m, [3, 17, 5], 6, adapter)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        prompt = [3, 17, 5, 41, 8, 2, 9]  # another prompt length and cache length
        assert generate(m, prompt, 9, adapter, step=step) == greedy_by_full_forward(m, prompt, 9, adapter)
        m.setup_cache(1, 20)
        M.prefill(m, torch.tensor([prompt]), adapter)
        token = torch.tensor([[11]])
        torch.testing.assert_close(step(m, token, 7, adapter), M.decode_one_token(m, token, 7, adapter),
                                   rtol=1e-5, atol=1e-5)


def test_generate_with_temperature_samples_valid_tokens():
    config = tiny_config()
    m = make_model(config)
    torch.manual_seed(0)
    out = generate(m, [1, 2, 3], 20, temperature=1.0)
    assert len(out) == 20 and all(0 <= t < config.vocab_size for t in out)
    assert len(set(out)) > 1


# ----------------------------------------------------------------------------------------------------
# Export: slice_model must compute exactly what the masked model computes

@pytest.mark.skipif(not hasattr(M, "slice_model"), reason="model.slice_model not written yet")
@pytest.mark.parametrize("tied", [False, True])
def test_slice_model_equals_masked_model(tied):
    config = tiny_config(n_heads=6, n_kv_heads=3, n_layers=3, tie_embeddings=tied)
    m, tok = make_model(config), tokens_for(config)
    adapter = {**soft_masks(config), **lora_adapter(m)}
    adapter["z_head"][0, [0, 1]] = 0  # layer 0 loses kv group 0 entirely
    adapter["z_head"][1, [2, 5]] = 0  # layer 1 loses one head of two groups
    adapter["z_head"][2] = 0  # layer 2 has no attention left
    adapter["z_int"][1, :10] = 0
    adapter["z_int"][2] = 0
    adapter["z_hid"][[1, 5, 30]] = 0
    small = M.slice_model(m, adapter)
    assert small.config.dim == 29 and small.config.ffn_dims == [24, 14, 0]
    assert small.config.kv_of_head == [[0, 0, 1, 1], [0, 0, 1, 2], []]
    assert small.layers[0].attention.wk.weight.shape == (2 * config.head_dim, 29)
    assert small.layers[2].attention is None and small.layers[2].feed_forward is None
    close(small(tok), m(tok, adapter), 1e-12, "sliced vs masked")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in make_model(config).state_dict().items())  # untouched


@pytest.mark.skipif(not hasattr(M, "slice_model"), reason="model.slice_model not written yet")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_slice_model_keeps_the_dtype(dtype):
    config = tiny_config()
    m = make_model(config, dtype=dtype)
    assert M.slice_model(m, {"z_hid": torch.ones(config.dim)}).tok_embeddings.weight.dtype == dtype


# ----------------------------------------------------------------------------------------------------
# The real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF, grouped-query attention, tied embeddings)

def test_real_model_says_paris(smollm):
    model, tokenizer, vocab = smollm
    prompt = [vocab.index(t) for t in SENTENCE[:5]]  # "The capital of France is"
    assert model.config.n_kv_heads == 3 and model.config.tie_embeddings
    out = generate(model, prompt, 3)
    assert vocab[out[0]] == "ĠParis", [vocab[t] for t in out]
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
        wrong = M.build(model.config, sd)
        wrong_loss = F.cross_entropy(wrong(ids)[0, :-1], ids[0, 1:]).item()
    assert math.exp(loss) < 8, math.exp(loss)  # 6.5 seen with the correct loader
    assert wrong_loss > loss + 0.3, (loss, wrong_loss)


def test_real_model_bf16_agrees_with_fp32(smollm):
    model, _, vocab = smollm
    ids = torch.tensor([[vocab.index(t) for t in SENTENCE]])
    bf16 = M.build(model.config, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
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




# ----------------------------------------------------------------------------------------------------
# Copied out: model.py, masks.py and kernels.py alone are the model with masks and LoRA

COPY_OUT = """
import torch
import masks, model
torch.manual_seed(0)
config = model.ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, vocab_size=64)
net = model.Transformer(config).double().eval().requires_grad_(False)
gen = torch.Generator().manual_seed(0)
log_alpha = {k: v.double() for k, v in masks.init_log_alpha(config, gen).items()}
log_alpha["z_head"][0, :2] = log_alpha["z_int"][1, ::3] = log_alpha["z_hid"][[3, 7]] = -30.0  # these go
z = {k: masks.deterministic_z(v).double() for k, v in log_alpha.items()}
lora = model.init_lora(net, ["q", "v", "down"], 4, gen)
lora = {k: (v + 0.1 * torch.randn(v.shape, generator=gen)).double() for k, v in lora.items()}  # B != 0
adapter = {**z, **lora, "lora_scale": 2.0}
tokens = torch.randint(0, 64, (2, 10), generator=gen)
sampled = {k: masks.sample_z(v, gen) for k, v in log_alpha.items()}  # a training step's masks run too
assert torch.isfinite(net(tokens, {**sampled, **lora, "lora_scale": 2.0})).all()
small = model.slice_model(net, adapter)
diff = (small(tokens) - net(tokens, adapter)).abs().max().item()
print(sum(p.numel() for p in small.parameters()), sum(p.numel() for p in net.parameters()), diff)
"""


def test_model_masks_and_kernels_copied_alone_run_and_slice(tmp_path):
    """The three files in an empty folder, nothing else of the repository on the path: a tiny model's forward
    with sampled masks and LoRA runs, and slice_model's smaller model computes the masked model's logits."""
    for name in ("model.py", "masks.py", "kernels.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "run.py").write_text(COPY_OUT)
    r = subprocess.run([sys.executable, "-E", "-s", "run.py"], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    small, full, diff = r.stdout.split()
    assert int(small) < int(full) and float(diff) < 1e-12
