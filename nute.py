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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import baselines
import data
import evaluate
import lorashear
from formats import hub, svg
from formats.checkpoint import LoadError, check_device, check_finite, load, load_adapter
from formats.run import check_run_folder, export, load_run_state, open_run, save_adapter, save_run_state
from kernels import TemperedKL, average_over_ranks, full_state, init_distributed, peak_mb, shard
from masks import (LOG_ALPHA_MAX, LOG_ALPHA_MIN, MASKS, deterministic_z, expected_sparsity, init_log_alpha, lagrangian,
                   mask_sparsity, project_to_target, sample_z, shifted, structure_table, target_at, warmup_for)
from model import LORA_TARGETS, build, compile_decoding, decode_one_token, init_lora

__all__ = ["Student", "TeacherQueue", "State", "start", "distill_loss", "micro_step", "train_step", "train",
           "get_args", "main"]  # what other code may call (lab/ does: tests/test_repo.py); the rest may change

# ----------------------------------------------------------------------------------------------------
# The student and its teachers (Sec. 3.2, Eq. 8-9)

@dataclass
class Student:
    """What training changes: log_alpha of every mask ({} when the masks are fixed) and the LoRA pairs."""
    log_alpha: dict
    lora: dict
    lora_scale: float
    fixed: dict  # masks that do not learn (a baseline's, post fine-tuning's; z_hid with --prune-hidden no)
    shift: float = None  # --mask-init taylor: the controller's common shift, kept apart (the order survives)
    binary: bool = False  # --final-masks binary: the deterministic masks keep units at 1

    def effective(self):
        """The log_alpha the masks use: clamp(log_alpha + shift) with the shift kept apart, else log_alpha."""
        return self.log_alpha if self.shift is None else shifted(self.log_alpha, self.shift)

    def adapter(self, gen):
        """The adapter of one training step: masks sampled once (Eq. 10) + LoRA."""
        z = {k: sample_z(v, gen) for k, v in self.effective().items()}
        return {**self.fixed, **z, **self.lora, "lora_scale": self.lora_scale}

    def frozen(self):
        """Deterministic masks + a copy of LoRA on the CPU: a teacher snapshot, or the run's result."""
        order = self.log_alpha if self.shift is not None else {}  # clamped values tie: rank by the learned ones
        masks = {k: deterministic_z(v, order=order.get(k), binary=self.binary) for k, v in self.effective().items()}
        return {**{k: v.detach().float().cpu().clone() for k, v in {**self.fixed, **masks, **self.lora}.items()},
                "lora_scale": torch.tensor(float(self.lora_scale))}


class TeacherQueue:
    """Snapshots of the student's deterministic masks + LoRA at sparsity points i, 2i, ... below the target (at
    most one a step, in order, as the reference), on the CPU. Schedule (`teacher_key`), gap g, interval i: stage 1,
    until every point is recorded and the student has reached the target: a student at sparsity s learns from the
    snapshot at s - g, key floor((s - g) / i) (Eq. 8), or while there is none (s < g + i) the intact model (Eq. 9).
    Stage 2, to the end: a sparsity that falls linearly from the target to 0 picks the snapshot at or just above
    it, less g: teachers from weak (t - g) to strong, an equal share of steps each, the intact model last."""

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
        return max((key for key in self.snapshots if key <= k), default=None)


def distill_loss(logits_s, logits_t, hidden_s, hidden_t, z_hid, temperature, layer_norm="none"):
    """Eq. 5: KL(teacher || student) at temperature T, summed over tokens, averaged over the batch. Eq. 6: sum over
    the states of forward(return_hidden=True) (HF's hidden_states[1:]) of their MSE over the kept hidden dims, in fp16
    as the reference (past 65504 it is inf: the step is skipped); layer_norm="teacher" (ours) divides each by the
    teacher's mean square there (lab/NOTEBOOK.md, "The losses")."""
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
    teacher: an adapter, or None for the intact model. distill: Eq. 7's terms (+ --ce-weight times the next-token
    loss, not in the reference), else the next-token loss alone (no-KD ablation, fine-tuning)."""
    logits, hidden = model(x, student, return_hidden=True)
    loss, terms = 0.0, {}
    if distill:
        with torch.no_grad():  # same base weights, teacher masks + LoRA: no second model
            logits_t, hidden_t = model(x, teacher, return_hidden=True)
        hidden = hidden if args.layer_weight else []  # weight 0: skip the layer loss altogether
        kl, layer = distill_loss(logits, logits_t, hidden, hidden_t, student["z_hid"], args.temperature, args.layer_norm)
        loss = args.kl_weight * kl + args.layer_weight * layer  # Eq. 7 without the L0 term
        terms = {"kl": kl.item(), "layer": layer.item()}
    if not distill or args.ce_weight:
        ce = next_token_loss(logits, x, loss_mask)
        loss, terms["ce"] = loss + (args.ce_weight if distill else 1.0) * ce, ce.item()
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


class Diverged(Exception):
    """The loss or the gradients stayed NaN / inf; the command line prints it as one line."""


@dataclass
class State:
    """Everything a run changes, and so everything its checkpoint holds (with the step and the run id)."""
    student: Student
    lambdas: torch.Tensor  # Eq. 11's lambda1, lambda2 (learned with --controller lagrangian)
    opts: dict  # name -> optimizer: "mask", "lambda", "lora"
    queue: TeacherQueue
    gen: torch.Generator  # LoRA init and mask noise: the same on every rank
    lorashear: dict  # lorashear.py's parts: "lhspg" moves the fixed masks, "recovery" mixes the data (--recovery dynamic)


def start(args, model, fixed=None, prior=None):
    """A new run's state: masks learned (log_alpha from `prior` where given) or fixed (--run's, a baseline's `fixed`)
    while LoRA trains; AdamW for each group that learns (the lambdas by ascent: Eq. 11 is maximized); no teachers."""
    gen = torch.Generator().manual_seed(args.seed)
    targets, device = args.lora_targets.split(","), model.tok_embeddings.weight.device
    log_alpha, fixed = {}, fixed or {}
    if args.run:  # its LoRA continues and grows to the fine-tuning targets
        run = load_adapter(args.run, model)
        fixed = {k: run[k] for k in MASKS}
        lora = init_lora(model, targets, args.lora_rank, gen, {k: v.cpu() for k, v in run.items() if ".lora_" in k})
    elif fixed:
        fixed = {k: v.to(device) for k, v in fixed.items()}
        lora = init_lora(model, targets, args.lora_rank, gen)
    else:
        log_alpha = {**init_log_alpha(model.config, gen), **(prior or {})}
        if args.prune_hidden == "no":  # every hidden dim kept, as every baseline does
            log_alpha.pop("z_hid")
            fixed = {"z_hid": torch.ones(model.config.dim, device=device)}
        lora = {} if args.masks_only else init_lora(model, targets, args.lora_rank, gen)
    for group in (log_alpha, lora):
        group.update({k: v.to(device).requires_grad_(True) for k, v in group.items()})
    shift = project_to_target(log_alpha, 0.0, model.config, write=False) if prior and log_alpha else None  # apart
    student = Student(log_alpha, lora, args.lora_alpha / args.lora_rank, fixed, shift, args.final_masks == "binary")
    lambdas = torch.zeros(2, device=device, requires_grad=True)
    adamw = lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr, weight_decay=0, **kw)
    opts = {"mask": adamw(student.log_alpha.values(), args.lr_mask)} if student.log_alpha else {}
    if student.log_alpha and args.controller == "lagrangian":
        opts["lambda"] = adamw([lambdas], args.lr_lambda, maximize=True)
    if student.lora:
        opts["lora"] = adamw(student.lora.values(), args.lr_lora)
    return State(student, lambdas, opts, TeacherQueue(args.target, args.interval, args.gap), gen, {})


def save_checkpoint(out, run_id, step, state):
    st = state.student
    for group in (st.log_alpha, st.lora, {"lambdas": state.lambdas}):
        check_finite(group, Path(out) / "checkpoint.pt")
    save_run_state(out, {"log_alpha": st.log_alpha, "lora": st.lora, "lambdas": state.lambdas, "step": step,
                         "shift": st.shift, "opts": {k: o.state_dict() for k, o in state.opts.items()},
                         "queue": vars(state.queue), "rng": state.gen.get_state(), "run_id": run_id,
                         "lorashear": {k: v.state_dict() for k, v in state.lorashear.items()}})


def restore_checkpoint(out, run_id, state):
    """The saved state back into the live tensors -> the step to go on from (0: died before the first checkpoint)."""
    ck = load_run_state(out, run_id, state.lambdas.device, trim_log=int(os.environ.get("RANK", 0)) == 0)
    if ck is None:
        return 0
    with torch.no_grad():
        for group, saved in ((state.student.log_alpha, ck["log_alpha"]), (state.student.lora, ck["lora"])):
            for k in group:
                group[k].copy_(saved[k])
        state.lambdas.copy_(ck["lambdas"])
    for name, opt in state.opts.items():
        opt.load_state_dict(ck["opts"][name])
    state.queue.snapshots, state.queue.stage2_start = ck["queue"]["snapshots"], ck["queue"]["stage2_start"]
    state.gen.set_state(ck["rng"])
    state.student.shift = ck.get("shift")
    for k, v in state.lorashear.items():
        v.load_state_dict(ck["lorashear"][k])
    return ck["step"]


def train_step(step, model, batches, state, args):
    """One optimizer step: sample masks, pick the teacher, forward/backward every micro-batch, step the
    optimizers, bring the expected sparsity to the target, snapshot the student -> the step's log row."""
    student, lambdas, opts, queue, gen = state.student, state.lambdas, state.opts, state.queue, state.gen
    t0, config, device, learn_masks = time.time(), model.config, lambdas.device, bool(student.log_alpha)
    target = target_at(step + 1, args.target, round(args.warmup * args.steps))  # the target this step ends on
    lr_lora = args.lr_lora * (1 - step / args.steps)  # linear decay to 0
    if "lora" in opts:
        opts["lora"].param_groups[0]["lr"] = lr_lora
    adapter = student.adapter(gen)
    # masks sampled once a step: every micro-batch adds its gradient to z; z's graph to log_alpha is walked once
    sampled = {k: adapter[k] for k in student.log_alpha}
    adapter.update({k: z.detach().requires_grad_() for k, z in sampled.items()})
    distill = "none" if args.finetune else args.distill
    key = teacher = None
    if distill == "pkd" and learn_masks:  # with fixed masks there are no snapshots: the intact model teaches
        key = queue.teacher_key(step, expected_sparsity(student.effective(), config).item(), args.steps)
        teacher = None if key is None else {k: v.to(device) for k, v in queue.snapshots[key].items()}
    lorashear.before_step(state.lorashear, step, model, student)  # the data's mix; a period's units and their weights
    terms = {"kl": 0.0, "layer": 0.0, "ce": 0.0, "skipped": 0}
    for micro in range(args.grad_accum):  # this rank's share of the global batch (all of it in one process)
        rows = lorashear.rows(state.lorashear, step * args.grad_accum + micro, args.batch_size * args.world, len(batches[0]), args.seed)
        rows = rows[args.rank * args.batch_size:(args.rank + 1) * args.batch_size]
        x, m = batches[0][rows].to(device), batches[1][rows].to(device)
        for k, v in micro_step(model, x, m, adapter, teacher, distill != "none", args).items():
            terms[k] += v if k == "skipped" else v / args.grad_accum
    z_grads = [adapter[k].grad for k in sampled]
    if sampled and all(g is not None for g in z_grads):  # (None: every micro-batch was skipped)
        torch.autograd.backward(list(sampled.values()), z_grads)
    if args.world > 1:  # a skipped rank sends NaN gradients: the check below then skips the step on every rank
        terms = {**average_over_ranks((*student.log_alpha.values(), *student.lora.values()), terms, args.world), "skipped": 0}
    lag = torch.zeros(())
    if "lambda" in opts:  # Eq. 7's L0 term: descends on log_alpha, ascends on the lambdas
        lag = lagrangian(expected_sparsity(student.effective(), config), target, lambdas)
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
        for v in student.log_alpha.values() if student.shift is None else ():  # kept apart: clamp(v + shift) counts
            v.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    lorashear.after_step(state.lorashear, step, model, student)  # --method lorashear: the picked units' masks fall to 0
    if learn_masks and args.controller == "project" and not terms["skipped"]:
        c = project_to_target(student.log_alpha, target, config, write=student.shift is None)
        student.shift = None if student.shift is None else c
    s_now = expected_sparsity(student.effective(), config).item() if learn_masks else mask_sparsity(student.fixed, config)
    taken = queue.maybe_snapshot(s_now, student) if distill == "pkd" and learn_masks else None
    return {"step": step + 1, **terms, "expected_sparsity": s_now, "target": target, "snapshot": taken,
            **({"lagrangian": lag.item(), "lambda1": lambdas[0].item(), "lambda2": lambdas[1].item()} if "lambda" in opts else {}),
            "teacher": None if distill == "none" else ("intact" if key is None else key * args.interval),
            "lr_lora": lr_lora, "tokens_per_s": x.numel() * args.grad_accum / (time.time() - t0),
            "memory_mb": peak_mb(device), "stage2": queue.stage2_start is not None,
            **{k: v for part in state.lorashear.values() for k, v in part.log().items()}}


def run_steps(model, batches, state, args, out, run_id, first):
    """The loop: a row a step appended to log.jsonl (one write: a crash tears at most the last line), an atomic checkpoint
    every save_every steps (all a resume needs); a non-finite step changes nothing. -> False: --stop-after ended it."""
    skipped = in_a_row = 0
    model.compile_blocks = args.compile  # for the training steps only: evaluation and decoding stay eager
    with open(out / "log.jsonl" if args.rank == 0 else os.devnull, "a") as log:
        bar = tqdm(range(first, args.steps), initial=first, total=args.steps, disable=args.rank > 0,
                   desc="prune" if state.student.log_alpha else "tune")
        for step in bar:
            row = train_step(step, model, batches, state, args)
            log.write(json.dumps(row) + "\n")
            skipped, in_a_row = skipped + row["skipped"], (in_a_row + 1) * row["skipped"]
            if in_a_row == MAX_SKIPPED:
                raise Diverged(f"steps {step + 2 - in_a_row}-{step + 1}: NaN or inf loss or gradients {in_a_row} times in a row "
                               f"(learning rate too high? fp16 overflow?); {out / 'checkpoint.pt'} is kept as it was")
            bar.set_postfix(sparsity=f"{row['expected_sparsity']:.3f}", target=f"{row['target']:.3f}", **{
                k: f"{row[k]:.3g}" for k in ("kl", "layer", "ce") if row[k]}, **({"skipped": skipped} if skipped else {}))
            if ((step + 1) % args.save_every == 0 or step + 1 == args.steps) and args.rank == 0:
                log.flush()
                save_checkpoint(out, run_id, step + 1, state)
                svg.draw(out)  # training.svg so far
            if args.stop_after and step + 1 - first >= args.stop_after:
                return False  # a deliberate stop, like a kill: what was not checkpointed is lost
    model.compile_blocks = False
    return True


def train(args):
    """The whole run -> (model, tokenizer, adapter), or None when --stop-after ended it early."""
    args.device = init_distributed(args.device, args.world)
    if args.rank == 0:
        check_run_folder(args.out, args.resume)  # before the long load; the folder is written only after it
    model, tok = load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device)
    if args.seq_len > model.config.max_seq_len or args.lora_rank > model.config.dim:
        raise ValueError(f"--seq-len {args.seq_len} / --lora-rank {args.lora_rank}: at most {model.config.max_seq_len} / {model.config.dim}")
    if args.run:
        load_adapter(args.run, model)  # a broken adapter is refused before the run folder is written
    model.grad_checkpoint = args.grad_checkpoint
    recovery = lorashear.Recovery(tok, args.seq_len, data.default_categories()) if args.recovery == "dynamic" else None
    batches = recovery.batches if recovery else data.training_blocks(tok, args.seq_len, args.data, args.finetune, args.blocks)
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    folder = open_run(args.out, settings, args.resume) if args.rank == 0 else nullcontext((Path(args.out), None))
    with folder as (out, run_id):  # locked to the end: one process writes a run folder at a time
        if args.world > 1:  # the other ranks learn the run id (and wait for rank 0's checks)
            dist.broadcast_object_list(box := [run_id])
            run_id = box[0]
        fixed = {}  # NutePrune learns its masks; LoRAShear moves them as it goes; a baseline chooses them here
        if args.method != "nuteprune":
            fixed = baselines.full_masks(model.config) if args.method == "lorashear" else baselines.baseline_masks(args, model, batches, out)
        new = args.method == "nuteprune" and not args.run and not (out / "checkpoint.pt").exists()  # else: checkpoint's
        prior = baselines.taylor_log_alpha(args, model, batches, out) if new and args.mask_init == "taylor" else None
        state = start(args, model, fixed, prior)
        state.lorashear = lorashear.start(args, model, batches, out, state.student.fixed, recovery)
        if args.fsdp:
            shard(model, args.device, args.world)
        first = restore_checkpoint(out, run_id, state) if args.resume else 0
        if not run_steps(model, batches, state, args, out, run_id, first):
            return None
        model = build(model.config, full_state(model)) if args.fsdp else model
        adapter = state.student.frozen()
        if args.rank > 0:
            return None
        save_adapter(adapter, out)
        (out / "structure.md").write_text(structure_table(adapter, model.config))
        svg.draw(out)  # structure.svg (and training.svg: a run of 0 steps has no checkpoint)
    adapter["lora_scale"] = float(adapter["lora_scale"])
    return model, tok, {k: v.to(model.tok_embeddings.weight.device) if torch.is_tensor(v) else v
                        for k, v in adapter.items()}


# ----------------------------------------------------------------------------------------------------
# Command line

# --recipe: the method's choices; nute's chosen on the validation split (lab/NOTEBOOK.md, "Learned masks")
RECIPES = {"nute": dict(controller="project", mask_init="taylor", prune_hidden="no", final_masks="binary",
                        ce_weight=100.0, layer_norm="teacher"),
           "paper": dict(controller="lagrangian", mask_init="clamp", prune_hidden="yes", final_masks="soft",
                         ce_weight=0.0, layer_norm="none")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="NutePrune: structured pruning with numerous teachers")
    p.add_argument("--ckpt", help="HF, Meta or .gguf checkpoint, or hub name ORG/NAME[@REV] (default: fetched SmolLM2-135M)")
    p.add_argument("--target", type=float, default=0.2, help="target sparsity of the prunable weights, in (0, 1)")
    p.add_argument("--out", default="runs/default", help="run folder: settings, log.jsonl, checkpoint, export")
    p.add_argument("--data", help="training text (.txt, .jsonl[.gz] with 'text', <doc> wiki); default: fetched C4 + Wikipedia")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--blocks", type=int, help="train on the first N blocks of --seq-len tokens (default: all the text)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--warmup", type=float, help="fraction of steps the target ramps over (default: the paper's)")
    p.add_argument("--recipe", choices=list(RECIPES), default="nute", help="the defaults of the flags marked (recipe)")
    p.add_argument("--controller", choices=["project", "lagrangian"], help="(recipe) lagrangian: Eq. 11")
    p.add_argument("--mask-init", choices=["taylor", "clamp"], help="(recipe) log_alpha in Taylor order, or alike")
    p.add_argument("--init-spread", type=float, default=20.0, help="--mask-init taylor: log_alpha in [0, this]")
    p.add_argument("--prune-hidden", choices=["no", "yes"], help="(recipe) learn masks over the hidden dims too")
    p.add_argument("--final-masks", choices=["binary", "soft"], help="(recipe) kept units of teachers and result")
    p.add_argument("--ce-weight", type=float, help="(recipe) weight of the next-token loss beside Eq. 7's terms")
    p.add_argument("--distill", choices=["pkd", "kd", "none"], default="pkd", help="pkd: numerous teachers")
    p.add_argument("--masks-only", action="store_true", help="learn masks without LoRA (the paper's dagger rows)")
    p.add_argument("--method", choices=["nuteprune", "magnitude", "taylor", "bonsai", "lorashear"], default="nuteprune",
                   help="a baseline (baselines.py) fixes its masks at --target, then LoRA recovers for --steps (0: none); "
                   "lorashear (lorashear.py) prunes progressively while LoRA trains, then recovers")
    p.add_argument("--recovery", choices=["uniform", "dynamic"], help="how fixed masks recover: the text in a seeded "
                   "order, or LoRAShear's mix of the default text's categories by degradation (default: dynamic for lorashear)")
    p.add_argument("--bonsai-samples", type=int, default=100, help="--method bonsai: sub-models per pruning round")
    p.add_argument("--masks", help="with --method: an earlier run's masks.safetensors instead of choosing again")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-targets", default=None, help="comma list of q,k,v,o,gate,up,down (default q,v; all for --finetune)")
    p.add_argument("--lr-mask", type=float, default=0.1)
    p.add_argument("--lr-lambda", type=float, default=0.1, help="--controller lagrangian: the lambdas' ascent rate")
    p.add_argument("--lr-lora", type=float, default=None, help="default 1e-3 (pruning), 1e-4 (--finetune)")
    p.add_argument("--kl-weight", type=float, default=0.1, help="Eq. 7, reference default")
    p.add_argument("--layer-weight", type=float, default=0.9, help="alpha_1 of Eq. 7, reference default")
    p.add_argument("--layer-norm", choices=["none", "teacher"], help="(recipe) Eq. 6's MSE raw or over the teacher's")
    p.add_argument("--temperature", type=float, default=2 / 3)
    p.add_argument("--interval", type=float, default=0.01, help="snapshot every this much sparsity (i)")
    p.add_argument("--gap", type=float, default=0.10, help="teacher is this much less sparse in stage 1 (g)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="base weights and compute (masks, LoRA stay fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base weights over the processes")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training blocks and decode step")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, help="stop after N steps of this invocation (like a kill; --resume continues)")
    p.add_argument("--run", help="a pruning run whose masks stay frozen and whose LoRA goes on training")
    p.add_argument("--finetune", help="post fine-tuning on an Alpaca JSON file, masks frozen (Sec. 3.3)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip perplexity and latency at the end")
    p.add_argument("--export-dtype", choices=list(DTYPES), help="dtype of model/ (default: --dtype)")
    p.add_argument("--gguf", type=str.upper, choices=["F32", "F16", "BF16", "Q8_0", "Q4_0"], help="also model.gguf")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Every setting checked, and the defaults that depend on others filled in, before anything is loaded -> args."""
    if not 0 < args.target < 1:
        raise ValueError(f"--target must be in (0, 1), got {args.target}")
    args.mask_init = args.mask_init or ("clamp" if args.controller == "lagrangian" else None)  # no order in Eq. 11
    for name, value in RECIPES[args.recipe].items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if args.mask_init == "taylor" and args.controller == "lagrangian":
        raise ValueError("--mask-init taylor needs --controller project (Eq. 11 and the clamp make every unit alike)")
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("steps", "batch_size", "grad_accum", "save_every", "lora_rank", "stop_after", "blocks", "bonsai_samples",
                 "seq_len"):  # a baseline may take --steps 0 (no recovery); --seq-len 2 is one next-token pair
        least = 0 if name == "steps" and args.method != "nuteprune" else 2 if name == "seq_len" else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise ValueError(f"{flag(name)} must be at least {least}, got {getattr(args, name)}")
    for name in ("lr_mask", "lr_lambda", "lr_lora", "lora_alpha", "temperature", "interval"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            raise ValueError(f"{flag(name)} must be a positive number, got {getattr(args, name)}")
    for name in ("kl_weight", "layer_weight", "gap", "ce_weight", "init_spread"):
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
    if args.fsdp and (args.compile or args.world < 2):
        raise ValueError("--compile is not supported with --fsdp, which shards over several processes (torchrun)")
    if args.masks and (args.method in ("nuteprune", "lorashear") or not os.path.isfile(args.masks)):
        raise ValueError(f"--masks {args.masks}: a baseline's masks.safetensors, given with its --method")
    if args.method != "nuteprune" and (args.run or args.masks_only):
        raise ValueError(f"--method {args.method} chooses its own masks: not with --run or --masks-only")
    if args.finetune and not args.run:
        raise ValueError("--finetune needs --run, the pruning run whose masks it keeps")
    args.lora_targets = args.lora_targets or ("q,k,v,o,gate,up,down" if args.finetune or args.method == "lorashear" else "q,v")
    args.recovery = args.recovery or ("dynamic" if args.method == "lorashear" and not (args.data or args.blocks) else None)
    if args.recovery == "dynamic" and (args.data or args.blocks or args.finetune or args.method == "nuteprune" and not args.run):
        raise ValueError("--recovery dynamic: for fixed masks (--method other than nuteprune, or --run) on the default text")
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
    if result is None:  # --stop-after, or a torchrun rank other than 0 (rank 0 exports and reports)
        if args.rank == 0:
            print(f"stopped after {args.stop_after} steps; continue with --resume")
        return
    (model, tok, adapter), out = result, Path(args.out)
    small = export(model, tok, adapter, out, DTYPES[args.export_dtype or args.dtype], args.gguf)
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
    except (LoadError, ValueError, OSError, Diverged, KeyboardInterrupt) as e:
        print(f"error: {str(e) or 'interrupted: the same command with --resume goes on from the last checkpoint'}", file=sys.stderr)
        sys.exit(2)
