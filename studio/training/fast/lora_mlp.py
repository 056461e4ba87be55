"""A SwiGLU MLP with LoRA on its gate, up and down projections as one autograd node, whose activation kernel also
adds the three rank-r LoRA terms that are 14,336 columns wide on an 8B model.

With LoRA on every projection, fused_lora.py adds each projection's rank-r term into its base result with one more
matmul (``out += (x A^T) (s B)^T``): for the gate and up outputs, and for the down projection's input gradient, that
matmul does almost no arithmetic but reads and writes the whole (tokens x intermediate) matrix, three times a layer
(bench/NOTES.md: 188 us each on the 8B step, about 18 ms a step). The SwiGLU activation reads those same matrices
right after. Here the activation kernel adds the rank-r terms itself, tile by tile, from the small rank-r factors
(a dot of rank r per value, which the tensor cores do for nothing next to the memory traffic; in float32 under
triton's interpreter, whose bf16 dot is wrong):

  forward:   h = silu(G + xa_g (s B_g)^T) * (U + xa_u (s B_u)^T), from the base products G = x W_g^T, U = x W_u^T
  backward:  dh = dH + gd A_d (dH = dy W_d, gd = dy (s B_d)); then the gradients of the gate and the up values,
             written over G and U, which are not needed after

G and U are kept for the backward without their LoRA terms, which the backward adds again: what is kept is what
Liger's SwiGLU keeps (the two pre-activations and h), and no full-size matrix is written that the step did not
write before. The rest is the matmuls fused_lora.py makes, with the adapters' kept casts.

Only the plain case takes this path: one active adapter on each of the three projections, no dropout, no bias, a 16-bit
unquantized base, SiLU; anything else runs the MLP's own forward. With triton's interpreter (TRITON_INTERPRET=1) the
kernels run on the CPU, which is how the tests check them; elsewhere without Triton the same arithmetic runs as
PyTorch operations (the tests' reference; the planner turns this path on only where Triton runs).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from studio.training.fast import fused_lora
from studio.training.fast.fused_lora import (_adapter_weight, _base_parts, _has_dropout, _runnable, _stacked_adapters,
                                            siblings_backward)
from studio.training.fast.triton_support import interpreted, tl, triton, triton_runs

# Each program takes BLOCK_M tokens and walks a run of BLOCK_N-column tiles (in the forward all of the width, in the
# backward about a quarter of it), fetching the next tiles asynchronously into shared memory while it computes (STAGES
# deep): read from there, a tile reaches the rank-r dot in the tensor cores' layout without a separate conversion. The
# ranks are compile-time constants, so the factors' loads are whole contiguous runs that can be fetched ahead too. The
# fastest form bench/lowrank_check.py found on the H200 (bench/NOTES.md), close to the speed of Liger's plain SwiGLU.
BLOCK_M = 16
BLOCK_N = 128
NUM_WARPS = 4
STAGES = 3  # at most: fewer where the buffers do not fit the GPU's shared memory (high ranks, smaller GPUs)
FORWARD_SPLIT = 1  # into how many runs of column tiles a block of tokens' columns is cut, one program each
BACKWARD_SPLIT = 4
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


if triton is not None:
    @triton.jit
    def _factor_rows(xa_ptr, xa_stride, first, rows, row_in, rank, RANK: tl.constexpr):
        """The (BM x RANK) block of xa[:, first:first + rank] for this program's tokens, zero past the rank."""
        r = tl.arange(0, RANK)
        return tl.load(xa_ptr + rows[:, None] * xa_stride + first + r[None, :],
                       mask=row_in[:, None] & (r[None, :] < rank), other=0.0)

    @triton.jit
    def _plus_lora_terms(base, xa, b_ptr, b_col_stride, b_rank_stride, cols, col_in, rank, RANK: tl.constexpr,
                         F32_DOT: tl.constexpr):
        """base (a float32 tile) + xa @ b^T over the tile's columns, where b[col, k] is at b_ptr + col x b_col_stride
        + k x b_rank_stride: one dot accumulating onto the tile."""
        r = tl.arange(0, RANK)
        b_t = tl.load(b_ptr + cols[None, :] * b_col_stride + r[:, None] * b_rank_stride,
                      mask=col_in[None, :] & (r[:, None] < rank), other=0.0)
        if F32_DOT:
            return tl.dot(xa.to(tl.float32), b_t.to(tl.float32), acc=base)
        return tl.dot(xa, b_t, acc=base)

    @triton.jit
    def _row_block(tokens, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr):
        """This program's tokens, which of them exist, and the first of its TILES column tiles."""
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        return rows, rows < tokens, tl.program_id(1) * (TILES * BN)

    @triton.jit
    def _column_tile(first, i, width, rows, row_in, BN: tl.constexpr):
        """The i-th column tile from `first`: its columns, which exist, which values exist, and their offsets."""
        cols = first + i * BN + tl.arange(0, BN)
        col_in = cols < width
        return cols, col_in, row_in[:, None] & col_in[None, :], rows[:, None] * width + cols[None, :]

    @triton.jit
    def _gate_and_up(g_ptr, u_ptr, xa_g, xa_u, bg_ptr, bu_ptr, rank_g, rank_u, cols, col_in, inside, at,
                     RANK: tl.constexpr, F32_DOT: tl.constexpr):
        """The tile's gate and up values in float32: the kept base products plus their LoRA terms."""
        gate = _plus_lora_terms(tl.load(g_ptr + at, mask=inside, other=0.0).to(tl.float32), xa_g, bg_ptr, rank_g, 1,
                                cols, col_in, rank_g, RANK, F32_DOT)
        up = _plus_lora_terms(tl.load(u_ptr + at, mask=inside, other=0.0).to(tl.float32), xa_u, bu_ptr, rank_u, 1,
                              cols, col_in, rank_u, RANK, F32_DOT)
        return gate, up

    @triton.jit
    def _swiglu_forward(g_ptr, u_ptr, h_ptr, xa_ptr, bg_ptr, bu_ptr, tokens, width, xa_stride, rank_g: tl.constexpr,
                        rank_u: tl.constexpr, RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        TILES: tl.constexpr, STAGES: tl.constexpr, F32_DOT: tl.constexpr):
        rows, row_in, first = _row_block(tokens, BM, BN, TILES)
        xa_g = _factor_rows(xa_ptr, xa_stride, 0, rows, row_in, rank_g, RANK)
        xa_u = _factor_rows(xa_ptr, xa_stride, rank_g, rows, row_in, rank_u, RANK)
        for i in tl.range(0, TILES, num_stages=STAGES):
            cols, col_in, inside, at = _column_tile(first, i, width, rows, row_in, BN)
            gate, up = _gate_and_up(g_ptr, u_ptr, xa_g, xa_u, bg_ptr, bu_ptr, rank_g, rank_u, cols, col_in, inside,
                                    at, RANK, F32_DOT)
            tl.store(h_ptr + at, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_backward(dh_ptr, g_ptr, u_ptr, xa_ptr, bg_ptr, bu_ptr, gd_ptr, ad_ptr, tokens, width, xa_stride,
                         gd_stride, rank_g: tl.constexpr, rank_u: tl.constexpr, rank_d: tl.constexpr,
                         RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr,
                         STAGES: tl.constexpr, F32_DOT: tl.constexpr):
        """The gate's and the up values' gradients, over G and U."""
        rows, row_in, first = _row_block(tokens, BM, BN, TILES)
        xa_g = _factor_rows(xa_ptr, xa_stride, 0, rows, row_in, rank_g, RANK)
        xa_u = _factor_rows(xa_ptr, xa_stride, rank_g, rows, row_in, rank_u, RANK)
        gd = _factor_rows(gd_ptr, gd_stride, 0, rows, row_in, rank_d, RANK)
        for i in tl.range(0, TILES, num_stages=STAGES):
            cols, col_in, inside, at = _column_tile(first, i, width, rows, row_in, BN)
            # A_d is (rank x intermediate), row-major: its [col, k] is at k x width + col.
            dh = _plus_lora_terms(tl.load(dh_ptr + at, mask=inside, other=0.0).to(tl.float32), gd, ad_ptr, 1, width,
                                  cols, col_in, rank_d, RANK, F32_DOT)
            gate, up = _gate_and_up(g_ptr, u_ptr, xa_g, xa_u, bg_ptr, bu_ptr, rank_g, rank_u, cols, col_in, inside,
                                    at, RANK, F32_DOT)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_gate = dh * up * (sig + silu * (1.0 - sig))
            tl.store(g_ptr + at, d_gate.to(g_ptr.dtype.element_ty), mask=inside)
            tl.store(u_ptr + at, (dh * silu).to(u_ptr.dtype.element_ty), mask=inside)


def path_runs(device: torch.device) -> bool:
    """Whether MLPs on `device` take this path (where the kernels run; the tests also send the PyTorch path)."""
    return triton_runs(device)


def _float32_dot() -> bool:
    """The rank-r dots take 16-bit operands on GPUs, float32 ones under triton's interpreter (its bf16 dot is wrong)."""
    return interpreted()


def _rank_block(*ranks: int) -> int:
    """The rank dimension of the kernels' dots: a power of two, at least 16 (the tensor cores' smallest)."""
    return max(16, 1 << (max(ranks) - 1).bit_length())


# (kernel, rank block, device) -> the most stages its buffers fit in, once a launch found fewer than STAGES do
_stages_that_fit: dict = {}


def _launch(kernel, split: int, tokens: int, width: int, *args, ranks: tuple, device: torch.device) -> None:
    """`kernel` over (tokens x width) matrices: blocks of BLOCK_M tokens, each block's column tiles cut into at most
    `split` runs of equal length, one program each. Each stage buffers every stream's tile and every factor's
    (rank x BLOCK_N) block, so at high ranks (or on GPUs with less shared memory) STAGES deep does not fit: Triton
    refuses such a launch before it runs, and the kernel is launched again one stage shallower."""
    from triton.runtime.errors import OutOfResources
    tiles = triton.cdiv(triton.cdiv(width, BLOCK_N), split)
    grid = (triton.cdiv(tokens, BLOCK_M), triton.cdiv(width, tiles * BLOCK_N))
    rank = _rank_block(*ranks)
    key = (kernel, rank, device)
    stages = min(STAGES, _stages_that_fit.get(key, STAGES))
    while True:
        try:
            kernel[grid](*args, RANK=rank, BM=BLOCK_M, BN=BLOCK_N, TILES=tiles, STAGES=stages,
                         F32_DOT=_float32_dot(), num_warps=NUM_WARPS)
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _stages_that_fit[key] = stages


def swiglu_forward(gate, up, xa, b_gate, b_up) -> torch.Tensor:
    """silu(gate + xa_g b_gate^T) * (up + xa_u b_up^T), xa = [xa_g | xa_u]; `gate` and `up` are left as they are."""
    rank_g, rank_u = b_gate.shape[1], b_up.shape[1]
    if triton_runs(gate.device):
        gate, up, xa, b_gate, b_up = _row_major(gate, up, xa, b_gate, b_up)
        h = torch.empty_like(gate)
        tokens, width = gate.shape
        if tokens and width:
            _launch(_swiglu_forward, FORWARD_SPLIT, tokens, width, gate, up, h, xa, b_gate, b_up, tokens, width,
                    xa.stride(0), rank_g, rank_u, ranks=(rank_g, rank_u), device=gate.device)
        return h
    g, u = _with_lora_terms(gate, up, xa, b_gate, b_up)
    return (torch.nn.functional.silu(g) * u).to(gate.dtype)


def swiglu_backward(grad_h, gate, up, xa, b_gate, b_up, grad_xa_down, a_down) -> None:
    """Turns `gate` and `up` (the base products the forward kept) into their gradients, in place, for the incoming
    gradient `grad_h` + grad_xa_down a_down (the down projection's base and LoRA input gradients)."""
    rank_g, rank_u, rank_d = b_gate.shape[1], b_up.shape[1], a_down.shape[0]
    if triton_runs(gate.device):
        if not (gate.is_contiguous() and up.is_contiguous()):
            raise ValueError("swiglu_backward writes the gradients over `gate` and `up`: they must be contiguous")
        grad_h, xa, b_gate, b_up, grad_xa_down, a_down = _row_major(grad_h, xa, b_gate, b_up, grad_xa_down, a_down)
        tokens, width = gate.shape
        if tokens and width:
            _launch(_swiglu_backward, BACKWARD_SPLIT, tokens, width, grad_h, gate, up, xa, b_gate, b_up, grad_xa_down,
                    a_down, tokens, width, xa.stride(0), grad_xa_down.stride(0), rank_g, rank_u, rank_d,
                    ranks=(rank_g, rank_u, rank_d), device=gate.device)
        # Written by the kernel, behind autograd's back: a second backward over this node must see them changed.
        torch.autograd.graph.increment_version(gate)
        torch.autograd.graph.increment_version(up)
        return
    dh = grad_h.float() + grad_xa_down.float() @ a_down.float()
    g, u = _with_lora_terms(gate, up, xa, b_gate, b_up)
    sig = torch.sigmoid(g)
    silu = g * sig
    gate.copy_(dh * u * (sig + silu * (1.0 - sig)))
    up.copy_(dh * silu)


def _row_major(*tensors):
    """The kernels index every matrix as contiguous rows (a no-op for what the node passes them: matmul results and
    the adapters' kept casts)."""
    return tuple(t.contiguous() for t in tensors)


def _with_lora_terms(gate, up, xa, b_gate, b_up):
    rank_g = b_gate.shape[1]
    xa = xa.float()
    return (gate.float() + xa[:, :rank_g] @ b_gate.float().t(), up.float() + xa[:, rank_g:] @ b_up.float().t())


class _LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection a frozen base weight plus LoRA (A, B, scale)."""

    @staticmethod
    def forward(ctx, x, dtype, scalings, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down):
        hidden = x.shape[-1]
        x2 = x.reshape(-1, hidden).to(dtype)
        s_gate, s_up, s_down = scalings
        with torch.autocast(x.device.type, enabled=False):  # every operand is already in `dtype`
            a_stack = _stacked_adapters([a_gate, a_up], dtype)
            bg, bu = _adapter_weight(b_gate, dtype, s_gate), _adapter_weight(b_up, dtype, s_up)
            ad, bd = _adapter_weight(a_down, dtype), _adapter_weight(b_down, dtype, s_down)
            xa = x2 @ a_stack.t()  # (tokens x rank_g + rank_u): the input read once for both adapters
            gate, up = x2 @ w_gate.to(dtype).t(), x2 @ w_up.to(dtype).t()
            h = swiglu_forward(gate, up, xa, bg, bu)
            ha = h @ ad.t()
            out = h @ w_down.to(dtype).t()
            out.addmm_(ha, bd.t())  # 4,096 columns on the 8B: the plain accumulation, as fused_lora.py does it
        ctx.save_for_backward(x2, xa, gate, up, h, ha, a_stack, bg, bu, ad, bd, w_gate, w_up, w_down)
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = scalings, dtype, x.shape, x.dtype
        ctx.param_dtypes = [p.dtype for p in (a_gate, b_gate, a_up, b_up, a_down, b_down)]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable  # the kernels are not differentiable, and the backward writes over what it saved
    def backward(ctx, grad_out):
        x2, xa, gate, up, h, ha, a_stack, bg, bu, ad, bd, w_gate, w_up, w_down = ctx.saved_tensors
        dtype = ctx.dtype
        s_gate, s_up, s_down = ctx.scalings
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        with torch.autocast(g.device.type, enabled=False):
            grad_ha = g @ bd  # (tokens x rank_d)
            grad_b_down = (g.t() @ ha).mul_(s_down)
            grad_a_down = grad_ha.t() @ h
            grad_h = g @ w_down.to(dtype)
            swiglu_backward(grad_h, gate, up, xa, bg, bu, grad_ha, ad)
            del grad_h
            # gate and up now hold their gradients (written in place by the kernel): the gate/up siblings' backward
            grad_x, (grad_a_gate, grad_a_up), (grad_b_gate, grad_b_up) = siblings_backward(
                [gate, up], (w.to(dtype) for w in (w_gate, w_up)), x2, xa, a_stack, [bg, bu],
                [bg.shape[1], bu.shape[1]], [s_gate, s_up], ctx.needs_input_grad[0])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        grads = (grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down, grad_b_down)
        return (grad_x, None, None, None, None, None, *(t.to(d) for t, d in zip(grads, ctx.param_dtypes)))


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# MLP classes whose forward is exactly down(silu(gate(x)) * up(x)) (others with the same projections scale, clamp or
# normalise in between).
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# Above this rank the kernels' rank-wide dots would not fit shared memory even one stage deep (about 45 KB a program at
# 128): the MLP's own forward runs.
MAX_RANK = 128


def _is_silu(mlp) -> bool:
    """The MLP's activation is SiLU (PyTorch's module, or the class older transformers used for it)."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _eligible(mlp) -> bool:
    """A SwiGLU MLP whose three projections are LoRA layers the fused path covers (fused_lora.fuse_lora_layers set
    their forward), with a plain unquantized base, no bias, and no dropout."""
    if type(mlp).__name__ not in SWIGLU_MLPS:
        return False
    projections = [getattr(mlp, name, None) for name in PROJECTIONS]
    if any(p is None or getattr(p.forward, "__func__", None) is not fused_lora._fused_forward for p in projections):
        return False
    if not _is_silu(mlp) or any(_has_dropout(p) for p in projections):
        return False
    parts = [_base_parts(p) for p in projections]
    return all(part is not None and part[1] is None and part[2] is None for part in parts)


def _forward_parts(mlp, x: torch.Tensor):
    """The tensors and scales for `_LoraSwiGLU` when this call can take the path now, else None."""
    dtype = fused_lora._compute_dtype(x)
    if dtype not in SIXTEEN_BIT or not path_runs(x.device):
        return None
    tensors, scalings = [], []
    for name in PROJECTIONS:
        layer = getattr(mlp, name)
        parts = _runnable(layer, allow_dropout=False)
        if parts is None:  # adapters disabled or merged, another adapter active: the MLP's own forward
            return None
        adapter, weight, bias, quant_state = parts
        if bias is not None or quant_state is not None or layer.r[adapter] > MAX_RANK:
            return None
        tensors.append((weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))
        scalings.append(float(layer.scaling[adapter]))
    (wg, ag, bg), (wu, au, bu), (wd, ad, bd) = tensors
    return dtype, tuple(scalings), (wg, wu, wd, ag, bg, au, bu, ad, bd)


def fuse_lora_mlps(model) -> int:
    """Route every eligible MLP of `model` through `_LoraSwiGLU`; returns how many. Called once the trainer is built
    (Liger replaces the MLP's forward then), and before the MLPs are tiled, so that the tiles wrap this forward."""
    fused = 0
    for module in model.modules():
        if getattr(module, "_studio_lora_mlp", False) or not _eligible(module):
            continue
        inner = module.forward

        def forward(x, mlp=module, inner=inner):
            parts = _forward_parts(mlp, x)
            if parts is None:
                return inner(x)
            dtype, scalings, tensors = parts
            return _LoraSwiGLU.apply(x, dtype, scalings, *tensors)

        module.forward = forward
        module._studio_lora_mlp = True
        fused += 1
    return fused

