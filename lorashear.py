"""LoRAShear (Chen et al. 2023, arXiv 2310.18356) in the harness: `python nute.py --method lorashear --target 0.2`.

Its steps, on the units every method here prunes (a head: its wq rows and wo columns, k and v going with the last
query head of a GQA group; an FFN unit: its w1, w3 rows and w2 column), counted by Eq. 3 so it lands on the target:
  1. Knowledge distribution (Sec. 3.2): how much the next-token loss on calibration batches rises when a block of
     units is removed; the most crucial share of the blocks (the unprunable ratio) is never pruned.   crucial_units
  2. LHSPG (Alg. 2), inside nute.py's training steps, with LoRA on every projection: a LoRA warm-up, then P periods.
     Each period picks the prunable units of least saliency (their weights W with the LoRA update D = scale * B A)
     until Eq. 3 reaches p/P of the target; over the period their masks fall linearly to exactly 0 while LoRA
     trains and takes over what they held, and the half-space projection zeroes a unit at once when its trial
     iterate leaves the half-space of its current one.                                                  Lhspg
  3. Dynamic knowledge recovery (Sec. 3.4), the steps after: every `interval` steps the text's categories (C4,
     Wikipedia) are mixed in proportion to how much each one's loss rose against the intact model on its validation
     documents. Any method's fixed masks can recover this way (`--recovery dynamic`).                Recovery
What follows the paper and OTO's LHSPG code, and where and why we differ: docs/guide.md, "LoRAShear".
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from baselines import calibration_batches, drop_until, full_masks, next_token_loss, units
from kernels import peak_mb

# ----------------------------------------------------------------------------------------------------
# 1. Knowledge distribution: which blocks of units are too crucial to prune (Sec. 3.2)

def loss_from(model, h, first, masks, x):
    """The next-token loss of tokens x [B, T] from the residual stream h entering block `first` on, with `masks`
    (one layer's rows of z_head / z_int) in that block: removing a unit changes nothing before its layer."""
    cos, sin = (t[:x.shape[1], None, :].to(h.dtype) for t in (model.rope_cos, model.rope_sin))
    for l in range(first, len(model.layers)):
        h = model.layers[l](h, cos, sin, masks if l == first else {}, None)
    logits = F.linear(model.norm(h), model.tok_embeddings.weight if model.output is None else model.output.weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as baselines.next_token_loss
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()


@torch.no_grad()
def knowledge_distribution(model, batches, ffn_block=512):
    """The loss increase on the calibration batches when one block of units is removed, every other unit kept ->
    [(increase, (mask name, layer, slice))]. A block: the query heads of one kv group (the GQA rule removes them
    together), or `ffn_block` consecutive FFN units (46k units one by one would cost 46k forward passes)."""
    c, dev = model.config, model.tok_embeddings.weight.device
    group = c.n_heads // c.n_kv_heads
    blocks = [("z_head", l, slice(g, g + group)) for l in range(c.n_layers) for g in range(0, c.n_heads, group)]
    blocks += [("z_int", l, slice(i, min(i + ffn_block, c.ffn_dim))) for l in range(c.n_layers)
               for i in range(0, c.ffn_dim, ffn_block)]
    streams = []  # per batch: the residual stream entering each block, of the intact model
    for x in batches:
        h, stream = model.tok_embeddings(x), []
        cos, sin = (t[:x.shape[1], None, :].to(h.dtype) for t in (model.rope_cos, model.rope_sin))
        for layer in model.layers:
            stream.append(h)
            h = layer(h, cos, sin, {}, None)
        streams.append(stream)
    loss = lambda l, masks: sum(loss_from(model, s[l], l, masks, x) for s, x in zip(streams, batches)) / len(batches)
    intact, rises = loss(0, {}), []
    for kind, l, idx in tqdm(blocks, desc="knowledge distribution", leave=False):
        row = torch.ones(c.n_heads if kind == "z_head" else c.ffn_dim, device=dev)
        row[idx] = 0
        rises.append((loss(l, {kind: row}) - intact, (kind, l, idx)))
    return rises


def crucial_units(model, batches, unprunable=0.1, ffn_block=512):
    """The share `unprunable` of blocks whose removal costs the most -> {"z_head": [L, H], "z_int": [L, F]} bool,
    True where a unit is never pruned."""
    rises = sorted(knowledge_distribution(model, batches, ffn_block), key=lambda r: r[0], reverse=True)
    crucial = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in full_masks(model.config).items() if k != "z_hid"}
    for _, (kind, l, idx) in rises[:math.ceil(unprunable * len(rises))]:
        crucial[kind][l, idx] = True
    return crucial


# ----------------------------------------------------------------------------------------------------
# 2. LHSPG: saliency from the weights and their LoRA update, progressive pruning, half-space projection (Alg. 2)

def weight_and_update(layer, l, name, lora, scale):
    """One projection's weight W and LoRA update D = scale * B A (0 without LoRA there), fp32 -> (W, D) [out, in]."""
    W = layer.get_submodule(name).weight.float()
    A, B = lora.get(f"layers.{l}.{name}.lora_A"), lora.get(f"layers.{l}.{name}.lora_B")
    return W, (torch.zeros_like(W) if A is None else scale * (B.detach().to(W) @ A.detach().to(W)))


def unit_products(model, lora, scale):
    """Per unit, over its weights: sum W*W, sum W*D, sum D*D -> {"z_head": [L, H, 3], "z_int": [L, F, 3]}."""
    c = model.config
    out = {"z_head": torch.zeros(c.n_layers, c.n_heads, 3), "z_int": torch.zeros(c.n_layers, c.ffn_dim, 3)}
    sums = lambda W, D, dim: torch.stack([(W * W).sum(dim), (W * D).sum(dim), (D * D).sum(dim)], -1).cpu()  # [units, 3]
    for l, layer in enumerate(model.layers):
        pair = lambda name: weight_and_update(layer, l, name, lora, scale)
        heads = sums(*pair("attention.wq"), 1) + sums(*pair("attention.wo"), 0)  # [H * head_dim, 3]: rows, columns
        out["z_head"][l] = heads.view(c.n_heads, c.head_dim, 3).sum(1)
        out["z_int"][l] = sums(*pair("feed_forward.w1"), 1) + sums(*pair("feed_forward.w3"), 1) + sums(*pair("feed_forward.w2"), 0)
    return out


def saliency(model, lora, scale):
    """OTO's saliency of LoRA groups: five criteria, each divided by its norm over all units, weighted equally:
    |W|, |W| per weight, cos(W, D) + 1, |W . D| (first-order Taylor with D in the place of the gradient) and
    (W . D)^2 / 2 (second order). Low = redundant -> {"z_head": [L, H], "z_int": [L, F]}."""
    c, p = model.config, unit_products(model, lora, scale)
    ww, wd, dd = (torch.cat([p["z_head"][..., i].flatten(), p["z_int"][..., i].flatten()]).double() for i in range(3))
    size = torch.cat([torch.full((p["z_head"][..., 0].numel(),), 2.0 * c.dim * c.head_dim),
                      torch.full((p["z_int"][..., 0].numel(),), 3.0 * c.dim)]).double()
    magnitude, cosine = ww.sqrt(), wd / (ww.sqrt() * dd.sqrt()).clamp_min(1e-12) + 1
    criteria = [magnitude, magnitude / size, cosine, wd.abs(), wd ** 2 / 2]  # the last two: Taylor, D for the gradient
    score = sum(x / x.norm().clamp_min(1e-12) for x in criteria) / len(criteria)
    n = p["z_head"][..., 0].numel()
    return {"z_head": score[:n].view(c.n_layers, c.n_heads).float(), "z_int": score[n:].view(c.n_layers, c.ffn_dim).float()}


def unit_vectors(model, lora, scale, which):
    """The weights W + D of the units marked in `which` ({"z_head", "z_int"} bool), flattened, layer by layer ->
    (heads [n, 2 * head_dim * dim], FFN units [m, 3 * dim])."""
    c, heads, ffn = model.config, [], []
    for l, layer in enumerate(model.layers):
        def full(name):
            W, D = weight_and_update(layer, l, name, lora, scale)
            return W + D
        if (h := which["z_head"][l].nonzero().flatten()).numel():
            q = full("attention.wq").view(c.n_heads, -1)[h.to(layer.attention.wq.weight.device)]
            o = full("attention.wo").view(c.dim, c.n_heads, c.head_dim).transpose(0, 1).flatten(1)[h.to(q.device)]
            heads.append(torch.cat([q, o], 1).cpu())
        if (i := which["z_int"][l].nonzero().flatten()).numel():
            i = i.to(layer.feed_forward.w1.weight.device)
            ffn.append(torch.cat([full("feed_forward.w1")[i], full("feed_forward.w3")[i], full("feed_forward.w2")[:, i].T], 1).cpu())
    return [torch.cat(v) if v else torch.zeros(0, 0) for v in (heads, ffn)]


def half_space(trial, current, eps=0.0):
    """HSPG's projection test, a row a group: True where the trial iterate has left the half-space
    {x : x . current >= eps |current|^2}, i.e. where the group is set to exactly 0."""
    return (trial * current).sum(1) < eps * (current * current).sum(1)


class Lhspg:
    """Alg. 2 over nute.py's steps. `z` is the student's fixed masks ({"z_head", "z_int", ...}), changed in place after
    every optimizer step: a warm-up of `warmup` of the steps (LoRA alone), then `periods` periods over `prune` of the
    steps, then nothing (recovery). Where the paper and OTO scale a redundant group's weights and LoRA rows down, we
    scale its mask: the same group output, falling to exactly 0 by the period's end."""

    def __init__(self, z, config, target, steps, crucial, periods=5, warmup=0.1, prune=0.4, eps=0.0):
        self.z, self.config, self.target, self.periods, self.eps = z, config, target, periods, eps
        self.start, self.length = round(warmup * steps), max(1, round(prune * steps / periods))
        self.end = self.start + periods * self.length  # the first step of recovery
        self.crucial = crucial  # never pruned (None for a resumed run until its checkpoint is loaded)
        self.active = {k: torch.zeros(z[k].shape, dtype=torch.bool) for k in ("z_head", "z_int")}  # decaying now
        self.current = None  # the active units' W + D after the last step

    def pick(self, goal, score):
        """The prunable units of least saliency, until Eq. 3 of the masks reaches `goal` -> newly active (bool)."""
        kept = {k: (v > 0).float().cpu() for k, v in self.z.items()}
        order = [u for u in units(self.config) if kept[u[0]][u[1], u[2]].all() and not self.crucial[u[0]][u[1], u[2]].any()]
        drop_until(kept, sorted(order, key=lambda u: score[u[0]][u[1], u[2]].item()), self.config, goal)
        return {k: (kept[k] == 0) & (self.z[k].cpu() > 0) for k in self.active}

    def where(self, step):
        """-> (period, steps into it) of optimizer step `step` (0-based), or None outside the periods."""
        t = step - self.start
        return divmod(t, self.length) if 0 <= t < self.end - self.start else None

    @torch.no_grad()
    def before_step(self, step, model, lora, scale):
        """A period's first step picks its units (saliency with LoRA as it stands); every step of a period starts from
        their W + D before its update (kept from the last step, or computed here: after a pick, or when resumed)."""
        if (at := self.where(step)) is None:
            return
        if at[1] == 0:
            self.active = self.pick(self.target * (at[0] + 1) / self.periods, saliency(model, lora, scale))
        if at[1] == 0 or self.current is None:
            self.current = unit_vectors(model, lora, scale, self.active)

    @torch.no_grad()
    def after_step(self, step, model, lora, scale):
        """After the update of a period's step k: the picked units' masks go to 1 - (k + 1) / length (exactly 0 at the
        period's end), or to 0 at once where the half-space projection says so."""
        if (at := self.where(step)) is None:
            return
        new = unit_vectors(model, lora, scale, self.active)  # their W + D after this step's update
        for kind, cur, nxt in zip(("z_head", "z_int"), self.current, new):
            picked = self.active[kind].to(self.z[kind].device)
            z_old = self.z[kind][picked].cpu()  # [n], layer-major like the vectors
            z_new = torch.where(z_old > 0, torch.full_like(z_old, 1 - (at[1] + 1) / self.length), 0.0)
            if len(cur):  # the trial iterate z_new (W + D_new) against the current one z_old (W + D_old)
                z_new[half_space(z_new[:, None] * nxt, z_old[:, None] * cur, self.eps)] = 0.0
            self.z[kind][picked] = z_new.to(self.z[kind])
        self.current = new

    def state_dict(self):
        return {"z": {k: self.z[k].cpu().clone() for k in self.active}, "active": self.active, "crucial": self.crucial}

    def load_state_dict(self, s):  # (a checkpoint is loaded onto the training device: the bookkeeping stays on the CPU)
        for k in self.active:
            self.z[k].copy_(s["z"][k])
        self.active, self.crucial, self.current = {k: v.cpu() for k, v in s["active"].items()}, \
            {k: v.cpu() for k, v in s["crucial"].items()}, None

    def log(self):
        return {"decaying": int(sum(int((self.z[k][self.active[k].to(self.z[k].device)] > 0).sum()) for k in self.active))}


# ----------------------------------------------------------------------------------------------------
# 3. Dynamic knowledge recovery: categories sampled by how much they degraded (Sec. 3.4)

class Recovery:
    """The training text by category (`categories`: {name: (training docs, validation docs)}, data.default_categories);
    `batches` is their blocks end to end. Until `start` the rows follow data.batch_rows; from then on, every
    `interval` steps, each category's mean next-token loss on `valid_blocks` blocks of its validation documents is
    compared with the intact model's, and each row's category is drawn in proportion to the rise."""

    def __init__(self, tok, seq_len, categories, start=0, interval=25, valid_blocks=8):
        packed = {name: (data.pack(train, tok, seq_len), data.pack(valid, tok, seq_len, blocks=valid_blocks))
                  for name, (train, valid) in categories.items()}
        self.names, self.start, self.interval = list(packed), start, interval
        self.sizes = [len(t) for t, _ in packed.values()]
        tokens = torch.cat([t for t, _ in packed.values()])
        self.batches = (tokens, torch.ones(tokens.shape))
        self.valid = [v for _, v in packed.values()]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # where each category's blocks start
        self.mix, self.intact = None, None  # mix: a probability per category, None before recovery

    @torch.no_grad()
    def losses(self, model, adapter):
        dev = model.tok_embeddings.weight.device
        return torch.tensor([sum(next_token_loss(model, x.to(dev), adapter).item() * len(x) for x in v.split(4)) / len(v)
                             for v in self.valid], dtype=torch.float64)

    def update(self, step, model, adapter):
        """At the start of a step: from `start` on, every `interval` steps, the mix by degradation."""
        if step < self.start or (step - self.start) % self.interval:
            return
        if self.intact is None:
            self.intact = self.losses(model, None)
        rise = (self.losses(model, adapter) - self.intact).clamp_min(0)
        self.mix = rise / rise.sum() if rise.sum() > 0 else torch.full((len(rise),), 1 / len(rise), dtype=torch.float64)

    def rows(self, index, batch_size, n, seed):
        """Rows of the `index`-th batch: data.batch_rows before recovery; then drawn by the mix (seeded by the index,
        so a resumed run draws the same rows)."""
        if self.mix is None:
            return data.batch_rows(index, batch_size, n, seed)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        cats = torch.multinomial(self.mix.float(), batch_size, replacement=True, generator=g).tolist()
        return [self.offsets[c] + int(torch.randint(self.sizes[c], (1,), generator=g)) for c in cats]

    def state_dict(self):
        return {"mix": self.mix, "intact": self.intact}

    def load_state_dict(self, s):  # on the CPU: the rows are drawn there
        self.mix, self.intact = (None if v is None else v.cpu() for v in (s["mix"], s["intact"]))

    def log(self):
        return {"mix": dict(zip(self.names, [round(p, 4) for p in self.mix.tolist()]))} if self.mix is not None else {}


# ----------------------------------------------------------------------------------------------------
# nute.py's hooks

def start(args, model, batches, out, fixed, recovery):
    """LoRAShear's parts that change a run as it goes -> {"lhspg": Lhspg (the fixed masks), "recovery": Recovery (the data)}
    (either may be absent). The crucial units are found once, before the first step (the cost goes to out/masks.json,
    like a baseline's); a resumed run takes them, and everything else here, from its checkpoint."""
    parts = {}
    if args.method == "lorashear":
        if args.fsdp:  # the saliency reads whole weights
            raise ValueError("--method lorashear: not with --fsdp")
        if (end := Lhspg(fixed, model.config, args.target, args.steps, None).end) > args.steps:
            raise ValueError(f"--method lorashear: its warm-up and pruning periods need --steps {end} or more")
        crucial, t0, dev = None, time.time(), model.tok_embeddings.weight.device
        if not (Path(out) / "checkpoint.pt").exists():
            crucial = crucial_units(model, calibration_batches(args, model, batches)[:1])
            if args.rank == 0:
                (Path(out) / "masks.json").write_text(json.dumps({"method": "lorashear knowledge distribution",
                                                                  "seconds": time.time() - t0, "peak_mb": peak_mb(dev)}))
        parts["lhspg"] = Lhspg(fixed, model.config, args.target, args.steps, crucial)
    if recovery:  # after LHSPG's periods, or from the first step for masks fixed from the start
        recovery.start = parts["lhspg"].end if parts else 0
        parts["recovery"] = recovery
    return parts


def before_step(parts, step, model, student):
    if "recovery" in parts:
        parts["recovery"].update(step, model, {**student.fixed, **student.lora, "lora_scale": student.lora_scale})
    if "lhspg" in parts:
        parts["lhspg"].before_step(step, model, student.lora, student.lora_scale)


def rows(parts, index, batch_size, n, seed):
    """The rows of a batch: drawn by the recovery's mix, or data.batch_rows."""
    return (parts["recovery"].rows if "recovery" in parts else data.batch_rows)(index, batch_size, n, seed)


def after_step(parts, step, model, student):
    if "lhspg" in parts:
        parts["lhspg"].after_step(step, model, student.lora, student.lora_scale)
