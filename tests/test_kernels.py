"""kernels.py: the CPU fast paths compute what the plain products compute (float64 references), and Eq. 5's
fused KL equals autograd's."""
import pytest
import torch
import torch.nn.functional as F

import kernels
import model as M
from helpers import lora_adapter, make_model, soft_masks, tiny_config, tokens_for


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_on_the_cpu_are_float64_products_rounded(dtype, monkeypatch):
    """From FP32_ROWS rows on, a CPU without the 16-bit instructions multiplies 16-bit operands in fp32 (kernels.base_linear): the
    output and the input's gradient are the float64 products rounded to 16 bits (half an ulp, plus fp32's
    summation error), the frozen weight gets no gradient, and one row (decoding) keeps the 16-bit kernel."""
    monkeypatch.setattr(kernels, "SLOW_16BIT", {dtype: True})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, kernels.FP32_ROWS // 2, 96, generator=g).to(dtype).requires_grad_()
    w, gy = torch.randn(160, 96, generator=g).to(dtype), torch.randn(2, kernels.FP32_ROWS // 2, 160, generator=g).to(dtype)
    y = kernels.base_linear(x, w)
    y.backward(gy)
    assert y.dtype == x.grad.dtype == dtype and type(y.grad_fn).__name__ == "FrozenLinearBackward" and w.grad is None
    eps = torch.finfo(dtype).eps
    for got, want in ((y, x.double() @ w.double().T), (x.grad, gy.double() @ w.double())):
        assert ((got.double() - want).abs() <= want.abs() * eps / 2 + 1e-5).all()
    assert type(kernels.base_linear(x[:1, :1], w).grad_fn).__name__ != "FrozenLinearBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_goes_through_mv_and_equals_the_float64_product(dtype):
    """Decoding's one row (kernels.base_linear -> torch.mv on a CPU): the float64 product rounded to the dtype,
    in the input's shape; its gradients are F.linear's."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(160, 96, generator=g).to(dtype), torch.randn(1, 1, 96, generator=g).to(dtype)
    want = x.double() @ w.double().T
    for inp in (x, x[0, 0]):  # [1, 1, in] as in decoding, and a bare vector
        y = kernels.base_linear(inp, w)
        assert y.shape == (*inp.shape[:-1], 160) and y.dtype == dtype and y.grad_fn is None
        assert ((y.double() - want.view(y.shape)).abs() <= want.abs().view(y.shape) * torch.finfo(dtype).eps + 1e-4).all()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    kernels.base_linear(xg, wg).sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xr, wr).sum().backward()
    assert type(kernels.base_linear(xg, wg).grad_fn.next_functions[0][0]).__name__ == "MvBackward0"
    torch.testing.assert_close((xg.grad, wg.grad), (xr.grad, wr.grad))


def test_16bit_training_step_in_fp32_products_is_as_accurate_as_the_16bit_kernels(monkeypatch):
    """A bf16 forward and backward (masks and LoRA, 2 x 32 tokens) with the fp32 products and with PyTorch's
    bf16 kernels, each against float64 on the same weights: the logits and every mask's and LoRA's gradient
    are as close as the bf16 kernels' (both are ~5-10% off on this tiny random model; a wiring error is ~100%)."""
    config = tiny_config()
    m, tok = make_model(config, dtype=torch.bfloat16), tokens_for(config, T=kernels.FP32_ROWS)
    m64 = M.build(config, {k: v.double() for k, v in m.state_dict().items()})
    init = {**soft_masks(config, dtype=torch.bfloat16), **lora_adapter(m, dtype=torch.bfloat16)}

    def run(model, slow):
        monkeypatch.setattr(kernels, "SLOW_16BIT", {torch.bfloat16: slow})
        dtype = model.tok_embeddings.weight.dtype
        adapter = {k: (v.to(dtype).requires_grad_() if torch.is_tensor(v) else v) for k, v in init.items()}
        logits = model(tok, adapter)
        assert (type(logits.grad_fn).__name__ == "FrozenLinearBackward") == (slow and dtype == torch.bfloat16)
        F.cross_entropy(logits.flatten(0, 1).double(), tok.roll(-1, 1).flatten()).backward()
        return {"logits": logits.detach(), **{k: v.grad for k, v in adapter.items() if torch.is_tensor(v)}}

    ref, fp32, bf16 = run(m64, False), run(m, True), run(m, False)
    err = lambda out, k: ((out[k].double() - ref[k]).abs().max() / ref[k].abs().max()).item()
    for k in ref:
        assert err(fp32, k) <= 1.5 * err(bf16, k) + 0.01, (k, err(fp32, k), err(bf16, k))


@pytest.mark.parametrize("amx", [False, True])
def test_a_bf16_model_on_a_cpu_with_amx_leaves_units_out_from_30_percent(amx, monkeypatch):
    """kernels.min_skip_for: the forward passes kept_units MIN_SKIP_AMX_BF16 for bf16 weights on a CPU with AMX
    (there copying kept rows costs more than it saves below ~30%, `python -m lab.bench skip`), MIN_SKIP otherwise."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    config = tiny_config()
    z = torch.ones(config.n_layers, config.ffn_dim)
    z[:, :round(0.2 * config.ffn_dim)] = 0  # 20% of every layer's units
    kept_units, seen = M.kept_units, []
    monkeypatch.setattr(M, "kept_units", lambda z, min_skip: seen.append(min_skip) or kept_units(z, min_skip))
    for dtype, want in ((torch.float32, 0.1), (torch.bfloat16, 0.3 if amx else 0.1)):
        seen.clear()
        make_model(config, dtype=dtype)(tokens_for(config), {"z_int": z})
        assert seen == [want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tempered_kl_equals_autograd(dtype):
    """The fused Eq. 5 term (computed in fp32) against autograd through log_softmax + kl_div in float64, over
    several chunks."""
    g = torch.Generator().manual_seed(0)
    ls, lt = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4, torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4
    lt[0, 0, :10] = -1e4  # teacher probabilities that underflow to 0 count 0, as in kl_div
    ls, lt, T = ls.to(dtype), lt.to(dtype), 2 / 3  # the reference sees the same (rounded) inputs
    ref_s = ls.double().requires_grad_()
    want = F.kl_div(F.log_softmax(ref_s / T, -1), F.softmax(lt.double() / T, -1), reduction="batchmean") * T * T
    want.backward(torch.tensor(1.7, dtype=torch.float64))
    for rows in (None, 2, 5):  # one chunk, and chunks that do not divide the 21 rows
        s = ls.clone().requires_grad_()
        got = kernels.TemperedKL.apply(s, lt, T, rows)
        got.backward(torch.tensor(1.7))
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}[dtype]  # bf16: the gradient's own rounding
        assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
        assert s.grad.dtype == dtype
        torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=tol, atol=tol * ref_s.grad.abs().max().item())
