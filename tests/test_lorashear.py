"""lorashear.py: the half-space projection by hand, the groups against Eq. 3, the knowledge distribution against a
model with the block's weights zeroed, LHSPG's schedule, the recovery mix, and whole runs (target, resume)."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import baselines as B
import lorashear as L
import nute
from helpers import make_model, make_tiny, tiny_config, tokens_for
from masks import mask_sparsity, prunable_size
from model import init_lora


@pytest.fixture
def tiny():
    config = tiny_config(n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
    return make_model(config), [tokens_for(config, seed=s) for s in (1, 2)]


def test_half_space_projection_by_hand():
    """Rows are groups. x~ . x against eps |x|^2: (1,0).(1,0) = 1 >= 0 stays; (-1, .1).(1,0) = -1 < 0 goes; with
    eps = 0.6, (.5,.5).(1,1) = 1 < 0.6 * 2 = 1.2 goes too, while (1,0) (1 >= 0.6) still stays."""
    trial = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.5, 0.5]])
    current = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert L.half_space(trial, current).tolist() == [False, True, False]
    assert L.half_space(trial, current, eps=0.6).tolist() == [False, True, True]


def lora_for(m, seed=0, scale=0.5):
    """LoRA on every projection with B != 0, so that D = scale * B A is a real update."""
    g = torch.Generator().manual_seed(seed)
    lora = init_lora(m, ["q", "k", "v", "o", "gate", "up", "down"], 4, g)
    return {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.3 if k.endswith("lora_B") else v.double())
            for k, v in lora.items()}, scale


def test_groups_cover_what_eq3_counts_and_products_by_hand(tiny):
    """Every unit's vector is exactly its weights: all of them plus the kv rows are the prunable weights Eq. 3
    counts; W + D, and the sums over a head's and an FFN unit's weights, by explicit slicing in float64."""
    m, _ = tiny
    c, (lora, s) = m.config, lora_for(m)
    every = {"z_head": torch.ones(c.n_layers, c.n_heads, dtype=torch.bool), "z_int": torch.ones(c.n_layers, c.ffn_dim, dtype=torch.bool)}
    heads, ffn = L.unit_vectors(m, lora, s, every)
    assert heads.numel() + ffn.numel() + 2 * c.n_layers * c.n_kv_heads * c.head_dim * c.dim == prunable_size(c)
    full = lambda l, name: getattr(m.layers[l], name.split(".")[0]).get_submodule(name.split(".")[1]).weight.double() + \
        s * lora[f"layers.{l}.{name}.lora_B"] @ lora[f"layers.{l}.{name}.lora_A"]
    hd, h, l = c.head_dim, 3, 1
    head = torch.cat([full(l, "attention.wq")[h * hd:(h + 1) * hd].flatten(), full(l, "attention.wo")[:, h * hd:(h + 1) * hd].flatten()])
    unit = torch.cat([full(0, "feed_forward.w1")[5], full(0, "feed_forward.w3")[5], full(0, "feed_forward.w2")[:, 5]])
    assert torch.allclose(heads[c.n_heads * l + h].double(), head, atol=1e-6)
    assert torch.allclose(ffn[5].double(), unit, atol=1e-6)
    W = lambda l, name: getattr(m.layers[l], name.split(".")[0]).get_submodule(name.split(".")[1]).weight.double()
    w_unit = torch.cat([W(0, "feed_forward.w1")[5], W(0, "feed_forward.w3")[5], W(0, "feed_forward.w2")[:, 5]])
    d_unit = unit - w_unit
    p = L.unit_products(m, lora, s)["z_int"][0, 5].double()
    assert torch.allclose(p, torch.stack([w_unit @ w_unit, w_unit @ d_unit, d_unit @ d_unit]).float().double(), rtol=1e-5)


def test_saliency_ranks_a_shrunk_unit_least(tiny):
    """A unit whose weights are scaled down 100x is the least salient (every criterion but the cosine shrinks)."""
    m, _ = tiny
    lora, s = lora_for(m)
    f = m.layers[1].feed_forward
    for w in (f.w1.weight, f.w3.weight):
        w.data[7] *= 0.01
    f.w2.weight.data[:, 7] *= 0.01
    score = L.saliency(m, lora, s)
    assert torch.cat([score["z_head"].flatten(), score["z_int"].flatten()]).argmin() == m.config.n_layers * m.config.n_heads + m.config.ffn_dim + 7


def test_knowledge_distribution_equals_zeroed_weights(tiny):
    """The loss rise of removing a block through the masks equals that of a model copy with the block's output weights
    (wo columns of the kv group's heads, w2 columns of the FFN units) set to 0; the top share is marked crucial."""
    m, batches = tiny
    c = m.config
    rises = L.knowledge_distribution(m, batches, ffn_block=8)
    assert len(rises) == c.n_layers * (c.n_kv_heads + 3)
    loss = lambda model: sum(B.next_token_loss(model, x).item() for x in batches) / len(batches)
    intact = loss(m)
    for rise, (kind, l, idx) in (rises[1], rises[-2]):
        cut = copy.deepcopy(m)
        if kind == "z_head":
            cut.layers[l].attention.wo.weight.data[:, idx.start * c.head_dim:idx.stop * c.head_dim] = 0
        else:
            cut.layers[l].feed_forward.w2.weight.data[:, idx] = 0
        assert rise == pytest.approx(loss(cut) - intact, abs=1e-10)
    crucial = L.crucial_units(m, batches, unprunable=0.25, ffn_block=8)
    top = sorted(rises, key=lambda r: r[0], reverse=True)[:3]  # ceil(0.25 * 10)
    assert sum(int(crucial[k][l, i].all()) for _, (k, l, i) in top) == 3
    assert int(crucial["z_head"].sum()) + int(crucial["z_int"].sum()) == sum((i.stop - i.start) for _, (_, _, i) in top)


def test_lhspg_schedule_and_projection(tiny):
    """Nothing moves before the warm-up ends; a period's units fall 1 - (k + 1) / length, the others stay at exactly 1;
    a unit whose weights LoRA turns around goes to 0 at once (the half-space projection), in a run resumed just
    before that step too; crucial units are never picked; after the last period the masks are binary and Eq. 3
    sits at the target (past it by less than one unit)."""
    m, _ = tiny
    c, (lora, s) = m.config, lora_for(m)
    z = {k: v.clone() for k, v in B.full_masks(c).items()}
    crucial = {"z_head": torch.zeros(c.n_layers, c.n_heads, dtype=torch.bool), "z_int": torch.zeros(c.n_layers, c.ffn_dim, dtype=torch.bool)}
    crucial["z_int"][0] = True
    lh = L.Lhspg(z, c, 0.3, steps=20, crucial=crucial, periods=2, warmup=0.1, prune=0.8)
    assert (lh.start, lh.length, lh.end) == (2, 8, 18)
    step = lambda lh, t: (lh.before_step(t, m, lora, s), lh.after_step(t, m, lora, s))
    for t in range(2):
        step(lh, t)
    assert all((v == 1).all() for v in z.values())
    step(lh, 2)  # period 0, k = 0: picks
    active = {k: v.clone() for k, v in lh.active.items()}
    assert active["z_int"].any() and not (active["z_int"] & crucial["z_int"]).any()
    assert torch.allclose(z["z_int"][active["z_int"]], torch.tensor(1 - 1 / 8))
    assert (z["z_int"][~active["z_int"]] == 1).all() and (z["z_head"][~active["z_head"]] == 1).all()
    step(lh, 3)
    z_b = {k: v.clone() for k, v in z.items()}  # a run resumed from a checkpoint after step 3
    resumed = L.Lhspg(z_b, c, 0.3, steps=20, crucial=None, periods=2, warmup=0.1, prune=0.8)
    resumed.load_state_dict(copy.deepcopy(lh.state_dict()))
    for run in (lh, resumed):
        run.before_step(4, m, lora, s)
    l, i = active["z_int"].nonzero()[0].tolist()  # step 4's update turns this unit around: W + D = -W
    f = m.layers[l].feed_forward
    for name, w in (("w1", f.w1.weight), ("w3", f.w3.weight)):
        key = f"layers.{l}.feed_forward.{name}"
        lora[key + ".lora_B"][i] = 0
        lora[key + ".lora_B"][i, 0] = -2 / s
        lora[key + ".lora_A"][0] = w[i].double()
    key = f"layers.{l}.feed_forward.w2"
    lora[key + ".lora_A"][:, i] = 0
    lora[key + ".lora_A"][1, i] = 1
    lora[key + ".lora_B"][:, 1] = -2 * f.w2.weight[:, i].double() / s
    for run in (lh, resumed):
        run.after_step(4, m, lora, s)
    assert z["z_int"][l, i] == 0 and all(torch.equal(z[k], z_b[k]) for k in z)
    others = active["z_int"].clone()
    others[l, i] = False
    assert others.any() and torch.allclose(z["z_int"][others], torch.tensor(1 - 3 / 8))
    for t in range(5, 20):
        step(lh, t)
    assert all(((v == 0) | (v == 1)).all() for v in z.values())
    assert (z["z_int"][0] == 1).all()  # crucial
    assert 0.3 <= mask_sparsity(z, c) < 0.3 + 4 * c.head_dim * c.dim / prunable_size(c)  # past it by at most a head + kv


def test_recovery_mix_follows_degradation(monkeypatch, tmp_path):
    """Loss rises 0.3, 0.1 and -0.2 give the mix 0.75 / 0.25 / 0; the rows then come from the categories in about
    that share (none from the third), the same rows for the same index; before `start` they are data.batch_rows'."""
    from formats.checkpoint import load
    model, tok = load(str(make_tiny(tmp_path / "ckpt")))
    docs = lambda w: [" ".join([w] * 60)] * 4
    rec = L.Recovery(tok, 16, {"a": (docs("cat"), docs("cat")), "b": (docs("dog"), docs("dog")), "c": (docs("bird"), docs("bird"))},
                     start=5, interval=10, valid_blocks=2)
    sizes = rec.sizes
    assert len(rec.batches[0]) == sum(sizes)
    import data
    assert rec.rows(3, 4, sum(sizes), 0) == data.batch_rows(3, 4, sum(sizes), 0)
    calls = iter([torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([1.3, 1.1, 0.8], dtype=torch.float64)])
    monkeypatch.setattr(rec, "losses", lambda model, adapter: next(calls))
    rec.update(4, model, {})
    assert rec.mix is None and rec.log() == {}
    rec.update(5, model, {})
    assert torch.allclose(rec.mix, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    rows = [r for i in range(400) for r in rec.rows(i, 4, sum(sizes), 0)]
    cat = lambda r: 0 if r < sizes[0] else 1 if r < sizes[0] + sizes[1] else 2
    share = [sum(cat(r) == k for r in rows) / len(rows) for k in range(3)]
    assert share[2] == 0 and abs(share[0] - 0.75) < 0.04
    assert rec.rows(17, 4, sum(sizes), 0) == rec.rows(17, 4, sum(sizes), 0)
    rec.update(6, model, {})  # not on the interval: unchanged (the iterator would be exhausted otherwise)
    assert rec.log()["mix"] == {"a": 0.75, "b": 0.25, "c": 0.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shear")
    words = "the cat sat on a mat while dogs ran over hills and birds sang in tall green trees".split()
    g = torch.Generator().manual_seed(0)
    text = lambda n: " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))
    return make_tiny(root / "ckpt"), {"c4": ([text(300) for _ in range(6)], [text(200)]), "wiki": ([text(300) for _ in range(6)], [text(200)])}


def shear(tiny_run, out, *extra):
    ckpt, _ = tiny_run
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--seq-len", "32", "--batch-size", "2", "--dtype", "fp32",
            "--no-eval", "--lr-lora", "1e-2", "--method", "lorashear", "--distill", "none", *map(str, extra)]
    return nute.train(nute.get_args(argv))


def test_lorashear_run_lands_on_target_and_resumes_bit_identical(tiny_run, tmp_path, monkeypatch):
    """The whole method through nute.py (default text replaced by two small categories): binary masks at the target,
    LoRA on every projection, masks.json with the analysis's cost, the mix in the log; a run killed mid-period and
    again mid-recovery, and resumed, ends exactly like an uninterrupted one."""
    monkeypatch.setattr(nute.data, "default_categories", lambda: tiny_run[1])
    common = ["--target", "0.3", "--steps", "40", "--save-every", "4"]  # warm-up 4 steps, 5 periods of 3, recovery from 19
    shear(tiny_run, tmp_path / "a", *common)
    assert shear(tiny_run, tmp_path / "b", *common, "--stop-after", "10") is None  # checkpoint at 8: mid-period (7-9)
    assert shear(tiny_run, tmp_path / "b", *common, "--resume", "--stop-after", "15") is None  # at 20: mid-recovery
    shear(tiny_run, tmp_path / "b", *common, "--resume")
    a = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(((a[k] == 0) | (a[k] == 1)).all() for k in ("z_head", "z_int"))
    config = nute.load(str(tiny_run[0]))[0].config
    assert 0.3 <= mask_sparsity(a, config) < 0.3 + 4 * config.head_dim * config.dim / prunable_size(config)
    assert "layers.0.feed_forward.w2.lora_A" in a and (tmp_path / "a" / "masks.json").exists()
    import json
    rows = [json.loads(r) for r in open(tmp_path / "a" / "log.jsonl")]
    with pytest.raises(ValueError, match="need --steps 5 or more"):  # 3 steps would end before the pruning does
        shear(tiny_run, tmp_path / "c", "--steps", "3")
    assert "mix" not in rows[18] and set(rows[19]["mix"]) == {"c4", "wiki"} and len(rows) == 40
