"""Baselines that choose masks without learning them, for the comparison with NutePrune.

    z = magnitude_masks(model, 0.2)      # binary z_head, z_int, z_hid at 20% sparsity (Eq. 3 count)

nute.py trains LoRA with such fixed masks (`--magnitude`), so every method shares export and evaluation.
"""
import torch

from model import mask_shapes, prunable_size


@torch.no_grad()
def magnitude_masks(model, target):
    """Binary masks for the magnitude baseline (the paper's MaP row): drop the heads and FFN units whose
    weights have the smallest root-mean-square, across all layers, until Eq. 3 reaches the target.
    Hidden dims are kept: their norms mix every layer, and the paper's baseline prunes heads and units."""
    c = model.config
    units = []  # (rms of the unit's weights, kind, layer, index)
    for l, layer in enumerate(model.layers):
        wq, wo = (layer.attention.get_submodule(n).weight.float() for n in ("wq", "wo"))
        for h in range(c.n_heads):
            rows = slice(h * c.head_dim, (h + 1) * c.head_dim)
            units.append((torch.cat([wq[rows].flatten(), wo[:, rows].flatten()]).pow(2).mean().sqrt().item(), "z_head", l, h))
        ff = layer.feed_forward
        rms = (ff.w1.weight.float().pow(2).mean(1) + ff.w3.weight.float().pow(2).mean(1) + ff.w2.weight.float().pow(2).mean(0)) / 3
        units += [(r, "z_int", l, i) for i, r in enumerate(rms.sqrt().tolist())]
    z = {k: torch.ones(shape) for k, shape in mask_shapes(c).items()}
    size, budget, group = prunable_size(c), (1 - target) * prunable_size(c), c.n_heads // c.n_kv_heads
    for _, kind, l, i in sorted(units):  # Eq. 3 with binary masks, kept up to date unit by unit
        if size <= budget:
            break
        z[kind][l, i] = 0
        size -= 3 * c.dim if kind == "z_int" else 2 * c.dim * c.head_dim
        if kind == "z_head" and z["z_head"][l, i // group * group:(i // group + 1) * group].sum() == 0:
            size -= 2 * c.dim * c.head_dim  # the last query head of its group takes k and v along
    return z
