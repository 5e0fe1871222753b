"""Tests for baselines.py: Taylor importance against finite differences, Bonsai's regression on a synthetic
problem and its forward-only promise, and every method's masks at exactly the target (the Eq. 3 count)."""
import pytest
import torch

import baselines as B
from helpers import make_model, tiny_config, tokens_for
from masks import mask_sparsity


@pytest.fixture
def tiny():
    config = tiny_config(n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
    return make_model(config), [tokens_for(config, seed=s) for s in (1, 2)]


def test_taylor_importance_equals_finite_differences(tiny):
    """sum |w * dL/dw| over a head's (wq rows, wo columns) and an FFN unit's (w1, w3 rows, w2 column) weights,
    each dL/dw a central difference of the summed loss, in float64."""
    m, batches = tiny
    importance = B.taylor_importance(m, batches)
    loss = lambda: sum(B.next_token_loss(m, x).item() for x in batches)
    hd = m.config.head_dim

    def by_differences(cells):
        total = 0.0
        for w, idx in cells:
            for i in zip(*[t.flatten().tolist() for t in torch.meshgrid(*idx, indexing="ij")]):
                v, h = w[i].item(), 1e-6
                w[i] = v + h
                up = loss()
                w[i] = v - h
                total += abs(v * (up - loss()) / (2 * h))
                w[i] = v
        return total
    a, f = m.layers[1].attention, m.layers[0].feed_forward
    head = by_differences([(a.wq.weight, (torch.arange(2 * hd, 3 * hd), torch.arange(32))),
                           (a.wo.weight, (torch.arange(32), torch.arange(2 * hd, 3 * hd)))])
    unit = by_differences([(f.w1.weight, (torch.tensor([3]), torch.arange(32))), (f.w3.weight, (torch.tensor([3]), torch.arange(32))),
                           (f.w2.weight, (torch.arange(32), torch.tensor([3])))])
    assert importance["z_head"][1, 2].item() == pytest.approx(head, rel=1e-6)
    assert importance["z_int"][0, 3].item() == pytest.approx(unit, rel=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in m.parameters())  # the model is left as it was


def test_ridge_recovers_known_relevances():
    """120 sub-models, 300 modules of which 20 matter: the regression finds most of them (under-determined),
    and all of them exactly when there are more sub-models than modules."""
    g = torch.Generator().manual_seed(0)
    M, relevant = 300, torch.randperm(300, generator=g)[:20]
    beta = torch.zeros(M, dtype=torch.float64)
    beta[relevant] = 1 + torch.rand(20, generator=g, dtype=torch.float64)
    for n, want in ((120, 16), (900, 20)):
        kept = (torch.rand(n, M, generator=g) < 0.9).double()
        utility = kept @ beta + 3.0 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
        estimate = B.ridge_relevance(kept, utility, 0.1)
        assert len(set(estimate.argsort(descending=True)[:20].tolist()) & set(relevant.tolist())) >= want, n
    assert torch.allclose(estimate, beta, atol=0.05)


def test_bonsai_uses_forward_passes_only(tiny, monkeypatch):
    m, batches = tiny

    def no_backward(*a, **k):
        raise AssertionError("Bonsai called backward")
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    forwards = []
    monkeypatch.setattr(B, "next_token_loss", lambda model, x, z=None: forwards.append(torch.is_grad_enabled())
                        or torch.nn.functional.cross_entropy(model(x, z)[:, :-1].flatten(0, 1), x[:, 1:].flatten()))
    z = B.bonsai_masks(m, batches, 0.3, samples=6, step=0.1, ffn_group=4)
    assert len(forwards) == 3 * 6 * 2 and not any(forwards)  # 3 rounds x 6 sub-models x 2 batches, no graph
    assert mask_sparsity(z, m.config) == pytest.approx(0.3, abs=0.03)


def test_bonsai_recovers_known_relevances(tiny, monkeypatch):
    """A synthetic loss with a known relevance per unit (additive in the kept units): sampling, regression and
    pruning together keep the units an oracle that knows the relevances keeps."""
    m, batches = tiny
    c, g = m.config, torch.Generator().manual_seed(5)
    relevance = {k: torch.rand(v.shape, generator=g) ** 4 for k, v in B.full_masks(c).items() if k != "z_hid"}
    monkeypatch.setattr(B, "next_token_loss", lambda model, x, z: -sum((relevance[k] * z[k].cpu()).sum() for k in relevance))
    z = B.bonsai_masks(m, batches, 0.5, samples=60, step=0.25, ffn_group=4)
    mods = B.units(c, 4)
    oracle = B.prune_lowest(B.per_weight(relevance, c), c, 0.5, ffn_group=4)
    same = sum(bool(z[k][l, i].all() == oracle[k][l, i].all()) for k, l, i in mods)
    assert same >= len(mods) - 2, f"{same} of {len(mods)} units decided as the oracle decides"


@pytest.mark.parametrize("method", ["magnitude", "taylor", "bonsai"])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_masks_land_on_the_target(tiny, method, target):
    """Eq. 3 on the binary masks is at the target to within one unit (an FFN group for Bonsai)."""
    m, batches = tiny
    z = {"magnitude": lambda: B.magnitude_masks(m, target), "taylor": lambda: B.taylor_masks(m, batches, target),
         "bonsai": lambda: B.bonsai_masks(m, batches, target, samples=4, step=0.25, ffn_group=4)}[method]()
    c = m.config
    unit = (4 if method == "bonsai" else 1) * 3 * c.dim + 4 * c.dim * c.head_dim  # the largest single drop
    total = c.n_layers * (2 * c.dim * c.head_dim * (c.n_heads + c.n_kv_heads) + 3 * c.dim * c.ffn_dim)
    assert target <= mask_sparsity(z, c) <= target + unit / total
    assert z["z_hid"].all()
