"""Benchmarks that print tables (never timed tests). Each row is measured side by side in one run.

    python -m lab.bench gemm      # GFLOP/s of fp32, bf16 and bf16-as-fp32 products by rows (kernels.FP32_ROWS)
    python -m lab.bench model     # forward tokens/s fp32 vs bf16; decode tokens/s with vs without the KV cache
    python -m lab.bench train     # paper Table 9: per-step time and peak memory of no-KD, KD, PKD, PKD + layer loss
    python -m lab.bench skip      # what leaving out zero-masked units saves: an FFN by share left out, the pruning step
    python -m lab.bench export    # decode speed of models pruned to 20% / 50% against the weight-bytes limit
    python -m lab.bench export --run runs/x   # the same for a run's export: sliced, and padded as nute.py pads it
    python -m lab.bench eval      # zero-shot scoring: batched (shared contexts) vs one request per forward
    python -m lab.bench layers --run runs/x   # the layer loss (Eq. 6) per layer, plain and --layer-norm teacher
    python -m lab.bench plan      # memory (and CPU time) of the paper's step for LLaMA-7B / 13B / 70B shapes

The same work in other tools (transformers, llama.cpp, lm-evaluation-harness): lab/versus.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import data
import evaluate
import kernels
import masks
import model
import nute
from formats import checkpoint
from formats.checkpoint import load
from formats.layout import pad_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where nute.py is
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # nute.py's --dtype -> torch's


def side_by_side(fns, rounds):
    """Median seconds of each fn over interleaved rounds, after one more that warms up (and compiles) and is
    dropped: this machine's speed drifts, and drift must not look like a ratio. One fn: a median of `rounds` calls."""
    times = [[] for _ in fns]
    for _ in range(rounds + 1):
        for t, f in zip(times, fns):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t[1:]) for t in times]


def table(*columns):
    """Prints the head of a Markdown table."""
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")


def bench_gemm(args):
    """SmolLM2's products (576 -> 1536 and the 49,152-entry head) at 1 .. 1024 rows, and its causal attention
    forward + backward at 4 x 256 tokens: fp32, PyTorch's bf16 kernels, and bf16 operands in fp32 as the
    model does from kernels.FP32_ROWS rows on (casts included)."""
    print(f"{torch.get_num_threads()} threads; the model multiplies bf16 in fp32 from {kernels.FP32_ROWS} rows "
          f"(kernels.SLOW_16BIT, no AVX512-BF16 on this x86 CPU): {kernels.SLOW_16BIT[torch.bfloat16]}; {args.rounds} rounds\n")
    table("what", "rows", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16 in fp32 GFLOP/s", "bf16 in fp32 / bf16")

    def row(what, rows, gflop, fns):  # fns: in fp32, in bf16, bf16 in fp32
        t = side_by_side(fns, args.rounds)
        print(f"| {what} | {rows} | {gflop / t[0]:.1f} | {gflop / t[1]:.1f} | {gflop / t[2]:.1f} | {t[1] / t[2]:.2f}x |")

    def casts(f, *fp32):  # f on fp32 operands, on bf16 ones, on bf16 ones cast to fp32 (the result cast back)
        bf16 = [t.bfloat16() for t in fp32]
        return [lambda: f(*fp32), lambda: f(*bf16), lambda: f(*(t.float() for t in bf16)).bfloat16()]
    g = torch.Generator().manual_seed(0)
    for n, k in ((1536, 576), (49152, 576)):
        w = torch.randn(n, k, generator=g)
        for rows in (1, 4, 16, 32, 64, 256, 1024):
            x = torch.randn(rows, k, generator=g)
            row(f"product {k} -> {n}", rows, 2 * rows * n * k / 1e9, casts(F.linear, x, w))
        # one row through torch.mv, as the model decodes (see kernels.FP32_ROWS)
        row(f"matrix-vector (torch.mv) {k} -> {n}", 1, 2 * n * k / 1e9, casts(torch.mv, w, x[0]))
    qkv = [torch.randn(4, 9, 256, 64, generator=g) for _ in range(3)]

    def attention(dtype, compute):
        q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
        F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute), is_causal=True).sum().backward()
    f32, b16 = torch.float32, torch.bfloat16
    gflop = 3 * 4 * 4 * 9 * 256 * 256 * 64 / 2 / 1e9  # QK^T and PV over the causal half; backward ~2x forward
    row("attention forward + backward, 4 x 9 heads x 256", 1024, gflop,
        [lambda: attention(f32, f32), lambda: attention(b16, b16), lambda: attention(b16, f32)])


def bench_model(args):
    """Forward tokens/s (4 x 128, no grad), and greedy decoding of 64 tokens after a 64-token prompt with the KV
    cache (model.generate) and without it; medians of 3, 2 and 1 calls after a warm-up call."""
    table("dtype", "forward tokens/s (4 x 128)", "decode tokens/s, KV cache", "decode tokens/s, no cache", "speed-up")
    for dtype in (torch.float32, torch.bfloat16):
        m, _ = load(args.ckpt, dtype=dtype)
        x, prompt, n = torch.randint(0, m.config.vocab_size, (4, 128)), list(range(100, 164)), 64

        @torch.no_grad()
        def no_cache():  # recompute the whole sequence for every new token
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        with torch.no_grad():
            fwd = x.numel() / side_by_side([lambda: m(x)], 3)[0]
        cached = n / side_by_side([lambda: model.generate(m, prompt, n)], 2)[0]
        plain = n / side_by_side([no_cache], 1)[0]
        print(f"| {str(dtype).split('.')[1]} | {fwd:,.0f} | {cached:.1f} | {plain:.1f} | {cached / plain:.1f}x |")


TABLE9 = {"no KD": ["--distill", "none"], "KD": ["--distill", "kd", "--layer-weight", "0"],
          "PKD": ["--distill", "pkd", "--layer-weight", "0"], "PKD + layer loss": ["--distill", "pkd"]}


def one_config(args):
    """train's child process, so that its peak memory is its own: a few training steps of one configuration.
    PKD is measured with a full teacher queue (0.01 .. target - 0.01), so that its teacher is a real snapshot."""
    m, _ = load(args.ckpt, dtype=DTYPES[args.dtype])
    a = nute.get_args(["--ckpt", args.ckpt, "--dtype", args.dtype, *TABLE9[args.one]])
    state = nute.start(a, m)
    student, queue, g = state.student, state.queue, state.gen
    opt = torch.optim.AdamW([*student.log_alpha.values(), *student.lora.values()], lr=1e-3)
    for k in range(1, round(a.target / a.interval)):
        queue.maybe_snapshot(k * a.interval, student)
    teacher = queue.snapshots[max(queue.snapshots)] if a.distill == "pkd" else None
    x = torch.randint(0, m.config.vocab_size, (a.batch_size, a.seq_len), generator=g)
    mask = torch.ones(x.shape)

    def step():
        nute.micro_step(m, x, mask, student.adapter(g), teacher, a.distill != "none", a)
        opt.step()
        opt.zero_grad()
        masks.project_to_target(student.log_alpha, 0.1, m.config)  # the default controller
    sec = side_by_side([step], args.steps)[0]
    queue_mb = sum(t.numel() * t.element_size() for snap in queue.snapshots.values() for t in snap.values()) / 2**20
    print(json.dumps({"sec": sec, "queue_mb": queue_mb, "snapshots": len(queue.snapshots)}))


def bench_train(args):
    """Paper Table 9. Each configuration runs in its own child process (one_config): peak RSS is its own."""
    rows = {}
    for name in TABLE9:
        p = subprocess.Popen([sys.executable, "-m", "lab.bench", "train", "--one", name, "--ckpt", args.ckpt,
                              "--dtype", args.dtype, "--steps", str(args.steps)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        if status != 0:
            sys.exit(f"{name}: child failed")
        rows[name] = {**json.loads(out.strip().splitlines()[-1]), "peak_gb": usage.ru_maxrss / 2**20}
    kd, pkd = rows["KD"], rows["PKD"]
    print(f"SmolLM2-135M, batch 4 x 128, {args.dtype}, median of {args.steps} steps, peak RSS of the whole process")
    table("method", "time / step (s)", "vs KD", "peak memory (GB)", "vs KD")
    for name, r in rows.items():
        print(f"| {name} | {r['sec']:.2f} | {r['sec'] / kd['sec']:.3f} | {r['peak_gb']:.2f} | {r['peak_gb'] / kd['peak_gb']:.3f} |")
    print(f"\nTeacher queue on the CPU: {pkd['snapshots']} snapshots, {pkd['queue_mb']:.1f} MB")
    l7 = model.ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008)
    per = 4 * (l7.n_layers * (l7.n_heads + l7.ffn_dim) + l7.dim + l7.n_layers * 2 * 8 * (2 * l7.dim))  # fp32 masks + q,v LoRA r=8
    print(f"LLaMA-7B, same queue layout: {per / 2**20:.2f} MB a snapshot; 49 snapshots (target 0.5) "
          f"{49 * per / 2**20:.0f} MB (paper Table 13: ~728 MB)")


def pruning_step_fn(a, m, x, g, sparsity, skip=True):
    """One pruning step (nute.micro_step and AdamW) of a student whose log_alpha sits at `sparsity` (moved by
    masks.project_to_target), taught as in stage 1 (Eq. 8) by its own snapshot a.gap less sparse (the intact
    model when there is none); skip: model.skip_zeros, leave out the units whose mask is 0."""
    student, teacher = nute.start(a, m).student, None
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
    dtype = DTYPES[args.dtype]
    m, _ = load(args.ckpt, dtype=dtype)
    ffn, n = m.layers[0].feed_forward, m.config.ffn_dim
    x = torch.randn(4, 256, m.config.dim, dtype=dtype, requires_grad=True)

    def ffn_step(share, skip):
        z = (torch.arange(n) >= round(share * n)).to(dtype)  # the first units left out
        units = z.nonzero()[:, 0] if skip else None
        z.requires_grad_()
        return lambda: ffn(x, {}, "", z, units).sum().backward()
    shares, levels = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5), (0.0, 0.2, 0.5)
    t = iter(side_by_side([ffn_step(share, skip) for share in shares for skip in (False, True)], args.rounds))
    print(f"SmolLM2-135M, {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    table("FFN units with z = 0", "forward + backward, all units (ms)", "kept units only (ms)", "speed-up")
    for share in shares:
        full, kept = next(t), next(t)
        print(f"| {share:.0%} | {full * 1e3:.1f} | {kept * 1e3:.1f} | {full / kept:.2f}x |")
    a = nute.get_args(["--ckpt", args.ckpt, "--dtype", args.dtype, "--seq-len", "256", "--batch-size", "4"])
    tokens, g = torch.randint(1000, 20000, (4, 256), generator=torch.Generator().manual_seed(0)), torch.Generator()
    t = iter(side_by_side([pruning_step_fn(a, m, tokens, g, s, skip) for s in levels for skip in (False, True)], args.rounds))
    print()
    table("pruning step, 4 x 256: student / teacher sparsity", "all units (tok/s)", "kept units only (tok/s)", "speed-up")
    for s in levels:
        full, kept = next(t), next(t)
        teacher = f"{s - a.gap:.0%}" if s > a.gap else "intact"
        print(f"| {s:.0%} / {teacher} | {tokens.numel() / full:.1f} | {tokens.numel() / kept:.1f} | {full / kept:.2f}x |")


def structured_masks(config, target):
    """Binary masks at a given sparsity, for timing only: the first heads and FFN units of every layer."""
    z_head, z_int = torch.zeros(config.n_layers, config.n_heads), torch.zeros(config.n_layers, config.ffn_dim)
    z_hid = torch.ones(config.dim)
    z_head[:, :max(1, round(config.n_heads * (1 - target)))] = 1
    attn = masks.expected_size(z_head, z_int, z_hid, config).item()  # z_int all 0 yet: the heads' size
    ffn = round(((1 - target) * masks.prunable_size(config) - attn) / (3 * config.dim * config.n_layers))
    z_int[:, :max(0, min(config.ffn_dim, ffn))] = 1
    return {"z_head": z_head, "z_int": z_int, "z_hid": z_hid}


def pruned_models(dense):
    """The dense model sliced to structured_masks at 20% and 50%, for timing only."""
    return {f"{t:.0%} pruned": model.slice_model(dense, structured_masks(dense.config, t)) for t in (0.2, 0.5)}


def weight_bytes_per_token(m):
    """Bytes a decode step reads: every matrix but the embedding table, of which one row is read
    (with tied embeddings the lm_head still reads the whole table)."""
    n = sum(p.numel() for p in m.parameters()) - (m.tok_embeddings.weight.numel() if m.output is not None else 0)
    return n * m.tok_embeddings.weight.element_size()


def bench_export(args):
    """Decode tokens/s of pruned models against the dense one (evaluate.latencies: interleaved rounds, medians),
    and against the limit: a decode step reads every weight once, so its speed-up is at most the bytes ratio."""
    big = torch.ones(2**28)  # 1 GiB: reading memory is a decode step's limit
    read_gbs = big.numel() * 4 / side_by_side([big.sum], 3)[0] / 1e9
    big = torch.ones(2**29, dtype=torch.bfloat16)  # the same bytes through PyTorch's bf16 kernel
    bf16_gbs = big.numel() * 2 / side_by_side([big.sum], 3)[0] / 1e9
    del big
    step = model.compile_decoding() if args.compile else model.decode_one_token
    print(f"memory read: {read_gbs:.1f} GB/s (a sum over 1 GiB; in bf16 {bf16_gbs:.1f} GB/s) on "
          f"{torch.get_num_threads()} threads; decode step {'torch.compiled' if args.compile else 'eager'}\n")
    table("dtype", "model", "params", "weight MB read / token", "decode tokens/s", "ms / token", "GB/s", "of read limit",
          "speed-up", "bytes ratio", "of bytes ratio")
    for dtype in (torch.float32, torch.bfloat16):
        dense, _ = load(args.ckpt, dtype=dtype)
        if args.run:  # a real run's masks, exported as sliced and in the shapes nute.py pads them to
            small = model.slice_model(dense, checkpoint.load_adapter(args.run[0], dense))
            models = {"dense": dense, "run, sliced": small, "run, fixed GQA": pad_model(small, 1),
                      "run, fixed GQA, widths of 32": pad_model(small, 32)}
        else:
            models = {"dense": dense, **pruned_models(dense)}
        speeds, base = evaluate.latencies(models, args.rounds, step), None
        for name, m in models.items():
            tps, nbytes = speeds[name]["decode_tok_s"], weight_bytes_per_token(m)
            base = base or (tps, nbytes)
            speed, limit = tps / base[0], base[1] / nbytes
            print(f"| {str(dtype).split('.')[1]} | {name} | {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M | "
                  f"{nbytes / 1e6:.0f} | {tps:.1f} | {1000 / tps:.1f} | {nbytes * tps / 1e9:.1f} | "
                  f"{nbytes * tps / 1e9 / read_gbs:.0%} | {speed:.2f}x | {limit:.2f}x | {speed / limit:.0%} |")


def bench_eval(args):
    """Zero-shot scoring of the first 40 ARC-Easy questions (4 choices each): evaluate_task, each context run once
    in batches, against one request per forward (against lm-evaluation-harness: `python -m lab.versus lm-eval`)."""
    docs = data.read_task("arc_easy", 40)
    table("dtype", "batched examples/s", "one request per forward, examples/s", "speed-up")
    for dtype in (torch.float32, torch.bfloat16):
        m, tok = load(args.ckpt, dtype=dtype)
        batched = len(docs) / side_by_side([lambda: evaluate.evaluate_task(m, tok, "arc_easy", docs, batch_size=32)], 1)[0]
        requests = [evaluate.encode_pair(tok, c, x) for d in docs for c, x in zip(*evaluate.make_example("arc_easy", d)[:2])]
        single = len(docs) / side_by_side([lambda: [evaluate.score_requests(m, [r], batch_size=1) for r in requests]], 1)[0]
        print(f"| {str(dtype).split('.')[1]} | {batched:.2f} | {single:.2f} | {batched / single:.2f}x |")


def bench_layers(args):
    """What each layer adds to Eq. 6 for one batch of held-out text: the intact model teaches a run's masks
    (or, without --run, the first heads and units of every layer at 50%)."""
    m, tok = load(args.ckpt, dtype=DTYPES[args.dtype])
    run = args.run[0] if args.run else None
    student = checkpoint.load_adapter(run, m) if run else structured_masks(m.config, 0.5)
    x = data.pack(data.default_texts()[1], tok, 128)[:4]  # 4 x 128 held-out Wikipedia tokens
    with torch.no_grad():
        (logits_s, hs), (logits_t, ht) = m(x, student, return_hidden=True), m(x, return_hidden=True)
    kept, total = student["z_hid"] > 0, [0.0, 0.0]
    print(f"{'the intact model teaching ' + (run or 'structured 50% masks')}, 4 x 128 held-out tokens, {args.dtype}")
    table("state", "teacher mean square", "MSE", "MSE / teacher mean square")
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
SHAPES = {"LLaMA-7B": dict(dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, n_layers=32),
          "LLaMA-2-13B": dict(dim=5120, n_heads=40, n_kv_heads=40, ffn_dim=13824, n_layers=40),
          "LLaMA-2-70B": dict(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672, n_layers=80)}


def llama_config(name, **change):
    """SHAPES[name] as a ModelConfig (LLaMA's head size and vocabulary), with fields changed."""
    return model.ModelConfig(**{**SHAPES[name], **change}, head_dim=128, vocab_size=32000)


def paper_step(name, n_layers, grad_checkpoint, batch, seq_len, timed_step):
    """One PKD step (teacher forward, student forward + Eq. 5-6 + backward) of a bf16 model with n_layers
    -> (bytes autograd keeps for backward, seconds of the whole step or None)."""
    c = llama_config(name, n_layers=n_layers, max_seq_len=seq_len)
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 directly: a 70B layer is 3.4 GB in fp32
    m = model.Transformer(c).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    m.grad_checkpoint, g, saved = grad_checkpoint, torch.Generator().manual_seed(0), {}
    la = {k: v.requires_grad_(True) for k, v in masks.init_log_alpha(c, g).items()}
    lora = {k: v.requires_grad_(True) for k, v in model.init_lora(m, ["q", "v"], 8, g).items()}
    x = torch.randint(0, c.vocab_size, (batch, seq_len), generator=g)

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
    if timed_step:
        (0.1 * kl + 0.9 * layer).backward()
    return sum(saved.values()), time.perf_counter() - t0 if timed_step else None


def bench_plan(args):
    """Memory of the paper's step (4 x 512, bf16) per layer, extrapolated to the full depth; CPU time of the
    step for the first shape (the others scale with their weights per layer)."""
    B, T, gb = 4, 512, 2**30
    kernels.SLOW_16BIT = {}  # the GPU's case: 16-bit kernels, no fp32 copies kept for backward
    print(f"batch {B} x {T}, bf16, LoRA r8 on q,v, PKD with the layer loss; measured on this CPU "
          f"({torch.get_num_threads()} threads)\n")
    table("model", "weights (GB)", "activations per layer (MB)", "+ checkpointing", "other activations (GB)",
          "one GPU (GB)", "+ checkpointing", "FSDP on 8 GPUs, each (GB)", "CPU s per layer", "+ checkpointing")
    per_layer_s, first = {}, None
    for name in args.shapes.split(","):
        timed_step, row = first is None and args.time, {}
        for ckpt in (False, True):
            if timed_step:  # a warm-up step, untimed: first calls allocate
                paper_step(name, 1, ckpt, B, T, True)
            (b1, s1), (b2, s2) = (paper_step(name, n, ckpt, B, T, timed_step) for n in (1, 2))
            row[ckpt] = (b2 - b1, b1 - (b2 - b1), (s2 - s1) if timed_step else None)
        c = llama_config(name)
        L = c.n_layers
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


BENCHES = {"gemm": bench_gemm, "model": bench_model, "train": bench_train, "skip": bench_skip, "export": bench_export,
           "eval": bench_eval, "layers": bench_layers, "plan": bench_plan}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--ckpt", default=str(data.default_model_path()))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per configuration")
    p.add_argument("--rounds", type=int, default=7, help="export, gemm, skip: interleaved timing rounds")
    p.add_argument("--compile", action="store_true", help="export: time the torch.compiled decode step")
    p.add_argument("--run", action="append", help="layers: a nute.py run whose masks the student uses; export: a run "
                   "whose export to time (default: first units kept, 20%% and 50%%)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="plan: which of " + ", ".join(SHAPES))
    p.add_argument("--no-time", dest="time", action="store_false", help="plan: memory only (the first shape is "
                   "timed, the others scaled by their weights per layer)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # train's child process: one configuration of TABLE9
    args = p.parse_args()
    torch.manual_seed(0)
    if args.one:  # train's child process
        return one_config(args)
    BENCHES[args.what](args)


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.LoadError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
