"""nute.py: hard-concrete masks, Eq. 3, the Lagrangian, the teacher schedule, training runs, export."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import baselines
import checkpoint
import model
import nute
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
# Masks and Eq. 3 against closed forms

def test_keep_prob_matches_sampling_and_closed_form():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    # closed form: z > 0  <=>  s > -l / (r - l)  <=>  u > sigmoid(beta * logit(-l / (r - l)) - log_alpha)
    c = -nute.LIMIT_L / (nute.LIMIT_R - nute.LIMIT_L)
    want = 1 - torch.sigmoid(nute.BETA * math.log(c / (1 - c)) - log_alpha)
    torch.testing.assert_close(nute.keep_prob(log_alpha), want, rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([nute.sample_z(log_alpha.expand(20000, -1).contiguous(), g) for _ in range(5)])
    frac = (draws > 0).double().mean((0, 1))
    assert (frac - want).abs().max() < 0.01  # 100k draws: standard error < 0.002
    assert draws.min() >= 0 and draws.max() <= 1 and (draws == 1).any()  # stretched then clamped


def test_deterministic_mask_count_and_values():
    g = torch.Generator().manual_seed(1)
    log_alpha = torch.randn(3, 50, generator=g) * 3
    z = nute.deterministic_z(log_alpha)
    for row, zr in zip(log_alpha, z):
        n_zero = round(50 - nute.keep_prob(row).sum().item())
        assert (zr == 0).sum() == n_zero
        assert set(row.argsort()[:n_zero].tolist()) == set((zr == 0).nonzero()[:, 0].tolist())  # smallest go
        kept = zr > 0
        torch.testing.assert_close(zr[kept], torch.sigmoid(row[kept] / nute.BETA * 0.8))
    hid_alpha = torch.randn(64, generator=g)
    hid = nute.deterministic_z(hid_alpha)  # 1-D: one global count over all dims
    assert (hid == 0).sum() == round(64 - nute.keep_prob(hid_alpha).sum().item()) > 0
    assert nute.deterministic_z(torch.full((8,), 10.0)).min() > 0.99  # intact init keeps everything


# ----------------------------------------------------------------------------------------------------
# The teacher schedule

def schedule(target, steps=140, warmup=80):
    """The teacher of every step when the student follows the warm-up target exactly."""
    q = nute.TeacherQueue(interval=0.01, gap=0.10)
    out = []
    for step in range(steps):
        s = target * min(1.0, step / warmup)
        key = q.teacher_key(step, s, warmup, steps, target)
        out.append(None if key is None else round(key * 0.01, 2))
        q.maybe_snapshot(s, target, nute.Student({"z_hid": torch.zeros(2)}, {}, 1.0, {}))
    return out, q


def test_teacher_schedule_target_02():
    t, q = schedule(0.2)
    assert sorted(q.snapshots) == list(range(1, 20))  # 0.01 .. 0.19: every interval below the target
    # stage 1: intact while s < g + i = 0.11 (Eq. 9), then the snapshot about g below (Eq. 8)
    assert t[:44] == [None] * 44  # s < 0.11 at step 43; step 44 sits on the boundary
    assert t[46] == 0.01 and t[60] == 0.05 and t[79] == 0.09  # s = 0.115, 0.15, 0.1975
    # stage 2 (60 steps): weak to strong, from t - g = 0.10 down to 0.01, then the intact model
    stage2 = t[80:]
    assert stage2[0] == 0.10
    sparse = [x for x in stage2 if x is not None]
    assert sparse == sorted(sparse, reverse=True) and sparse[-1] == 0.01
    first_intact = stage2.index(None)
    assert all(x is None for x in stage2[first_intact:])
    assert abs(len(stage2[first_intact:]) / len(stage2) - 0.5) < 0.05  # g / t of stage 2


def test_teacher_schedule_target_05():
    t, q = schedule(0.5)
    assert sorted(q.snapshots) == list(range(1, 50))
    assert t[17] is None and t[18] == 0.01  # s = 0.5 * 18 / 80 = 0.1125 > 0.11
    assert t[79] == 0.39  # s = 0.49375: the teacher is ~10% less sparse
    stage2 = t[80:]
    assert stage2[0] == 0.40
    first_intact = stage2.index(None)
    assert all(x is None for x in stage2[first_intact:])
    assert abs(len(stage2[first_intact:]) / len(stage2) - 0.2) < 0.05


# ----------------------------------------------------------------------------------------------------
# Training runs on a tiny model

def test_lagrangian_reaches_and_holds_target(tiny, tmp_path):
    run(tiny, tmp_path / "r", "--target", "0.3", "--steps", "200", "--warmup", "0.5", "--save-every", "1000")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    tail = [r["expected_sparsity"] for r in rows[150:]]
    assert max(abs(s - 0.3) for s in tail) < 0.02, tail
    adapter = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    size = model.expected_size(*((adapter[k] > 0).float() for k in model.MASKS), checkpoint.load(str(tiny[0]))[0].config)
    assert abs(1 - size / model.prunable_size(checkpoint.load(str(tiny[0]))[0].config) - 0.3) < 0.05


def test_teacher_forward_leaves_student_untouched(tiny):
    m, _ = checkpoint.load(str(tiny[0]))
    g = torch.Generator().manual_seed(0)
    log_alpha = {k: v.requires_grad_(True) for k, v in nute.init_log_alpha(m.config, g).items()}
    lora = {k: v.requires_grad_(True) for k, v in nute.init_lora(m, ["q", "v"], 4, g).items()}
    for v in lora.values():
        v.data.normal_(0, 0.1, generator=g)
    opt = torch.optim.AdamW([*log_alpha.values(), *lora.values()], lr=0.1)
    x = torch.randint(0, 257, (2, 16), generator=g)
    teacher = {k: nute.deterministic_z(v) * 0.5 for k, v in log_alpha.items()}
    teacher.update({k: torch.randn(v.shape, generator=g) for k, v in lora.items()}, lora_scale=torch.tensor(1.0))

    def step(with_teacher):
        z = {k: nute.sample_z(v, torch.Generator().manual_seed(5)) for k, v in log_alpha.items()}
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
    assert not any(".lora_" in k for k in adapter) and set(model.MASKS) <= set(adapter)

    run(tiny, tmp_path / "p", "--target", "0.2", "--steps", "30")
    pruned = load_file(str(tmp_path / "p" / "adapter.safetensors"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi there"},
                                  {"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    run(tiny, tmp_path / "ft", "--run", tmp_path / "p", "--finetune", alpaca, "--steps", "10", "--seq-len", "256")
    tuned = load_file(str(tmp_path / "ft" / "adapter.safetensors"))
    for k in model.MASKS:
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
    adapter = nute.init_lora(m, list(model.LORA_TARGETS), 3, g, adapter)
    for k in adapter:
        if ".lora_B" in k:
            adapter[k] = torch.randn(adapter[k].shape, generator=g) * 0.1
    small = model.slice_model(m, adapter)
    x = torch.randint(0, 257, (2, 20), generator=g)
    want = m(x, adapter)
    torch.testing.assert_close(small(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    k = int((adapter["z_hid"] > 0).sum())
    binary = [(adapter[n] > 0).float() for n in model.MASKS]
    rest = config.vocab_size * k + (2 * config.n_layers + 1) * k + (0 if config.tie_embeddings else config.vocab_size * k)
    assert sum(p.numel() for p in small.parameters()) == model.expected_size(*binary, config).item() + rest
    assert small.config.kv_of_head[0] == [0, 0] and small.config.kv_of_head[1] == [] and small.config.ffn_dims[2] == 0
    assert model.generate(small, [1, 2, 3], 8) == model.generate(m, [1, 2, 3], 8, adapter)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2

@pytest.mark.parametrize("extra, message", [
    (["--target", "1.5"], "--target must be in (0, 1)"),
    (["--data", "EMPTY"], "no text"),
    (["--ckpt", "/nonexistent/ckpt"], "no such file"),
])
def test_bad_input_exit_2(tiny, tmp_path, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "o"), "--steps", "2", "--no-eval"]
    argv += [str(empty) if a == "EMPTY" else a for a in extra]
    r = subprocess.run([sys.executable, "nute.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


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
    size = model.expected_size(z["z_head"], z["z_int"], z["z_hid"], m.config).item()
    M = model.prunable_size(m.config)
    assert (1 - 0.3) * M - 4 * m.config.dim * m.config.head_dim < size <= (1 - 0.3) * M  # stops right at the target
    assert z["z_int"][1, 7] == 0 and z["z_hid"].all()


def test_magnitude_run_trains_lora_with_fixed_masks(tiny, tmp_path):
    run(tiny, tmp_path / "mag", "--target", "0.3", "--steps", "6", "--magnitude", "--distill", "none")
    adapter = load_file(str(tmp_path / "mag" / "adapter.safetensors"))
    want = baselines.magnitude_masks(checkpoint.load(str(tiny[0]))[0], 0.3)
    for k in model.MASKS:
        assert torch.equal(adapter[k], want[k]), k
    assert adapter["layers.0.attention.wq.lora_B"].abs().sum() > 0  # LoRA learned
