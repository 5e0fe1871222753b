"""NutePrune: prune a LLaMA-family model with hard-concrete masks, LoRA and numerous teachers.

    python nute.py                                   # the embedded default: SmolLM2-135M to 20% sparsity
    python nute.py --ckpt llama-7b --target 0.2      # any HF / Meta / GGUF checkpoint
    python nute.py --out runs/x --resume             # continue an interrupted run
    python nute.py --run runs/x --finetune alpaca.json --out runs/x-ft   # post fine-tuning, masks frozen

One intact model is loaded. The student is that model with learnable masks + LoRA; every teacher is the
same model with a frozen snapshot of earlier masks + LoRA (a few MB, kept on the CPU). Paper Sec. 3.
"""
import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import baselines
import data
import evaluate
import hub
from checkpoint import (LoadError, check_device, check_finite, check_run_folder, load, load_adapter, load_run_state,
                        open_run, save, save_adapter, save_gguf, save_run_state)
from model import (LORA_TARGETS, MASKS, build, compile_decoding, decode_one_token, expected_size, mask_shapes,
                   mask_sparsity, pad_model, prunable_size, slice_model)

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
def deterministic_z(log_alpha, shift=0.0):
    """Eval/export mask: zero the round(N - sum P(keep)) units with the smallest log_alpha (per layer for
    heads and FFN units, over all dims for hidden); the rest keep the soft value sigmoid(0.8 log_alpha / beta).
    shift (not in the reference) counts P(keep) at log_alpha + shift: more or fewer units, the same ranking."""
    rows = log_alpha.reshape(-1, log_alpha.shape[-1]).float()
    z = torch.sigmoid(rows / BETA * 0.8)
    for r in range(rows.shape[0]):
        n_zero = round(rows.shape[1] - keep_prob(rows[r] + shift).sum().item())
        if n_zero > 0:
            z[r, rows[r].topk(n_zero, largest=False).indices] = 0
    return z.reshape(log_alpha.shape)


def expected_sparsity(log_alpha, config):
    """s_hat = 1 - E / M, Eq. 3 with each unit counted by its keep probability (model.expected_size)."""
    p = {k: keep_prob(v) for k, v in log_alpha.items()}
    return 1 - expected_size(p["z_head"], p["z_int"], p["z_hid"], config) / prunable_size(config)


def lagrangian(s_hat, target, lambdas):
    """Eq. 11: lambda1 (s - t) + lambda2 (s - t)^2; the lambdas are trained by gradient ascent
    (`--controller lagrangian`, the paper's way to reach the target)."""
    return lambdas[0] * (s_hat - target) + lambdas[1] * (s_hat - target) ** 2


@torch.no_grad()
def project_to_target(log_alpha, target, config, iters=50):
    """The default controller (`--controller project`, not in the paper): after each optimizer step, shift
    every log_alpha by one constant c so that Eq. 3's expected sparsity equals the ramped target exactly.
    s_hat(log_alpha + c) falls monotonically in c, so bisection finds c. The shift sets how many units are
    kept; which ones is left to what the task gradient taught log_alpha (a common shift keeps their order).
    Unlike Eq. 11 it has no state, so nothing winds up, and it needs no rate: it reaches any target in one
    step, where Adam moves log_alpha ~lr a step from its clamp (tens of steps before the first unit goes)."""
    shifted = lambda c: {k: (v + c).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) for k, v in log_alpha.items()}
    span = 2 * (LOG_ALPHA_MAX - LOG_ALPHA_MIN)  # enough to move any log_alpha from one clamp to the other
    lo, hi = -span, span
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_sparsity(shifted(mid), config) > target else (lo, mid)
    for k, v in shifted((lo + hi) / 2).items():
        log_alpha[k].copy_(v)


# ----------------------------------------------------------------------------------------------------
# LoRA (Eq. 4): W x + B A x * alpha / r, A random, B zero, so training starts from the intact model

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


@dataclass
class Student:
    """What training changes: log_alpha of every mask ({} when the masks are fixed) and the LoRA pairs."""
    log_alpha: dict
    lora: dict
    lora_scale: float
    fixed: dict  # masks that do not learn (magnitude baseline, post fine-tuning), else {}

    def adapter(self, gen):
        """The adapter of one training step: masks sampled once (Eq. 10) + LoRA."""
        z = {k: sample_z(v, gen) for k, v in self.log_alpha.items()} if self.log_alpha else self.fixed
        return {**z, **self.lora, "lora_scale": self.lora_scale}

    def frozen(self):
        """Deterministic masks + a copy of LoRA on the CPU: a teacher snapshot, or the run's result."""
        masks = {k: deterministic_z(v) for k, v in self.log_alpha.items()} if self.log_alpha else self.fixed
        return {**{k: v.detach().float().cpu().clone() for k, v in {**masks, **self.lora}.items()},
                "lora_scale": torch.tensor(float(self.lora_scale))}


# ----------------------------------------------------------------------------------------------------
# Progressive knowledge distillation with numerous teachers (Sec. 3.2, Eq. 8-9)

class TeacherQueue:
    """Snapshots of the student's deterministic masks + LoRA at sparsity points i, 2i, ... below the target.

    Recording (as the reference): at most one snapshot a step, in order; a step that passed several points
    records the next one, the following steps the rest.
    Schedule (`teacher_key`), with gap g and interval i (defaults 0.10 and 0.01):
      stage 1, until every point is recorded and the student has reached the target: a student at
        sparsity s learns from the snapshot at s - g, key floor((s - g) / i) (Eq. 8); while there is no
        such snapshot (s < g + i), from the intact model (Eq. 9).
      stage 2, from then to the end: a sparsity that falls linearly from the target to 0 picks the
        snapshot at or just above it, less g, so the teachers go from weak (t - g) to strong, an equal
        share of steps each, and the intact model teaches the final g / t of stage 2 (50% at t = 0.2).
    A snapshot lives on the CPU; a teacher forward moves it to the device for that forward only.
    """

    def __init__(self, target, interval=0.01, gap=0.10):
        self.target, self.interval, self.gap = target, interval, gap
        self.points = math.ceil(target / interval - 1e-6) - 1  # keys 1 .. points: every interval below the target
        self.snapshots, self.stage2_start = {}, None  # key k -> adapter at sparsity k * i; the step stage 2 began

    def maybe_snapshot(self, s_hat, student):
        k = len(self.snapshots) + 1
        if k <= self.points and s_hat >= k * self.interval - 1e-6:
            self.snapshots[k] = student.frozen()
            return k

    def teacher_key(self, step, s_student, steps):
        """-> the snapshot key that teaches at this step, or None for the intact model."""
        if self.stage2_start is None and len(self.snapshots) == self.points and s_student >= self.target - 1e-6:
            self.stage2_start = step
        if self.stage2_start is None:  # Eq. 8-9
            k = math.floor((s_student - self.gap) / self.interval + 1e-6)
        else:
            s = self.target * (1 - (step - self.stage2_start) / max(1, steps - self.stage2_start))
            k = math.ceil((s - self.gap) / self.interval - 1e-6)
        usable = [key for key in self.snapshots if key <= k]
        return max(usable) if usable else None

    def state(self):
        return {"snapshots": self.snapshots, "stage2_start": self.stage2_start}

    def nbytes(self):
        return sum(t.numel() * t.element_size() for snap in self.snapshots.values() for t in snap.values())


class TemperedKL(torch.autograd.Function):
    """Eq. 5's term, T^2 * KL(p_t || q_s) / batch, with its gradient T / batch * (q_s - p_t) formed in the
    same pass, a chunk of rows at a time in three reused fp32 buffers: autograd's log_softmax + kl_div would
    keep fp32 copies of both [tokens, vocab] tensors for backward, and fresh temporaries that large cost
    page faults on every step on the CPU. What is kept is one gradient in the logits' dtype. On a CPU a
    chunk of ~2 MB per buffer stays in the cache over the dozen passes below; a GPU keeps 16 MB ones
    (fewer launches)."""

    @staticmethod
    def forward(ctx, logits_s, logits_t, T, rows=None):
        s, t = logits_s.flatten(0, -2), logits_t.flatten(0, -2)  # [tokens, vocab]
        chunk = 2 ** 19 if s.device.type == "cpu" else 2 ** 22  # fp32 entries per buffer: 2 MB / 16 MB
        batch, rows = logits_s.shape[0], min(len(s), rows or max(1, chunk // s.shape[1]))
        log_q, log_p, diff = (torch.empty(rows, s.shape[1], device=s.device) for _ in range(3))
        grad, total = torch.empty_like(s), torch.zeros((), device=s.device)
        for i in range(0, len(s), rows):
            n = min(rows, len(s) - i)
            lq, lp, d = log_q[:n].copy_(s[i:i + n]).div_(T), log_p[:n].copy_(t[i:i + n]).div_(T), diff[:n]
            lq.sub_(lq.logsumexp(-1, keepdim=True))  # log_softmax in place
            lp.sub_(lp.logsumexp(-1, keepdim=True))
            torch.sub(lp, lq, out=d)
            p = lp.exp_()
            total += torch.dot(p.view(-1), d.view(-1))  # sum of p * (log p - log q)
            grad[i:i + n] = lq.exp_().sub_(p).mul_(T / batch)
        ctx.grad = grad.view(logits_s.shape)  # used once: backward scales it in place
        return total * T * T / batch

    @staticmethod
    def backward(ctx, g):  # g: a 0-dim fp32 tensor, applied in fp32 (PyTorch's scalar rule)
        grad = ctx.grad
        del ctx.grad  # a second backward through the same graph fails instead of reusing a scaled gradient
        return grad.mul_(g), None, None, None


def distill_loss(logits_s, logits_t, hidden_s, hidden_t, z_hid, temperature, layer_norm="none"):
    """Eq. 5: KL(teacher || student) at temperature T, summed over tokens, averaged over the batch.
    Eq. 6: sum over the states of Transformer.forward(return_hidden=True) (HF's hidden_states[1:]) of their
    MSE over the hidden dims the student keeps, each cast to fp16 as the reference does (so an MSE past
    65504 is inf and its step is skipped). layer_norm="teacher" (not in the reference) divides each MSE by
    the teacher's mean square there: every layer then counts alike, where SmolLM2's few huge activations
    otherwise make the sum (README, "The losses")."""
    kl = TemperedKL.apply(logits_s, logits_t, temperature)
    kept, layer = z_hid > 0, torch.zeros((), device=logits_s.device)
    for hs, ht in zip(hidden_s, hidden_t):
        hs, ht = hs.float()[..., kept], ht.float()[..., kept]
        mse = F.mse_loss(hs, ht)
        if layer_norm == "teacher":
            mse = mse / ht.pow(2).mean().clamp(min=1e-12)
        layer = layer + mse.half()
    return kl, layer


# ----------------------------------------------------------------------------------------------------
# One micro-batch

def next_token_loss(logits, tokens, loss_mask):
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    m = loss_mask[:, 1:].flatten()
    return (nll * m).sum() / m.sum().clamp(min=1)


def micro_step(model, x, loss_mask, student, teacher, distill, args):
    """Forward and backward of one micro-batch -> its loss terms ("skipped" when the loss is not finite).
    teacher: an adapter, or None for the intact model; distill=False trains on the next-token loss instead
    (no-KD ablation, fine-tuning)."""
    logits, hidden = model(x, student, return_hidden=True)
    if not distill:
        loss = next_token_loss(logits, x, loss_mask)
        terms = {"ce": loss.item()}
    else:
        with torch.no_grad():  # same base weights, teacher masks + LoRA: no second model
            logits_t, hidden_t = model(x, teacher, return_hidden=True)
        hidden = hidden if args.layer_weight else []  # weight 0: skip the layer loss altogether
        kl, layer = distill_loss(logits, logits_t, hidden, hidden_t, student["z_hid"], args.temperature, args.layer_norm)
        loss = args.kl_weight * kl + args.layer_weight * layer  # Eq. 7 without the L0 term
        terms = {"kl": kl.item(), "layer": layer.item()}
    if not torch.isfinite(loss):  # the reference skips such a step: no backward, no update
        return {**terms, "skipped": 1}
    (loss / args.grad_accum).backward()
    return terms


# ----------------------------------------------------------------------------------------------------
# The training loop: pruning (masks + LoRA, Lagrangian, teachers) and post fine-tuning (masks frozen)

RUN_ONLY = ("resume", "stop_after", "save_every", "eval", "out", "grad_checkpoint", "compile", "rank", "gguf", "masks",
            "export_dtype")  # may differ on --resume
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SKIPPED = 5  # this many non-finite steps in a row stop the run: it has diverged
CALIBRATION = 2  # training batches the baselines score units on (LLM-Pruner: 10 sequences)


class Diverged(Exception):
    """The loss or the gradients stayed NaN / inf; the command line prints it as one line."""


def warmup_for(target):
    """The paper ramps the target over 4 of 7 epochs at 20% sparsity and 1 of 7 at 50% (Sec. 4); between
    them the fraction is interpolated linearly in the target, and held at 4/7 below 20%, 1/7 above 50%."""
    return 4 / 7 - 3 / 7 * min(1.0, max(0.0, (target - 0.2) / 0.3))


def target_at(step, args):
    """Eq. 11's target t after `step` steps: it warms up linearly from 0 over the first `warmup` of the
    steps, then holds."""
    return args.target * min(1.0, step / max(1, round(args.warmup * args.steps)))


def lora_lr(step, args):
    return args.lr_lora * (1 - step / args.steps)  # linear decay to 0


def baseline_masks(args, model, batches, out):
    """--method magnitude / taylor / bonsai: the masks, chosen once before training (calibration: the first
    CALIBRATION training batches) and kept in out/masks.safetensors, so a resumed run reuses them."""
    path = Path(out) / "masks.safetensors"
    if args.masks and not path.exists():  # chosen by an earlier run: kept here with what choosing cost
        shutil.copy(args.masks, path)
        if os.path.exists(cost := os.path.join(os.path.dirname(args.masks), "masks.json")):
            shutil.copy(cost, Path(out) / "masks.json")
    if path.exists():
        z = load_file(str(path))
        if {k: tuple(v.shape) for k, v in z.items()} != mask_shapes(model.config):
            raise ValueError(f"{args.masks or path}: not the masks of this model (shapes {mask_shapes(model.config)})")
        return z
    device, t0 = model.tok_embeddings.weight.device, time.time()
    calibration = [batches[0][i * args.batch_size:(i + 1) * args.batch_size].to(device) for i in range(CALIBRATION)]
    z = {"magnitude": lambda: baselines.magnitude_masks(model, args.target),
         "taylor": lambda: baselines.taylor_masks(model, calibration, args.target),
         "bonsai": lambda: baselines.bonsai_masks(model, calibration, args.target, args.bonsai_samples, seed=args.seed),
         }[args.method]()
    if args.rank == 0:  # what choosing them cost: Bonsai's promise is the memory of inference
        (Path(out) / "masks.json").write_text(json.dumps({"method": args.method, "seconds": time.time() - t0, "peak_mb": peak_mb(device)}))
        save_file(z, str(path))
    return z


def init_student(args, model, gen, fixed):
    """One of three mask sources: learned (NutePrune), a pruning run's masks (post fine-tuning) or a baseline's
    (`fixed`, from baseline_masks); the last two stay fixed while LoRA trains."""
    targets, device = args.lora_targets.split(","), model.tok_embeddings.weight.device
    log_alpha = {}
    if args.run:  # its LoRA continues and grows to the fine-tuning targets
        run = load_adapter(args.run, model)
        fixed = {k: run[k] for k in MASKS}
        lora = init_lora(model, targets, args.lora_rank, gen, {k: v.cpu() for k, v in run.items() if ".lora_" in k})
    elif fixed:
        fixed = {k: v.to(device) for k, v in fixed.items()}
        lora = init_lora(model, targets, args.lora_rank, gen)
    else:
        log_alpha = init_log_alpha(model.config, gen)
        lora = {} if args.masks_only else init_lora(model, targets, args.lora_rank, gen)
    for group in (log_alpha, lora):
        for k in group:
            group[k] = group[k].to(device).requires_grad_(True)
    return Student(log_alpha, lora, args.lora_alpha / args.lora_rank, fixed)


def make_optimizers(args, student, lambdas):
    """AdamW for each group that learns; with `--controller lagrangian` the lambdas too, by gradient ascent
    (Eq. 11 is maximized over them)."""
    opts = {}
    if student.log_alpha:
        opts["mask"] = torch.optim.AdamW(student.log_alpha.values(), lr=args.lr_mask, weight_decay=0)
        if args.controller == "lagrangian":
            opts["lambda"] = torch.optim.AdamW([lambdas], lr=args.lr_lambda, weight_decay=0, maximize=True)
    if student.lora:
        opts["lora"] = torch.optim.AdamW(student.lora.values(), lr=args.lr_lora, weight_decay=0)
    return opts


def save_checkpoint(out, run_id, step, student, lambdas, opts, queue, gen):
    for group in (student.log_alpha, student.lora, {"lambdas": lambdas}):
        check_finite(group, Path(out) / "checkpoint.pt")
    save_run_state(out, {"log_alpha": student.log_alpha, "lora": student.lora, "lambdas": lambdas, "step": step,
                         "opts": {k: o.state_dict() for k, o in opts.items()}, "queue": queue.state(),
                         "rng": gen.get_state(), "run_id": run_id})


def restore_checkpoint(out, run_id, student, lambdas, opts, queue, gen):
    """Puts the saved state back into the live tensors and objects -> the step to go on from (0 when the
    run died before its first checkpoint). Every rank reads it; rank 0 alone trims the log."""
    ck = load_run_state(out, run_id, lambdas.device, trim_log=int(os.environ.get("RANK", 0)) == 0)
    if ck is None:
        return 0
    with torch.no_grad():
        for group, saved in ((student.log_alpha, ck["log_alpha"]), (student.lora, ck["lora"])):
            for k in group:
                group[k].copy_(saved[k])
        lambdas.copy_(ck["lambdas"])
    for name, opt in opts.items():
        opt.load_state_dict(ck["opts"][name])
    queue.snapshots, queue.stage2_start = ck["queue"]["snapshots"], ck["queue"]["stage2_start"]
    gen.set_state(ck["rng"])
    return ck["step"]


def train_step(step, model, batches, student, lambdas, opts, queue, gen, args):
    """One optimizer step: sample masks, pick the teacher, forward/backward every micro-batch, step the
    optimizers, bring the expected sparsity to the target, snapshot the student -> the step's log row."""
    t0, config, device = time.time(), model.config, lambdas.device
    target, learn_masks = target_at(step + 1, args), bool(student.log_alpha)  # the target this step ends on
    if "lora" in opts:
        opts["lora"].param_groups[0]["lr"] = lora_lr(step, args)
    adapter = student.adapter(gen)
    # the masks are sampled once a step; every micro-batch adds its gradient to z, and z's own graph back
    # to log_alpha is walked once, after the last micro-batch
    sampled = {k: adapter[k] for k in student.log_alpha}
    adapter.update({k: z.detach().requires_grad_() for k, z in sampled.items()})
    distill = "none" if args.finetune else args.distill
    key = teacher = None
    if distill == "pkd" and learn_masks:  # with fixed masks there are no snapshots: the intact model teaches
        key = queue.teacher_key(step, expected_sparsity(student.log_alpha, config).item(), args.steps)
        teacher = None if key is None else {k: v.to(device) for k, v in queue.snapshots[key].items()}
    terms = {"kl": 0.0, "layer": 0.0, "ce": 0.0, "skipped": 0}
    for micro in range(args.grad_accum):  # this rank's share of the global batch (all of it in one process)
        rows = data.batch_rows(step * args.grad_accum + micro, args.batch_size * args.world, len(batches[0]), args.seed)
        rows = rows[args.rank * args.batch_size:(args.rank + 1) * args.batch_size]
        x, m = batches[0][rows].to(device), batches[1][rows].to(device)
        for k, v in micro_step(model, x, m, adapter, teacher, distill != "none", args).items():
            terms[k] += v if k == "skipped" else v / args.grad_accum
    z_grads = [adapter[k].grad for k in sampled]
    if sampled and all(g is not None for g in z_grads):  # (None: every micro-batch was skipped)
        torch.autograd.backward(list(sampled.values()), z_grads)
    if args.world > 1:
        terms = average_over_ranks(student, terms, args.world)
    lag = torch.zeros(())
    if "lambda" in opts:  # Eq. 7's L0 term: descends on log_alpha, ascends on the lambdas
        lag = lagrangian(expected_sparsity(student.log_alpha, config), target, lambdas)
        lag.backward()
    grads = [p.grad for p in (*student.log_alpha.values(), *student.lora.values(), lambdas) if p.grad is not None]
    terms["skipped"] = int(terms["skipped"] > 0 or not all(torch.isfinite(g).all() for g in grads))
    if student.lora:
        torch.nn.utils.clip_grad_norm_(student.lora.values(), 1.0)  # as the reference: LoRA only, not log_alpha
    for opt in opts.values():
        if not terms["skipped"]:
            opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for v in student.log_alpha.values():
            v.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    if learn_masks and args.controller == "project" and not terms["skipped"]:
        project_to_target(student.log_alpha, target, config)
    s_now = expected_sparsity(student.log_alpha, config).item() if learn_masks else mask_sparsity(student.fixed, config)
    taken = queue.maybe_snapshot(s_now, student) if distill == "pkd" and learn_masks else None
    return {"step": step + 1, **terms, "expected_sparsity": s_now, "target": target, "snapshot": taken,
            **({"lagrangian": lag.item(), "lambda1": lambdas[0].item(), "lambda2": lambdas[1].item()} if "lambda" in opts else {}),
            "teacher": None if distill == "none" else ("intact" if key is None else key * args.interval),
            "lr_lora": lora_lr(step, args), "tokens_per_s": x.numel() * args.grad_accum / (time.time() - t0),
            "memory_mb": peak_mb(device)}


def peak_mb(device):
    """Peak memory so far: CUDA's allocator on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def average_over_ranks(student, terms, world):
    """Data parallel (torchrun): every rank ends with the gradients and losses of the global batch. A rank
    whose loss was not finite sends NaN, so every rank skips that step together."""
    for p in (*student.log_alpha.values(), *student.lora.values()):
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        if terms["skipped"]:
            p.grad.fill_(math.nan)
        dist.all_reduce(p.grad)
        p.grad /= world
    losses = torch.tensor([terms["kl"], terms["layer"], terms["ce"]], device=p.device) / world
    dist.all_reduce(losses)
    return {**dict(zip(("kl", "layer", "ce"), losses.tolist())), "skipped": 0}  # skipped: set by the NaN check


def init_distributed(args):
    """Under torchrun (args.world > 1): one process per device, gloo on the CPU, NCCL on GPUs."""
    if args.world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def shard(model, args):
    """--fsdp: every block's base weights (and the embeddings) split over the ranks with FSDP2; a forward
    gathers a block's weights just in time. Masks and LoRA stay whole on every rank."""
    from torch.distributed.fsdp import fully_shard
    mesh = dist.device_mesh.init_device_mesh(torch.device(args.device).type, (args.world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unshard(model):
    """--fsdp: the whole weights again (a collective: every rank calls it) -> a plain model."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return build(model.config, state)


def load_model_and_data(args):
    """-> the intact model, its tokenizer and the training blocks (tokens, loss mask), checked."""
    model, tok = load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device)
    model.grad_checkpoint = args.grad_checkpoint
    if args.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len}: {args.ckpt} takes at most {model.config.max_seq_len} tokens")
    batches = data.training_blocks(tok, args.seq_len, args.data, args.finetune, args.blocks)
    if len(batches[0]) == 0:
        raise ValueError("the training data is empty")
    return model, tok, batches


def train(args):
    """The whole run -> (model, tokenizer, adapter), or None when --stop-after ended it early."""
    init_distributed(args)
    if args.rank == 0:
        check_run_folder(args.out, args.resume)  # before the long load; the folder is written only after it
    model, tok, batches = load_model_and_data(args)
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    out, run_id = open_run(args.out, settings, args.resume) if args.rank == 0 else (Path(args.out), None)
    if args.world > 1:  # the other ranks learn the run id (and wait for rank 0's checks)
        run_id = [run_id]
        dist.broadcast_object_list(run_id)
        run_id = run_id[0]
    gen = torch.Generator().manual_seed(args.seed)  # LoRA init and mask noise: the same on every rank
    fixed = baseline_masks(args, model, batches, out) if args.method != "nuteprune" else {}
    student = init_student(args, model, gen, fixed)
    if args.fsdp:
        shard(model, args)
    lambdas = torch.zeros(2, device=model.tok_embeddings.weight.device, requires_grad=True)
    opts, queue = make_optimizers(args, student, lambdas), TeacherQueue(args.target, args.interval, args.gap)
    start = restore_checkpoint(out, run_id, student, lambdas, opts, queue, gen) if args.resume else 0

    # The loop. Every step appends a row to log.jsonl (one write: a crash tears at most the last line);
    # every save_every steps an atomic checkpoint holds all the state a resume needs (masks, LoRA, lambdas,
    # optimizers, teacher snapshots, the RNG). A step with a non-finite loss or gradient changes nothing.
    skipped = in_a_row = 0
    model.compile_blocks = args.compile  # for the training steps only: evaluation and decoding stay eager
    with open(out / "log.jsonl" if args.rank == 0 else os.devnull, "a") as log:
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.rank > 0,
                   desc="prune" if student.log_alpha else "tune")
        for step in bar:
            row = train_step(step, model, batches, student, lambdas, opts, queue, gen, args)
            log.write(json.dumps(row) + "\n")
            skipped, in_a_row = skipped + row["skipped"], (in_a_row + 1) * row["skipped"]
            if in_a_row == MAX_SKIPPED:
                raise Diverged(f"steps {step + 2 - in_a_row}-{step + 1}: the loss or its gradients were NaN or inf "
                               f"{in_a_row} times in a row (learning rate too high? fp16 overflow?); the last "
                               f"checkpoint ({out / 'checkpoint.pt'}) is kept as it was")
            bar.set_postfix(sparsity=f"{row['expected_sparsity']:.3f}", target=f"{row['target']:.3f}",
                            **{k: f"{row[k]:.3g}" for k in ("kl", "layer", "ce") if row[k]},
                            **({"skipped": skipped} if skipped else {}))
            if ((step + 1) % args.save_every == 0 or step + 1 == args.steps) and args.rank == 0:
                log.flush()
                save_checkpoint(out, run_id, step + 1, student, lambdas, opts, queue, gen)
            if args.stop_after and step + 1 - start >= args.stop_after:
                return None  # a deliberate stop, like a kill: what was not checkpointed is lost

    model.compile_blocks = False
    if args.fsdp:
        model = unshard(model)
    adapter = student.frozen()
    if args.rank > 0:
        return None
    save_adapter(adapter, out)
    (out / "structure.md").write_text(evaluate.structure_table(adapter, model.config))
    adapter["lora_scale"] = float(adapter["lora_scale"])
    return model, tok, {k: v.to(model.tok_embeddings.weight.device) if torch.is_tensor(v) else v
                        for k, v in adapter.items()}


# ----------------------------------------------------------------------------------------------------
# Command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description="NutePrune: structured pruning with numerous teachers")
    p.add_argument("--ckpt", help="HF, Meta or .gguf checkpoint, or hub name ORG/NAME[@REV] (default: fetched SmolLM2-135M)")
    p.add_argument("--target", type=float, default=0.2, help="target sparsity of the prunable weights, in (0, 1)")
    p.add_argument("--out", default="runs/default", help="run folder: settings, log.jsonl, checkpoint, export")
    p.add_argument("--data", help="training text (.txt, .jsonl[.gz] with 'text', <doc> wiki); default: fetched C4 + Wikipedia")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--blocks", type=int, help="train on the first N packed blocks of --seq-len tokens (the paper: "
                   "20000 of 512); default: all of the text")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--warmup", type=float, help="fraction of steps the target ramps up over "
                   "(default as the paper: 4/7 at target 0.2, 1/7 at 0.5, linear in between)")
    p.add_argument("--controller", choices=["project", "lagrangian"], default="project",
                   help="project: shift log_alpha onto the ramped target every step (default); "
                   "lagrangian: the paper's Eq. 11 with learned lambdas")
    p.add_argument("--distill", choices=["pkd", "kd", "none"], default="pkd",
                   help="pkd: progressive numerous teachers; kd: the intact teacher throughout; none: next-token loss")
    p.add_argument("--masks-only", action="store_true", help="learn masks without LoRA (the paper's dagger rows)")
    p.add_argument("--method", choices=["nuteprune", "magnitude", "taylor", "bonsai"], default="nuteprune",
                   help="the baselines fix their masks at --target before training (magnitude: weight norms; taylor: "
                   "LLM-Pruner's |w * dL/dw|; bonsai: forward passes only), then LoRA recovers for --steps (0: none)")
    p.add_argument("--bonsai-samples", type=int, default=100, help="--method bonsai: sub-models per pruning round")
    p.add_argument("--masks", help="with --method: its masks as an earlier run chose them (that run's "
                   "masks.safetensors), so one choice is recovered several ways without choosing again")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-targets", default=None, help="comma list of q,k,v,o,gate,up,down (default q,v; all for --finetune)")
    p.add_argument("--lr-mask", type=float, default=0.1)
    p.add_argument("--lr-lambda", type=float, default=0.1, help="--controller lagrangian: the lambdas' ascent rate")
    p.add_argument("--lr-lora", type=float, default=None, help="default 1e-3 (pruning), 1e-4 (--finetune)")
    p.add_argument("--kl-weight", type=float, default=0.1, help="Eq. 7, reference default")
    p.add_argument("--layer-weight", type=float, default=0.9, help="alpha_1 of Eq. 7, reference default")
    p.add_argument("--layer-norm", choices=["none", "teacher"], default="teacher",
                   help="teacher (default, not in the reference): each layer's MSE divided by the teacher's mean "
                   "square there; none: the reference's raw MSE")
    p.add_argument("--temperature", type=float, default=2 / 3)
    p.add_argument("--interval", type=float, default=0.01, help="snapshot every this much sparsity (i)")
    p.add_argument("--gap", type=float, default=0.10, help="teacher is this much less sparse in stage 1 (g)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="base weights and compute (masks, LoRA stay fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base weights over the processes "
                   "(FSDP2), for a model that does not fit one device; default: each process holds them all")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block: the "
                   "student's activations are recomputed in backward (less memory, ~1/3 more compute)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training blocks (the small ops between "
                   "the products fuse: ~1.15-1.2x a step on a CPU, ~1 min to compile) and the report's decode step")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, help="stop after N steps of this invocation (like a kill; --resume continues)")
    p.add_argument("--run", help="a pruning run whose masks stay frozen and whose LoRA goes on training")
    p.add_argument("--finetune", help="post fine-tuning on an Alpaca JSON file, masks frozen (Sec. 3.3)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip perplexity and latency at the end")
    p.add_argument("--export-dtype", choices=list(DTYPES), help="the exported model/ (default: the run's --dtype); "
                   "the end-of-run report times the intact model in the same dtype")
    p.add_argument("--gguf", type=str.upper, choices=["F32", "F16", "BF16", "Q8_0", "Q4_0"],
                   help="also write the pruned model as out/model.gguf for llama.cpp, in this tensor type")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Every setting checked and the defaults that depend on others filled in, before anything is loaded
    or written -> args."""
    if not 0 < args.target < 1:
        raise ValueError(f"--target must be in (0, 1), got {args.target}")
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("steps", "batch_size", "grad_accum", "save_every", "lora_rank", "stop_after", "blocks", "bonsai_samples"):
        least = 0 if name == "steps" and args.method != "nuteprune" else 1  # a baseline with --steps 0: no recovery
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise ValueError(f"{flag(name)} must be at least {least}, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a next-token pair), got {args.seq_len}")
    for name in ("lr_mask", "lr_lambda", "lr_lora", "lora_alpha", "temperature", "interval"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            raise ValueError(f"{flag(name)} must be a positive number, got {getattr(args, name)}")
    for name in ("kl_weight", "layer_weight", "gap"):
        if not 0 <= getattr(args, name) < math.inf:
            raise ValueError(f"{flag(name)} must be a number >= 0, got {getattr(args, name)}")
    if args.warmup is not None and not 0 <= args.warmup <= 1:
        raise ValueError(f"--warmup is a fraction of the steps in [0, 1], got {args.warmup}")
    check_device(args.device)
    for name in ("ckpt", "data", "finetune"):
        path = getattr(args, name)
        if path and not os.path.exists(path) and not (name == "ckpt" and hub.REPO_ID.fullmatch(path)):
            raise ValueError(f"--{name} {path}: no such file or folder" + (name == "ckpt") * " (nor a hub name ORG/NAME)")
    if args.run and not os.path.isfile(os.path.join(args.run, "adapter.safetensors")):
        raise ValueError(f"--run {args.run}: no adapter.safetensors there (not a finished nute.py run)")
    args.world, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # torchrun's
    if args.fsdp and args.compile:
        raise ValueError("--compile is not supported with --fsdp (the sharded blocks are not compiled)")
    if args.fsdp and args.world < 2:
        raise ValueError("--fsdp shards over several processes: run under torchrun --nproc_per_node N")
    if args.masks and (args.method == "nuteprune" or not os.path.isfile(args.masks)):
        raise ValueError(f"--masks {args.masks}: a baseline's masks.safetensors, given with its --method")
    if args.method != "nuteprune" and (args.run or args.masks_only):
        raise ValueError(f"--method {args.method} chooses its own masks: not with --run or --masks-only")
    if args.finetune and not args.run:
        raise ValueError("--finetune needs --run, the pruning run whose masks it keeps")
    args.lora_targets = args.lora_targets or ("q,k,v,o,gate,up,down" if args.finetune else "q,v")
    if bad := set(args.lora_targets.split(",")) - set(LORA_TARGETS):
        raise ValueError(f"--lora-targets: unknown {sorted(bad)}; choose from {','.join(LORA_TARGETS)}")
    args.lr_lora = args.lr_lora or (1e-4 if args.finetune else 1e-3)
    args.warmup = warmup_for(args.target) if args.warmup is None else args.warmup
    if args.ckpt is None:
        if not data.ready():  # missing, or damaged since it was fetched
            data.fetch()
        args.ckpt = str(data.default_model_path())
    return args


def main(argv=None):
    args = get_args(argv)
    result = train(args)
    if args.rank > 0:  # torchrun: rank 0 exports and reports
        return
    if result is None:
        print(f"stopped after {args.stop_after} steps; continue with --resume")
        return
    model, tok, adapter = result
    out = Path(args.out)
    dtype = DTYPES[args.export_dtype or args.dtype]
    # zero units (exact) for shapes that decode faster here: every layer in the fixed GQA layout (SDPA reads the
    # kv heads in place), and in 16 bits widths in multiples of 32 (README, "Pruned vs dense decoding")
    small = pad_model(slice_model(model, adapter), 1 if dtype == torch.float32 else 32).to(dtype)
    save(small, tok, out / "model")
    if args.gguf:  # for llama.cpp (checkpoint.py writes one from any finished run too)
        save_gguf(small, tok, out / "model.gguf", args.gguf)
    print((out / "structure.md").read_text())
    print(evaluate.trajectory(out / "log.jsonl"))
    final = mask_sparsity(adapter, model.config)
    if abs(final - args.target) > 0.005:
        print(f"warning: the pruned model's sparsity {final:.4f} misses the target {args.target} by more than 0.005")
    print(f"exported {sum(p.numel() for p in small.parameters()):,} parameters "
          f"(intact {sum(p.numel() for p in model.parameters()):,}) to {out / 'model'}")
    if args.eval:
        evaluate.run_report(model, small, tok, adapter, out, compile_decoding() if args.compile else decode_one_token)


if __name__ == "__main__":
    try:
        main()
    except (LoadError, ValueError, OSError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
