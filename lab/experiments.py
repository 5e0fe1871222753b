"""The paper's comparison on one model: NutePrune against its ablations and a magnitude baseline.

    python -m lab.experiments                   # SmolLM2-135M, 20% and 50%, budget sized for a 2-core CPU
    python -m lab.experiments --ckpt llama-7b --steps 3000 --batch-size 8 --seq-len 512 --limit 0   # a GPU budget
    python -m lab.experiments --targets 0.5 --rows "NutePrune,KD (intact teacher)" --seeds 0,1,2 --out runs/seeds

Every row gets the same data, token budget and seeds. Each finished run is kept in --out and skipped when
the script runs again (an interrupted one resumes), and --out/table.md is rewritten after every row, with
the mean and spread over the seeds. --at-target also scores each learned-mask run with its masks moved to
exactly the target. --out/teachers.md: how strong the NutePrune runs' teacher snapshots were.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import data
import evaluate
from formats import svg
from formats.checkpoint import load
from formats.run import save_adapter
from masks import deterministic_z, mask_sparsity, shifted

ROOT = Path(__file__).resolve().parent.parent  # the repository: nute.py and evaluate.py
PREVIOUS = ["--recipe", "paper", "--controller", "project", "--layer-norm", "teacher"]  # the defaults until issue 31
ROWS = {  # name in the table -> nute.py flags (NutePrune is the default: PKD, masks + LoRA)
    "NutePrune": [],
    "NutePrune, paper recipe": ["--recipe", "paper"],
    "NutePrune, previous defaults": PREVIOUS,  # and each of today's changes alone on top of them:
    "previous + Taylor-ordered masks": PREVIOUS + ["--mask-init", "taylor"],
    "previous + hidden dims kept": PREVIOUS + ["--prune-hidden", "no"],
    "previous + binary final masks": PREVIOUS + ["--final-masks", "binary"],
    "previous + next-token term": PREVIOUS + ["--ce-weight", "100"],
    "KD (intact teacher)": ["--distill", "kd"],
    "no KD (next-token loss)": ["--distill", "none"],
    "NutePrune, masks only": ["--masks-only"],
    "magnitude + LoRA": ["--method", "magnitude", "--distill", "none"],
    "Taylor + LoRA": ["--method", "taylor", "--distill", "none"],  # LLM-Pruner
    "Bonsai + LoRA": ["--method", "bonsai", "--distill", "none"],
    "Taylor, no recovery": ["--method", "taylor", "--steps", "0"],
    "Bonsai, no recovery": ["--method", "bonsai", "--steps", "0"],
    "LoRAShear": ["--method", "lorashear", "--distill", "none"],  # LHSPG, then dynamic recovery (lorashear.py)
    "Taylor + LoRA, dynamic recovery": ["--method", "taylor", "--distill", "none", "--recovery", "dynamic"],
    # NutePrune's run (its row first in --rows) with its masks kept and 100 more steps of LoRA, read in order or mixed:
    "NutePrune, then 100 steps": ["--run", "{NutePrune}", "--steps", "100", "--distill", "none"],
    "NutePrune, then 100 steps dynamic": ["--run", "{NutePrune}", "--steps", "100", "--distill", "none", "--recovery", "dynamic"],
}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def sh(cmd, log):
    """Runs one of the repository's scripts (cmd[0], e.g. nute.py) with its arguments, output into log."""
    with open(log, "a") as f:
        if subprocess.run([sys.executable, ROOT / cmd[0], *map(str, cmd[1:])], stdout=f, stderr=subprocess.STDOUT).returncode:
            fail(f"{' '.join(map(str, cmd))} failed; see {log}")


def at_target(run, target, config):
    """A run's masks moved to exactly the target (post hoc, for a comparison at equal size): every log_alpha is
    shifted by one constant, found by bisection, so the ranking the run learned stays and only the number of
    pruned units moves; kept units keep their soft values. The LoRA was trained with the run's own masks."""
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    log_alpha, kept = ck["log_alpha"], ck.get("shift")  # kept: the controller's shift, apart from log_alpha
    adapter = load_file(str(run / "adapter.safetensors"))
    binary = all(bool((adapter[k][adapter[k] > 0] == 1).all()) for k in log_alpha)  # --final-masks binary
    masks = lambda shift: {k: deterministic_z(v, shift, binary=binary) for k, v in log_alpha.items()} if kept is None \
        else {k: deterministic_z(z, order=log_alpha[k], binary=binary) for k, z in shifted(log_alpha, kept + shift).items()}
    if any(not torch.allclose(z, adapter[k].float(), rtol=0, atol=1e-6) for k, z in masks(0.0).items()):
        fail(f"{run}/checkpoint.pt does not hold the masks of its adapter.safetensors")
    lo, hi = -20.0, 20.0  # sparsity falls as the shift grows: keep hi on the side at or below the target
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mask_sparsity(masks(mid), config) > target else (lo, mid)
    return {**adapter, **masks(hi)}


def teachers(run, model, ids, every=10):
    """Markdown: held-out perplexity of the teacher snapshots a PKD run collected (every `every`-th and the
    last), with the step each was taken at: how strong the teachers of the numerous-teacher schedule were."""
    snaps = torch.load(run / "checkpoint.pt", weights_only=True)["queue"]["snapshots"]
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    lines = ["| snapshot at sparsity | taken at step | held-out perplexity |", "|---|---|---|"]
    for k in sorted({*sorted(snaps)[every - 1::every], *sorted(snaps)[-1:]}):
        step = next(x["step"] for x in log if x.get("snapshot") == k)
        teacher = {n: v.to(model.tok_embeddings.weight.device) for n, v in snaps[k].items()}
        lines.append(f"| {k}% | {step} | {evaluate.perplexity(model, ids, 128, teacher):.2f} |")
    return "\n".join(lines) + "\n"


def report(rows, args, heldout):
    """The results table in the paper's layout, the settings, and per row: wall time and expected sparsity."""
    note = (f"Ratio: target (sparsity of the exported model's projections). {args.steps} steps x {args.batch_size} x "
            f"{args.seq_len} tokens, {args.dtype}, seed {args.seeds}; perplexity at seq_len 128 on {heldout}"
            + ("" if args.tasks == "none" else f"; tasks: first {args.limit} examples of each" if args.limit else "; tasks: full splits"))
    steps = [k * args.steps // 6 for k in range(1, 7)]
    lines = ["| row | validation perplexity | choosing masks (min) | training (min) | peak memory (MB) | scoring (min) | "
             + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (6 + len(steps)) + "|"]
    for x in rows:
        sparsity = [f"{x['log'][s]['expected_sparsity']:.3f}" if s in x["log"] else "-" for s in steps]
        # from the run's own records (masks.json, log.jsonl's step times), however the row was produced
        train_min = sum(args.batch_size * args.seq_len / r["tokens_per_s"] for r in x["log"].values()) / 60
        peak = max([r["memory_mb"] for r in x["log"].values()] + [x["masks"].get("peak_mb", 0)])
        valid = f"{x['valid_ppl']:.2f}" if x.get("valid_ppl") else "-"
        lines.append(f"| {x['ratio']} {x['method']} | {valid} | {x['masks'].get('seconds', 0) / 60:.1f} | {train_min:.1f} | "
                     f"{f'{peak:,.0f}' if peak else '-'} | {x['score_min']:.1f} | " + " | ".join(sparsity) + " |")
    spread = seed_spread(rows)
    return (evaluate.table(rows, Path(heldout).name) + "\n\n" + note
            + ("\n\nOver the seeds (mean +- standard deviation):\n\n" + spread if spread else "")
            + "\n\nPer row: perplexity on the validation text (defaults are chosen on it, never on the held-out text), "
            "wall time, and the expected sparsity (Eq. 3) during training:\n\n" + "\n".join(lines) + "\n")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="default: the fetched SmolLM2-135M")
    p.add_argument("--targets", default="0.2,0.5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", help="training text (default: the fetched C4 + Wikipedia train part)")
    p.add_argument("--heldout", help="perplexity text (default: the held-out Wikipedia documents)")
    p.add_argument("--valid", help="validation text, scored per row for choosing defaults (default: the fetched "
                   "Wikipedia validation documents; none with --data)")
    p.add_argument("--tasks", default="all")
    p.add_argument("--limit", type=int, default=200, help="first N examples of each task; 0 = full splits")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--rows", help="comma list of rows to train (names as in ROWS, no space after a separating "
                   "comma, e.g. 'NutePrune,Taylor, no recovery'); default: all")
    p.add_argument("--seeds", default="0", help="comma list: every row once per seed, with mean and spread")
    p.add_argument("--at-target", action="store_true", help="also score each learned-mask run with its masks "
                   "moved to exactly the target (for runs that did not land on it)")
    p.add_argument("--out", default="runs/comparison", help="the runs, their scores and table.md "
                   "(the committed ones are in lab/results/)")
    args = p.parse_args(argv)
    try:  # checked here, not after the dense row has been scored
        targets, _ = [float(t) for t in args.targets.split(",")], [int(x) for x in args.seeds.split(",")]
    except ValueError:
        fail(f"--targets and --seeds are comma lists of numbers, got {args.targets!r}, {args.seeds!r}")
    if not all(0 < t < 1 for t in targets) or min(args.steps, args.batch_size, args.seq_len - 1) < 1 or args.limit < 0:
        fail("--targets in (0, 1); --steps, --batch-size >= 1; --seq-len >= 2; --limit >= 0")
    return args


def folder_of(name, ratio, seed):
    """'Taylor, no recovery', '20%', 1 -> 'Taylor-no-recovery-20-seed1'"""
    return name.split(" (")[0].replace(" ", "-").replace(",", "") + f"-{ratio[:-1]}" + (f"-seed{seed}" if seed else "")


def make_jobs(args):
    """-> [(name, folder, ratio, target, nute.py flags)]: dense, then every row at every target and seed;
    with --at-target the learned-mask runs again moved to exactly the target (flags None: they reuse the
    trained run)."""
    rows = re.split(r",(?! )", args.rows) if args.rows else [r for r in ROWS if not (args.data and "dynamic" in ROWS[r])]
    # (", " belongs to a name; dynamic recovery mixes the default text's categories: not with --data)
    if bad := [r for r in rows if r not in ROWS]:
        fail(f"--rows: unknown {bad}; choose from {list(ROWS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [("dense", "dense", "0%", None, None)]
    run_of = lambda name, t, seed: str(Path(args.out) / folder_of(name, f"{float(t):.0%}", seed))
    jobs += [(name + (f", seed {seed}" if len(seeds) > 1 else ""), folder_of(name, f"{float(t):.0%}", seed),
              f"{float(t):.0%}", float(t), [run_of("NutePrune", t, seed) if f == "{NutePrune}" else f for f in ROWS[name]]
              + ["--seed", seed]) for t in args.targets.split(",") for name in rows for seed in seeds]
    if args.at_target:
        jobs += [(name + ", at target", folder + "-at-target", ratio, target, None)
                 for name, folder, ratio, target, flags in jobs if target is not None and not {"--method", "--run"} & set(flags)]
    return jobs


def task_average(row):
    """The 7-task average accuracy (%) of a row, or None when not every task was scored."""
    tasks = row["tasks"]
    return statistics.mean(tasks[t][m] * 100 for t, (_, m) in evaluate.COLUMNS.items()) \
        if len(tasks) == len(evaluate.COLUMNS) else None


def seed_spread(rows):
    """Markdown: mean and standard deviation over the seeds of every row that ran with more than one."""
    groups = {}
    for r in rows:
        if ", seed " in r["method"]:
            groups.setdefault((r["ratio"].split(" ")[0], r["method"].split(", seed ")[0]), []).append(r)
    lines = ["| ratio | row | seeds | perplexity | average accuracy |", "|---|---|---|---|---|"]
    for (ratio, name), rs in groups.items():
        ppl = [r["ppl"] for r in rs]
        avg = [a for a in map(task_average, rs) if a is not None]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        cell = lambda v: f"{statistics.mean(v):.2f} +- {sd(v):.2f}" if v else "-"
        lines.append(f"| {ratio} | {name} | {len(rs)} | {cell(ppl)} | {cell(avg)} |")
    return "\n".join(lines) + "\n" if groups else ""


def shared_masks(job, args):
    """A baseline's masks depend on its method, target and seed, not on the recovery after them: a row reuses
    the masks another row of the same method chose (Bonsai's take the longest) -> extra nute.py flags."""
    name, folder, ratio, target, flags = job
    method = lambda f: f[f.index("--method") + 1] if "--method" in f else None
    for other in ROWS:
        masks = Path(args.out) / folder_of(other, ratio, flags[-1]) / "masks.safetensors"  # flags end "--seed", s
        if method(ROWS[other]) == method(flags) is not None and other != name.split(", seed ")[0] and masks.exists():
            return ["--masks", masks]
    return []


def where_of(args, run, target):
    """evaluate.py's flags for a row: the base checkpoint, masked by the run's adapter (the dense row: none)."""
    return ["--ckpt", args.ckpt] + (["--run", run] if target is not None else [])


def run_job(job, args, common, scoring, base, valid):
    """Trains (or resumes) and scores one row unless its result exists -> the row for the table."""
    name, folder, ratio, target, flags = job
    out = Path(args.out)
    run, log, result = out / folder, out / f"{folder}.log", out / f"{folder}.json"
    trained = out / folder.removesuffix("-at-target")  # the training run behind the row
    if not result.exists():
        t0 = time.time()
        if flags is not None and not (run / "adapter.safetensors").exists():
            resume = ["--resume"] if (run / "settings.json").exists() else []  # it started: continue it
            sh(["nute.py", *common, "--target", target, "--out", run, *flags, *resume, *shared_masks(job, args)], log)
        if target is not None and flags is None:  # an ", at target" row: new masks for the trained run
            run.mkdir(exist_ok=True)
            save_adapter(at_target(trained, target, base), run)
        train_s = time.time() - t0
        sh(["evaluate.py", *where_of(args, run, target), *scoring, "--ratio", ratio, "--out", result], log)
        r = json.loads(result.read_text())
        r["train_seconds"], r["row_seconds"] = train_s, time.time() - t0
        result.write_text(json.dumps(r, indent=1))
    r = json.loads(result.read_text())
    if valid and "valid_ppl" not in r:  # the validation text, for choosing defaults
        sh(["evaluate.py", *where_of(args, run, target), "--ppl", valid, "--dtype", args.dtype, "--out",
            out / f"{folder}-valid.json"], log)
        r["valid_ppl"] = json.loads((out / f"{folder}-valid.json").read_text())["results"][0]["ppl"]
        result.write_text(json.dumps(r, indent=1))
    if target is not None and "sparsity" not in r:  # the masks land near the target, not on it
        r["sparsity"] = mask_sparsity(load_file(str(run / "adapter.safetensors")), base)
        result.write_text(json.dumps(r, indent=1))
    return {**r["results"][0], "valid_ppl": r.get("valid_ppl"), "method": name, "ratio": ratio + (f" ({r['sparsity']:.1%})" if target else ""),
            "score_min": (r["row_seconds"] - r["train_seconds"]) / 60,
            "masks": json.loads((trained / "masks.json").read_text()) if (trained / "masks.json").exists() else {},
            "log": {x["step"]: x for x in map(json.loads, open(trained / "log.jsonl"))} if target else {}}


def main():
    args = get_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ckpt is None:
        data.fetch(tasks=args.tasks != "none")
        args.ckpt = str(data.default_model_path())
    heldout = args.heldout
    if heldout is None:  # never trained on: data.default_texts() keeps these documents out of the training part
        heldout = out / "heldout-wiki.txt"
        heldout.write_text("\n\n".join(data.default_texts()[1]))
    valid = args.valid
    if valid is None and args.data is None:  # neither trained on nor the held-out text
        valid = out / "valid-wiki.txt"
        valid.write_text("\n\n".join(data.default_texts()[2]))
    common = ["--ckpt", args.ckpt, "--steps", args.steps, "--batch-size", args.batch_size,
              "--seq-len", args.seq_len, "--dtype", args.dtype, "--no-eval"]
    common += ["--data", args.data] if args.data else []
    scoring = ["--ppl", heldout, "--dtype", args.dtype]
    scoring += ["--tasks", args.tasks] if args.tasks != "none" else []
    scoring += ["--limit", args.limit] if args.limit else []
    base = load(args.ckpt, torch.bfloat16, "cpu")[0].config  # the intact model's sizes
    jobs, rows = make_jobs(args), []
    for job in jobs:
        rows.append(run_job(job, args, common, scoring, base, valid))
        (out / "table.md").write_text(report(rows, args, heldout))
        points = [(j[0].split(", seed ")[0], j[3], r["ppl"], task_average(r)) for j, r in zip(jobs, rows) if j[3] is not None]
        (out / "comparison.svg").write_text(svg.comparison_svg(points, (rows[0]["ppl"], task_average(rows[0]))))
        print(f"{job[2]} {job[0]}: done", flush=True)
    teachers_md = out / "teachers.md"  # why PKD does (not) beat KD: how good were its teachers?
    if not teachers_md.exists():
        model, tok = load(args.ckpt, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                          "cuda" if torch.cuda.is_available() else "cpu")
        ids = evaluate.text_ids(tok, "\n\n".join(data.read_texts(heldout)))
        pkd = [(name, folder, ratio) for name, folder, ratio, _, _ in jobs if name.split(", seed")[0] == "NutePrune"]
        teachers_md.write_text("".join(f"\n{name} {ratio}: {out / folder}\n\n" + teachers(out / folder, model, ids)
                                       for name, folder, ratio in pkd))
    print((out / "table.md").read_text() + "\nTeachers of the NutePrune runs:\n" + teachers_md.read_text())


if __name__ == "__main__":
    main()
