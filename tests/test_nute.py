"""nute.py: hard-concrete masks, Eq. 3, the Lagrangian, the teacher schedule, training runs, export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import baselines
import data
import evaluate
import masks
import model
import nute
from formats import checkpoint, gguf
from formats.run import save_adapter
from conftest import ROOT
from helpers import make_tiny



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    text = root / "train.txt"
    words = "the cat sat on a mat while dogs ran over hills and birds sang in tall green trees".split()
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (3000,), generator=g)))
    return make_tiny(root / "ckpt"), text


def run(tiny, out, *extra):
    ckpt, text = tiny
    argv = ["--ckpt", str(ckpt), "--data", str(text), "--out", str(out), "--seq-len", "32", "--batch-size", "2",
            "--dtype", "fp32", "--no-eval", "--lr-lora", "1e-2", *map(str, extra)]
    return nute.train(nute.get_args(argv))


# ----------------------------------------------------------------------------------------------------
# Losses (Eq. 5-6) by hand

def test_distill_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    B, T_, V, D, T = 2, 3, 5, 4, 2 / 3
    ls, lt = torch.randn(B, T_, V, generator=g), torch.randn(B, T_, V, generator=g)
    hs = [torch.randn(B, T_, D, generator=g) * 10 for _ in range(3)]
    ht = [torch.randn(B, T_, D, generator=g) * 10 for _ in range(3)]
    z_hid = torch.tensor([0.9, 0.0, 1.0, 0.5])  # dim 1 pruned: it must not count
    kl, layer = nute.distill_loss(ls, lt, hs, ht, z_hid, T)
    # KL(teacher || student) of every token at temperature T, summed over tokens, / batch, * T^2
    want_kl = 0.0
    for b in range(B):
        for t in range(T_):
            p, q = (lt[b, t] / T).softmax(-1), (ls[b, t] / T).softmax(-1)
            want_kl += (p * (p.log() - q.log())).sum().item()
    assert kl.item() == pytest.approx(want_kl / B * T * T, rel=1e-5)
    kept = [0, 2, 3]
    mses = [((a[..., kept] - b[..., kept]) ** 2).mean() for a, b in zip(hs, ht)]
    assert layer.item() == sum(float(m.half()) for m in mses)  # each layer's MSE in fp16, as the reference
    _, rel = nute.distill_loss(ls, lt, hs, ht, z_hid, T, layer_norm="teacher")
    want = sum(float((m / (b[..., kept] ** 2).mean()).half()) for m, b in zip(mses, ht))
    assert rel.item() == pytest.approx(want, rel=1e-6)
    _, big = nute.distill_loss(ls, lt, [h * 1000 for h in hs], ht, z_hid, T)
    assert big.isinf()  # past fp16's 65504: the step that gets it is skipped


# ----------------------------------------------------------------------------------------------------
# The teacher schedule

def schedule(target, steps=140, warmup=80):
    """The teacher of every step when the student follows the warm-up target exactly (as the projection
    controller makes it) -> (teacher sparsity per step, the step each snapshot was taken, the queue)."""
    q, student = nute.TeacherQueue(target, interval=0.01, gap=0.10), nute.Student({"z_hid": torch.zeros(2)}, {}, 1.0, {})
    teachers, taken = [], {}
    for step in range(steps):
        s = target * min(1.0, step / warmup)
        key = q.teacher_key(step, s, steps)
        teachers.append(None if key is None else round(key * 0.01, 2))
        k = q.maybe_snapshot(s, student)
        if k is not None:
            taken[k] = step
    return teachers, taken, q


def test_teacher_schedule_target_02():
    t, taken, q = schedule(0.2)
    assert sorted(q.snapshots) == list(range(1, 20))  # 0.01 .. 0.19: every interval below the target
    # stage 1: intact while s < g + i = 0.11 (Eq. 9), then the snapshot about g below (Eq. 8)
    assert t[:44] == [None] * 44  # s < 0.11 at step 43; step 44 sits on the boundary
    assert t[46] == 0.01 and t[60] == 0.05 and t[79] == 0.09  # s = 0.115, 0.15, 0.1975
    # stage 2 starts when the target is reached (step 80), 60 steps: weak to strong from t - g = 0.10 to
    # 0.01, each an equal share (3 steps), then the intact model for exactly g / t = half of them
    assert q.stage2_start == 80
    stage2 = t[80:]
    assert stage2[:3] == [0.10] * 3 and stage2[27:30] == [0.01] * 3
    assert all(stage2.count(k / 100) == 3 for k in range(1, 11))
    assert stage2[30:] == [None] * 30


def test_teacher_schedule_target_05():
    t, taken, q = schedule(0.5)
    assert sorted(q.snapshots) == list(range(1, 50))
    assert t[17] is None and t[18] == 0.01  # s = 0.5 * 18 / 80 = 0.1125 > 0.11
    assert t[79] == 0.39  # s = 0.49375: the teacher is ~10% less sparse
    stage2 = t[80:]
    assert q.stage2_start == 80 and stage2[0] == 0.40
    assert stage2[-12:] == [None] * 12 and stage2[-13] == 0.01  # g / t = 20% of the 60 steps


def test_snapshots_one_a_step_in_order_and_stage2_waits_for_them():
    """A ramp faster than the interval (2.5 points a step): the reference records the next point each step,
    so the last of the 49 comes at step 49, after the warm-up (20 steps); stage 2 begins once all are in."""
    t, taken, q = schedule(0.5, steps=100, warmup=20)
    assert taken == {k: k for k in range(1, 50)}
    assert q.stage2_start == 50 and t[49] == t[50] == 0.40 and t[51] == 0.39  # 40 teachers, 40 steps
    assert t[-10:] == [None] * 10  # 20% of stage 2's 50 steps


# ----------------------------------------------------------------------------------------------------
# Training runs on a tiny model

def test_run_follows_the_ramp_and_lands_on_the_target(tiny, tmp_path):
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "60", "--save-every", "1000")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    warmup = round(masks.warmup_for(0.3) * 60)
    assert [r["target"] for r in rows[:3]] == pytest.approx([0.3 / warmup, 0.6 / warmup, 0.9 / warmup])
    assert all(abs(r["expected_sparsity"] - r["target"]) < 1e-4 for r in rows)
    table = evaluate.trajectory(tmp_path / "r" / "log.jsonl").splitlines()
    assert table[0] == "| step | 1 | 13 | 25 | 36 | 48 | 60 |" and table[3].endswith("| 0.300 | 0.300 |")
    assert table[-1] == "largest |expected sparsity - target| after a quarter of the warm-up: 0.0000"
    adapter = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    # the tiny model's smallest unit (a hidden dim) is 1/48 of the prunable weights
    assert abs(masks.mask_sparsity(adapter, checkpoint.load(str(tiny[0]))[0].config) - 0.3) < 1 / 48


def test_default_masks_start_in_taylor_order_keep_hidden_dims_and_end_binary(tiny, tmp_path):
    """--recipe nute: log_alpha starts from the Taylor ranking (baselines.taylor_log_alpha); with a mask rate too
    small to reorder anything, the units that go are the least important ones (per layer, every dropped unit
    scores below every kept one). Hidden dims are not learned (all kept); the kept units are exactly 1."""
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "8", "--lr-mask", "1e-9")
    adapter = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert set(ck["log_alpha"]) == {"z_head", "z_int"} and ck["shift"] is not None
    assert torch.equal(adapter["z_hid"], torch.ones_like(adapter["z_hid"]))
    m, tok = checkpoint.load(str(tiny[0]))
    blocks = data.training_blocks(tok, 32, str(tiny[1]))
    args = nute.get_args(["--ckpt", str(tiny[0]), "--batch-size", "2", "--dtype", "fp32"])
    imp = baselines.taylor_importance(m, baselines.calibration_batches(args, m, blocks))
    c = m.config
    for k, size in (("z_head", 2 * c.dim * c.head_dim), ("z_int", 3 * c.dim)):
        assert set(adapter[k].unique().tolist()) <= {0.0, 1.0}
        for z, score in zip(adapter[k], imp[k] / size):
            if 0 < z.sum() < len(z):
                assert score[z == 0].max() < score[z == 1].min()
    assert (adapter["z_int"] == 0).sum() > 0  # something was pruned in order
    assert abs(masks.mask_sparsity(adapter, c) - 0.3) < 0.05
    cost = json.loads((tmp_path / "r" / "masks.json").read_text())  # what ranking the units cost, for the tables
    assert cost["method"] == "taylor order" and cost["seconds"] > 0


def test_paper_recipe_settings(tiny, tmp_path):
    run(tiny, tmp_path / "p", "--target", "0.3", "--steps", "2", "--recipe", "paper")
    s = json.loads((tmp_path / "p" / "settings.json").read_text())
    assert (s["controller"], s["mask_init"], s["prune_hidden"], s["final_masks"], s["ce_weight"], s["layer_norm"]) == \
        ("lagrangian", "clamp", "yes", "soft", 0.0, "none")
    assert set(torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["log_alpha"]) == set(masks.MASKS)
    with pytest.raises(ValueError, match="--mask-init taylor needs --controller project"):
        nute.get_args(["--controller", "lagrangian", "--mask-init", "taylor", "--ckpt", str(tiny[0])])


def test_lagrangian_controller_moves_towards_the_target(tiny, tmp_path):
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "40", "--recipe", "paper", "--lr-lambda", "1")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert rows[-1]["lambda1"] < 0 < rows[-1]["lambda2"]  # ascent: lambda1 pushes the sparsity up
    assert rows[-1]["expected_sparsity"] > 0.1 > rows[0]["expected_sparsity"]


def test_clipping_covers_lora_only(tiny, tmp_path, monkeypatch):
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, *a, **k: clipped.append(list(params)) or real(params, *a, **k))
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "2")
    assert len(clipped) == 2 and all(p.shape[0] == 8 or p.shape[1] == 8 for p in clipped[0])  # rank-8 LoRA
    assert len(clipped[0]) == 2 * 2 * 3  # A and B of q and v in 3 layers, no log_alpha


def test_a_non_finite_loss_skips_the_step(tiny, tmp_path, monkeypatch):
    real = nute.distill_loss
    monkeypatch.setattr(nute, "distill_loss", lambda *a: (torch.tensor(float("nan")) + real(*a)[0], real(*a)[1]))
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "3")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert all(r["skipped"] == 1 for r in rows)
    assert len({r["expected_sparsity"] for r in rows}) == 1  # nor did the controller move the masks
    adapter = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    assert all(adapter[k].abs().sum() == 0 for k in adapter if k.endswith(".lora_B"))  # B starts at 0, never stepped
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_teacher_forward_leaves_student_untouched(tiny):
    m, _ = checkpoint.load(str(tiny[0]))
    g = torch.Generator().manual_seed(0)
    log_alpha = {k: v.requires_grad_(True) for k, v in masks.init_log_alpha(m.config, g).items()}
    lora = {k: v.requires_grad_(True) for k, v in model.init_lora(m, ["q", "v"], 4, g).items()}
    for v in lora.values():
        v.data.normal_(0, 0.1, generator=g)
    opt = torch.optim.AdamW([*log_alpha.values(), *lora.values()], lr=0.1)
    x = torch.randint(0, 257, (2, 16), generator=g)
    teacher = {k: masks.deterministic_z(v) * 0.5 for k, v in log_alpha.items()}
    teacher.update({k: torch.randn(v.shape, generator=g) for k, v in lora.items()}, lora_scale=torch.tensor(1.0))

    def step(with_teacher):
        z = {k: masks.sample_z(v, torch.Generator().manual_seed(5)) for k, v in log_alpha.items()}
        logits = m(x, {**z, **lora, "lora_scale": 1.0})
        if with_teacher:
            with torch.no_grad():
                m(x, teacher, return_hidden=True)
        logits.float().pow(2).mean().backward()
        return {k: v.grad.clone() for k, v in {**log_alpha, **lora}.items()}

    before = {k: v.detach().clone() for k, v in {**log_alpha, **lora}.items()}
    g1 = step(False)
    opt.zero_grad()
    g2 = step(True)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
        assert torch.equal(before[k], {**log_alpha, **lora}[k])
    assert not opt.state  # nothing stepped
    assert all(p.grad is None for p in m.parameters())  # base weights are frozen


def test_masks_only_and_finetune(tiny, tmp_path):
    run(tiny, tmp_path / "m", "--target", "0.2", "--steps", "30", "--masks-only")
    adapter = load_file(str(tmp_path / "m" / "adapter.safetensors"))
    assert not any(".lora_" in k for k in adapter) and set(masks.MASKS) <= set(adapter)

    run(tiny, tmp_path / "p", "--target", "0.2", "--steps", "30")
    pruned = load_file(str(tmp_path / "p" / "adapter.safetensors"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi there"},
                                  {"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    run(tiny, tmp_path / "ft", "--run", tmp_path / "p", "--finetune", alpaca, "--steps", "10", "--seq-len", "256")
    tuned = load_file(str(tmp_path / "ft" / "adapter.safetensors"))
    for k in masks.MASKS:
        assert torch.equal(tuned[k], pruned[k]), k  # post fine-tuning changes no mask
    assert sum(".lora_A" in k for k in tuned) == 3 * 7  # LoRA grown to all seven projections
    assert not torch.equal(tuned["layers.0.attention.wq.lora_B"], pruned["layers.0.attention.wq.lora_B"])


def test_resume_gives_same_masks(tiny, tmp_path):
    common = ["--target", "0.3", "--steps", "40", "--save-every", "7", "--warmup", "0.5"]
    run(tiny, tmp_path / "a", *common)
    assert run(tiny, tmp_path / "b", *common, "--stop-after", "23") is None  # killed at 23, checkpoint at 21
    run(tiny, tmp_path / "b", *common, "--resume")
    a = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (a["z_int"] == 0).any()  # it really pruned something


@pytest.mark.parametrize("flags", [["--grad-checkpoint"], ["--compile"], ["--compile", "--grad-checkpoint"]])
def test_grad_checkpoint_and_compiled_runs_learn_the_same(tiny, tmp_path, flags, monkeypatch):
    common = ["--target", "0.3", "--steps", "6"]
    run(tiny, tmp_path / "a", *common)
    calls, compiled = [], model.compiled_block()
    monkeypatch.setattr(model, "compiled_block", lambda: lambda *a: calls.append(1) or compiled(*a))
    m, _, _ = run(tiny, tmp_path / "b", *common, *flags)
    assert bool(calls) == ("--compile" in flags) and not m.compile_blocks  # evaluation and the report run eager
    a, b = load_file(str(tmp_path / "a" / "adapter.safetensors")), load_file(str(tmp_path / "b" / "adapter.safetensors"))
    # fp32: a recomputed block may round differently; a fused one does, and Adam's first steps (m / sqrt(v))
    # magnify that in the small LoRA gradients, yet far below one step's change (lr 1e-2)
    atol = 1e-4 if "--compile" in flags else 1e-6
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=k)


def test_grad_accum_equals_one_big_batch(tiny, tmp_path):
    """The masks are sampled once a step and every micro-batch adds to their gradient: batch 1 x grad-accum
    2 learns what batch 2 does (with the raw layer MSE, a mean over the batch like the KL; the normalised
    one divides by each micro-batch's own teacher scale)."""
    common = ["--target", "0.3", "--steps", "6", "--layer-norm", "none"]
    run(tiny, tmp_path / "a", *common, "--batch-size", "2")
    run(tiny, tmp_path / "b", *common, "--batch-size", "1", "--grad-accum", "2")
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    for group in ("log_alpha", "lora"):
        for k in a[group]:
            # fp32: a batch of 2 and two of 1 round differently, and Adam scales a near-zero gradient's
            # rounding up to ~lr; measured 7e-5 at most on log_alpha (values ~1-5)
            torch.testing.assert_close(b[group][k], a[group][k], rtol=0, atol=3e-4, msg=k)


def torchrun(n, *argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "nute.py",
                           *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_torchrun_ddp_and_fsdp_equal_one_process(tiny, tmp_path):
    """2 processes (gloo) x batch 1 take the same rows in the same micro-batches as one process x batch 1 x
    grad-accum 2: masks and LoRA agree to float32 rounding (the all-reduce sums in another order; measured
    4e-6 on log_alpha after 6 steps), with --fsdp too. Only rank 0 writes; a killed run resumes exactly."""
    common = ["--ckpt", tiny[0], "--data", tiny[1], "--seq-len", "32", "--batch-size", "1", "--dtype", "fp32",
              "--no-eval", "--lr-lora", "1e-2", "--target", "0.3", "--steps", "6", "--save-every", "3"]
    run(tiny, tmp_path / "one", *common[4 + 6:], "--batch-size", "1", "--grad-accum", "2")
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("ddp-killed", ["--stop-after", "4"])):
        r = torchrun(2, *common, "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, *common, "--out", tmp_path / "ddp-killed", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ddp", "fsdp", "ddp-killed"):
        ck = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        for group in ("log_alpha", "lora"):
            for k in one[group]:
                torch.testing.assert_close(ck[group][k], one[group][k], rtol=0, atol=3e-4, msg=f"{name} {k}")
        assert [json.loads(x)["step"] for x in open(tmp_path / name / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
        assert (tmp_path / name / "model" / "model.safetensors").exists()
    resumed, straight = (load_file(str(tmp_path / n / "adapter.safetensors")) for n in ("ddp-killed", "ddp"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_export_equals_masked_model_and_formula(tiny):
    m, _ = checkpoint.load(str(tiny[0]))
    g = torch.Generator().manual_seed(3)
    config = m.config
    adapter = {"z_head": torch.rand(3, 4, generator=g) * (torch.rand(3, 4, generator=g) > 0.4),
               "z_int": torch.rand(3, 96, generator=g) * (torch.rand(3, 96, generator=g) > 0.5),
               "z_hid": torch.rand(48, generator=g) * (torch.rand(48, generator=g) > 0.3), "lora_scale": 0.5}
    adapter["z_head"][1] = 0  # a layer without attention
    adapter["z_head"][0] = torch.tensor([0.9, 0.7, 0.0, 0.0])  # kv group 1 of layer 0 emptied
    adapter["z_int"][2] = 0  # a layer without FFN
    adapter = model.init_lora(m, list(model.LORA_TARGETS), 3, g, adapter)
    for k in adapter:
        if ".lora_B" in k:
            adapter[k] = torch.randn(adapter[k].shape, generator=g) * 0.1
    small = model.slice_model(m, adapter)
    x = torch.randint(0, 257, (2, 20), generator=g)
    want = m(x, adapter)
    torch.testing.assert_close(small(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    k = int((adapter["z_hid"] > 0).sum())
    binary = [(adapter[n] > 0).float() for n in masks.MASKS]
    rest = config.vocab_size * k + (2 * config.n_layers + 1) * k + (0 if config.tie_embeddings else config.vocab_size * k)
    assert sum(p.numel() for p in small.parameters()) == masks.expected_size(*binary, config).item() + rest
    assert small.config.kv_of_head[0] == [0, 0] and small.config.kv_of_head[1] == [] and small.config.ffn_dims[2] == 0
    assert model.generate(small, [1, 2, 3], 8) == model.generate(m, [1, 2, 3], 8, adapter)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2

def nute_cli(*argv):
    return subprocess.run([sys.executable, "nute.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("extra, message", [
    (["--target", "1.5"], "--target must be in (0, 1)"),
    (["--data", "EMPTY"], "no text"),
    (["--data", "DIR"], "a folder, not a text file"),
    (["--data", "BAD.gz"], "cannot be read"),
    (["--ckpt", "/nonexistent/ckpt"], "no such file"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--seq-len", "0"], "--seq-len must be at least 2"),
    (["--seq-len", "100000"], "--seq-len 100000 / --lora-rank 8: at most"),
    (["--lora-rank", "1000000000"], "--lora-rank 1000000000: at most"),
    (["--run", "NANRUN", "--finetune", "ALPACA"], "holds NaN"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--interval", "0"], "--interval must be a positive number"),
    (["--lr-mask", "nan"], "--lr-mask must be a positive number"),
    (["--device", "bogus"], "not a device name"),
    (["--device", "cuda:99"], "cuda devices"),
    (["--out", "FILE"], "a file, not a folder"),
    (["--out", "FILE/o"], "cannot create it in"),
    (["--resume"], "holds no run"),
    (["--data", "DIR/missing.txt"], "no such file"),
    (["--run", "DIR", "--finetune", "BAD.gz"], "no adapter.safetensors there"),
    (["--method", "bonsai", "--masks-only"], "chooses its own masks"),
    (["--method", "taylor", "--steps", "-1"], "--steps must be at least 0"),
    (["--method", "bonsai", "--bonsai-samples", "0"], "--bonsai-samples must be at least 1"),
    (["--masks", "FILE"], "given with its --method"),
    (["--method", "taylor", "--masks", "DIR/missing.safetensors"], "given with its --method"),
    (["--fsdp", "--compile"], "not supported with --fsdp"),
])
def test_bad_input_exit_2(tiny, tmp_path, extra, message):
    """One line, exit 2, and nothing written: every setting is checked before the run folder is made."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "DIR").mkdir()
    (tmp_path / "BAD.gz").write_text("not gzip")
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "NANRUN").mkdir()
    z = {k: torch.full(v, float("nan")) for k, v in masks.mask_shapes(checkpoint.load(str(tiny[0]))[0].config).items()}
    save_file(z, str(tmp_path / "NANRUN" / "adapter.safetensors"))
    (tmp_path / "ALPACA").write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 8))
    argv = ["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "o"), "--steps", "2", "--no-eval"]
    argv += [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / a)
             if a.startswith(("DIR", "BAD", "FILE", "NANRUN", "ALPACA")) else a for a in extra]
    r = nute_cli(*argv)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tiny, tmp_path):
    cmd = [sys.executable, "nute.py", "--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "r", "--seq-len", 32,
           "--batch-size", 2, "--dtype", "fp32", "--no-eval", "--steps", 10000, "--save-every", 1]
    # SIGINT as in a terminal: a shell's background job (`pytest &`) starts with it ignored, and Python keeps that
    p = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (tmp_path / "r" / "checkpoint.pt").exists() and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted: the same command with --resume goes on from the last checkpoint"


def test_a_run_folder_belongs_to_its_run(tiny, tmp_path):
    """A finished run is never overwritten; a run that died before its first checkpoint starts over with
    --resume (no duplicate log rows); a checkpoint from another run, or a torn one, is refused."""
    common = ["--target", "0.3", "--steps", "6", "--save-every", "3"]
    run(tiny, tmp_path / "a", *common)
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not empty: add --resume"):
        run(tiny, tmp_path / "a", *common)
    with pytest.raises(ValueError, match="not empty"):
        run(tiny, tmp_path / "a", "--target", "0.5", "--steps", "6")  # other settings, same folder
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before
    assert run(tiny, tmp_path / "b", *common, "--stop-after", "2") is None  # died before its first checkpoint
    run(tiny, tmp_path / "b", *common, "--resume")
    assert [json.loads(r)["step"] for r in open(tmp_path / "b" / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "adapter.safetensors").read_bytes() == before  # the same run as a
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())
    with pytest.raises(checkpoint.LoadError, match="belongs to another run"):
        run(tiny, tmp_path / "b", *common, "--resume")
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes()[:5000])
    r = nute_cli("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "b", "--seq-len", 32, "--batch-size", 2,
                 "--dtype", "fp32", "--no-eval", "--lr-lora", "1e-2", *common, "--resume")
    assert r.returncode == 2 and "checkpoint.pt: cannot be read" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    marker = tmp_path / "marker"

    class Payload:  # a pickle that, loaded with weights_only=False, would create the marker file
        def __reduce__(self):
            return open, (str(marker), "w")
    torch.save({"run_id": "x", "step": 3, "payload": Payload()}, tmp_path / "b" / "checkpoint.pt")
    r = nute_cli("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "b", "--seq-len", 32, "--batch-size", 2,
                 "--dtype", "fp32", "--no-eval", "--lr-lora", "1e-2", *common, "--resume")
    assert r.returncode == 2 and "checkpoint.pt: cannot be read" in r.stderr and not marker.exists(), r.stderr


def test_non_finite_gradients_skip_the_step(tiny, tmp_path, monkeypatch):
    real = nute.micro_step

    def nan_grad(model_, x, m, adapter, *rest):
        terms = real(model_, x, m, adapter, *rest)
        adapter["layers.0.attention.wq.lora_A"].grad[0, 0] = float("nan")
        return terms
    monkeypatch.setattr(nute, "micro_step", nan_grad)
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "3")
    assert [json.loads(r)["skipped"] for r in open(tmp_path / "r" / "log.jsonl")] == [1, 1, 1]
    adapter = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    assert all(adapter[k].abs().sum() == 0 for k in adapter if k.endswith(".lora_B"))  # never stepped


def test_a_diverged_run_stops_and_writes_nothing_non_finite(tiny, tmp_path, monkeypatch):
    """The loss turns NaN from the third step on (patched in: whether a huge learning rate overflows or
    saturates depends on the CPU's kernels). The run must stop after MAX_SKIPPED non-finite steps in a row,
    write no adapter or export, keep its last checkpoint finite, and leave nothing to score."""
    calls, loss = iter(range(10**6)), nute.next_token_loss
    monkeypatch.setattr(nute, "next_token_loss", lambda *a: loss(*a) * (1 if next(calls) < 2 else float("nan")))
    argv = ["--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "r", "--seq-len", 32, "--batch-size", 2,
            "--dtype", "fp32", "--method", "magnitude", "--distill", "none", "--steps", 30, "--save-every", 2,
            "--target", 0.2]
    with pytest.raises(nute.Diverged, match=f"steps 3-{2 + nute.MAX_SKIPPED}: .* {nute.MAX_SKIPPED} times in a row"):
        nute.main(list(map(str, argv)))
    assert not (tmp_path / "r" / "adapter.safetensors").exists() and not (tmp_path / "r" / "model").exists()
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["lora"].values())
    with pytest.raises(ValueError, match="NaN or inf"):
        save_adapter({"z_hid": torch.tensor([1.0, float("nan")])}, tmp_path / "r")


def test_resume_with_other_model_refused(tiny, tmp_path):
    run(tiny, tmp_path / "r", "--target", "0.2", "--steps", "4")
    other = make_tiny(tmp_path / "other", seed=1, dim=32)
    argv = ["--ckpt", str(other), "--data", str(tiny[1]), "--out", str(tmp_path / "r"), "--seq-len", "32",
            "--batch-size", "2", "--dtype", "fp32", "--lr-lora", "1e-2", "--target", "0.2", "--steps", "4", "--resume"]
    r = subprocess.run([sys.executable, "nute.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "other settings" in r.stderr and "ckpt" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_magnitude_masks_reach_target_and_drop_smallest(tiny):
    m, _ = checkpoint.load(str(tiny[0]))
    with torch.no_grad():
        m.layers[1].feed_forward.w1.weight[7] *= 0.01  # a unit with tiny weights must go first
    z = baselines.magnitude_masks(m, 0.3)
    size = masks.expected_size(z["z_head"], z["z_int"], z["z_hid"], m.config).item()
    M = masks.prunable_size(m.config)
    assert (1 - 0.3) * M - 4 * m.config.dim * m.config.head_dim < size <= (1 - 0.3) * M  # stops right at the target
    assert z["z_int"][1, 7] == 0 and z["z_hid"].all()


@pytest.mark.parametrize("method", ["taylor", "bonsai"])
def test_baseline_masks_are_chosen_once_and_kept(tiny, tmp_path, method):
    """--method taylor / bonsai: masks at the target in masks.safetensors (with their cost in masks.json), LoRA
    trained with them fixed; a resume reuses the file (Bonsai's sampling is not redone), --steps 0 only prunes."""
    out = tmp_path / "r"
    extra = ["--target", "0.3", "--method", method, "--bonsai-samples", "4", "--distill", "none", "--save-every", "2"]
    assert run(tiny, out, *extra, "--steps", "4", "--stop-after", "2") is None
    z = load_file(str(out / "masks.safetensors"))
    cost = json.loads((out / "masks.json").read_text())
    assert cost["method"] == method and cost["seconds"] > 0 and cost["peak_mb"] > 0
    called = []
    original = getattr(baselines, f"{method}_masks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(baselines, f"{method}_masks", lambda *a, **k: called.append(1) or original(*a, **k))
        _, _, adapter = run(tiny, out, *extra, "--steps", "4", "--resume")
    assert not called and all(torch.equal(adapter[k].cpu(), z[k]) for k in masks.MASKS)
    config = checkpoint.load(str(tiny[0]))[0].config
    assert 0.3 <= masks.mask_sparsity(z, config) < 0.4 and z["z_hid"].all()
    assert adapter["layers.0.attention.wq.lora_B"].abs().sum() > 0  # LoRA learned
    with pytest.MonkeyPatch.context() as mp:  # --masks: the choice above again, not chosen anew
        mp.setattr(baselines, f"{method}_masks", lambda *a, **k: pytest.fail("chose the masks again"))
        _, _, untrained = run(tiny, tmp_path / "none", *extra, "--steps", "0", "--masks", out / "masks.safetensors")
    assert all(torch.equal(untrained[k].cpu(), z[k]) for k in masks.MASKS)  # no recovery: the masks alone
    assert untrained["layers.0.attention.wq.lora_B"].abs().sum() == 0
    assert json.loads((tmp_path / "none" / "masks.json").read_text()) == cost
    save_file({**z, "z_hid": z["z_hid"][:-1].contiguous()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="not the masks of this model"):
        run(tiny, tmp_path / "short", *extra, "--steps", "0", "--masks", tmp_path / "short.safetensors")
    bad = {"garbage": b"not safetensors", "nan": {**z, "z_int": z["z_int"] * float("nan")},
           "zero": {k: torch.zeros_like(v) for k, v in z.items()}}
    for name, content in bad.items():  # refused before anything is copied into the new run's folder
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(content) if isinstance(content, bytes) else save_file(content, str(f))
        with pytest.raises(ValueError, match=f"{f}: .*masks"):
            run(tiny, tmp_path / name, *extra, "--steps", "0", "--masks", f)
        assert not (tmp_path / name / "masks.safetensors").exists()
    (out / "masks.safetensors").write_bytes((out / "masks.safetensors").read_bytes()[:100])  # torn
    (out / "adapter.safetensors").unlink()
    with pytest.raises(ValueError, match="masks.safetensors: not a safetensors file"):
        run(tiny, out, *extra, "--steps", "4", "--resume")


def test_gguf_written_next_to_the_export(tiny, tmp_path):
    """--gguf: the pruned model also as model.gguf (llama.cpp's deci layout), computing what model/ computes."""
    r = nute_cli("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "r", "--seq-len", 32, "--batch-size", 2,
                 "--dtype", "fp32", "--no-eval", "--method", "magnitude", "--target", "0.3", "--steps", "0", "--gguf", "f32")
    assert r.returncode == 0, r.stderr[-2000:]
    (a, _), (b, _) = (checkpoint.load(str(tmp_path / "r" / f)) for f in ("model", "model.gguf"))
    x = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)
    assert gguf.read_gguf(str(tmp_path / "r" / "model.gguf"), tensors=False)[0]["general.architecture"] == "deci"


def test_magnitude_run_trains_lora_with_fixed_masks(tiny, tmp_path):
    run(tiny, tmp_path / "mag", "--target", "0.3", "--steps", "6", "--method", "magnitude", "--distill", "none")
    adapter = load_file(str(tmp_path / "mag" / "adapter.safetensors"))
    want = baselines.magnitude_masks(checkpoint.load(str(tiny[0]))[0], 0.3)
    for k in masks.MASKS:
        assert torch.equal(adapter[k], want[k]), k
    assert adapter["layers.0.attention.wq.lora_B"].abs().sum() > 0  # LoRA learned


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_in_padded_shapes_equals_the_masked_model(tiny, tmp_path, dtype):
    """nute.py's export: every layer in the fixed GQA layout, and in bf16 every width a multiple of 32 (zero
    units), computing what the masked model computes."""
    out = tmp_path / "r"
    nute.main(["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--out", str(out), "--seq-len", "32", "--batch-size",
               "2", "--dtype", "fp32", "--export-dtype", dtype, "--target", "0.4", "--steps", "3", "--no-eval"])
    small, _ = checkpoint.load(str(out / "model"), dtype=torch.float32)
    m, _ = checkpoint.load(str(tiny[0]))
    adapter = checkpoint.load_adapter(str(out), m)
    c = small.config
    assert all(layer.attention is None or layer.attention.uniform_gqa for layer in small.layers)
    if dtype == "bf16":
        assert c.dim % 32 == 0 and all(n % 32 == 0 for n in c.ffn_dims) and c.dim > (adapter["z_hid"] > 0).sum()
    x = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    want = m(x, adapter)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(small(x), want, rtol=tol, atol=tol * want.abs().max().item())


def test_export_dtype_and_a_like_for_like_report(tiny, tmp_path, monkeypatch):
    """--export-dtype fp32 after a bf16 run: model/ holds fp32 weights, and the end-of-run report times and
    sizes the intact model in fp32 too (not as the file it was loaded from)."""
    timed = []
    fake_latency = lambda m, *a, **k: timed.append(m.tok_embeddings.weight.dtype) or {
        "params": sum(p.numel() for p in m.parameters()), "prefill_ms": 1, "decode_tok_s": 1, "ms_per_token": 1, "bandwidth_gb_s": 1}
    monkeypatch.setattr(nute.evaluate, "latency", fake_latency)
    monkeypatch.setattr(nute.evaluate.data, "default_texts", lambda: ([], [tiny[1].read_text()[:3000]], []))
    out = tmp_path / "r"
    nute.main(["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--out", str(out), "--seq-len", "32", "--batch-size", "2",
               "--dtype", "bf16", "--export-dtype", "fp32", "--target", "0.3", "--steps", "2"])
    assert {t.dtype for t in load_file(str(out / "model" / "model.safetensors")).values()} == {torch.float32}
    assert timed == [torch.float32] * 12  # intact, exported: interleaved, a warm-up round and 5 more
    size = json.loads((out / "results.json").read_text())["latency"]
    intact = checkpoint.load(str(tiny[0]))[0]
    assert size["intact"]["disk_bytes"] == 4 * sum(p.numel() for p in intact.parameters())
    assert size["exported"]["disk_bytes"] == os.path.getsize(out / "model" / "model.safetensors")
