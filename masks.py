"""NutePrune's masks: hard-concrete L0 masks over heads, FFN units and hidden dims, and what they cost (Eq. 3).

A mask is a tensor of values in [0, 1] that the model multiplies in (model.py, Eq. 1-2): z_head [L, H] on
each head's output, z_int [L, F] on each FFN unit, z_hid [D] on the residual stream. Training learns one
`log_alpha` per unit and samples z from it (Eq. 10); Eq. 3 counts the weights the masks keep, so the
expected sparsity can be driven to a target (Eq. 11, or the projection used by default).

    log_alpha = init_log_alpha(config, gen)                  # {"z_head": [L, H], "z_int": [L, F], "z_hid": [D]}
    z = {k: sample_z(v, gen) for k, v in log_alpha.items()}  # a training step's masks (Eq. 10)
    s_hat = expected_sparsity(log_alpha, config)              # Eq. 3, differentiable
    z = {k: deterministic_z(v) for k, v in log_alpha.items()}  # the masks a snapshot or the export uses

Only torch is imported: `config` is anything with the sizes of model.ModelConfig.
"""
import math

import torch

MASKS = ("z_head", "z_int", "z_hid")


def mask_shapes(config):
    return {"z_head": (config.n_layers, config.n_heads), "z_int": (config.n_layers, config.ffn_dim),
            "z_hid": (config.dim,)}


# ----------------------------------------------------------------------------------------------------
# Hard-concrete L0 masks (Louizos et al. 2017; paper Appendix A, Eq. 10)

LIMIT_L, LIMIT_R, BETA, EPS = -0.1, 1.1, 2 / 3, 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100)  # log_alpha is clamped here after every step


def init_log_alpha(config, gen):
    """log_alpha ~ N(mean, 0.01): heads and hidden dims start near 'keep' (10), FFN units at p=0.01."""
    means = {"z_head": 10.0, "z_int": math.log(0.99 / 0.01), "z_hid": 10.0}
    return {k: torch.randn(shape, generator=gen) * 0.01 + means[k] for k, shape in mask_shapes(config).items()}


def sample_z(log_alpha, gen):
    """Eq. 10: a stretched, clamped concrete sample; one draw per optimizer step, shared by the batch."""
    u = torch.rand(log_alpha.shape, generator=gen).clamp(EPS, 1 - EPS).to(log_alpha.device)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)


def keep_prob(log_alpha):
    """P(z > 0) = 1 - Q(0), the probability that a unit survives."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


@torch.no_grad()
def deterministic_z(log_alpha, shift=0.0, order=None, binary=False):
    """Eval/export mask: zero the round(N - sum P(keep)) units with the smallest log_alpha (per layer for
    heads and FFN units, over all dims for hidden); the rest keep the soft value sigmoid(0.8 log_alpha / beta).
    shift (not in the reference) counts P(keep) at log_alpha + shift: more or fewer units, the same ranking.
    order (`--mask-init taylor`): rank by these values instead (log_alpha there is clamped and ties at the clamps).
    binary (`--final-masks binary`, not in the reference): kept units get 1. After a short run most log_alpha
    sit inside the clamps, so the soft values scale kept units down (lab/NOTEBOOK.md, "Learned masks")."""
    rows = log_alpha.reshape(-1, log_alpha.shape[-1]).float()
    ranks = rows if order is None else order.reshape(rows.shape).float()
    z = torch.ones_like(rows) if binary else torch.sigmoid(rows / BETA * 0.8)
    for r in range(rows.shape[0]):
        n_zero = round(rows.shape[1] - keep_prob(rows[r] + shift).sum().item())
        if n_zero > 0:
            z[r, ranks[r].topk(n_zero, largest=False).indices] = 0
    return z.reshape(log_alpha.shape)


# ----------------------------------------------------------------------------------------------------
# What the masks keep (Eq. 3)

def prunable_size(config):
    """M: parameters of all attention and FFN projections (embeddings, norms and lm_head excluded)."""
    c = config
    return c.n_layers * (2 * c.dim * c.head_dim * (c.n_heads + c.n_kv_heads) + 3 * c.dim * c.ffn_dim)


def expected_size(p_head, p_int, p_hid, config):
    """Eq. 3 with keep probabilities [L, H], [L, F], [D] (or binary masks: then it is the exact count).
    sum_h sum_k z_head[h] z_hid[k] is sum(z_head) * sum(z_hid): a product of sums, never an outer product.
    Grouped-query attention: a kv head's k and v rows stay while any query head of its group does; with
    one query head per group (multi-head attention) this is exactly Eq. 3's 4 * d_h per head."""
    c = config
    group = c.n_heads // c.n_kv_heads
    p_kv = 1 - (1 - p_head).reshape(c.n_layers, c.n_kv_heads, group).prod(-1)  # [L, H_kv]
    per_hidden_dim = 2 * c.head_dim * (p_head.sum() + p_kv.sum()) + 3 * p_int.sum()
    return per_hidden_dim * p_hid.sum()


def expected_sparsity(log_alpha, config):
    """s_hat = 1 - E / M, Eq. 3 with each unit counted by its keep probability."""
    p = {k: keep_prob(v) for k, v in log_alpha.items()}
    p_hid = p["z_hid"] if "z_hid" in p else torch.ones(config.dim, device=p["z_int"].device)  # --prune-hidden no
    return 1 - expected_size(p["z_head"], p["z_int"], p_hid, config) / prunable_size(config)


def mask_sparsity(z, config):
    """Eq. 3 on binary masks (an absent mask keeps everything): exactly the share of the projection
    weights that `model.slice_model` removes."""
    kept = [(z[k].cpu() > 0).float() if k in z else torch.ones(shape) for k, shape in mask_shapes(config).items()]
    return 1 - expected_size(*kept, config).item() / prunable_size(config)


def unevenness(kept):
    """Coefficient of variation (population standard deviation / mean) of per-layer kept counts: 0 when every
    layer is cut alike; the paper's learned LLaMA-7B structure at 20% (Table 16) has 0.155 for its FFN widths."""
    kept = torch.as_tensor(kept, dtype=torch.float64)
    return (kept.std(correction=0) / kept.mean()).item() if kept.mean() > 0 else 0.0


def structure_table(z, config):
    """The pruned structure in the layout of the paper's Tables 16-17, with how uneven it is across layers and
    how many hidden dims went: whether the masks learned a structure or cut every layer alike."""
    c = config
    heads = (z["z_head"] > 0).sum(1).tolist()
    ffn = (z["z_int"] > 0).sum(1).tolist()
    hidden = int((z["z_hid"] > 0).sum())
    lines = [f"Hidden dim: {hidden} of {c.dim} ({c.dim - hidden} removed); "
             f"sparsity of the prunable weights: {mask_sparsity(z, c):.4f}; unevenness across layers "
             f"(coefficient of variation): FFN widths {unevenness(ffn):.3f}, heads {unevenness(heads):.3f}", "",
             "| Layer | " + " | ".join(str(i) for i in range(c.n_layers)) + " |",
             "|---" * (c.n_layers + 1) + "|",
             f"| Head (of {c.n_heads}) | " + " | ".join(map(str, heads)) + " |",
             f"| Intermediate dim (of {c.ffn_dim}) | " + " | ".join(map(str, ffn)) + " |"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Reaching the target sparsity: the ramped target, Eq. 11's Lagrangian or the projection

def warmup_for(target):
    """The paper ramps the target over 4 of 7 epochs at 20% sparsity and 1 of 7 at 50% (Sec. 4); between
    them the fraction is interpolated linearly in the target, and held at 4/7 below 20%, 1/7 above 50%."""
    return 4 / 7 - 3 / 7 * min(1.0, max(0.0, (target - 0.2) / 0.3))

def target_at(step, target, warmup_steps):
    """Eq. 11's target t after `step` steps: it warms up linearly from 0 over `warmup_steps`, then holds."""
    return target * min(1.0, step / max(1, warmup_steps))

def lagrangian(s_hat, target, lambdas):
    """Eq. 11: lambda1 (s - t) + lambda2 (s - t)^2; the lambdas are trained by gradient ascent
    (`--controller lagrangian`, the paper's way to reach the target)."""
    return lambdas[0] * (s_hat - target) + lambdas[1] * (s_hat - target) ** 2

def shifted(log_alpha, c):
    """clamp(log_alpha + c): what the masks use when the controller's shift c is kept apart."""
    return {k: (v + c).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) for k, v in log_alpha.items()}

@torch.no_grad()
def project_to_target(log_alpha, target, config, write=True, iters=50):
    """The default controller (`--controller project`, not in the paper): after each optimizer step, one
    constant c for every log_alpha so that Eq. 3's expected sparsity of clamp(log_alpha + c) equals the ramped
    target exactly -> c. s_hat falls monotonically in c, so bisection finds it. The shift sets how many units
    are kept; which ones is left to the order of log_alpha (an importance prior, what the task gradient taught).
    Unlike Eq. 11 it has no state, so nothing winds up, and it needs no rate: it reaches any target in one step.
    write=True (`--mask-init clamp`) writes clamp(log_alpha + c) back: that erases the order of every unit it pushes
    against a clamp (all of them while a low ramped target needs c > 0). write=False (`--mask-init taylor`) leaves
    log_alpha as it is; the caller keeps c and the masks use clamp(log_alpha + c)."""
    span = 2 * (LOG_ALPHA_MAX - LOG_ALPHA_MIN)  # enough to move any clamped log_alpha from one clamp to the other
    lo, hi = -span, span
    if not write:  # unclamped values: from every unit below the lower clamp to every unit above the upper one
        lo = LOG_ALPHA_MIN - max(v.max().item() for v in log_alpha.values()) - 1
        hi = LOG_ALPHA_MAX - min(v.min().item() for v in log_alpha.values()) + 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_sparsity(shifted(log_alpha, mid), config) > target else (lo, mid)
    c = (lo + hi) / 2
    if write:
        for k, v in shifted(log_alpha, c).items():
            log_alpha[k].copy_(v)
    return c
