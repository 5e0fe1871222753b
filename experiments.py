"""The paper's comparison on one model: NutePrune against its ablations and a magnitude baseline.

    python experiments.py                       # SmolLM2-135M, 20% and 50%, budget sized for a 2-core CPU
    python experiments.py --ckpt llama-7b --steps 3000 --batch-size 8 --seq-len 512 --limit 0 \
        --lr-lambda 0.1 --layer-weight 0.9                                      # a GPU budget, reference losses

Every row gets the same data, token budget and seed. Each finished run is kept in --out and skipped when
the script runs again (an interrupted one resumes), and --out/table.md is rewritten after every row.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
import evaluate
from model import load

ROWS = {  # name in the table -> nute.py flags (NutePrune is the default: PKD, masks + LoRA)
    "NutePrune": [],
    "KD (intact teacher)": ["--distill", "kd"],
    "no KD (next-token loss)": ["--distill", "none"],
    "NutePrune, masks only": ["--masks-only"],
    "magnitude + LoRA": ["--magnitude", "--distill", "none"],
}


def sh(cmd, log):
    with open(log, "a") as f:
        if subprocess.run([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"error: {' '.join(map(str, cmd))} failed; see {log}")


def report(rows, args, heldout):
    """The results table in the paper's layout, the settings, and per row: wall time and expected sparsity."""
    note = (f"Ratio: target (sparsity of the exported model's projections). {args.steps} steps x {args.batch_size} x "
            f"{args.seq_len} tokens, {args.dtype}, seed 0; perplexity at seq_len 128 on {heldout}"
            + ("" if args.tasks == "none" else f"; tasks: first {args.limit} examples of each" if args.limit else "; tasks: full splits"))
    steps = [k * args.steps // 6 for k in range(1, 7)]
    lines = ["| row | training (min) | scoring (min) | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (3 + len(steps)) + "|"]
    for x in rows:
        sparsity = [f"{x['log'][s]['expected_sparsity']:.3f}" if s in x["log"] else "-" for s in steps]
        lines.append(f"| {x['ratio']} {x['method']} | {x['train_min']:.1f} | {x['score_min']:.1f} | " + " | ".join(sparsity) + " |")
    return (evaluate.table(rows, Path(heldout).name) + "\n\n" + note
            + "\n\nWall time and expected sparsity (Eq. 3) during training:\n\n" + "\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="default: the fetched SmolLM2-135M")
    p.add_argument("--targets", default="0.2,0.5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", help="training text (default: the fetched C4 + Wikipedia train part)")
    p.add_argument("--heldout", help="perplexity text (default: the held-out Wikipedia documents)")
    p.add_argument("--tasks", default="all")
    p.add_argument("--limit", type=int, default=200, help="first N examples of each task; 0 = full splits")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--lr-lambda", type=float, default=10.0, help="as nute.py's embedded short schedule")
    p.add_argument("--layer-weight", type=float, default=0.0, help="as nute.py's embedded short schedule")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ckpt is None:
        data.fetch(tasks=args.tasks != "none")
        args.ckpt = str(data.default_model_path())
    heldout = args.heldout
    if heldout is None:  # never trained on: data.default_texts() keeps these documents out of the training part
        heldout = out / "heldout-wiki.txt"
        heldout.write_text("\n\n".join(data.default_texts()[1]))
    common = ["--ckpt", args.ckpt, "--steps", args.steps, "--batch-size", args.batch_size,
              "--seq-len", args.seq_len, "--dtype", args.dtype, "--seed", 0, "--no-eval",
              "--lr-lambda", args.lr_lambda, "--layer-weight", args.layer_weight]
    common += ["--data", args.data] if args.data else []
    scoring = ["--ppl", heldout, "--dtype", args.dtype]
    scoring += ["--tasks", args.tasks] if args.tasks != "none" else []
    scoring += ["--limit", args.limit] if args.limit else []

    jobs = [("dense", "0%", None, None)]
    jobs += [(name, f"{float(t):.0%}", float(t), flags) for t in args.targets.split(",") for name, flags in ROWS.items()]
    rows = []
    for name, ratio, target, flags in jobs:
        slug = name.split(" (")[0].replace(" ", "-").replace(",", "") + (f"-{ratio[:-1]}" if target else "")
        run, log = out / slug, out / f"{slug}.log"
        result = out / f"{slug}.json"
        if not result.exists():
            t0 = time.time()
            if target is not None and not (run / "adapter.safetensors").exists():
                resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
                sh(["nute.py", *common, "--target", target, "--out", run, *flags, *resume], log)
            train_s = time.time() - t0
            where = ["--ckpt", args.ckpt] + (["--run", run] if target is not None else [])
            sh(["evaluate.py", *where, *scoring, "--ratio", ratio, "--out", result], log)
            r = json.loads(result.read_text())
            r["train_seconds"], r["row_seconds"] = train_s, time.time() - t0
            result.write_text(json.dumps(r, indent=1))
        r = json.loads(result.read_text())
        if target is not None and "sparsity" not in r:  # masks land near, not on, the target: count what the export kept
            r["sparsity"] = 1 - evaluate.prunable_params(load(run / "model", torch.float32, "cpu")[0]) \
                / r["results"][0]["prunable_params"]
            result.write_text(json.dumps(r, indent=1))
        rows.append({**r["results"][0], "method": name, "ratio": ratio + (f" ({r['sparsity']:.1%})" if target else ""),
                     "train_min": r["train_seconds"] / 60, "score_min": (r["row_seconds"] - r["train_seconds"]) / 60,
                     "log": {x["step"]: x for x in map(json.loads, open(run / "log.jsonl"))} if target else {}})
        (out / "table.md").write_text(report(rows, args, heldout))
        print(f"{ratio} {name}: done", flush=True)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
