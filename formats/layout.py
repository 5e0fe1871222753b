"""Shapes other runtimes need: a pruned model rewritten with zero heads and zero units that change nothing.

slice_model (model.py) gives every layer its own number of heads, kv heads and FFN units. llama.cpp and Hugging
Face read the heads in a fixed grouped-query layout, GGUF's quantized types cut rows into blocks of 32, and a
Hugging Face config has one size for all layers; in bf16 some widths also decode faster (lab/NOTEBOOK.md,
"Pruned vs dense decoding"). pad_model meets each rule exactly.
"""
import math
from dataclasses import asdict

import torch

from model import ModelConfig, build


def regroup(kv_of_head, group):
    """A layer's heads in llama.cpp's and Hugging Face's fixed layout, where query slot s reads kv slot s // group:
    -> (slots: the query head in each slot, None for a zero head; kv: the kv head in each kv slot). Each kv
    head keeps its query heads in runs of `group`; a short run is filled with zero heads."""
    slots, kv = [], []
    for j in sorted(set(kv_of_head)):
        heads = [h for h, k in enumerate(kv_of_head) if k == j]
        for start in range(0, len(heads), group):
            run = heads[start:start + group]
            slots += run + [None] * (group - len(run))
            kv.append(j)
    return slots, kv


def cheapest_layout(kv_of_head):
    """regroup with the group size that costs the fewest projection rows (query slots + kv slots)."""
    return min((regroup(kv_of_head, g) for g in range(1, len(kv_of_head) + 1)),
               key=lambda s: (len(s[0]) + len(s[1]), len(s[1])))


@torch.no_grad()
def pad_model(model, multiple=1, uniform=False):
    """-> a model that computes exactly what `model` computes, in shapes other runtimes take: every layer's
    attention in the fixed GQA layout (`regroup`), the hidden dim and FFN widths rounded up to `multiple`
    (GGUF's 32-element blocks) with zero units, and with `uniform` every layer the same size (Hugging Face
    configs have one size for all layers, and a hidden size that the head count divides). Zero units add
    nothing: a zero FFN unit has silu(0) * 0 = 0, a zero head has zero output rows; zero hidden dims stay
    zero, and the RMSNorms divide by the kept dims only (weight * sqrt(d/d'), eps * d/d', as in slice_model)."""
    c, hd = model.config, model.config.head_dim
    sd = model.state_dict()
    ref = sd["tok_embeddings.weight"]
    zeros = lambda *shape: torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    up = lambda n: -(-n // multiple) * multiple
    rows = lambda w, idx: torch.cat([w[i * hd:(i + 1) * hd] if i is not None else zeros(hd, w.shape[1]) for i in idx])
    group = c.n_heads // c.n_kv_heads  # uniform: the model's own group size; else the cheapest (cheapest_layout)
    layouts = [regroup(k, group) if uniform or not k else cheapest_layout(k) for k in c.kv_of_head]
    n_kv = max(len(kv) for _, kv in layouts)
    ffn = max(up(f) for f in c.ffn_dims)
    d = up(c.dim)
    while uniform and d % (group * n_kv):  # transformers also wants the hidden size a multiple of the heads
        d = up(d + 1)
    pad_in = lambda w: torch.cat([w, zeros(w.shape[0], d - w.shape[1])], 1)  # new input dims read nothing
    new, kv_of_head, ffn_dims = {}, [], []
    for i, (slots, kv) in enumerate(layouts):
        p = f"layers.{i}."
        if uniform:  # fill up to n_kv kv heads, each with `group` zero query heads
            slots, kv = slots + [None] * group * (n_kv - len(kv)), kv + [None] * (n_kv - len(kv))
        g = len(slots) // max(1, len(kv))
        kv_of_head.append([s // g for s in range(len(slots))])
        if slots:
            wq, wk, wv = (sd.get(p + f"attention.{w}.weight", zeros(0, c.dim)) for w in ("wq", "wk", "wv"))
            new[p + "attention.wq.weight"] = pad_in(rows(wq, slots))
            new[p + "attention.wk.weight"] = pad_in(rows(wk, kv))
            new[p + "attention.wv.weight"] = pad_in(rows(wv, kv))
            wo = rows(sd.get(p + "attention.wo.weight", zeros(c.dim, 0)).T, slots).T
            new[p + "attention.wo.weight"] = torch.cat([wo, zeros(d - c.dim, wo.shape[1])])
        f = ffn if uniform else up(c.ffn_dims[i])
        ffn_dims.append(f)
        if f:
            for w in ("w1", "w3"):
                old = sd.get(p + f"feed_forward.{w}.weight", zeros(0, c.dim))
                new[p + f"feed_forward.{w}.weight"] = pad_in(torch.cat([old, zeros(f - len(old), c.dim)]))
            w2 = sd.get(p + "feed_forward.w2.weight", zeros(c.dim, 0))
            w2 = torch.cat([w2, zeros(c.dim, f - w2.shape[1])], 1)
            new[p + "feed_forward.w2.weight"] = torch.cat([w2, zeros(d - c.dim, f)])
    norm = lambda w: torch.cat([w * math.sqrt(c.dim / d), zeros(d - c.dim)])
    for key, w in sd.items():
        if key.endswith("norm.weight"):
            new[key] = norm(w)
    new["tok_embeddings.weight"] = pad_in(sd["tok_embeddings.weight"])
    if not c.tie_embeddings:
        new["output.weight"] = pad_in(sd["output.weight"])
    padded = ModelConfig(**{**asdict(c), "dim": d, "norm_eps": c.norm_eps * c.dim / d, "kv_of_head": kv_of_head,
                            "ffn_dims": ffn_dims})
    if uniform:  # the Hugging Face config's sizes
        padded.n_heads, padded.n_kv_heads, padded.ffn_dim = len(kv_of_head[0]), n_kv, ffn
    return build(padded, {k: v.contiguous() for k, v in new.items()})
