"""The methods a user would pick instead of NutePrune. Each chooses binary masks without learning them, at the
target sparsity (the Eq. 3 count), over heads and FFN units (hidden dims are kept, as in the papers); nute.py
then trains LoRA with the masks fixed (`--method`), so export, evaluation and the structure report are shared.

    z = magnitude_masks(model, 0.2)          # weight norms (the paper's MaP row)
    z = taylor_masks(model, batches, 0.2)    # LLM-Pruner: first-order Taylor importance |w * dL/dw|
    z = bonsai_masks(model, batches, 0.2)    # Bonsai: forward passes only, module relevance by regression
    z = baseline_masks(args, model, batches, out)   # nute.py --method: one of them, chosen once per run folder
"""
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from formats.checkpoint import write_atomic
from kernels import peak_mb
from masks import expected_size, mask_shapes, prunable_size


# ----------------------------------------------------------------------------------------------------
# Units, their sizes, and dropping them in some order until Eq. 3 reaches a sparsity

def units(config, ffn_group=1):
    """-> [(mask name, layer, slice of indices)]: every query head, and the FFN units in runs of ffn_group."""
    c = config
    heads = [("z_head", l, slice(h, h + 1)) for l in range(c.n_layers) for h in range(c.n_heads)]
    return heads + [("z_int", l, slice(i, min(i + ffn_group, c.ffn_dim)))
                    for l in range(c.n_layers) for i in range(0, c.ffn_dim, ffn_group)]


def weights_of(unit, config):
    """Projection weights a unit holds alone: a head's rows of wq and columns of wo, an FFN unit's rows of w1,
    w3 and column of w2. (k and v rows are shared by a group and go with its last head.)"""
    kind, _, idx = unit
    n = idx.stop - idx.start
    return n * (2 * config.dim * config.head_dim if kind == "z_head" else 3 * config.dim)


def drop_until(z, order, config, target):
    """Zeroes the units of `order` one by one until the Eq. 3 count of z reaches target sparsity (in place)."""
    c, total = config, prunable_size(config)
    group = c.n_heads // c.n_kv_heads
    kept_heads = z["z_head"].view(c.n_layers, c.n_kv_heads, group).sum(-1)  # [L, H_kv] query heads left per group
    size = expected_size(z["z_head"], z["z_int"], z["z_hid"], c).item()  # Eq. 3 on binary masks: the exact count
    for unit in order:
        if size <= (1 - target) * total:
            break
        kind, l, idx = unit
        if z[kind][l, idx].sum() == 0:
            continue
        z[kind][l, idx] = 0
        size -= weights_of(unit, c)
        if kind == "z_head":
            g = idx.start // group
            kept_heads[l, g] -= 1
            if kept_heads[l, g] == 0:  # the last query head of its group takes k and v along
                size -= 2 * c.dim * c.head_dim
    return z


def full_masks(config):
    return {k: torch.ones(shape) for k, shape in mask_shapes(config).items()}


def prune_lowest(score, config, target, ffn_group=1):
    """score(unit) -> a number, higher = keep; drops the lowest-scoring units first, across all layers."""
    return drop_until(full_masks(config), sorted(units(config, ffn_group), key=score), config, target)


def per_weight(importance, config):
    """{"z_head": [L, H], "z_int": [L, F]} summed over each unit's weights -> score of a unit per weight it holds."""
    return lambda u: importance[u[0]][u[1], u[2]].sum().item() / weights_of(u, config)


# ----------------------------------------------------------------------------------------------------
# Magnitude (MaP) and Taylor (LLM-Pruner)

def unit_sums(model, value):
    """value(weight tensor) -> same shape; summed over each head's rows of wq and columns of wo, and over each
    FFN unit's rows of w1, w3 and column of w2 -> {"z_head": [L, H], "z_int": [L, F]}."""
    c = model.config
    out = {"z_head": torch.zeros(c.n_layers, c.n_heads), "z_int": torch.zeros(c.n_layers, c.ffn_dim)}
    for l, layer in enumerate(model.layers):
        a, f = layer.attention, layer.feed_forward
        per_row = lambda w: value(w).float().sum(1).cpu()  # [out]
        out["z_head"][l] = (per_row(a.wq.weight) + value(a.wo.weight).float().sum(0).cpu()).view(c.n_heads, -1).sum(1)
        out["z_int"][l] = per_row(f.w1.weight) + per_row(f.w3.weight) + value(f.w2.weight).float().sum(0).cpu()
    return out


@torch.no_grad()
def magnitude_masks(model, target):
    """The paper's MaP row: drop the heads and FFN units whose weights have the smallest mean square."""
    return prune_lowest(per_weight(unit_sums(model, lambda w: w.float() ** 2), model.config), model.config, target)


def next_token_loss(model, x, z=None):
    logits = model(x, z)  # [B, T, V]; the loss in at least fp32
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), x[:, 1:].flatten())


def taylor_importance(model, batches):
    """LLM-Pruner's first-order importance (element-wise, summed over the group): |w * dL/dw| for every weight,
    dL/dw the next-token loss's gradient summed over the calibration batches (one backward a batch), summed
    over each unit's weights -> {"z_head": [L, H], "z_int": [L, F]}."""
    weights = [l.get_submodule(n).weight for l in model.layers for n in
               ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    for w in weights:
        w.requires_grad_(True)
    try:
        for x in tqdm(batches, desc="taylor", leave=False):
            next_token_loss(model, x).backward()
        return unit_sums(model, lambda w: (w * w.grad).abs())
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


def taylor_masks(model, batches, target):
    """LLM-Pruner, pruned globally: the units with the least Taylor importance per weight go, across all layers."""
    return prune_lowest(per_weight(taylor_importance(model, batches), model.config), model.config, target)


# ----------------------------------------------------------------------------------------------------
# Bonsai: relevance from the loss of random sub-models, forward passes only

@torch.no_grad()
def activation_prior(model, x):
    """Bonsai's informative prior, Wanda-style: a head's mean output norm times its wo columns' norm, an FFN unit's
    mean |activation| times its w2 column's norm, on calibration tokens x [B, T] -> {"z_head", "z_int"}."""
    c = model.config
    out = {"z_head": torch.zeros(c.n_layers, c.n_heads), "z_int": torch.zeros(c.n_layers, c.ffn_dim)}
    h = model.tok_embeddings(x)
    cos, sin = (t[:x.shape[1], None, :].to(h.dtype) for t in (model.rope_cos, model.rope_sin))
    for l, layer in enumerate(model.layers):  # Block.forward, step by step, keeping what goes into wo and w2
        a, f = layer.attention, layer.feed_forward
        y = a.attend(layer.attention_norm(h), cos, sin, {}, "", None)  # [B, T, heads, head_dim]
        wo = a.wo.weight.float().view(c.dim, c.n_heads, c.head_dim)
        out["z_head"][l] = (y.float().norm(dim=-1).mean((0, 1)) * wo.norm(dim=(0, 2))).cpu()
        h = h + F.linear(y.flatten(2), a.wo.weight)
        act = f.act(layer.ffn_norm(h), {}, "")  # [B, T, F]
        out["z_int"][l] = (act.float().abs().mean((0, 1)) * f.w2.weight.float().norm(dim=0)).cpu()
        h = h + F.linear(act, f.w2.weight)
    return out


def ridge_relevance(kept, utility, ridge):
    """The under-determined regression: utility_k ~ sum_m beta_m kept_km + b over n sub-models and M > n modules.
    Ridge solution in its n x n (dual) form: beta = X^T (X X^T + ridge I)^-1 u, with X and u centred."""
    X = kept - kept.mean(0)  # [n, M]
    u = utility - utility.mean()  # [n]
    return X.T @ torch.linalg.solve(X @ X.T + ridge * torch.eye(len(u), dtype=X.dtype), u)


@torch.no_grad()
def bonsai_masks(model, batches, target, samples=100, step=0.05, ffn_group=32, ridge=1.0, seed=0):
    """Bonsai (Dery et al. 2024), iterative: each round prunes `step` more of the weights (the last round up to
    the target). A round draws `samples` sub-models from the units still kept: each drops units in a random
    order biased by the prior (Gumbel top-k on the standardized -log prior: weak units first) until it is `step`
    sparser; the
    sub-model's utility is minus its next-token loss on the calibration batches. The relevance of every unit is
    the ridge regression of the utilities on the kept/dropped indicators; the units with the least relevance
    per weight go. Modules: heads, and FFN units in runs of `ffn_group` (46k single units would need far more
    sub-models than a budget of forward passes allows). Choices the paper leaves open are the arguments."""
    c, dev = model.config, model.tok_embeddings.weight.device
    gen = torch.Generator().manual_seed(seed)
    prior = activation_prior(model, batches[0])
    mods = units(c, ffn_group)
    log_prior = torch.tensor([prior[k][l, i].sum().item() / weights_of((k, l, i), c) for k, l, i in mods]).clamp_min(1e-12).log()
    z = full_masks(c)
    rounds = 1
    bar = tqdm(desc="bonsai sub-models", leave=False)
    while True:
        alive = [j for j, (k, l, i) in enumerate(mods) if z[k][l, i].sum() > 0]
        goal = min(target, step * rounds)
        p = log_prior[alive]
        bias = (p - p.mean()) / p.std().clamp_min(1e-12)  # standardized, so every unit is dropped in some sub-models
        kept, utility = torch.zeros(samples, len(alive)), torch.zeros(samples)
        for s in range(samples):
            gumbel = -torch.empty(len(alive)).exponential_(generator=gen).log()
            order = (gumbel - bias).argsort(descending=True).tolist()  # weak units first, at random
            zs = drop_until({k: v.clone() for k, v in z.items()}, [mods[alive[o]] for o in order], c, goal)
            kept[s] = torch.tensor([float(zs[mods[j][0]][mods[j][1], mods[j][2]].sum() > 0) for j in alive])
            sub = {k: v.to(dev) for k, v in zs.items()}
            utility[s] = -sum(next_token_loss(model, x, sub).item() for x in batches) / len(batches)
            bar.update()
        beta = ridge_relevance(kept.double(), utility.double(), ridge)
        relevance = {alive[j]: beta[j].item() / weights_of(mods[alive[j]], c) for j in range(len(alive))}
        for j in range(len(alive)):  # a unit that no sub-model dropped has no estimate: it is not dropped this round
            if kept[:, j].all():
                relevance[alive[j]] = float("inf")
        z = drop_until(z, [mods[j] for j in sorted(alive, key=relevance.get)], c, goal)
        if goal >= target:
            return z
        rounds += 1


# ----------------------------------------------------------------------------------------------------
# nute.py --method: the masks chosen once, before LoRA recovers, and kept in the run folder

CALIBRATION = 8  # training sequences the baselines score units on, in batches of --batch-size (LLM-Pruner: 10)


def calibration_batches(args, model, batches):
    return list(batches[0][:CALIBRATION].to(model.tok_embeddings.weight.device).split(args.batch_size))


def read_masks(path, config):
    """A masks.safetensors, checked before anything uses or copies it -> {"z_head", "z_int", "z_hid"}."""
    try:
        z = load_file(str(path))
    except Exception:  # torn, or not safetensors at all: the library raises its own type
        raise ValueError(f"{path}: not a safetensors file of masks") from None
    if {k: tuple(v.shape) for k, v in z.items()} != mask_shapes(config):
        raise ValueError(f"{path}: not the masks of this model (shapes {mask_shapes(config)})")
    if not all(((v >= 0) & (v <= 1)).all() for v in z.values()) or not (z["z_hid"] > 0).any():
        raise ValueError(f"{path}: masks are numbers in [0, 1] that keep at least one hidden dim")
    return z


def baseline_masks(args, model, batches, out):
    """--method magnitude / taylor / bonsai: the masks, chosen once before training (calibration: the first
    CALIBRATION training sequences) and kept in out/masks.safetensors, so a resumed run reuses them."""
    path = Path(out) / "masks.safetensors"
    if path.exists():  # chosen before this run was interrupted
        return read_masks(path, model.config)
    device, t0 = model.tok_embeddings.weight.device, time.time()
    if args.masks:  # chosen by an earlier run: kept here with what choosing cost
        z = read_masks(args.masks, model.config)
        if os.path.exists(cost := os.path.join(os.path.dirname(args.masks), "masks.json")):
            shutil.copy(cost, Path(out) / "masks.json")
    else:
        calibration = calibration_batches(args, model, batches)
        z = {"magnitude": lambda: magnitude_masks(model, args.target),
             "taylor": lambda: taylor_masks(model, calibration, args.target),
             "bonsai": lambda: bonsai_masks(model, calibration, args.target, args.bonsai_samples, seed=args.seed),
             }[args.method]()
        if args.rank == 0:  # what choosing them cost: Bonsai's promise is the memory of inference
            (Path(out) / "masks.json").write_text(json.dumps({"method": args.method, "seconds": time.time() - t0,
                                                              "peak_mb": peak_mb(device)}))
    if args.rank == 0:
        write_atomic(path, lambda tmp: save_file(z, tmp))  # a kill mid-write leaves no torn masks behind
    return z


def taylor_log_alpha(args, model, batches, out):
    """nute.py --mask-init taylor (not in the paper): NutePrune's masks start from the Taylor order. Heads and FFN
    units are ranked together by Taylor importance per weight on the calibration batches (the order --method
    taylor drops them in); rank r in [0, 1] (0: least important) gives log_alpha = --init-spread * r. The
    controller's common shift (kept apart from log_alpha) then removes units in this order unless the task gradient
    reorders them; a unit further than the clamps' span (log 100 - log 0.01 = 9.2) from the threshold has no
    gradient and keeps its place. What it cost goes to out/masks.json. -> {"z_head": [L, H], "z_int": [L, F]}"""
    t0, c, imp = time.time(), model.config, taylor_importance(model, calibration_batches(args, model, batches))
    score = torch.cat([imp["z_head"].flatten() / (2 * c.dim * c.head_dim), imp["z_int"].flatten() / (3 * c.dim)])
    rank = score.argsort(stable=True).argsort().float() / (len(score) - 1)
    theta, n = args.init_spread * rank, imp["z_head"].numel()
    if args.rank == 0:
        (Path(out) / "masks.json").write_text(json.dumps({"method": "taylor order", "seconds": time.time() - t0,
                                                          "peak_mb": peak_mb(model.tok_embeddings.weight.device)}))
    return {"z_head": theta[:n].view_as(imp["z_head"]), "z_int": theta[n:].view_as(imp["z_int"])}
