"""The same work in other tools, side by side with ours on the same weights: transformers + peft, llama.cpp and
lm-evaluation-harness. Each is an optional peer, never in requirements.txt; a missing one is one line. Timing as
in lab/bench.py: interleaved rounds, medians.

    python -m lab.versus hf          # forward, decode and the KD step against transformers + peft
    python -m lab.versus llama-cpp --run runs/a --run runs/b   # dense vs pruned GGUF in the real llama.cpp
    python -m lab.versus lm-eval     # zero-shot scoring against lm-evaluation-harness (HFLM)
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import evaluate
import kernels
import model
import nute
from formats import checkpoint
from formats.checkpoint import load
from lab.bench import DTYPES, ROOT, pruned_models, pruning_step_fn, side_by_side, table


def versus_lm_eval(args):
    """ARC-Easy and HellaSwag requests scored by lm-evaluation-harness's Hugging Face model (HFLM) on the same
    weights saved as safetensors, and by evaluate.score_requests: speed, and the largest log-likelihood gap."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return print("\nlm-evaluation-harness is not installed (an optional peer): pip install lm-eval==0.4.13")
    pairs = [(c, x) for task in ("arc_easy", "hellaswag") for d in data.read_task(task, 40)
             for c, x in zip(*evaluate.make_example(task, d)[:2])]
    print(f"\nAgainst lm-evaluation-harness (HFLM, loglikelihood): {len(pairs)} requests of the first 40 ARC-Easy and "
          f"40 HellaSwag documents, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    table("dtype", "harness batch 8, req/s", "harness batch 32, req/s", "nute batch 32, req/s", "nute / harness at 8",
          "max abs. difference of log-likelihoods")
    for dtype in (torch.float32, torch.bfloat16):
        m, tok = load(args.ckpt, dtype=dtype)
        requests = [evaluate.encode_pair(tok, c, x) for c, x in pairs]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(m, tok, tmp)
            lms = [HFLM(pretrained=tmp, device="cpu", dtype=dtype, batch_size=b, add_bos_token=False) for b in (8, 32)]
        instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        ll = {}  # log-likelihoods: the harness's at batch 8, ours

        def harness(lm):
            ll[lm.batch_size] = [s for s, _ in lm.loglikelihood(instances, True)]

        def ours():
            ll["nute"] = evaluate.score_requests(m, requests, batch_size=32)
        t8, t32, t = side_by_side([lambda: harness(lms[0]), lambda: harness(lms[1]), ours], args.rounds)
        diff = max(abs(a - b) for a, b in zip(ll["nute"], ll[8]))
        print(f"| {str(dtype).split('.')[1]} | {len(pairs) / t8:.1f} | {len(pairs) / t32:.1f} | {len(pairs) / t:.1f} "
              f"| {t8 / t:.2f}x | {diff:.2g} |")
    trees = sum(map(len, {tuple(c) for c, _ in requests})) + sum(len(x) - 1 for _, x in requests)
    print(f"\nToken positions run: the harness {sum(len(c) + len(x) - 1 for c, x in requests):,} (each request "
          f"whole), nute {trees:,} (each context once, before padding)")


def llama_cpp_perplexity(llm, chunks):
    """evaluate.perplexity's number (non-overlapping chunks, tokens 1..L-1 scored), computed by llama.cpp."""
    nll = 0.0
    for chunk in chunks.tolist():
        llm.reset()
        llm.eval(chunk)
        nll += F.cross_entropy(torch.tensor(llm.scores[:len(chunk) - 1]), torch.tensor(chunk[1:]), reduction="sum").item()
    return math.exp(nll / (chunks.numel() - len(chunks)))


def llama_cpp_speeds(llm, prompt):
    """-> (prefill tokens/s of prompt[:64], decode tokens/s of the rest, one token at a time) in llama.cpp."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt[:64])
    t1 = time.perf_counter()
    for t in prompt[64:]:
        llm.eval([t])
    return 64 / (t1 - t0), (len(prompt) - 64) / (time.perf_counter() - t1)


def as_deci(m):
    """The dense model with 32 zero FFN units added to layer 0: no longer uniform, so save_gguf writes it as
    `deci`, the architecture of the pruned exports, computing what the dense model computes."""
    sd, f = dict(m.state_dict()), "layers.0.feed_forward."
    for w in ("w1", "w3"):
        sd[f + w + ".weight"] = torch.cat([sd[f + w + ".weight"], torch.zeros(32, m.config.dim)])
    sd[f + "w2.weight"] = torch.cat([sd[f + "w2.weight"], torch.zeros(m.config.dim, 32)], 1)
    ffn_dims = [m.config.ffn_dims[0] + 32] + m.config.ffn_dims[1:]
    return model.build(dataclasses.replace(m.config, ffn_dims=ffn_dims), sd)


def versus_llama_cpp(args):
    """The paper's speed-up measured in a real engine: the dense model and the pruned ones written by save_gguf in
    the same tensor type; file size, held-out perplexity through our loader and through llama.cpp, prefill and
    decode speed in llama.cpp (llama-cpp-python), interleaved rounds, medians."""
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed; docs/guide.md, 'Run your pruned model', has the line that builds it")
    dense, tok = load(args.ckpt)
    models = {"dense": dense, "dense as deci": as_deci(dense)}  # the same weights in the pruned models' architecture
    for run in args.run or []:
        models[os.path.basename(os.path.normpath(run))] = model.slice_model(dense, checkpoint.load_adapter(run, dense))
    if not args.run:  # timing only: the first heads and FFN units of every layer
        models.update(pruned_models(dense))
    ids = evaluate.text_ids(tok, "\n\n".join(data.default_texts()[1]))  # held-out Wikipedia documents
    chunks = torch.tensor(ids[:args.ppl_chunks * 128]).view(-1, 128)
    prompt = torch.randint(1000, 20000, (64 + 192,), generator=torch.Generator().manual_seed(0)).tolist()
    threads = torch.get_num_threads()
    print(f"llama.cpp (llama-cpp-python), {threads} threads; prefill: a 64-token prompt, decode: 192 tokens one at a "
          f"time; perplexity: {len(chunks)} x 128 held-out tokens\n")
    table("type", "model", "parameters", "file MB", "bytes / parameter", "perplexity (ours)", "perplexity (llama.cpp)",
          "prefill tokens/s", "decode tokens/s", "prefill speed-up", "decode speed-up")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            llms, ppl = {}, {}  # name -> (llama.cpp's model, file bytes), (perplexity: ours, llama.cpp's)
            for name, m in models.items():
                path = os.path.join(tmp, f"{len(llms)}.{qtype}.gguf")
                checkpoint.save_gguf(m, tok, path, qtype)
                ours = evaluate.perplexity(load(path)[0], chunks.flatten().tolist(), 128)
                llm = Llama(path, n_ctx=512, n_threads=threads, n_batch=128, logits_all=True, verbose=False)
                llms[name], ppl[name] = (llm, os.path.getsize(path)), (ours, llama_cpp_perplexity(llm, chunks))
            rounds = [[llama_cpp_speeds(llm, prompt) for llm, _ in llms.values()] for _ in range(args.rounds)]
            base = None
            for (name, (llm, size)), speeds in zip(llms.items(), zip(*rounds)):  # interleaved rounds, medians
                pre, dec = (statistics.median(s[i] for s in speeds) for i in (0, 1))
                base, n = base or (pre, dec), sum(p.numel() for p in models[name].parameters())
                print(f"| {qtype} | {name} | {n / 1e6:.1f}M | {size / 1e6:.1f} | {size / n:.3f} | {ppl[name][0]:.2f} | "
                      f"{ppl[name][1]:.2f} | {pre:.0f} | {dec:.1f} | {pre / base[0]:.2f}x | {dec / base[1]:.2f}x |")
            del llms


def hf_kd_step_fn(peft, hf, x, temperature):
    """Hugging Face's plain KD step: LoRA q, v rank 8 (peft); the intact teacher is the same model with its
    adapter disabled; the student's forward / backward; AdamW."""
    student = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with torch.no_grad(), student.disable_adapter():
            logits_t = student(x).logits
        logits_s = student(x).logits
        F.kl_div(torch.log_softmax(logits_s.float() / temperature, -1), torch.softmax(logits_t.float() / temperature, -1),
                 reduction="batchmean").backward()
        opt.step()
        opt.zero_grad()
    return step


def cli_kd_tokens_per_s(ckpt, dtype, flags):
    """The KD step through the command line: the median tokens/s of steps 3-8 in its log.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "nute.py", "--ckpt", ckpt, "--distill", "kd", "--layer-weight", "0", "--seq-len", "256",
               "--batch-size", "4", "--dtype", dtype, "--steps", "8", "--no-eval", "--out", tmp + "/run", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
        return statistics.median(json.loads(line)["tokens_per_s"] for line in list(open(tmp + "/run/log.jsonl"))[2:])


KD = "KD step, LoRA q,v r8, 4 x 256"


def hf_jobs(args, dtype, peft, transformers):
    """hf's rows in one dtype (nute.py's name), the same weights in both: {what: (HF's fn, ours, tokens a call)};
    HF's fn None: ours against HF's figure of the row above."""
    ours, tok = load(args.ckpt, dtype=DTYPES[dtype])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(ours, tok, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype]).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 20000, (4, 256), generator=g)
    prompt = x[0, :64].tolist()
    a = nute.get_args(["--ckpt", args.ckpt, "--distill", "kd", "--layer-weight", "0", "--seq-len", "256",
                       "--batch-size", "4", "--dtype", dtype, "--steps", "1000", "--no-eval"])

    batches = (x.repeat(4, 1), torch.ones(16, 256))

    def our_kd_step(m):  # a training step of nute.py's loop
        state, steps = nute.start(a, m), iter(range(10**6))
        return lambda: nute.train_step(next(steps), m, batches, state, a)
    compiled_blocks, _ = load(args.ckpt, dtype=DTYPES[dtype])  # the same weights, blocks through model.compiled_block
    compiled_blocks.compile_blocks = True
    hf_kd_step, compiled = hf_kd_step_fn(peft, hf, x, a.temperature), model.compile_decoding()
    return {
        "forward 4 x 256, no grad": (lambda: torch.no_grad()(hf)(x), lambda: torch.no_grad()(ours)(x), x.numel()),
        "greedy decode 64 -> 256 (with prefill)": (
            lambda: hf.generate(torch.tensor([prompt]), max_new_tokens=192, min_new_tokens=192, do_sample=False),
            lambda: model.generate(ours, prompt, 192), 192),
        "same, our decode step compiled (`evaluate.py --compile`)": (
            None, lambda: model.generate(ours, prompt, 192, step=compiled), 192),
        KD: (hf_kd_step, our_kd_step(ours), x.numel()),
        "same, our blocks compiled (`nute.py --compile`)": (None, our_kd_step(compiled_blocks), x.numel()),
        **{f"pruning step at {s:.0%} (student; its teacher {s - a.gap:.0%})": (
            None, pruning_step_fn(a, ours, x, g, s), x.numel()) for s in (0.2, 0.5)}}


def versus_hf(args):
    """The same weights in transformers (+ peft for LoRA) and here, timed in interleaved rounds in one process:
    a no-grad forward, greedy decoding with prefill, and a KD step (ours: nute.train_step with masks sampled,
    the teacher forward, the controller); then our pruning step at 20% and 50% (zero-masked units left out)
    against the same HF KD step; then the KD step through nute.py's command line (its log.jsonl)."""
    try:
        import peft
        import transformers
    except ImportError:
        sys.exit("transformers and peft are not installed (optional peers): pip install transformers peft")
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, transformers {transformers.__version__}, peft "
          f"{peft.__version__}; {args.rounds} interleaved rounds, medians; bf16 products in fp32 from "
          f"{kernels.FP32_ROWS} rows (kernels.SLOW_16BIT): {kernels.SLOW_16BIT[torch.bfloat16]}\n")
    if not args.profile:
        table("what", "dtype", "Hugging Face", "nute", "nute / HF")
    for dtype in args.dtypes:
        jobs, name = hf_jobs(args, dtype, peft, transformers), str(DTYPES[dtype]).split(".")[1]
        if args.profile:  # where the KD steps' time goes instead of the table: self CPU time per op
            for who, f in zip(("Hugging Face", "nute"), jobs[KD][:2]):
                f()  # a warm-up call
                with torch.profiler.profile() as prof:
                    f()
                print(f"\nKD step, {who}, {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
            continue
        t = iter(side_by_side([f for f_hf, f_ours, _ in jobs.values() for f in (f_hf, f_ours) if f], args.rounds))
        tps, hf_tps = {}, None
        for k, (f_hf, _, n) in jobs.items():  # tokens/s, HF and ours
            hf_tps = n / next(t) if f_hf else hf_tps
            tps[k] = (hf_tps, n / next(t))
            print(f"| {k} | {name} | {hf_tps:,.1f} tok/s | {tps[k][1]:,.1f} | {tps[k][1] / hf_tps:.2f}x |")
        for flags in ([], ["--compile"]):  # the step users get, against HF's KD step above
            cli = cli_kd_tokens_per_s(args.ckpt, dtype, flags)
            print(f"| KD step through `{' '.join(['nute.py', *flags])}` (log.jsonl) | {name} | {tps[KD][0]:,.1f} tok/s | "
                  f"{cli:,.1f} | {cli / tps[KD][0]:.2f}x |")


VERSUS = {"hf": versus_hf, "llama-cpp": versus_llama_cpp, "lm-eval": versus_lm_eval}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=VERSUS)
    p.add_argument("--ckpt", default=str(data.default_model_path()))
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="hf: one of them (default: both)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--profile", action="store_true", help="hf: torch.profiler's top ops of both KD steps, no table")
    p.add_argument("--run", action="append", help="llama-cpp: pruned runs to time against the dense model (repeatable; "
                   "default: first units kept, 20%% and 50%%)")
    p.add_argument("--types", default="F32,Q8_0", help="llama-cpp: GGUF tensor types to compare in")
    p.add_argument("--ppl-chunks", type=int, default=64, help="llama-cpp: held-out chunks of 128 tokens for perplexity")
    args = p.parse_args()
    args.dtypes, args.dtype = [args.dtype] if args.dtype else list(DTYPES), args.dtype or "bf16"
    torch.manual_seed(0)
    VERSUS[args.what](args)


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.LoadError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
