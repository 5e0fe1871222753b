"""masks.py: hard-concrete masks (Eq. 10) against closed forms, Eq. 3 against the paper's tables, the ramped
target and the controllers that reach it."""
import math

import pytest
import torch

import masks
from model import ModelConfig


# ----------------------------------------------------------------------------------------------------
# Masks and Eq. 3 against closed forms

def test_keep_prob_matches_sampling_and_closed_form():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    # closed form: z > 0  <=>  s > -l / (r - l)  <=>  u > sigmoid(beta * logit(-l / (r - l)) - log_alpha)
    c = -masks.LIMIT_L / (masks.LIMIT_R - masks.LIMIT_L)
    want = 1 - torch.sigmoid(masks.BETA * math.log(c / (1 - c)) - log_alpha)
    torch.testing.assert_close(masks.keep_prob(log_alpha), want, rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([masks.sample_z(log_alpha.expand(20000, -1).contiguous(), g) for _ in range(5)])
    frac = (draws > 0).double().mean((0, 1))
    assert (frac - want).abs().max() < 0.01  # 100k draws: standard error < 0.002
    assert draws.min() >= 0 and draws.max() <= 1 and (draws == 1).any()  # stretched then clamped


def test_deterministic_mask_count_and_values():
    g = torch.Generator().manual_seed(1)
    log_alpha = torch.randn(3, 50, generator=g) * 3
    z = masks.deterministic_z(log_alpha)
    for row, zr in zip(log_alpha, z):
        n_zero = round(50 - masks.keep_prob(row).sum().item())
        assert (zr == 0).sum() == n_zero
        assert set(row.argsort()[:n_zero].tolist()) == set((zr == 0).nonzero()[:, 0].tolist())  # smallest go
        kept = zr > 0
        torch.testing.assert_close(zr[kept], torch.sigmoid(row[kept] / masks.BETA * 0.8))
    hid_alpha = torch.randn(64, generator=g)
    hid = masks.deterministic_z(hid_alpha)  # 1-D: one global count over all dims
    assert (hid == 0).sum() == round(64 - masks.keep_prob(hid_alpha).sum().item()) > 0
    assert masks.deterministic_z(torch.full((8,), 10.0)).min() > 0.99  # intact init keeps everything


# ----------------------------------------------------------------------------------------------------
# Eq. 3: the size the masks leave

LLAMA_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008, vocab_size=32000)


def test_eq3_on_llama7b_tables():
    def sparsity(hid, heads, ffn):
        zh, zi, zd = torch.zeros(32, 32), torch.zeros(32, 11008), torch.zeros(4096)
        zd[:hid] = 1
        for layer, (h, f) in enumerate(zip(heads, ffn)):
            zh[layer, :h], zi[layer, :f] = 1, 1
        return (1 - masks.expected_size(zh, zi, zd, LLAMA_7B) / masks.prunable_size(LLAMA_7B)).item()

    assert sparsity(4096, [32] * 32, [11008] * 32) == 0
    t16 = ([23, 22, 30, 22, 29, 27, 30, 28, 30, 30, 31, 30, 32, 27, 30, 30, 30, 29, 26, 25, 23, 21, 16, 21, 14, 15, 6, 7, 11, 8, 7, 9],
           [5832, 7820, 9169, 9187, 8967, 9163, 9186, 9112, 9261, 9165, 9303, 9695, 10005, 10258, 10417, 10564,
            10715, 10759, 10785, 10790, 10808, 10778, 10729, 10707, 10568, 10366, 10054, 9403, 8519, 7297, 6588, 5164])
    t17 = ([24, 21, 27, 18, 26, 21, 20, 20, 25, 21, 27, 26, 23, 21, 25, 21, 23, 23, 21, 19, 16, 15, 6, 13, 7, 8, 2, 5, 7, 5, 3, 8],
           [3980, 6216, 7120, 6590, 5889, 5731, 5283, 4944, 4879, 4563, 4590, 5040, 5469, 5832, 6215, 778,
            7706, 8121, 8005, 8091, 8232, 7705, 6879, 6134, 4912, 3762, 3107, 2527, 2357, 2314, 2931, 2622])
    assert abs(sparsity(4070, *t16) - 0.20) < 0.002  # Table 16: 0.2009
    assert abs(sparsity(4021, *t17) - 0.512) < 0.001  # Table 17 as printed: layer 16's "778" overshoots 50%
    fixed = list(t17[1])
    fixed[15] = 6778  # a lost digit between its neighbours 6215 and 7706 gives the 50% the paper states
    assert abs(sparsity(4021, t17[0], fixed) - 0.50) < 0.002
    assert masks.unevenness(t16[1]) == pytest.approx(0.155, abs=5e-4)  # Table 16's FFN widths


def test_structure_table_counts_and_unevenness():
    """structure.md: kept heads and units per layer, hidden dims removed, and the coefficient of variation
    (population standard deviation / mean, computed here by hand) of the kept counts across layers."""
    config = ModelConfig(dim=16, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=10)
    z = {"z_head": torch.ones(3, 4), "z_int": torch.ones(3, 10) * 0.9, "z_hid": torch.ones(16)}
    z["z_head"][1, :3] = 0
    z["z_int"][0, :4], z["z_int"][2, :1] = 0, 0  # kept 6, 10, 9
    z["z_hid"][[2, 5]] = 0
    table = masks.structure_table(z, config)
    mean = (6 + 10 + 9) / 3
    cv = math.sqrt(((6 - mean) ** 2 + (10 - mean) ** 2 + (9 - mean) ** 2) / 3) / mean
    assert f"FFN widths {cv:.3f}" in table and "Hidden dim: 14 of 16 (2 removed)" in table
    assert "| Head (of 4) | 4 | 1 | 4 |" in table and "| Intermediate dim (of 10) | 6 | 10 | 9 |" in table
    assert masks.unevenness([7, 7, 7]) == 0


def test_eq3_gqa_reduces_to_paper_formula_for_mha():
    config = ModelConfig(dim=16, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=4, ffn_dim=24)
    g = torch.Generator().manual_seed(0)
    ph, pi, pd = (torch.rand(s, generator=g, dtype=torch.float64) for s in ((3, 4), (3, 24), (16,)))
    # Eq. 3 literally, with the outer products the reference code builds
    literal = 4 * 4 * torch.einsum("lh,k->lhk", ph, pd).sum() + 3 * torch.einsum("li,k->lik", pi, pd).sum()
    torch.testing.assert_close(masks.expected_size(ph, pi, pd, config), literal)
    assert masks.prunable_size(config) == 3 * (4 * 16 * 16 + 3 * 16 * 24)
    # GQA, binary: k/v rows of a group count while one of its query heads is kept
    gqa = ModelConfig(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=24)
    zh = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # group 0 half kept, group 1 gone
    size = masks.expected_size(zh, torch.zeros(1, 24), torch.ones(16), gqa)
    assert size == 2 * 16 * 4 * 1 + 2 * 16 * 4 * 1  # q+o of one head, k+v of one kv head


# ----------------------------------------------------------------------------------------------------
# The ramp and the controller: the expected sparsity follows it

def test_warmup_as_the_paper():
    assert masks.warmup_for(0.2) == pytest.approx(4 / 7) and masks.warmup_for(0.5) == pytest.approx(1 / 7)
    assert masks.warmup_for(0.35) == pytest.approx(2.5 / 7) and masks.warmup_for(0.1) == pytest.approx(4 / 7)
    assert masks.warmup_for(0.7) == pytest.approx(1 / 7)


SMOLLM2 = ModelConfig()  # the mask shapes of SmolLM2-135M: 30 layers, 9 heads (3 kv), 1536 units, 576 dims


def test_a_kept_shift_reaches_the_target_and_leaves_the_spread_of_log_alpha():
    """write=False (--mask-init taylor): log_alpha untouched, c returned; clamp(log_alpha + c) is at the target
    even with values far past the clamps, and the deterministic masks drop units in log_alpha's order."""
    g = torch.Generator().manual_seed(0)
    log_alpha = {k: torch.rand(shape, generator=g) * 20 for k, shape in masks.mask_shapes(SMOLLM2).items() if k != "z_hid"}
    before = {k: v.clone() for k, v in log_alpha.items()}
    for target in (0.0, 0.1, 0.5):
        c = masks.project_to_target(log_alpha, target, SMOLLM2, write=False)
        assert all(torch.equal(log_alpha[k], before[k]) for k in log_alpha)
        s = masks.expected_sparsity(masks.shifted(log_alpha, c), SMOLLM2).item()  # z_hid absent: every dim kept
        assert s == pytest.approx(target, abs=1e-6) if target else s < 0.01
    eff = masks.shifted(log_alpha, c)
    for k in log_alpha:
        z = masks.deterministic_z(eff[k], order=log_alpha[k], binary=True)
        assert set(z.unique().tolist()) <= {0.0, 1.0}
        for row, la in zip(z.reshape(-1, z.shape[-1]), log_alpha[k].reshape(-1, z.shape[-1])):
            if 0 < row.sum() < len(row):  # every dropped unit has a lower log_alpha than every kept one
                assert la[row == 0].max() < la[row == 1].min()
    z = {k: masks.deterministic_z(eff[k], order=log_alpha[k], binary=True) for k in eff}
    assert masks.mask_sparsity(z, SMOLLM2) == pytest.approx(0.5, abs=0.01)


def test_projection_hits_any_target_and_keeps_the_order():
    g = torch.Generator().manual_seed(0)
    log_alpha = {k: (torch.randn(shape, generator=g) * 2).clamp(masks.LOG_ALPHA_MIN, masks.LOG_ALPHA_MAX)
                 for k, shape in masks.mask_shapes(SMOLLM2).items()}
    for target in (0.05, 0.2, 0.5, 0.8):
        la = {k: v.clone() for k, v in log_alpha.items()}
        masks.project_to_target(la, target, SMOLLM2)
        assert masks.expected_sparsity(la, SMOLLM2).item() == pytest.approx(target, abs=1e-6)
        for k in la:  # one common shift for every unit that no clamp holds: the order of the units is kept
            d = la[k] - log_alpha[k]
            inside = (la[k] > masks.LOG_ALPHA_MIN) & (la[k] < masks.LOG_ALPHA_MAX) & (log_alpha[k] > masks.LOG_ALPHA_MIN) \
                & (log_alpha[k] < masks.LOG_ALPHA_MAX)
            assert d[inside].max() - d[inside].min() < 1e-5


@pytest.mark.parametrize("target, steps", [(0.2, 150), (0.5, 150), (0.5, 600)])
def test_controller_tracks_the_ramp_on_a_toy_problem(target, steps):
    """SmolLM2's masks, Adam at the reference lr 0.1 on log_alpha from the clamp, and a task loss whose
    gradient, noisy and ~1e4 times larger than Eq. 11's early on, wants every unit kept. The projection must
    hold the ramp at every step after the first quarter of the warm-up and end within 0.005 of the target
    in the deterministic masks (the acceptance test of the real runs, without the model), and the masks
    must still learn which units the task wants: half of them lower the loss when kept, half when pruned."""
    g = torch.Generator().manual_seed(1)
    warmup = round(masks.warmup_for(target) * steps)  # the paper's warm-up, as nute.py's default
    log_alpha = {k: v.requires_grad_(True) for k, v in masks.init_log_alpha(SMOLLM2, g).items()}
    with torch.no_grad():
        for v in log_alpha.values():
            v.clamp_(masks.LOG_ALPHA_MIN, masks.LOG_ALPHA_MAX)
    importance = {k: torch.rand(v.shape, generator=g) * 2 - 1 for k, v in log_alpha.items()}
    opt = torch.optim.AdamW(log_alpha.values(), lr=0.1, weight_decay=0)
    for step in range(steps):
        z = {k: masks.sample_z(v, g) for k, v in log_alpha.items()}
        task = -sum((importance[k] * z[k]).sum() * 1e4 for k in z)
        task.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for v in log_alpha.values():
                v.clamp_(masks.LOG_ALPHA_MIN, masks.LOG_ALPHA_MAX)
        t = masks.target_at(step + 1, target, warmup)
        masks.project_to_target(log_alpha, t, SMOLLM2)
        if step + 1 >= warmup / 4:
            assert abs(masks.expected_sparsity(log_alpha, SMOLLM2).item() - t) <= 0.03, step
    final = masks.mask_sparsity({k: masks.deterministic_z(v) for k, v in log_alpha.items()}, SMOLLM2)
    assert abs(final - target) <= 0.005, final
    kept = masks.deterministic_z(log_alpha["z_int"]) > 0  # the task taught the ranking
    assert importance["z_int"][kept].mean() > importance["z_int"][~kept].mean() + 0.5
