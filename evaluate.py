"""Evaluate a (pruned) LLaMA the way the paper does: WikiText-2 perplexity, 7 zero-shot tasks, latency.

    python evaluate.py                                        # SmolLM2: held-out perplexity + a greedy sample
    python evaluate.py --ckpt M --ppl wiki.test.raw --tasks all                # one row of the paper's table
    python evaluate.py --ckpt M --run runs/x --tasks all --limit 200   # base + the masks/LoRA of a nute.py run
    python evaluate.py --ckpt M --compare pruned/ --latency                # generation speed side by side

Zero-shot scores follow EleutherAI's lm-evaluation-harness and perplexity follows LLM-Pruner's script,
so the numbers can sit next to the paper's tables (conventions in docs/guide.md).
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from formats import hub
from formats.checkpoint import LoadError, check_device, load, load_adapter, run_base
from masks import mask_sparsity
from model import compile_decoding, decode_one_token, generate, prefill

TASKS = list(data.TASKS)  # boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa
# the paper's table: column name and the metric LLM-Pruner's convention reports in it
COLUMNS = {"boolq": ("BoolQ", "acc"), "piqa": ("PIQA", "acc"), "hellaswag": ("HellaSwag", "acc_norm"),
           "winogrande": ("WinoGrande", "acc"), "arc_easy": ("ARC-e", "acc"),
           "arc_challenge": ("ARC-c", "acc_norm"), "openbookqa": ("OBQA", "acc_norm")}
TOKENS_PER_ROW = 128  # a forward holds at most batch_size * 128 tokens, so long inputs take fewer rows


# ----------------------------------------------------------------------------------------------------
# Perplexity (LLM-Pruner protocol)

@torch.no_grad()
def perplexity(model, ids, seq_len=128, adapter=None, batch_size=32):
    """ids: the whole text tokenized once -> exp(mean NLL) over non-overlapping chunks of seq_len tokens."""
    n = len(ids) // seq_len  # the remainder is dropped
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of --seq-len {seq_len}")
    chunks = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    rows = max(1, min(batch_size, batch_size * TOKENS_PER_ROW // seq_len))
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, rows), desc=f"perplexity@{seq_len}", leave=False):
        x = chunks[i:i + rows].to(model.tok_embeddings.weight.device)  # [B, L]
        logits = model(x, adapter)  # [B, L, V]; position t predicts token t+1, so tokens 1..L-1 are scored
        nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def text_ids(tok, text):
    # Like Hugging Face's tokenizer(text) in LLM-Pruner: a BOS at the very start iff the tokenizer adds one
    # (LLaMA's SentencePiece does, SmolLM2's BPE does not).
    return ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)


HELDOUT = "held-out perplexity (all held-out Wikipedia documents, seq_len 128)"


def heldout_perplexity(model, tok, adapter=None):
    """HELDOUT, as the end-of-run report and `python evaluate.py` print it: the Wikipedia documents that
    data.default_texts() holds out of training, joined with blank lines (as `--ppl` joins a file's), seq_len 128."""
    return perplexity(model, text_ids(tok, "\n\n".join(data.default_texts()[1])), 128, adapter)


@torch.no_grad()
def continuation(model, tok, adapter=None, prompt="The capital of France is", n=16):
    """A greedy continuation of the prompt: what a reader checks first."""
    return tok.decode(generate(model, tok.encode(prompt), n, adapter, eos_id=tok.eos_id))


# ----------------------------------------------------------------------------------------------------
# Zero-shot multiple choice (lm-evaluation-harness)

def preprocess(text):
    """HellaSwag's cleanup of WikiHow / ActivityNet text, as in the harness."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def make_example(task, doc):
    """One task document -> (contexts, continuations, choices, gold): a (context, continuation) per choice;
    `choices` are the texts whose character lengths acc_norm divides by."""
    if task == "winogrande":  # partial scoring: the option goes into the context, the rest is shared
        i = doc["sentence"].index("_")
        contexts = [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]
        rest = " " + doc["sentence"][i + 1:].strip()
        # the harness reports only acc here; our acc_norm divides by these contexts' lengths, as its code would
        return contexts, [rest, rest], contexts, {"1": 0, "2": 1}[doc["answer"]]
    if task == "boolq":
        context, choices = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"]
        gold = int(doc["answer"])  # true -> "yes"
    elif task == "piqa":
        context, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    elif task == "hellaswag":  # str.capitalize() also lowercases the rest: the harness does it too
        context = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices, gold = [preprocess(e) for e in doc["endings"]], int(doc["label"])
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        question = doc["question_stem"] if task == "openbookqa" else f"Question: {doc['question']}\nAnswer:"
        # some ARC questions are keyed "1".."5" instead of "A".."E": the same positions
        letter = lambda k: {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(k.strip(), k.strip())
        labels = [letter(k) for k in doc["choices"]["label"]]
        context, choices, gold = question, doc["choices"]["text"], labels.index(letter(doc["answerKey"]))
    else:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return [context] * len(choices), [" " + c for c in choices], choices, gold


def encode_pair(tok, context, continuation):
    """The harness's `_encode_pair`: trailing spaces of the context move to the continuation, the pair is
    encoded as one string and split where the context's own encoding ends. No BOS, as in the harness."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


def request_trees(requests):
    """requests: [(context ids, continuation ids)] -> one tree per distinct context: (tokens, positions,
    branch (0: the context, b: choice b), [(request, the indices of the tokens that predict its continuation)]).
    A tree holds the context once, then every choice's continuation but its last token, each choice at the
    positions it would have right after the context."""
    groups = {}  # context ids -> indices of the requests that continue it
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    trees = []
    for ctx, choices in groups.items():
        tokens, positions, branch, reads = list(ctx), list(range(len(ctx))), [0] * len(ctx), []
        for b, i in enumerate(choices, 1):
            cont = requests[i][1]
            reads.append((i, [len(ctx) - 1, *range(len(tokens), len(tokens) + len(cont) - 1)]))
            tokens += cont[:-1]
            positions += range(len(ctx), len(ctx) + len(cont) - 1)
            branch += [b] * (len(cont) - 1)
        trees.append((tokens, positions, branch, reads))
    return trees


def pack(trees):
    """Trees -> rows of trees, each row at most as long as the longest tree (T): first fit, longest first.
    Rows with no room left for the shortest tree are not looked at again. -> (rows, T)"""
    trees = sorted(trees, key=lambda t: -len(t[0]))
    T, shortest, rows, used, open_rows = len(trees[0][0]), len(trees[-1][0]), [], [], []
    for t in trees:
        r = next((r for r in open_rows if used[r] + len(t[0]) <= T), None)
        if r is None:
            r = len(rows)
            rows.append([])
            used.append(0)
            open_rows.append(r)
        rows[r].append(t)
        used[r] += len(t[0])
        if used[r] + shortest > T:
            open_rows.remove(r)
    return rows, T


@torch.no_grad()
def score_requests(model, requests, adapter=None, batch_size=32, desc="scoring"):
    """requests: [(context ids, continuation ids)] -> summed log-prob of each continuation given its context.

    Choices with the same context share its forward, as a tree (request_trees), each choice attending only to
    the context and to itself (tree attention). Trees are packed into rows (pack), so padding is rare, and
    only the positions that predict a continuation's tokens reach the output layer. A forward holds at most
    batch_size * TOKENS_PER_ROW tokens.
    """
    device = model.tok_embeddings.weight.device
    rows, T = pack(request_trees(requests))
    per_forward = max(1, batch_size * TOKENS_PER_ROW // T)
    out = [0.0] * len(requests)
    for b in tqdm(range(0, len(rows), per_forward), desc=desc, leave=False):
        tokens, positions, tree, branch, reads = [], [], [], [], []
        for row in rows[b:b + per_forward]:
            cat = lambda k: [v for t in row for v in t[k]]
            start = [sum(len(x[0]) for x in row[:j]) for j in range(len(row))]  # where each tree begins
            pad = T - sum(len(t[0]) for t in row)
            tokens.append(cat(0) + [0] * pad)
            positions.append(cat(1) + [0] * pad)
            branch.append(cat(2) + [-1] * pad)
            tree.append([j for j, t in enumerate(row) for _ in t[0]] + [-1] * pad)
            reads += [(i, [(len(tokens) - 1) * T + s + j for j in at]) for s, t in zip(start, row) for i, at in t[3]]
        tokens, positions, tree, branch = (torch.tensor(x, device=device) for x in (tokens, positions, tree, branch))
        # a query reads the earlier keys of its tree's context and of its own branch (padding reads padding)
        order = torch.arange(T, device=device)
        same = lambda x: x[:, :, None] == x[:, None, :]  # [B, T (query), T (key)]
        mask = (order[:, None] >= order) & same(tree) & ((branch[:, None, :] == 0) | same(branch))
        at = torch.tensor([j for _, js in reads for j in js], device=device)
        target = torch.tensor([t for i, _ in reads for t in requests[i][1]], device=device)
        logits = model(tokens, adapter, positions=positions, mask=mask[:, None], logits_at=at)  # [n, V]
        logp = logits.float().log_softmax(-1).gather(-1, target[:, None])[:, 0].tolist()
        n = 0
        for i, js in reads:
            out[i], n = sum(logp[n:n + len(js)]), n + len(js)
    return out


def evaluate_task(model, tok, task, docs, adapter=None, batch_size=32):
    """-> {"acc", "acc_norm", their standard errors, "n"} for one task's documents."""
    examples = [make_example(task, d) for d in docs]
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    max_len = model.config.max_seq_len
    requests = []
    for contexts, conts, _, _ in examples:
        for context, cont in zip(contexts, conts):
            ctx, cont = encode_pair(tok, context, cont)
            # An empty context would leave nothing to predict the first token from: the harness then uses
            # BOS (or EOS) as the context, so do we. Too long: cut the context from the left, like the harness.
            requests.append(((ctx or [prefix])[-(max_len - len(cont) + 1):], cont))
    ll = score_requests(model, requests, adapter, batch_size, desc=task)
    acc, acc_norm, k = [], [], 0
    for _, _, choices, gold in examples:
        s, k = ll[k:k + len(choices)], k + len(choices)
        argmax = lambda v: max(range(len(v)), key=v.__getitem__)  # first of ties, like np.argmax
        acc.append(float(argmax(s) == gold))
        acc_norm.append(float(argmax([x / len(c) for x, c in zip(s, choices)]) == gold))
    stderr = lambda v: statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"acc": statistics.mean(acc), "acc_stderr": stderr(acc), "acc_norm": statistics.mean(acc_norm),
            "acc_norm_stderr": stderr(acc_norm), "n": len(acc)}


# ----------------------------------------------------------------------------------------------------
# Latency (gpt-fast style): KV-cached greedy generation, timed with the device synchronized

def disk_size(path):
    p = Path(hub.resolve(str(path)))  # a hub name: its downloaded folder
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def sync(device):
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()


@torch.no_grad()
def timed_generation(model, prompt, new_tokens, adapter=None, step=decode_one_token):
    """Greedy KV-cached generation, like model.generate -> (prefill seconds, seconds for the rest)."""
    device = model.tok_embeddings.weight.device
    model.setup_cache(1, len(prompt) + new_tokens)
    sync(device)
    t0 = time.perf_counter()
    nxt = prefill(model, torch.tensor([prompt], device=device), adapter).argmax(-1, keepdim=True)  # [1, 1]
    sync(device)
    t1 = time.perf_counter()
    for i in range(new_tokens - 1):  # the token stays on the device: no sync per token
        nxt = step(model, nxt, len(prompt) + i, adapter).argmax(-1, keepdim=True)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def latency(model, prompt_len=64, gen_len=256, adapter=None, runs=5, warmup=2, seed=0, step=decode_one_token):
    """Median prefill time and decode speed of generating from a prompt_len-token prompt to gen_len tokens.
    step: the one-token step, model.decode_one_token or a compiled one (model.compile_decoding)."""
    if not 0 < prompt_len < gen_len - 1 < model.config.max_seq_len:  # at least 2 new tokens: 1 is decoded
        raise ValueError(f"need 0 < --prompt-len < --gen-len - 1, --gen-len <= {model.config.max_seq_len}")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (prompt_len,), generator=g).tolist()  # content does not matter
    for _ in range(warmup):
        timed_generation(model, prompt, gen_len - prompt_len, adapter, step)
    times = [timed_generation(model, prompt, gen_len - prompt_len, adapter, step) for _ in range(runs)]
    prefill = statistics.median(t[0] for t in times)
    tok_s = (gen_len - prompt_len - 1) / statistics.median(t[1] for t in times)  # the prefill gave the 1st token
    # every decoded token reads all the weights once (the KV cache, small here, is left out)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prompt_len": prompt_len, "gen_len": gen_len, "prefill_ms": prefill * 1e3, "decode_tok_s": tok_s,
            "ms_per_token": 1e3 / tok_s, "params": sum(p.numel() for p in model.parameters()),
            "bandwidth_gb_s": weight_bytes * tok_s / 1e9, "runs": runs}


def latencies(models, rounds=5, step=decode_one_token):
    """{name: latency()} of several models timed in interleaved rounds, the median of each field, after one
    round that warms up (and compiles): where the machine's speed drifts, it moves every model alike and
    leaves their ratio."""
    rows = {name: [] for name in models}
    for _ in range(rounds + 1):
        for name, m in models.items():
            rows[name].append(latency(m, runs=1, warmup=0, step=step))
    return {name: {**{k: statistics.median(r[k] for r in rs[1:]) for k in rs[0]}, "runs": rounds}
            for name, rs in rows.items()}


# ----------------------------------------------------------------------------------------------------
# Output

def prunable_params(model):
    """Parameters of the attention and FFN projections: what the paper's pruning ratio counts."""
    return sum(p.numel() for n, p in model.layers.named_parameters() if "norm" not in n)


def pruned_ratio(model, adapter=None, base_params=None):
    """The table's Ratio: a run's sparsity from its binary masks (counted as nute.py counts it), else the fraction
    of projection weights missing against a base model (an export is physically smaller), else 0% if intact."""
    c = model.config
    if adapter is not None:
        return f"{mask_sparsity(adapter, c):.0%}"
    if base_params:
        return f"{1 - prunable_params(model) / base_params:.0%}"
    intact = all(len(h) == c.n_heads for h in c.kv_of_head) and all(f == c.ffn_dim for f in c.ffn_dims)
    return "0%" if intact else "-"


def table(results, ppl_name="WikiText2"):
    """Markdown in the paper's layout; accuracies in %, Avg over the 7 task columns (only when all 7 ran).
    ppl_name heads the perplexity column: the paper's is WikiText2; name whatever text was really used."""
    head = ["Ratio", "Method", ppl_name] + [c for c, _ in COLUMNS.values()] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["ratio"], r["method"], f"{r['ppl']:.2f}" if r.get("ppl") else "-"]
        accs = [r["tasks"][t][m] * 100 for t, (_, m) in COLUMNS.items() if t in r["tasks"]]
        cells += [f"{r['tasks'][t][m] * 100:.2f}" if t in r["tasks"] else "-" for t, (_, m) in COLUMNS.items()]
        cells.append(f"{statistics.mean(accs):.2f}" if len(accs) == len(COLUMNS) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trajectory(log_path, points=6):
    """Target against expected sparsity (Eq. 3) at a few steps of a run's log, as a markdown table, and the
    largest gap once the ramp has covered a quarter of the target (a quarter of the warm-up)."""
    rows = [json.loads(line) for line in open(log_path)]
    if not rows:
        return "no training steps (--steps 0)\n"
    picked = [rows[round(k * (len(rows) - 1) / (points - 1))] for k in range(points)]
    gap = max(abs(r["expected_sparsity"] - r["target"]) for r in rows if r["target"] >= rows[-1]["target"] / 4)
    return ("| step | " + " | ".join(str(r["step"]) for r in picked) + " |\n" + "|---" * (points + 1) + "|\n"
            + "| target | " + " | ".join(f"{r['target']:.3f}" for r in picked) + " |\n"
            + "| expected sparsity | " + " | ".join(f"{r['expected_sparsity']:.3f}" for r in picked) + " |\n"
            + f"\nlargest |expected sparsity - target| after a quarter of the warm-up: {gap:.4f}\n")


def run_report(model, small, tok, adapter, out, step=decode_one_token):
    """The end of a nute.py run: held-out perplexity of the intact, masked and exported models, and the
    generation latency and size of the intact and exported models in the export's dtype (like with like:
    the intact model as if saved the same way; step: the decode step both run), printed and written to
    out/results.json."""
    results = {"ppl@128": {"intact": heldout_perplexity(model, tok), "masked": heldout_perplexity(model, tok, adapter),
                           "exported": heldout_perplexity(small, tok)},
               "sample": {"intact": continuation(model, tok), "exported": continuation(small, tok)}}
    intact = model.to(small.tok_embeddings.weight.dtype)  # the run is over: the training dtype is not needed
    weight_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    timed = latencies({"intact": intact, "exported": small}, step=step)
    results["latency"] = {"intact": {**timed["intact"], "disk_bytes": weight_bytes(intact)},
                          "exported": {**timed["exported"], "disk_bytes": disk_size(out / "model" / "model.safetensors")}}
    results["decode_step"] = "eager" if step is decode_one_token else "compiled"
    print(f"{HELDOUT}: " + ", ".join(f"{k} {v:.2f}" for k, v in results["ppl@128"].items()))
    print("\n".join(f"{k}: The capital of France is{v}" for k, v in results["sample"].items()))
    print(latency_table([{"method": k, "latency": v} for k, v in results["latency"].items()]))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not all(math.isfinite(v) for v in results["ppl@128"].values()):
        raise ValueError(f"{out / 'results.json'}: a perplexity is not finite")


def latency_table(results):
    rows = [("parameters (M)", "params", 1e-6), ("size of the weights (MB)", "disk_bytes", 1e-6),
            ("prefill (ms)", "prefill_ms", 1), ("decode (tokens/s)", "decode_tok_s", 1),
            ("ms / token", "ms_per_token", 1), ("weights read (GB/s)", "bandwidth_gb_s", 1)]
    head = [""] + [r["method"] for r in results] + [f"{r['method']} / {results[0]['method']}" for r in results[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, key, scale in rows:
        vals = [r["latency"][key] for r in results]
        lines.append("| " + " | ".join([name] + [f"{v * scale:.2f}" for v in vals]
                                       + [f"{v / vals[0]:.2f}" for v in vals[1:]]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a .gguf file, a checkpoint folder or ORG/NAME[@REV] (default: the run's base, else SmolLM2)")
    p.add_argument("--run", help="a nute.py run folder: evaluate --ckpt masked by its adapter.safetensors")
    p.add_argument("--compare", action="append", default=[], help="another checkpoint to evaluate (repeatable)")
    p.add_argument("--ppl", help="text file for perplexity (WikiText-2's wiki.test.raw for the paper's column)")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity chunk length: 128 (LLM-Pruner) or 2048")
    p.add_argument("--tasks", help="comma list of " + ", ".join(TASKS) + ", or all")
    p.add_argument("--limit", type=int, help="score only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    p.add_argument("--latency", action="store_true", help="time KV-cached generation")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=256, help="total length: prompt + generated tokens")
    p.add_argument("--runs", type=int, default=5, help="timed runs for --latency (the median is reported)")
    p.add_argument("--compile", action="store_true", help="--latency: torch.compile the decode step (warm-up runs absorb it)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: as lm-eval's dtype=bfloat16 (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ratio", default="", help="the Ratio cell of the first model (default: from masks / sizes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --latency prompt")
    p.add_argument("--out", help="JSON with every number (default: RUN/eval.json or ./eval.json)")
    args = p.parse_args(argv)
    # check everything cheap before loading anything
    args.tasks = data.parse_tasks(args.tasks) if args.tasks else []
    if args.ppl and not os.path.isfile(args.ppl):
        raise ValueError(f"--ppl {args.ppl}: no such file")
    if args.run and not os.path.isfile(os.path.join(args.run, "adapter.safetensors")):
        raise ValueError(f"--run {args.run}: no adapter.safetensors there (not a finished nute.py run)")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise ValueError("--limit and --batch-size must be >= 1, --seq-len >= 2")
    if args.runs < 1 or args.prompt_len < 1 or args.gen_len <= args.prompt_len:
        raise ValueError("--runs and --prompt-len must be >= 1, --gen-len more than --prompt-len")
    folder = os.path.dirname(os.path.abspath(args.out or os.path.join(args.run or ".", "eval.json")))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # found now, not after hours of scoring
        raise ValueError(f"--out {args.out or 'eval.json'}: cannot write into {folder}")
    if bad := [p for p in args.compare if not os.path.exists(p) and not hub.REPO_ID.fullmatch(p)]:
        raise ValueError(f"--compare {bad[0]}: no such file or folder (nor a hub name ORG/NAME)")
    check_device(args.device)
    if args.ckpt is None and args.run:
        args.ckpt = run_base(args.run)
    if args.ckpt is None:
        args.ckpt = str(data.default_model_path())
        if not data.ready():
            data.fetch()
    return args


def demo(model, tok, adapter, args):
    """No task given: a quick look at a model, perplexity on a fixed slice of held-out text and a sample."""
    print(f"{HELDOUT}: {heldout_perplexity(model, tok, adapter):.2f}")
    print("The capital of France is" + continuation(model, tok, adapter))


def evaluate_model(model, tok, adapter, docs, path, args):
    """Every number asked for, of one model -> its result dict (without the method name and ratio)."""
    t0, r = time.time(), {"tasks": {}}
    if args.ppl:
        r["ppl"] = perplexity(model, text_ids(tok, "\n\n".join(data.read_texts(args.ppl))), args.seq_len,
                              adapter, args.batch_size)
    for t in args.tasks:
        r["tasks"][t] = evaluate_task(model, tok, t, docs[t], adapter, args.batch_size)
        print(f"{path} {t}: acc {r['tasks'][t]['acc']:.4f} acc_norm {r['tasks'][t]['acc_norm']:.4f} "
              f"({r['tasks'][t]['n']} examples)", file=sys.stderr)
    if args.latency:
        step = compile_decoding() if args.compile else decode_one_token
        r["latency"] = latency(model, args.prompt_len, args.gen_len, adapter, args.runs, seed=args.seed, step=step)
        r["latency"].update(disk_bytes=disk_size(path), compiled=args.compile)
    r["seconds"] = time.time() - t0
    r["prunable_params"] = prunable_params(model)
    return r


def main(argv=None):
    args = get_args(argv)
    docs = {t: data.read_task(t, args.limit) for t in args.tasks}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    for i, path in enumerate([args.ckpt] + args.compare):
        run = args.run if i == 0 else None
        print(f"loading {path}" + (f" + {run}" if run else ""), file=sys.stderr)
        model, tok = load(path, dtype=dtype, device=args.device)
        adapter = load_adapter(run, model) if run else None
        if not (args.ppl or args.tasks or args.latency):
            demo(model, tok, adapter, args)
            continue
        where = Path(run or path)
        name = where.parent.name if where.name == "model" else where.name  # an export runs/x/model is called x
        r = {"ckpt": path, "run": run, "method": name.removesuffix(".gguf"),
             **evaluate_model(model, tok, adapter, docs, path, args)}
        r["ratio"] = args.ratio if i == 0 and args.ratio else \
            pruned_ratio(model, adapter, results[0]["prunable_params"] if results else None)
        results.append(r)
        del model
    if results:
        report(results, args)


def report(results, args):
    """Prints the tables and writes every number as JSON."""
    if args.ppl or args.tasks:
        print(table(results, Path(args.ppl).name if args.ppl else "PPL"))
        notes = [f"perplexity: seq_len {args.seq_len}, {args.ppl}"] if args.ppl else []
        notes += [f"tasks: the first {args.limit} examples of each"] if args.limit else []
        print("\n" + "; ".join(notes) if notes else "")
    if args.latency:
        print(f"\ngeneration from {args.prompt_len} to {args.gen_len} tokens, batch 1, {args.dtype}, "
              f"{args.device}, median of {args.runs}")
        print(latency_table(results))
    out = args.out or os.path.join(args.run or ".", "eval.json")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with open(out, "w") as f:
        json.dump({"settings": settings, "results": results, "torch": torch.__version__}, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    bad = [f"{r['method']} {name}" for r in results for name, v in [("perplexity", r.get("ppl", 0))]
           + [(f"{t} {m}", x[m]) for t, x in r["tasks"].items() for m in ("acc", "acc_norm")] if not math.isfinite(v)]
    if bad:  # written above all the same, but a NaN is no result: the exit status says so
        raise ValueError(f"not finite: {', '.join(bad)} (a diverged adapter?)")


if __name__ == "__main__":
    try:
        main()
    except (LoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
