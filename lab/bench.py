"""Benchmarks that print tables (never timed tests). Each row is measured side by side in one run.

    python -m lab.bench gemm      # GFLOP/s of fp32, bf16 and bf16-as-fp32 products by rows (kernels.FP32_ROWS)
    python -m lab.bench model     # forward tokens/s fp32 vs bf16; decode tokens/s with vs without the KV cache
    python -m lab.bench train     # paper Table 9: per-step time and peak memory of no-KD, KD, PKD, PKD + layer loss
    python -m lab.bench skip      # what leaving out zero-masked units saves: an FFN by share left out, the pruning step
    python -m lab.bench export    # decode speed of models pruned to 20% / 50% against the weight-bytes limit
    python -m lab.bench export --run runs/x   # the same for a run's export: sliced, and padded as nute.py pads it
    python -m lab.bench eval      # zero-shot scoring: batched (shared contexts) vs one request per forward; vs lm-eval
    python -m lab.bench layers --run runs/x   # the layer loss (Eq. 6) per layer, plain and --layer-norm teacher
    python -m lab.bench plan      # memory (and CPU time) of the paper's step for LLaMA-7B / 13B / 70B shapes
    python -m lab.bench llama-cpp --run runs/a --run runs/b   # dense vs pruned GGUF in the real llama.cpp
    python -m lab.bench vs-hf     # forward, decode and the KD step against transformers + peft, side by side
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

import data
import evaluate
import kernels
import masks
import model
import nute
from formats import checkpoint
from formats.checkpoint import load, load_adapter
from formats.layout import pad_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where nute.py is


def side_by_side(fns, rounds):
    """Median seconds of each fn over interleaved rounds, after one more that warms up (and compiles): this
    machine's speed drifts, and drift must not look like a ratio."""
    times = [[] for _ in fns]
    for _ in range(rounds + 1):
        for t, f in zip(times, fns):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t[1:]) for t in times]


def timed(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_gemm(args):
    """SmolLM2's products (576 -> 1536 and the 49,152-entry head) at 1 .. 1024 rows, and its causal attention
    forward + backward at 4 x 256 tokens: fp32, PyTorch's bf16 kernels, and bf16 operands in fp32 as the
    model does from kernels.FP32_ROWS rows on (casts included). Interleaved rounds, medians."""
    import torch.nn.functional as F

    print(f"{torch.get_num_threads()} threads; the model multiplies bf16 in fp32 from {kernels.FP32_ROWS} rows "
          f"(kernels.SLOW_16BIT, no AVX512-BF16 on this x86 CPU): {kernels.SLOW_16BIT[torch.bfloat16]}; {args.rounds} rounds\n\n"
          "| what | rows | fp32 GFLOP/s | bf16 GFLOP/s | bf16 in fp32 GFLOP/s | bf16 in fp32 / bf16 |\n|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, k in ((1536, 576), (49152, 576)):
        w = torch.randn(n, k, generator=g)
        for rows in (1, 4, 16, 32, 64, 256, 1024):
            x = torch.randn(rows, k, generator=g)
            xb, wb, flops = x.bfloat16(), w.bfloat16(), 2 * rows * n * k / 1e9
            t = side_by_side([lambda: F.linear(x, w), lambda: F.linear(xb, wb),
                              lambda: F.linear(xb.float(), wb.float()).bfloat16()], args.rounds)
            print(f"| product {k} -> {n} | {rows} | {flops / t[0]:.1f} | {flops / t[1]:.1f} | {flops / t[2]:.1f} | "
                  f"{t[1] / t[2]:.2f}x |")
        x = x[0]  # one row through torch.mv, as the model decodes (see kernels.FP32_ROWS)
        xb, flops = x.bfloat16(), 2 * n * k / 1e9
        t = side_by_side([lambda: torch.mv(w, x), lambda: torch.mv(wb, xb),
                          lambda: torch.mv(wb.float(), xb.float()).bfloat16()], args.rounds)
        print(f"| matrix-vector (torch.mv) {k} -> {n} | 1 | {flops / t[0]:.1f} | {flops / t[1]:.1f} | "
              f"{flops / t[2]:.1f} | {t[1] / t[2]:.2f}x |")
    qkv = [torch.randn(4, 9, 256, 64, generator=g) for _ in range(3)]

    def attention(dtype, compute):
        q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
        F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute), is_causal=True).sum().backward()
    t = side_by_side([lambda: attention(torch.float32, torch.float32), lambda: attention(torch.bfloat16, torch.bfloat16),
                      lambda: attention(torch.bfloat16, torch.float32)], args.rounds)
    flops = 3 * 4 * 4 * 9 * 256 * 256 * 64 / 2 / 1e9  # QK^T and PV over the causal half; backward ~2x forward
    print(f"| attention forward + backward, 4 x 9 heads x 256 | 1024 | {flops / t[0]:.1f} | {flops / t[1]:.1f} | "
          f"{flops / t[2]:.1f} | {t[1] / t[2]:.2f}x |")


def bench_model(args):
    print("| dtype | forward tokens/s (4 x 128) | decode tokens/s, KV cache | decode tokens/s, no cache | speed-up |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        m, _ = load(args.ckpt, dtype=dtype)
        x = torch.randint(0, m.config.vocab_size, (4, 128))
        with torch.no_grad():
            fwd = x.numel() / timed(lambda: m(x), 3)
        prompt, n = list(range(100, 164)), 64  # 64-token prompt, 64 new tokens
        cached = n / timed(lambda: model.generate(m, prompt, n), 2)

        @torch.no_grad()
        def no_cache():  # recompute the whole sequence for every new token
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        plain = n / timed(no_cache, 1)
        print(f"| {str(dtype).split('.')[1]} | {fwd:,.0f} | {cached:.1f} | {plain:.1f} | {cached / plain:.1f}x |")


TABLE9 = {"no KD": ["--distill", "none"], "KD": ["--distill", "kd", "--layer-weight", "0"],
          "PKD": ["--distill", "pkd", "--layer-weight", "0"], "PKD + layer loss": ["--distill", "pkd"]}


def one_config(args):
    """Runs in a child process, so its peak memory is its own: a few training steps of one configuration.
    PKD is measured with a full teacher queue (0.01 .. target - 0.01) so its teacher is a real snapshot."""
    m, tok = load(args.ckpt, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    a = nute.get_args(["--ckpt", args.ckpt, "--dtype", args.dtype, *TABLE9[args.one]])
    state = nute.start(a, m)
    student, queue, g = state.student, state.queue, state.gen
    opt = torch.optim.AdamW([*student.log_alpha.values(), *student.lora.values()], lr=1e-3)
    for k in range(1, round(a.target / a.interval)):
        queue.maybe_snapshot(k * a.interval, student)
    teacher_key = max(queue.snapshots) if a.distill == "pkd" else None
    x = torch.randint(0, m.config.vocab_size, (a.batch_size, a.seq_len), generator=g)
    mask = torch.ones(x.shape)

    def step():
        teacher = None if teacher_key is None else queue.snapshots[teacher_key]
        nute.micro_step(m, x, mask, student.adapter(g), teacher, a.distill != "none", a)
        opt.step()
        opt.zero_grad()
        masks.project_to_target(student.log_alpha, 0.1, m.config)  # the default controller

    sec = timed(step, args.steps)
    queue_bytes = sum(t.numel() * t.element_size() for snap in queue.snapshots.values() for t in snap.values())
    print(json.dumps({"sec": sec, "queue_mb": queue_bytes / 2**20, "snapshots": len(queue.snapshots)}))


def bench_train(args):
    rows = {}
    for name in TABLE9:  # one child process per configuration: peak RSS is per configuration
        p = subprocess.Popen([sys.executable, "-m", "lab.bench", "train", "--one", name, "--ckpt", args.ckpt,
                              "--dtype", args.dtype, "--steps", str(args.steps)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        if status != 0:
            sys.exit(f"{name}: child failed")
        rows[name] = {**json.loads(out.strip().splitlines()[-1]), "peak_gb": usage.ru_maxrss / 2**20}
    kd = rows["KD"]
    print(f"SmolLM2-135M, batch 4 x 128, {args.dtype}, median of {args.steps} steps, peak RSS of the whole process")
    print("| method | time / step (s) | vs KD | peak memory (GB) | vs KD |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['sec']:.2f} | {r['sec'] / kd['sec']:.3f} | {r['peak_gb']:.2f} | {r['peak_gb'] / kd['peak_gb']:.3f} |")
    r = rows["PKD"]
    print(f"\nTeacher queue on the CPU: {r['snapshots']} snapshots, {r['queue_mb']:.1f} MB")
    l7 = model.ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008)
    per = 4 * (l7.n_layers * (l7.n_heads + l7.ffn_dim) + l7.dim + l7.n_layers * 2 * 8 * (2 * l7.dim))  # fp32 masks + q,v LoRA r=8
    print(f"LLaMA-7B, same queue layout: {per / 2**20:.2f} MB a snapshot; 49 snapshots (target 0.5) "
          f"{49 * per / 2**20:.0f} MB (paper Table 13: ~728 MB)")


def pruning_step_fn(a, m, x, g, sparsity, skip=True):
    """One pruning step (nute.micro_step and AdamW) of a student whose log_alpha sits at `sparsity` (moved by
    masks.project_to_target), taught as in stage 1 (Eq. 8) by its own snapshot a.gap less sparse (the intact
    model when there is none); skip: model.skip_zeros, leave out the units whose mask is 0."""
    student = nute.start(a, m).student
    teacher = None
    if sparsity > a.gap:
        masks.project_to_target(student.log_alpha, sparsity - a.gap, m.config)
        teacher = student.frozen()
    masks.project_to_target(student.log_alpha, sparsity, m.config)
    opt, mask = torch.optim.AdamW([*student.log_alpha.values(), *student.lora.values()], lr=1e-3), torch.ones(x.shape)

    def step():
        m.skip_zeros = skip
        nute.micro_step(m, x, mask, student.adapter(g), teacher, True, a)
        opt.step()
        opt.zero_grad()
    return step


def bench_skip(args):
    """What leaving out the units whose mask is 0 saves (model.kept_units): an FFN's forward + backward by the
    share of its units left out (kernels.MIN_SKIP is read off it), and the pruning step by the student's sparsity."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    m, _ = load(args.ckpt, dtype=dtype)
    ffn, n = m.layers[0].feed_forward, m.config.ffn_dim
    x = torch.randn(4, 256, m.config.dim, dtype=dtype, requires_grad=True)

    def ffn_step(share, skip):
        z = (torch.arange(n) >= round(share * n)).to(dtype)  # the first units left out
        units = z.nonzero()[:, 0] if skip else None
        z.requires_grad_()
        return lambda: ffn(x, {}, "", z, units).sum().backward()
    shares = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    t = iter(side_by_side([ffn_step(share, skip) for share in shares for skip in (False, True)], args.rounds))
    print(f"SmolLM2-135M, {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    print("| FFN units with z = 0 | forward + backward, all units (ms) | kept units only (ms) | speed-up |\n|---|---|---|---|")
    for share in shares:
        full, kept = next(t), next(t)
        print(f"| {share:.0%} | {full * 1e3:.1f} | {kept * 1e3:.1f} | {full / kept:.2f}x |")
    a = nute.get_args(["--ckpt", args.ckpt, "--dtype", args.dtype, "--seq-len", "256", "--batch-size", "4"])
    tokens, g = torch.randint(1000, 20000, (4, 256), generator=torch.Generator().manual_seed(0)), torch.Generator()
    levels = (0.0, 0.2, 0.5)
    t = iter(side_by_side([pruning_step_fn(a, m, tokens, g, s, skip) for s in levels for skip in (False, True)], args.rounds))
    print("\n| pruning step, 4 x 256: student / teacher sparsity | all units (tok/s) | kept units only (tok/s) | speed-up |"
          "\n|---|---|---|---|")
    for s in levels:
        full, kept = next(t), next(t)
        teacher = f"{s - a.gap:.0%}" if s > a.gap else "intact"
        print(f"| {s:.0%} / {teacher} | {tokens.numel() / full:.1f} | {tokens.numel() / kept:.1f} | {full / kept:.2f}x |")


def structured_masks(config, target):
    """Binary masks at a given sparsity, for timing only: the first heads and FFN units of every layer."""
    keep_heads = max(1, round(config.n_heads * (1 - target)))
    z_head = torch.zeros(config.n_layers, config.n_heads)
    z_head[:, :keep_heads] = 1
    z_hid = torch.ones(config.dim)
    attn = masks.expected_size(z_head, torch.zeros(config.n_layers, config.ffn_dim), z_hid, config)
    ffn = round(((1 - target) * masks.prunable_size(config) - attn.item()) / (3 * config.dim * config.n_layers))
    z_int = torch.zeros(config.n_layers, config.ffn_dim)
    z_int[:, :max(0, min(config.ffn_dim, ffn))] = 1
    return {"z_head": z_head, "z_int": z_int, "z_hid": z_hid}


def weight_bytes_per_token(m):
    """Bytes a decode step reads: every matrix but the embedding table, of which one row is read
    (with tied embeddings the lm_head still reads the whole table)."""
    n = sum(p.numel() for p in m.parameters()) - m.tok_embeddings.weight.numel()
    if m.output is None:
        n += m.tok_embeddings.weight.numel()
    return n * m.tok_embeddings.weight.element_size()


def bench_export(args):
    big = torch.ones(2**28)  # 1 GiB: a decode step reads every weight once, so reading memory is its limit
    read_gbs = big.numel() * 4 / timed(big.sum, 3) / 1e9
    big = torch.ones(2**29, dtype=torch.bfloat16)  # the same bytes through PyTorch's bf16 kernel
    bf16_gbs = big.numel() * 2 / timed(big.sum, 3) / 1e9
    del big
    step = model.compile_decoding() if args.compile else model.decode_one_token
    print(f"memory read: {read_gbs:.1f} GB/s (a sum over 1 GiB; in bf16 {bf16_gbs:.1f} GB/s) on "
          f"{torch.get_num_threads()} threads; decode step {'torch.compiled' if args.compile else 'eager'}\n")
    print("| dtype | model | params | weight MB read / token | decode tokens/s | ms / token | GB/s | of read limit "
          "| speed-up | bytes ratio | of bytes ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        dense, _ = load(args.ckpt, dtype=dtype)
        if args.run:  # a real run's masks, exported as sliced and in the shapes nute.py pads them to
            small = model.slice_model(dense, load_adapter(args.run[0], dense))
            models = {"dense": dense, "run, sliced": small, "run, fixed GQA": pad_model(small, 1),
                      "run, fixed GQA, widths of 32": pad_model(small, 32)}
        else:
            models = {"dense": dense, **{f"{t:.0%} pruned": model.slice_model(dense, structured_masks(dense.config, t))
                                          for t in (0.2, 0.5)}}
        # Interleaved rounds, median per model: this machine's speed drifts, and drift must not look like a ratio.
        speeds = {name: [] for name in models}
        for i in range(args.rounds + 1):  # round 0 warms up (and compiles)
            for name, m in models.items():
                tps = evaluate.latency(m, prompt_len=64, gen_len=256, runs=1, warmup=0, step=step)["decode_tok_s"]
                if i:
                    speeds[name].append(tps)
        base = None
        for name, m in models.items():
            tps, nbytes = statistics.median(speeds[name]), weight_bytes_per_token(m)
            base = base or (tps, nbytes)
            speed, limit = tps / base[0], base[1] / nbytes
            print(f"| {str(dtype).split('.')[1]} | {name} | {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M | "
                  f"{nbytes / 1e6:.0f} | {tps:.1f} | {1000 / tps:.1f} | {nbytes * tps / 1e9:.1f} | "
                  f"{nbytes * tps / 1e9 / read_gbs:.0%} | {speed:.2f}x | {limit:.2f}x | {speed / limit:.0%} |")


def llama_cpp_perplexity(llm, chunks):
    """evaluate.perplexity's number (non-overlapping chunks, tokens 1..L-1 scored), computed by llama.cpp."""
    nll, count = 0.0, 0
    for chunk in chunks.tolist():
        llm.reset()
        llm.eval(chunk)
        logits = torch.tensor(llm.scores[:len(chunk) - 1])
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def as_deci(m):
    """The dense model with 32 zero FFN units added to layer 0: no longer uniform, so save_gguf writes it as
    `deci`, the architecture of the pruned exports, computing what the dense model computes."""
    sd, f = dict(m.state_dict()), "layers.0.feed_forward."
    for w in ("w1", "w3"):
        sd[f + w + ".weight"] = torch.cat([sd[f + w + ".weight"], torch.zeros(32, m.config.dim)])
    sd[f + "w2.weight"] = torch.cat([sd[f + "w2.weight"], torch.zeros(m.config.dim, 32)], 1)
    ffn_dims = [m.config.ffn_dims[0] + 32] + m.config.ffn_dims[1:]
    return model.build(dataclasses.replace(m.config, ffn_dims=ffn_dims), sd)


def bench_llama_cpp(args):
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
        models.update({f"{t:.0%} pruned": model.slice_model(dense, structured_masks(dense.config, t)) for t in (0.2, 0.5)})
    ids = evaluate.text_ids(tok, "\n\n".join(data.default_texts()[1]))  # held-out Wikipedia documents
    chunks = torch.tensor(ids[:args.ppl_chunks * 128]).view(-1, 128)
    prompt = torch.randint(1000, 20000, (64 + 192,), generator=torch.Generator().manual_seed(0)).tolist()
    threads = torch.get_num_threads()
    print(f"llama.cpp (llama-cpp-python), {threads} threads; prefill: a 64-token prompt, decode: 192 tokens one at a "
          f"time; perplexity: {len(chunks)} x 128 held-out tokens\n")
    print("| type | model | parameters | file MB | bytes / parameter | perplexity (ours) | perplexity (llama.cpp) | "
          "prefill tokens/s | decode tokens/s | prefill speed-up | decode speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            llms, times, ppl = {}, {}, {}
            for name, m in models.items():
                path = os.path.join(tmp, f"{len(llms)}.{qtype}.gguf")
                checkpoint.save_gguf(m, tok, path, qtype)
                ours = evaluate.perplexity(load(path)[0], chunks.flatten().tolist(), 128)
                llm = Llama(path, n_ctx=512, n_threads=threads, n_batch=128, logits_all=True, verbose=False)
                llms[name], times[name] = (llm, os.path.getsize(path)), []
                ppl[name] = (ours, llama_cpp_perplexity(llm, chunks))
            for _ in range(args.rounds):
                for name, (llm, _) in llms.items():
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(prompt[:64])
                    t1 = time.perf_counter()
                    for t in prompt[64:]:
                        llm.eval([t])
                    times[name].append((64 / (t1 - t0), 192 / (time.perf_counter() - t1)))
            base = None
            for name, (llm, size) in llms.items():
                pre, dec = (statistics.median(x[i] for x in times[name]) for i in (0, 1))
                base = base or (pre, dec)
                n = sum(p.numel() for p in models[name].parameters())
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
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits_s.float() / temperature, -1),
                                        torch.softmax(logits_t.float() / temperature, -1), reduction="batchmean")
        kl.backward()
        opt.step()
        opt.zero_grad()
    return step


def our_kd_step_fn(a, m, batches):
    """A training step of nute.py's loop on model m (a: nute's settings)."""
    state, steps = nute.start(a, m), iter(range(10**6))
    return lambda: nute.train_step(next(steps), m, batches, state, a)


def profile(f):
    """Self CPU time per op of one call of f, after a warm-up call -> a table."""
    f()
    with torch.profiler.profile() as prof:
        f()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6)


def cli_kd_tokens_per_s(ckpt, dtype, flags):
    """The KD step through the command line: the median tokens/s of steps 3-8 in its log.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "nute.py", "--ckpt", ckpt, "--distill", "kd", "--layer-weight", "0", "--seq-len", "256",
               "--batch-size", "4", "--dtype", dtype, "--steps", "8", "--no-eval", "--out", tmp + "/run", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
        return statistics.median(json.loads(line)["tokens_per_s"] for line in list(open(tmp + "/run/log.jsonl"))[2:])


def bench_vs_hf(args, dtypes):
    """The same weights in transformers (+ peft for LoRA) and here, timed in interleaved rounds in one process:
    a no-grad forward, greedy decoding with prefill, and a KD step (ours: nute.train_step with masks sampled,
    the teacher forward, the controller); then our pruning step at 20% and 50% (zero-masked units left out)
    against the same HF KD step."""
    try:
        import peft
        import transformers
    except ImportError:
        sys.exit("transformers and peft are not installed (optional peers): pip install transformers peft")
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, transformers {transformers.__version__}, peft "
          f"{peft.__version__}; {args.rounds} interleaved rounds, medians; bf16 products in fp32 from "
          f"{kernels.FP32_ROWS} rows (kernels.SLOW_16BIT): {kernels.SLOW_16BIT[torch.bfloat16]}\n")
    if not args.profile:
        print("| what | dtype | Hugging Face | nute | nute / HF |\n|---|---|---|---|---|")
    for dtype in [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in dtypes]:
        ours, tok = load(args.ckpt, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(ours, tok, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(1000, 20000, (4, 256), generator=g)
        prompt = x[0, :64].tolist()
        name = str(dtype).split(".")[1]
        a = nute.get_args(["--ckpt", args.ckpt, "--distill", "kd", "--layer-weight", "0", "--seq-len", "256",
                           "--batch-size", "4", "--dtype", name.replace("float32", "fp32").replace("bfloat16", "bf16"),
                           "--steps", "1000", "--no-eval"])
        batches = (x.repeat(4, 1), torch.ones(16, 256))
        our_kd_step = lambda m: our_kd_step_fn(a, m, batches)
        compiled_blocks, _ = load(args.ckpt, dtype=dtype)  # the same weights, blocks through model.compiled_block
        compiled_blocks.compile_blocks = True
        hf_kd_step = hf_kd_step_fn(peft, hf, x, a.temperature)
        compiled, KD = model.compile_decoding(), "KD step, LoRA q,v r8, 4 x 256"
        def hf_generate():
            hf.generate(torch.tensor([prompt]), max_new_tokens=192, min_new_tokens=192, do_sample=False)
        jobs = {  # what: (HF, ours, tokens per call); HF None: the HF figure of the row above
            "forward 4 x 256, no grad": (lambda: torch.no_grad()(hf)(x), lambda: torch.no_grad()(ours)(x), x.numel()),
            "greedy decode 64 -> 256 (with prefill)": (hf_generate, lambda: model.generate(ours, prompt, 192), 192),
            "same, our decode step compiled (`evaluate.py --compile`)": (
                None, lambda: model.generate(ours, prompt, 192, step=compiled), 192),
            KD: (hf_kd_step, our_kd_step(ours), x.numel()),
            "same, our blocks compiled (`nute.py --compile`)": (None, our_kd_step(compiled_blocks), x.numel()),
            **{f"pruning step at {s:.0%} (student; its teacher {s - a.gap:.0%})": (
                None, pruning_step_fn(a, ours, x, g, s), x.numel()) for s in (0.2, 0.5)}}
        if args.profile:  # where the KD steps' time goes instead of the table: self CPU time per op
            for who, f in (("Hugging Face", hf_kd_step), ("nute", jobs[KD][1])):
                print(f"\nKD step, {who}, {name}\n" + profile(f))
            continue
        timed = side_by_side([f for f_hf, f_ours, _ in jobs.values() for f in (f_hf, f_ours) if f], args.rounds)
        t, tps, hf_tps = iter(timed), {}, None
        for k, (f_hf, _, n) in jobs.items():  # tokens/s, HF and ours
            hf_tps = n / next(t) if f_hf else hf_tps
            tps[k] = (hf_tps, n / next(t))
        for k, (hf_tps, our_tps) in tps.items():
            print(f"| {k} | {name} | {hf_tps:,.1f} tok/s | {our_tps:,.1f} | {our_tps / hf_tps:.2f}x |")
        for flags in ([], ["--compile"]):  # the step users get, against HF's KD step above
            cli = cli_kd_tokens_per_s(args.ckpt, a.dtype, flags)
            print(f"| KD step through `{' '.join(['nute.py', *flags])}` (log.jsonl) | {name} | {tps[KD][0]:,.1f} tok/s | "
                  f"{cli:,.1f} | {cli / tps[KD][0]:.2f}x |")


def bench_eval(args):
    docs = data.read_task("arc_easy", 40)  # the first 40 ARC-Easy test questions, 4 choices each
    print("| dtype | batched examples/s | one request per forward, examples/s | speed-up |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        m, tok = load(args.ckpt, dtype=dtype)
        batched = len(docs) / timed(lambda: evaluate.evaluate_task(m, tok, "arc_easy", docs, batch_size=32), 1)
        requests = [evaluate.encode_pair(tok, c, x) for d in docs
                    for c, x in zip(*evaluate.make_example("arc_easy", d)[:2])]
        single = len(docs) / timed(lambda: [evaluate.score_requests(m, [r], batch_size=1) for r in requests], 1)
        print(f"| {str(dtype).split('.')[1]} | {batched:.2f} | {single:.2f} | {batched / single:.2f}x |")
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return print("\nlm-evaluation-harness is not installed (an optional peer): pip install lm-eval==0.4.13")
    # The same requests through the harness's Hugging Face model, on the same weights saved as safetensors
    pairs = [(c, x) for task in ("arc_easy", "hellaswag") for d in data.read_task(task, 40)
             for c, x in zip(*evaluate.make_example(task, d)[:2])]
    print(f"\nAgainst lm-evaluation-harness (HFLM, loglikelihood): {len(pairs)} requests of the first 40 ARC-Easy and "
          f"40 HellaSwag documents, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n\n"
          "| dtype | harness batch 8, req/s | harness batch 32, req/s | nute batch 32, req/s | nute / harness at 8 | "
          "max abs. difference of log-likelihoods |\n|---|---|---|---|---|---|")
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


def bench_layers(args):
    """What each layer adds to Eq. 6 for one batch of held-out text: the intact model teaches a run's masks
    (or, without --run, the first heads and units of every layer at 50%)."""
    m, tok = load(args.ckpt, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    run = args.run[0] if args.run else None
    student = checkpoint.load_adapter(run, m) if run else structured_masks(m.config, 0.5)
    x = data.pack(data.default_texts()[1], tok, 128)[:4]  # 4 x 128 held-out Wikipedia tokens
    with torch.no_grad():
        (logits_s, hs), (logits_t, ht) = m(x, student, return_hidden=True), m(x, return_hidden=True)
    kept = student["z_hid"] > 0
    print(f"{'the intact model teaching ' + (run or 'structured 50% masks')}, 4 x 128 held-out tokens, {args.dtype}")
    print("| state | teacher mean square | MSE | MSE / teacher mean square |\n|---|---|---|---|")
    total = [0.0, 0.0]
    for i, (a, b) in enumerate(zip(hs, ht)):
        a, b = a.float()[..., kept], b.float()[..., kept]
        ms, mse = b.pow(2).mean().item(), (a - b).pow(2).mean().item()
        total = [total[0] + mse, total[1] + mse / ms]
        name = f"layer {i}" if i < len(hs) - 1 else "final norm"
        print(f"| {name} | {ms:.3g} | {mse:.3g} | {mse / ms:.3g} |")
    kl = nute.distill_loss(logits_s, logits_t, [], [], student["z_hid"], 2 / 3)[0].item()
    print(f"| sum (Eq. 6) | | {total[0]:.3g} | {total[1]:.3g} |\n\nKL (Eq. 5): {kl:.3g}")


# The paper's step at full size: random weights of the real shapes with one and two layers; their difference
# is one layer, the rest (embeddings, logits, KL) is counted once
SHAPES = {"LLaMA-7B": dict(dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, layers=32),
          "LLaMA-2-13B": dict(dim=5120, n_heads=40, n_kv_heads=40, ffn_dim=13824, layers=40),
          "LLaMA-2-70B": dict(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672, layers=80)}


def paper_step(shape, n_layers, grad_checkpoint, batch, seq_len, timed_step):
    """One PKD step (teacher forward, student forward + Eq. 5-6 + backward) of a bf16 model with n_layers
    -> (bytes autograd keeps for backward, seconds of the whole step or None)."""
    c = model.ModelConfig(**{k: v for k, v in shape.items() if k != "layers"}, head_dim=128, vocab_size=32000,
                          n_layers=n_layers, max_seq_len=seq_len)
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 directly: a 70B layer is 3.4 GB in fp32
    m = model.Transformer(c).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    m.grad_checkpoint = grad_checkpoint
    g = torch.Generator().manual_seed(0)
    la = {k: v.requires_grad_(True) for k, v in masks.init_log_alpha(c, g).items()}
    lora = {k: v.requires_grad_(True) for k, v in model.init_lora(m, ["q", "v"], 8, g).items()}
    x = torch.randint(0, c.vocab_size, (batch, seq_len), generator=g)
    saved = {}

    def keep(t):  # counted once per storage: views of one tensor share it
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    t0 = time.perf_counter()
    with torch.no_grad():
        logits_t, hidden_t = m(x, return_hidden=True)
    adapter = nute.Student(la, lora, 1.0, {}).adapter(g)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits, hidden = m(x, adapter, return_hidden=True)
        kl, layer = nute.distill_loss(logits, logits_t, hidden, hidden_t, adapter["z_hid"], 2 / 3, "teacher")
    if not timed_step:
        return sum(saved.values()), None
    (0.1 * kl + 0.9 * layer).backward()
    return sum(saved.values()), time.perf_counter() - t0


def bench_plan(args):
    """Memory of the paper's step (4 x 512, bf16) per layer, extrapolated to the full depth; CPU time of the
    step for the first shape (the others scale with their weights per layer)."""
    B, T, gb = 4, 512, 2**30
    kernels.SLOW_16BIT = {}  # the GPU's case: 16-bit kernels, no fp32 copies kept for backward
    print(f"batch {B} x {T}, bf16, LoRA r8 on q,v, PKD with the layer loss; measured on this CPU "
          f"({torch.get_num_threads()} threads)\n")
    print("| model | weights (GB) | activations per layer (MB) | + checkpointing | other activations (GB) | "
          "one GPU (GB) | + checkpointing | FSDP on 8 GPUs, each (GB) | CPU s per layer | + checkpointing |")
    print("|" + "---|" * 10)
    per_layer_s, first = {}, None
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        timed_step = first is None and args.time
        row = {}
        for ckpt in (False, True):
            if timed_step:  # a warm-up step, untimed: first calls allocate
                paper_step(shape, 1, ckpt, B, T, True)
            (b1, s1), (b2, s2) = (paper_step(shape, n, ckpt, B, T, timed_step) for n in (1, 2))
            row[ckpt] = (b2 - b1, b1 - (b2 - b1), (s2 - s1) if timed_step else None)
        L, c = shape["layers"], model.ModelConfig(**{k: v for k, v in shape.items() if k != "layers"}, head_dim=128,
                                                  vocab_size=32000, n_layers=shape["layers"])
        weights = 2 * (masks.prunable_size(c) + 2 * c.vocab_size * c.dim + (2 * L + 1) * c.dim)  # bf16
        lora = 8 * L * (2 * c.dim + (c.n_heads + c.n_kv_heads) * c.head_dim) * 16  # fp32 weight, grad, Adam m, v
        teacher_states = L * B * T * c.dim * 2  # the teacher's hidden states, kept for Eq. 6
        total = {k: weights + lora + teacher_states + base + L * layer for k, (layer, base, _) in row.items()}
        total[True] += row[False][0]  # backward recomputes one block at a time: its activations, once
        fsdp = weights / 8 + lora + teacher_states + row[True][1] + L * row[True][0] + row[False][0] + weights / L
        if timed_step:  # the other shapes' time scales with the weights of a layer
            per_layer_s, first = {k: v[2] for k, v in row.items()}, masks.prunable_size(c) / L
        ratio = masks.prunable_size(c) / L / first if first else None
        secs = " | ".join("-" if ratio is None else f"{per_layer_s[k] * ratio:.1f}" + ("" if timed_step else " (scaled)")
                          for k in (False, True))
        print(f"| {name} | {weights / gb:.1f} | {row[False][0] / 2**20:.0f} | {row[True][0] / 2**20:.0f} | "
              f"{row[False][1] / gb:.2f} | {total[False] / gb:.1f} | {total[True] / gb:.1f} | {fsdp / gb:.1f} | {secs} |")
    print("\nDDP needs what one GPU needs, on each GPU. On a GPU: `torchrun --nproc_per_node 8 nute.py --ckpt "
          "meta-llama/Llama-2-70b-hf --fsdp --grad-checkpoint --seq-len 512 --batch-size 1 --grad-accum 2 ...`")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gemm", "model", "train", "skip", "export", "eval", "layers", "plan", "llama-cpp",
                                    "vs-hf"])
    p.add_argument("--ckpt", default=str(data.default_model_path()))
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 (vs-hf: both)")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per configuration")
    p.add_argument("--rounds", type=int, default=7, help="export, llama-cpp, gemm, skip, vs-hf, eval: interleaved timing rounds")
    p.add_argument("--compile", action="store_true", help="export: time the torch.compiled decode step")
    p.add_argument("--profile", action="store_true", help="vs-hf: torch.profiler's top ops of both KD steps, no table")
    p.add_argument("--run", action="append", help="layers: a nute.py run whose masks the student uses; export: a run "
                   "whose export to time; llama-cpp: pruned runs to time against the dense model (repeatable; "
                   "default: first units kept, 20%% and 50%%)")
    p.add_argument("--types", default="F32,Q8_0", help="llama-cpp: GGUF tensor types to compare in")
    p.add_argument("--ppl-chunks", type=int, default=64, help="llama-cpp: held-out chunks of 128 tokens for perplexity")
    p.add_argument("--shapes", default=",".join(SHAPES), help="plan: which of " + ", ".join(SHAPES))
    p.add_argument("--no-time", dest="time", action="store_false", help="plan: memory only (the first shape is "
                   "timed, the others scaled by their weights per layer)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    dtypes, args.dtype = [args.dtype] if args.dtype else ["fp32", "bf16"], args.dtype or "bf16"
    torch.manual_seed(0)
    if args.one:
        one_config(args)
    elif args.what == "gemm":
        bench_gemm(args)
    elif args.what == "model":
        bench_model(args)
    elif args.what == "train":
        bench_train(args)
    elif args.what == "skip":
        bench_skip(args)
    elif args.what == "export":
        bench_export(args)
    elif args.what == "layers":
        bench_layers(args)
    elif args.what == "plan":
        bench_plan(args)
    elif args.what == "llama-cpp":
        bench_llama_cpp(args)
    elif args.what == "vs-hf":
        bench_vs_hf(args, dtypes)
    else:
        bench_eval(args)


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.LoadError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
