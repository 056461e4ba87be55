"""Attention over packed rows as one variable-length FlashAttention call each way.

A packed row holds several conversations, and attention must not reach from one into another. Flex attention
keeps them apart with a block mask that transformers rebuilds every step (a compiled call, plus a wait on the
GPU to find where the packed conversations start), and every one of its calls goes through dynamo's guards and
AOT autograd's Python wrappers: host time that QLoRA, bound by the host, cannot spare (bench/NOTES.md).

PyTorch ships FlashAttention-2's variable-length kernel (`aten::_flash_attention_forward` with cumulative
sequence lengths). Its forward and its backward are one dispatcher call each, with autograd in C++, and it
needs no mask at all: TRL's padding-free collator already works out where each conversation starts, on the
CPU (`cu_seq_lens_q`, `max_length_q`), and the model hands those to every attention call. No mask function is
registered for this attention, so transformers builds none.

The kernel runs on NVIDIA GPUs of compute capability 8.0 (Ampere) and newer, in bf16 or fp16, for head sizes
up to 256; `supported` says whether a model and GPU qualify, `kernel_runs` tries the kernel once on the GPU,
and the planner uses flex attention wherever either says no.

A row that is one long sequence (long documents, one to a row) needs no boundaries at all: plain causal attention.
There cuDNN's fused attention (through SDPA) is much faster than FlashAttention-2 on Hopper, and at long lengths
attention is most of the step, so the plan sends such rows to it (`long_rows_cudnn`: from that many tokens on, where
`cudnn_runs` found the kernel working). A row of one sequence is told by the shape of its boundaries (two entries),
without reading them from the GPU.

Where the `flash-attn-4` package is installed on a Hopper or Blackwell GPU, the packed rows go through
FlashAttention-4's variable-length kernels instead (`flash4`): the same boundaries, no mask, and on Hopper the
warp-group matrix instructions FlashAttention-2 does not use; on the H200 it took about a fifth less time and energy
on the bench's 8B rows and two fifths less time on its 1B rows (bench/NOTES.md, session 17). Its kernels are compiled
by CuTe's Python DSL at their first call (seconds to tens of seconds), kept in a cache folder under the studio's data
folder for the next run. `flash4_runs` tries them once against FlashAttention-2 before the plan relies on them. The
plan uses them only where no layer is checkpointed: with checkpointing they measured slower (plan.FLASH4_CHECKPOINTED).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import torch

from studio.shapes import head_dim_of

NAME = "packed_varlen"  # no "flash" in it: transformers takes such names for the flash-attn package
# Rows of one sequence at least this long go through cuDNN's attention (0: never); set by register().
_cudnn_from = 0
# Packed rows go through FlashAttention-4's kernels (flash4); set by register().
_flash4 = False
# GPU generations (compute capability majors) FlashAttention-4 has kernels for: Hopper and Blackwell.
FLASH4_GENERATIONS = (9, 10)


def supported(config, capability: tuple[int, int] | None, dtype: torch.dtype | None) -> bool:
    """Whether this attention computes exactly what `config`'s model computes, on a GPU of `capability`.
    Models with sliding windows or soft-capped logits keep an attention that knows them. (The planner also
    runs the kernel once, `kernel_runs`, before relying on it.)"""
    if capability is None or tuple(capability) < (8, 0) or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    head_dim = head_dim_of(config)
    if not head_dim or head_dim > 256 or head_dim % 8:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not any(getattr(config, name, None) for name in (
        "attn_logit_softcapping", "final_logit_softcapping", "attention_chunk_size"))


@functools.lru_cache(maxsize=None)
def kernel_runs(head_dim: int, dtype: torch.dtype) -> bool:
    """Run the kernel once, forward and backward, on a few tokens of this head size and precision on the
    current GPU. Which head sizes FlashAttention-2 trains with differs between GPU generations, and a PyTorch
    build may leave the kernel out: where it does not run, the plan takes flex attention rather than the run
    failing at its first step."""
    try:
        query = torch.randn((16, 2, head_dim), device="cuda", dtype=dtype, requires_grad=True)
        key = torch.randn((16, 1, head_dim), device="cuda", dtype=dtype, requires_grad=True)
        bounds = torch.tensor([0, 9, 16], device="cuda", dtype=torch.int32)
        out = flash_varlen(query, key, key, bounds, 9, 0.0, None)
        out.float().sum().backward()
        return bool(torch.isfinite(out).all()) and query.grad is not None
    except Exception:  # noqa: BLE001 - any failure of the kernel here means: do not plan on it
        return False


@functools.lru_cache(maxsize=None)
def cudnn_runs(head_dim: int, dtype: torch.dtype) -> bool:
    """Run SDPA's cuDNN attention once, forward and backward, causal with grouped-query heads, on inputs laid out as
    transformers' attention hands them over (heads and tokens transposed views), against the variable-length kernel.
    cuDNN's support differs between its versions and GPUs: where it does not run or disagrees, it is not planned."""
    try:
        query = torch.randn((1, 24, 4, head_dim), device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
        key = torch.randn((1, 24, 2, head_dim), device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
        out = _cudnn_causal(query, key, key, 0.0, None)
        out.float().sum().backward()
        bounds = torch.tensor([0, 24], device="cuda", dtype=torch.int32)
        want = flash_varlen(query.transpose(1, 2)[0], key.transpose(1, 2)[0], key.transpose(1, 2)[0], bounds, 24,
                            0.0, None)
        close = torch.allclose(out[0].float(), want.float(), atol=2e-2, rtol=2e-2)
        return bool(close and query.grad is not None and torch.isfinite(query.grad).all())
    except Exception:  # noqa: BLE001 - any failure of the kernel here means: do not plan on it
        return False


def _cudnn_causal(query, key, value, dropout: float, scale):
    """Causal attention of whole rows through SDPA's cuDNN kernel: (batch x heads x tokens x d) in, (batch x tokens x
    heads x d) out. Grouped-query heads are read by the kernel (enable_gqa), not copied."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                               scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def flash_varlen(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, dropout: float, scale):
    """Causal attention within each packed sequence: (tokens x heads x head_dim) in, the same out.
    Grouped-query attention needs no copies: the kernel reads each key/value head for its group of queries."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seq_lens, cu_seq_lens, max_length,
                                                   max_length, dropout, True, False, scale=scale)[0]


def flash4_installed(capability: tuple[int, int] | None) -> bool:
    """Whether FlashAttention-4 could run here: the package is installed and the GPU is of a generation it has kernels
    for. (`flash4_runs` then tries it.)"""
    if capability is None or capability[0] not in FLASH4_GENERATIONS:
        return False
    try:  # by its distribution: FlashAttention-2's `flash-attn` package has the same import name
        importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def flash4_runs(query_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str = "cuda") -> bool:
    """Run FlashAttention-4's variable-length kernels once, forward and backward, on packed sequences with this model's
    heads, against FlashAttention-2's. Its kernels are compiled per head size, grouping of heads and precision, and
    also by whether the longest sequence fits one tile and whether gradients are wanted: one sequence longer than any
    tile with short ones beside it, as in packed rows, and a forward without gradients (evaluation) compile and check
    the kernels a run will mostly use, so it pays their compile here. Any failure, a version without these kernels or a
    disagreement: not planned."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        tokens, bounds_list = 340, [0, 300, 333, 340]
        q = torch.randn((tokens, query_heads, head_dim), device=device, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn((tokens, kv_heads, head_dim), device=device, dtype=dtype, generator=gen).requires_grad_(True)
        v = torch.randn((tokens, kv_heads, head_dim), device=device, dtype=dtype, generator=gen).requires_grad_(True)
        grad = torch.randn((tokens, query_heads, head_dim), device=device, dtype=dtype, generator=gen)
        bounds = torch.tensor(bounds_list, device=device, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds_list, bounds_list[1:]))
        out4 = flash4_varlen(q, k, v, bounds, longest, None)
        got = torch.autograd.grad(out4, (q, k, v), grad)
        with torch.no_grad():
            inference = flash4_varlen(q, k, v, bounds, longest, None)
        out2 = flash_varlen(q, k, v, bounds, longest, 0.0, None)
        want = torch.autograd.grad(out2, (q, k, v), grad)
        pairs = [(out4.detach(), out2.detach()), (inference, out2.detach()), *zip(got, want)]
        # Against the largest value: the two kernels round bf16 gradients differently (on the H200 up to 5e-3 of the
        # largest value, bench/NOTES.md), which an element-wise tolerance would fail on values near zero.
        return all(bool(torch.isfinite(a).all()) and float((a.float() - b.float()).abs().max())
                   <= 2e-2 * float(b.float().abs().max()) for a, b in pairs)
    except Exception:  # noqa: BLE001 - any failure of the kernels here means: do not plan on them
        return False


def flash4_varlen(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, scale):
    """FlashAttention-4's causal attention within each packed sequence: (tokens x heads x head_dim) in, the same out.
    Grouped-query heads are read by the kernel, not copied. (No dropout: the kernels have none.)"""
    _cache_compiled_kernels()
    from flash_attn.cute.interface import flash_attn_varlen_func
    out = flash_attn_varlen_func(query, key, value, cu_seqlens_q=cu_seq_lens, cu_seqlens_k=cu_seq_lens,
                                 max_seqlen_q=max_length, max_seqlen_k=max_length, softmax_scale=scale, causal=True)
    return out[0] if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=None)
def _cache_compiled_kernels() -> None:
    """FlashAttention-4 keeps its compiled kernels on disk only where asked to, before its first import: a folder of
    the studio's data folder, so that only the first run on a machine waits for the compiler."""
    from studio.paths import studio_home
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(studio_home() / "cache" / "flash-attn-4"))


def _give_up_flash4(error: Exception) -> None:
    """A FlashAttention-4 call that failed in its forward leaves no graph behind: the run goes on with
    FlashAttention-2 for the rest of the process, and says so, rather than failing a step the probe found working."""
    global _flash4
    _flash4 = False
    import warnings
    warnings.warn(f"FlashAttention-4 failed ({type(error).__name__}: {str(error)[:200]}); training goes on with "
                  "FlashAttention-2", RuntimeWarning, stacklevel=2)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention signature: query (batch x heads x tokens x head_dim), key and value the same
    with their own head count; returns (batch x tokens x heads x head_dim) and no attention weights."""
    if cu_seq_lens_q is None:
        return _unpacked(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:  # the padding-free collator puts a whole batch in one row; the boundaries index that row
        raise ValueError(f"packed sequence boundaries need a batch flattened into one row, got {query.shape[0]} rows")
    if _cudnn_from and cu_seq_lens_q.shape[0] == 2 and query.shape[2] >= _cudnn_from:
        # One sequence filling the row (the collator adds no padding here): plain causal attention.
        return _cudnn_causal(query, key, value, dropout, scaling), None
    # (1 x heads x tokens x d) -> (tokens x heads x d): a view (last dimension contiguous), no copy.
    q, k, v = query.transpose(1, 2)[0], key.transpose(1, 2)[0], value.transpose(1, 2)[0]
    if _flash4 and not dropout:
        try:
            return flash4_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling).unsqueeze(0), None
        except RuntimeError as error:  # e.g. its compile cache's lock held by another process past its wait
            _give_up_flash4(error)
    return flash_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), dropout, scaling).unsqueeze(0), None


def _unpacked(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """A batch without packing information (a plain forward on the model): each row is one causal sequence.
    No mask reaches this attention (none is registered for it), so a row with padding cannot be told apart."""
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed_varlen attention trains on packed rows; it does not run with a key/value cache. "
                         "Load the model with attn_implementation='sdpa' to generate.")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True,
                                  **kwargs)


def register(long_rows_cudnn: int = 0, flash4: bool = False) -> None:
    """Make NAME a valid `attn_implementation` for every model (idempotent). Called by apply.py when a plan
    uses this attention, never at import. `long_rows_cudnn`: rows of one sequence of at least this many tokens go
    through cuDNN's attention (0: none). `flash4`: packed rows go through FlashAttention-4's kernels."""
    global _cudnn_from, _flash4
    _cudnn_from, _flash4 = long_rows_cudnn, flash4
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, varlen_attention_forward)
