"""The hardware side: CPU fast paths, Eq. 5's KL in one fused pass, and running on several processes.

Nothing here changes what is computed beyond the rounding of a sum's order; each CPU rule is measured
(`python -m lab.bench gemm`, `skip`, lab/NOTEBOOK.md) and tested against float64 (tests/test_kernels.py).
model.py calls base_linear for every frozen product and min_skip_for to decide when leaving out zero-masked
units pays; nute.py computes Eq. 5's KL with TemperedKL and runs under torchrun with the last section.
Only torch is imported.
"""
import math
import os
import platform
import resource

import torch
import torch.distributed as dist
import torch.nn.functional as F

# On an x86 CPU without AVX512-BF16, PyTorch's bf16 matrix products and attention run 2-6x slower than its
# fp32 ones (`python -m lab.bench gemm`, lab/NOTEBOOK.md), fp16 likewise without AMX-FP16; so from FP32_ROWS rows on such a CPU
# multiplies 16-bit operands in fp32. Their products are exact in fp32 and the 16-bit kernels accumulate in
# fp32 too: only the order of the sums differs. Below it (decoding one token) casting the weight costs more
# than it saves. CPUs with the instructions (there bf16 runs ~1.9x faster than fp32) and GPUs keep the
# 16-bit kernels, and so do other CPUs (not measured here).
# One row (decoding a token) goes through torch.mv on a CPU: PyTorch's bf16 matrix-vector kernel reads the
# weight 1.5-1.7x faster there than F.linear's product of a 1-row matrix (`python -m lab.bench gemm`, lab/NOTEBOOK.md).
FP32_ROWS = 64
X86 = platform.machine().lower() in ("x86_64", "amd64")
SLOW_16BIT = {torch.bfloat16: X86 and not torch.cpu._is_avx512_bf16_supported(),
              torch.float16: X86 and not torch.cpu._is_amx_fp16_supported()}


def in_fp32(x):
    """Whether a product with these activations [..., in] runs in fp32 (see FP32_ROWS)."""
    return x.device.type == "cpu" and SLOW_16BIT.get(x.dtype, False) and x.numel() >= FP32_ROWS * x.shape[-1]


def part(weight, rows=None, cols=None):
    """W [out, in] -> W[rows][:, cols]: only the outputs `rows` and inputs `cols` (None: all of them)."""
    weight = weight if rows is None else weight.index_select(0, rows)
    return weight if cols is None else weight.index_select(1, cols)


class FrozenLinear(torch.autograd.Function):
    """y = x W[rows][:, cols]^T for a frozen W, in fp32 when `fp32` (16-bit x and W, see FP32_ROWS). Autograd
    through F.linear(x.float(), part(W).float()) would keep that fp32 / sliced copy of W until the backward;
    this keeps W itself and slices and casts it again there."""

    @staticmethod
    def forward(ctx, x, weight, rows, cols, fp32):
        ctx.save_for_backward(weight, rows, cols)
        ctx.fp32 = fp32
        w = part(weight, rows, cols)
        return F.linear(x.float(), w.float()).to(x.dtype) if fp32 else F.linear(x, w)

    @staticmethod
    def backward(ctx, g):  # g [..., out] -> dL/dx [..., in]; no gradient for the frozen weight
        weight, rows, cols = ctx.saved_tensors
        w = part(weight, rows, cols)
        return ((g.float() @ w.float()).to(g.dtype) if ctx.fp32 else g @ w), None, None, None, None


def base_linear(x, weight, rows=None, cols=None):
    """y = x W^T, only W's `rows` / `cols` when given; in fp32 where the CPU's 16-bit kernel is slow (a frozen W)."""
    if x.device.type == "cpu" and x.numel() == x.shape[-1] and rows is None and cols is None:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], -1)  # one row: see FP32_ROWS
    fp32 = in_fp32(x) and not weight.requires_grad
    if weight.requires_grad or not (fp32 or rows is not None or cols is not None):
        return F.linear(x, part(weight, rows, cols))
    return FrozenLinear.apply(x, weight, rows, cols, fp32)


# A layer leaves out its zero-masked units from this share of them on: below it, copying the kept rows of the
# weights costs more than the products it saves (`python -m lab.bench skip`, lab/NOTEBOOK.md, an FFN's forward + backward on 4 x 256
# tokens, 2 threads: 5-6% slower with 5% of its units left out, 1-3% faster with 10%, 10% with 20%). On a CPU
# with AMX, whose bf16 products run ~5x its fp32 ones, the copies weigh more: in bf16 0.85-0.93x at 20%, 0.98-1.10x
# at 30%, 1.00-1.01x at 40%, 1.23-1.26x at 50% (three runs); in fp32 the cross-over stays near 10%.
MIN_SKIP = 0.1
MIN_SKIP_AMX_BF16 = 0.3


def min_skip_for(weight):
    """The MIN_SKIP of a model with this weight dtype and device."""
    amx = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    return MIN_SKIP_AMX_BF16 if amx else MIN_SKIP


class TemperedKL(torch.autograd.Function):
    """Eq. 5's term, T^2 * KL(p_t || q_s) / batch, with its gradient T / batch * (q_s - p_t) formed in the
    same pass, a chunk of rows at a time in three reused fp32 buffers: autograd's log_softmax + kl_div would
    keep fp32 copies of both [tokens, vocab] tensors for backward, and fresh temporaries that large cost
    page faults on every step on the CPU. What is kept is one gradient in the logits' dtype. On a CPU a
    chunk of ~2 MB per buffer stays in the cache over the dozen passes below; a GPU keeps 16 MB ones
    (fewer launches)."""

    @staticmethod
    def forward(ctx, logits_s, logits_t, T, rows=None):
        s, t = logits_s.flatten(0, -2), logits_t.flatten(0, -2)  # [tokens, vocab]
        chunk = 2 ** 19 if s.device.type == "cpu" else 2 ** 22  # fp32 entries per buffer: 2 MB / 16 MB
        batch, rows = logits_s.shape[0], min(len(s), rows or max(1, chunk // s.shape[1]))
        log_q, log_p, diff = (torch.empty(rows, s.shape[1], device=s.device) for _ in range(3))
        grad, total = torch.empty_like(s), torch.zeros((), device=s.device)
        for i in range(0, len(s), rows):
            n = min(rows, len(s) - i)
            lq, lp, d = log_q[:n].copy_(s[i:i + n]).div_(T), log_p[:n].copy_(t[i:i + n]).div_(T), diff[:n]
            lq.sub_(lq.logsumexp(-1, keepdim=True))  # log_softmax in place
            lp.sub_(lp.logsumexp(-1, keepdim=True))
            torch.sub(lp, lq, out=d)
            p = lp.exp_()
            total += torch.dot(p.view(-1), d.view(-1))  # sum of p * (log p - log q)
            grad[i:i + n] = lq.exp_().sub_(p).mul_(T / batch)
        ctx.grad = grad.view(logits_s.shape)  # used once: backward scales it in place
        return total * T * T / batch

    @staticmethod
    def backward(ctx, g):  # g: a 0-dim fp32 tensor, applied in fp32 (PyTorch's scalar rule)
        grad = ctx.grad
        del ctx.grad  # a second backward through the same graph fails instead of reusing a scaled gradient
        return grad.mul_(g), None, None, None


def peak_mb(device):
    """Peak memory so far: CUDA's allocator on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------
# Several processes (torchrun): data parallel, and FSDP for base weights too big for one device

def init_distributed(device, world):
    """Under torchrun (world > 1): one process per device, gloo on the CPU, NCCL on GPUs -> this rank's device."""
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def average_over_ranks(params, terms, world):
    """Data parallel: every rank ends with the gradients of `params` and the loss terms averaged over the ranks
    -> {"kl", "layer", "ce"}. A rank whose loss was not finite (terms["skipped"]) sends NaN gradients, so that
    every rank finds them and skips the step together."""
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        if terms["skipped"]:
            p.grad.fill_(math.nan)
        dist.all_reduce(p.grad)
        p.grad /= world
    losses = torch.tensor([terms["kl"], terms["layer"], terms["ce"]], device=p.device) / world
    dist.all_reduce(losses)
    return dict(zip(("kl", "layer", "ce"), losses.tolist()))


def shard(model, device, world):
    """--fsdp: every block's base weights (and the embeddings) split over the ranks with FSDP2; a forward
    gathers a block's weights just in time. Masks and LoRA stay whole on every rank."""
    from torch.distributed.fsdp import fully_shard
    mesh = dist.device_mesh.init_device_mesh(torch.device(device).type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(model):
    """--fsdp: the whole weights of a sharded model again (a collective: every rank calls it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
