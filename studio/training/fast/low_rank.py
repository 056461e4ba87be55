"""out += left @ right for a thin product (left: tokens x r, right: r x width, r at most 128): how every fused LoRA
projection adds its rank-r term onto its base result, and its LoRA input gradient onto the base one.

cuBLAS treats such a product as a matmul with K = r and runs it far below the memory's speed (bench/NOTES.md: on the
H200, 60 us to add a rank-16 term onto an 8,192 x 4,096 bf16 matrix, against 36 us for a pass that only reads and
writes that matrix). The kernel here streams the matrix in tiles and adds each tile's rank-r dot on the tensor cores
as it goes (40 us there). It runs where the studio's Triton kernels run and the plan turns it on (`use_kernel`), for
16-bit matrices whose rows are contiguous; anything else is PyTorch's addmm_. Under triton's interpreter the dot takes
float32 operands (its bf16 dot is wrong), which is how the tests check the kernel on the CPU.
"""

from __future__ import annotations

import torch

from studio.training.fast.triton_support import interpreted, tl, triton, triton_runs

# The tiling the bench's sweep found fastest on the H200 for 4,096- and 14,336-wide matrices, ranks 16 to 64
# (bench/lowrank_check.py).
BLOCK_M = 64
BLOCK_N = 128
NUM_WARPS = 4
# Above this rank the dot's operands outgrow shared memory on smaller GPUs, and the product is no longer thin.
MAX_RANK = 128
SIXTEEN_BIT = (torch.bfloat16, torch.float16)

_enabled = False


def use_kernel(on: bool) -> None:
    """Turn the kernel on or off for this process (the plan's `lora_accumulate_kernel`; a run is its own process)."""
    global _enabled
    _enabled = bool(on)


if triton is not None:
    @triton.jit
    def _accumulate(out_ptr, left_ptr, right_ptr, tokens, width, rank: tl.constexpr, out_stride, left_row_stride,
                    left_rank_stride, right_rank_stride, right_col_stride, RANK: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, F32_DOT: tl.constexpr):
        # `rank` is a compile-time constant (a few per run): the factors' loads are then whole contiguous runs.
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        r = tl.arange(0, RANK)
        row_in, col_in, rank_in = rows < tokens, cols < width, r < rank
        left = tl.load(left_ptr + rows[:, None] * left_row_stride + r[None, :] * left_rank_stride,
                       mask=row_in[:, None] & rank_in[None, :], other=0.0)
        right = tl.load(right_ptr + r[:, None] * right_rank_stride + cols[None, :] * right_col_stride,
                        mask=rank_in[:, None] & col_in[None, :], other=0.0)
        inside = row_in[:, None] & col_in[None, :]
        at = rows[:, None] * out_stride + cols[None, :]
        tile = tl.load(out_ptr + at, mask=inside, other=0.0).to(tl.float32)
        if F32_DOT:
            tile = tl.dot(left.to(tl.float32), right.to(tl.float32), acc=tile)
        else:
            tile = tl.dot(left, right, acc=tile)
        tl.store(out_ptr + at, tile.to(out_ptr.dtype.element_ty), mask=inside)


def rank_block(*ranks: int) -> int:
    """The rank dimension of a kernel's dot: a power of two, at least 16 (the tensor cores' smallest)."""
    return max(16, 1 << (max(ranks) - 1).bit_length())


def _kernel_takes(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    return (_enabled and out.dim() == 2 and out.dtype in SIXTEEN_BIT and left.dtype == right.dtype == out.dtype
            and out.stride(1) == 1 and 0 < left.shape[1] <= MAX_RANK and triton_runs(out.device))


def accumulate_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out += left @ right, in place; returns `out` (as addmm_ does)."""
    if not _kernel_takes(out, left, right):
        return out.addmm_(left, right)
    tokens, width = out.shape
    rank = left.shape[1]
    if tokens and width:
        grid = (triton.cdiv(tokens, BLOCK_M), triton.cdiv(width, BLOCK_N))
        _accumulate[grid](out, left, right, tokens, width, rank, out.stride(0), left.stride(0), left.stride(1),
                          right.stride(0), right.stride(1), RANK=rank_block(rank), BM=BLOCK_M, BN=BLOCK_N,
                          F32_DOT=interpreted(), num_warps=NUM_WARPS)
    torch.autograd.graph.increment_version(out)  # written behind autograd's back, as an in-place op would count it
    return out
