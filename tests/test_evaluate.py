"""evaluate.py: the batched scorer against a plain loop, the harness's conventions, perplexity, errors."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import data
import evaluate as E
from helpers import make_tiny
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent


class WordTok:
    """A test tokenizer: GPT-2-like words (a leading space belongs to the word), ids handed out on first sight."""
    bos_id, eos_id, add_bos, vocab_size = 1, 2, False, 300

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 3 + len(self.vocab) % 297) for w in re.findall(r" ?\S+|\s", text)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model's ops are microseconds; on a loaded 2-core machine OpenMP's thread hand-offs made them
    # ~100x slower (6.5 s instead of 0.02 s for the batched-scorer test). Restored after this file.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=300)
    return Transformer(args).eval().requires_grad_(False)


def loop_loglik(model, ctx, cont):
    """Independent reference: one full forward per continuation token, no cache, no batch, no padding."""
    total = 0.0
    for j, tok in enumerate(cont):
        logits = model(torch.tensor([ctx + cont[:j]]))[0, -1].double()
        total += (logits.log_softmax(-1)[tok]).item()
    return total


def random_requests(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    requests = []
    for ctx_len, n_choices in [(5, 4), (5, 2), (5, 1), (9, 3), (12, 2), (1, 2), (9, 1)]:
        ctx = ids(ctx_len)  # choices of one example share the context; continuation lengths 1..5 vary
        requests += [(ctx, ids(int(torch.randint(1, 6, (1,), generator=g)))) for _ in range(n_choices)]
    return requests


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_scores_equal_plain_loop(tiny, batch_size, monkeypatch):
    monkeypatch.setattr(E, "TOKENS_PER_ROW", 8)  # several forwards at batch sizes 1 and 3
    requests = random_requests()  # 7 contexts of 1..12 tokens, 1..4 choices of 1..5 tokens each
    fed, logits = [], []
    hook = tiny.register_forward_hook(lambda m, a, out: fed.append(a[0].shape) or logits.append(out.shape))
    try:
        got = E.score_requests(tiny, requests, batch_size=batch_size)
    finally:
        hook.remove()
    want = [loop_loglik(tiny, c, x) for c, x in requests]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # each context once, each continuation token but the last once; little padding, bounded forwards
    tree_tokens = sum(len(c) for c in {tuple(c) for c, _ in requests}) + sum(len(x) - 1 for _, x in requests)
    T = fed[0][1]
    assert tree_tokens <= sum(b * t for b, t in fed) < tree_tokens + 2 * T
    assert all(b * t <= max(T, batch_size * 8) for b, t in fed) and (len(fed) == 1) == (batch_size == 64)
    assert sum(s[0] for s in logits) == sum(len(x) for _, x in requests)  # only where continuations are predicted


def test_a_tree_longer_than_max_seq_len():
    """Each request fits max_seq_len (64), its context with all choices after it does not."""
    torch.manual_seed(0)
    tiny = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                                   vocab_size=300, max_seq_len=64)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    ctx = torch.randint(3, 300, (40,), generator=g).tolist()
    requests = [(ctx, torch.randint(3, 300, (20,), generator=g).tolist()) for _ in range(3)]  # a tree of 97 tokens
    got = E.score_requests(tiny, requests)
    assert got == pytest.approx([loop_loglik(tiny, c, x) for c, x in requests], rel=1e-5, abs=1e-6)


def test_scores_with_adapter(tiny):
    torch.manual_seed(3)
    adapter = {"z_head": torch.rand(2, 4), "z_int": torch.rand(2, 128), "z_hid": torch.rand(64),
               "layers.1.attention.wq.lora_A": torch.randn(4, 64), "layers.1.attention.wq.lora_B": torch.randn(64, 4),
               "lora_scale": 0.5}
    requests = random_requests(seed=2)[:6]
    got = E.score_requests(tiny, requests, adapter, batch_size=8)
    want = []
    for ctx, cont in requests:
        logp = tiny(torch.tensor([ctx + cont]), adapter)[0].double().log_softmax(-1)
        want.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    assert got == pytest.approx(want, rel=1e-5)


def test_perplexity_matches_direct_computation(tiny):
    ids = torch.randint(0, 300, (16 * 5 + 7,), generator=torch.Generator().manual_seed(4)).tolist()
    nll = []
    for i in range(5):  # 5 full chunks of 16; the 7 left over are dropped
        chunk = torch.tensor(ids[16 * i:16 * (i + 1)])
        logp = tiny(chunk[None])[0].double().log_softmax(-1)
        nll += [-logp[t - 1, chunk[t]].item() for t in range(1, 16)]
    want = math.exp(sum(nll) / len(nll))
    assert E.perplexity(tiny, ids, seq_len=16, batch_size=2) == pytest.approx(want, rel=1e-5)
    assert E.perplexity(tiny, ids, seq_len=16, batch_size=64) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        E.perplexity(tiny, ids[:10], seq_len=16)


def test_encode_pair_moves_trailing_spaces():
    tok = WordTok()
    ctx, cont = E.encode_pair(tok, "Question: x\nAnswer: ", " yes")  # the context's space joins the continuation
    assert ctx == tok.encode("Question: x\nAnswer:")
    assert cont == tok.encode("  yes") and len(cont) == 2
    ctx, cont = E.encode_pair(tok, "A cat", " sat down")
    assert ctx + cont == tok.encode("A cat sat down") and cont == tok.encode(" sat down")


def test_encode_pair_splits_the_whole_encoding():
    class Merging(WordTok):  # merges "ab" across the boundary: the split must come from the whole encoding
        def encode(self, text):
            return [ord(c) for c in text.replace("ab", "\x01")]
    ctx, cont = E.encode_pair(Merging(), "xa", "bc")
    assert ctx == [ord("x"), 1] and cont == [ord("c")]


def test_hellaswag_preprocess_and_example():
    assert E.preprocess(" Fix a tire [title] Remove the  hubcap. [step] Pry it off. ") == "Fix a tire. Remove the hubcap. Pry it off."
    doc = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he IS",
           "endings": ["is using wrap [title] to wrap.", "b", "c", "d"], "label": "3"}
    contexts, conts, choices, gold = E.make_example("hellaswag", doc)
    assert contexts == ["Roof shingle removal: A man is sitting on a roof. He is"] * 4  # capitalize() lowers the rest
    assert conts[0] == " is using wrap. to wrap." and choices[0] == "is using wrap. to wrap." and gold == 3


def test_winogrande_partial_scoring():
    doc = {"sentence": "The trophy doesn't fit in the suitcase because _ is too big.", "option1": "the trophy",
           "option2": "the suitcase", "answer": "2"}
    contexts, conts, choices, gold = E.make_example("winogrande", doc)
    assert contexts == ["The trophy doesn't fit in the suitcase because the trophy",
                        "The trophy doesn't fit in the suitcase because the suitcase"]
    assert conts == [" is too big.", " is too big."] and gold == 1


def test_gold_labels_of_every_task():
    ex = lambda task, doc: E.make_example(task, doc)
    boolq = ex("boolq", {"passage": "P", "question": "is it", "answer": True})
    assert boolq[0][0] == "P\nQuestion: is it?\nAnswer:" and boolq[1] == [" no", " yes"] and boolq[3] == 1
    assert ex("boolq", {"passage": "P", "question": "q", "answer": False})[3] == 0
    piqa = ex("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 1})
    assert piqa[0][0] == "Question: g\nAnswer:" and piqa[3] == 1
    assert ex("winogrande", {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"})[3] == 0
    for task in ("arc_easy", "arc_challenge"):
        letters = ex(task, {"question": "q", "choices": {"text": list("wxyz"), "label": list("ABCD")}, "answerKey": "C"})
        assert letters[0][0] == "Question: q\nAnswer:" and letters[1][2] == " y" and letters[3] == 2
        for k in "12345":  # numeric keys, as some ARC questions have
            doc = {"question": "q", "choices": {"text": list("vwxyz"), "label": list("12345")}, "answerKey": k}
            assert ex(task, doc)[3] == int(k) - 1
    obqa = ex("openbookqa", {"question_stem": "The sun is", "choices": {"text": ["hot", "cold", "wet", "blue"],
                                                                      "label": list("ABCD")}, "answerKey": "D"})
    assert obqa[0][0] == "The sun is" and obqa[3] == 3


def test_acc_norm_divides_by_choice_characters(monkeypatch):
    docs = [{"goal": "g", "sol1": "a", "sol2": "bbbb", "label": 1}, {"goal": "h", "sol1": "cc", "sol2": "d", "label": 0}]
    lls = [-2.0, -4.0, -3.0, -2.0]  # acc: 0 and 1 win; per character: -2 vs -1 and -1.5 vs -2
    monkeypatch.setattr(E, "score_requests", lambda *a, **k: lls)
    model = type("M", (), {"config": ModelConfig(max_seq_len=64)})()
    m = E.evaluate_task(model, WordTok(), "piqa", docs)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0 and m["n"] == 2


def test_requests_empty_context_and_truncation(monkeypatch):
    seen = []
    monkeypatch.setattr(E, "score_requests", lambda model, reqs, *a, **k: seen.extend(reqs) or [0.0] * len(reqs))
    model = type("M", (), {"config": ModelConfig(max_seq_len=6)})()
    tok = WordTok()
    E.evaluate_task(model, tok, "openbookqa", [{"question_stem": "", "choices": {"text": ["a b", "c"],
                                                                                 "label": ["A", "B"]}, "answerKey": "A"}])
    assert seen[0] == ([tok.bos_id], tok.encode(" a b"))  # nothing to condition on: BOS is the context
    seen.clear()
    E.evaluate_task(model, tok, "openbookqa", [{"question_stem": "1 2 3 4 5 6 7", "choices": {"text": ["a b"],
                                                                                              "label": ["A"]}, "answerKey": "A"}])
    ctx, cont = seen[0]
    assert len(ctx) + len(cont) - 1 == 6 and ctx == tok.encode("1 2 3 4 5 6 7")[-5:]  # cut from the left


def test_pruned_ratio_of_masks_equals_that_of_the_export(tiny):
    from model import slice_model
    z_head = torch.ones(2, 4)
    z_head[0, :2] = 0  # a whole kv group of layer 0: its k and v rows go too
    z_head[1, 3] = 0
    z_int, z_hid = torch.ones(2, 128), torch.ones(64)
    z_int[1, :40], z_hid[:8] = 0, 0
    adapter = {"z_head": z_head, "z_int": z_int, "z_hid": z_hid}
    small = slice_model(tiny, adapter)
    assert E.pruned_ratio(tiny) == "0%" and E.pruned_ratio(small) == "-"  # alone, an export's base is unknown
    want = 1 - E.prunable_params(small) / E.prunable_params(tiny)
    assert 0.2 < want < 0.4
    assert E.pruned_ratio(tiny, adapter) == E.pruned_ratio(small, base_params=E.prunable_params(tiny)) == f"{want:.0%}"


def test_table_and_latency(tiny):
    tasks = {t: {"acc": 0.5, "acc_norm": 0.25} for t in E.TASKS}
    lines = E.table([{"ratio": "0%", "method": "base", "ppl": 12.345, "tasks": tasks}], "wiki.txt").splitlines()
    assert lines[0].startswith("| Ratio | Method | wiki.txt | BoolQ |")
    # acc columns 50, acc_norm columns (HellaSwag, ARC-c, OBQA) 25: Avg = (4*50 + 3*25) / 7
    assert lines[2] == "| 0% | base | 12.35 | 50.00 | 50.00 | 25.00 | 50.00 | 50.00 | 25.00 | 25.00 | 39.29 |"
    r = E.latency(tiny, prompt_len=4, gen_len=12, runs=1, warmup=0)
    assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and r["params"] == sum(p.numel() for p in tiny.parameters())


def test_latencies_interleave_the_models_and_drop_the_warm_up_round(monkeypatch):
    calls, speed = [], iter([100, 1, 3, 30, 2, 20, 4, 40, 5, 50, 6, 60])  # a, b per round; round 0 is slow
    fake = lambda m, runs, warmup, step: calls.append((m, runs, warmup, step)) or {"decode_tok_s": next(speed), "params": 7}
    monkeypatch.setattr(E, "latency", fake)
    r = E.latencies({"a": "A", "b": "B"}, rounds=5, step="S")
    assert [c[0] for c in calls] == ["A", "B"] * 6 and all(c[1:] == (1, 0, "S") for c in calls)
    assert r == {"a": {"decode_tok_s": 4, "params": 7, "runs": 5}, "b": {"decode_tok_s": 40, "params": 7, "runs": 5}}


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # a hang fails; a busy machine does not


def test_cli_errors(tmp_path):
    r = run_cli("--tasks", "boolq,nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: unknown task nope") and "hellaswag" in r.stderr
    r = run_cli("--tasks", "piqa", env={"NUTE_CACHE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "python data.py fetch --tasks" in r.stderr
    make_tiny(tmp_path / "ckpt")  # found before the first model is scored (no "loading" line), not after
    r = run_cli("--ckpt", str(tmp_path / "ckpt"), "--ppl", __file__, "--compare", "/nonexistent")
    assert r.returncode == 2 and r.stderr == "error: --compare /nonexistent: no such file or folder (nor a hub name ORG/NAME)\n"


def test_an_unwritable_out_is_found_before_scoring(tmp_path, monkeypatch):
    argv = ["--ckpt", str(tmp_path), "--ppl", __file__, "--out", str(tmp_path / "e.json")]
    assert E.get_args(argv).out == str(tmp_path / "e.json")
    monkeypatch.setattr(E.os, "access", lambda path, mode: path != str(tmp_path))  # (root may write anywhere)
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'e.json'}: cannot write into {tmp_path}"):
        E.get_args(argv)


def test_a_non_finite_result_is_written_and_exits_non_zero(tmp_path, monkeypatch):
    ckpt, text = tmp_path / "ckpt", tmp_path / "t.txt"
    make_tiny(ckpt)
    text.write_text("the cat sat on the mat " * 200)
    monkeypatch.setattr(E, "perplexity", lambda *a, **k: float("nan"))
    with pytest.raises(ValueError, match="not finite: ckpt perplexity"):
        E.main(["--ckpt", str(ckpt), "--ppl", str(text), "--out", str(tmp_path / "e.json")])
    assert math.isnan(json.loads((tmp_path / "e.json").read_text())["results"][0]["ppl"])  # the run is not lost


# ----------------------------------------------------------------------------------------------------
# The real model (skipped until `python data.py fetch --tasks` has run)

real = pytest.mark.skipif(not (data.default_model_path().exists() and all(data.task_path(t).exists() for t in E.TASKS)),
                          reason="SmolLM2 / tasks not fetched: run `python data.py fetch --tasks`")


@real
def test_real_batched_scores_equal_one_forward_each(smollm):
    model, tok, _ = smollm
    docs = data.read_jsonl(data.task_path("arc_easy"))[:4] + data.read_jsonl(data.task_path("boolq"))[:2]
    examples = [E.make_example("arc_easy", d) for d in docs[:4]] + [E.make_example("boolq", d) for d in docs[4:]]
    requests = [E.encode_pair(tok, c, x) for cs, xs, _, _ in examples for c, x in zip(cs, xs)]
    got = E.score_requests(model, requests, batch_size=32)
    want = []
    for ctx, cont in requests:  # one plain forward per request, no cache, no padding
        logp = model(torch.tensor([ctx + cont]))[0].double().log_softmax(-1)
        want.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@real
def test_real_cli_run_compare_latency(tmp_path):
    """End to end: a run folder (masks that drop heads, settings.json naming the base), --compare, --latency."""
    z_head = torch.ones(30, 9)
    z_head[20:, 6:] = 0  # the last 10 layers lose their last kv group (3 of 9 heads)
    save_file({"z_head": z_head, "z_int": torch.ones(30, 1536), "z_hid": torch.ones(576)},
              tmp_path / "adapter.safetensors")
    (tmp_path / "settings.json").write_text(json.dumps({"ckpt": str(data.default_model_path())}))
    out = tmp_path / "eval.json"
    r = run_cli("--run", str(tmp_path), "--compare", str(data.default_model_path()), "--tasks", "arc_easy,winogrande",
                "--limit", "8", "--latency", "--prompt-len", "8", "--gen-len", "24", "--runs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    # 1/3 of the heads of 1/3 of the layers: 2 * 64 * (3 + 1) of 2 * 64 * (9 + 3) + 3 * 1536 per hidden dim
    ratio = (10 / 30) * (2 * 64 * 4) / (2 * 64 * 12 + 3 * 1536)
    assert f"| {ratio:.0%} | {tmp_path.name} | - | - | - | - |" in r.stdout
    assert "| 0% | SmolLM2-135M-Instruct.Q4_1 | - | - | - | - |" in r.stdout and "decode (tokens/s)" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert [x["tasks"]["arc_easy"]["n"] for x in res] == [8, 8] and res[1]["latency"]["params"] == 134_515_008
