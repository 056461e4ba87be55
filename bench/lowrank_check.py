"""Times the memory-bound kernels that add a rank-r product onto a large matrix, in the tilings and loop forms Triton
can be asked for, against cuBLAS's addmm_ and against plain PyTorch ops that move the same bytes.

Two families, on the 8B LoRA shapes (8,192 tokens):
  accumulate:  C (tokens x width, bf16) += A (tokens x r) @ B^T (width x r): what fused_lora.py's addmm_ does for
               every projection's LoRA term (4,096 wide: q, o, down, and the stacked q/k/v input gradient; 14,336
               wide: gate and up outside lora_mlp.py). The kernels for it live here.
  swiglu:      lora_mlp.py's forward, h = silu(G + A_g B_g^T) * (U + A_u B_u^T), and its backward, in the forms its
               module constants allow, against Liger's SwiGLU (the same bytes without the LoRA terms).

Each variant is checked against a float32 reference first (the largest error, relative to the largest value), then
timed with triton.testing.do_bench. "tile" variants (accumulate only) give each program one (BM x BN) tile; "rows"
variants give each program BM rows and a run of column tiles that it walks in a loop (tl.range with num_stages, which
lets Triton fetch the next tiles asynchronously into shared memory and read them back in the dot's layout).

  python3 bench/lowrank_check.py [--quick] [--families accumulate,swiglu] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _accumulate_onto(c_ptr, a, b_ptr, rows, row_in, cols, N, R: tl.constexpr, ADD_AFTER: tl.constexpr):
    """C's (rows x cols) tile += a @ B[cols]^T, a being the rows' (BM x R) block of A."""
    r = tl.arange(0, R)
    bt = tl.load(b_ptr + cols[None, :] * R + r[:, None], mask=cols[None, :] < N, other=0.0)
    inside = row_in[:, None] & (cols[None, :] < N)
    at = rows[:, None] * N + cols[None, :]
    c = tl.load(c_ptr + at, mask=inside, other=0.0)
    if ADD_AFTER:
        out = c.to(tl.float32) + tl.dot(a, bt)
    else:
        out = tl.dot(a, bt, acc=c.to(tl.float32))
    tl.store(c_ptr + at, out.to(c_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rows_of_a(a_ptr, M, R: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_in = rows < M
    r = tl.arange(0, R)
    return rows, row_in, tl.load(a_ptr + rows[:, None] * R + r[None, :], mask=row_in[:, None], other=0.0)


@triton.jit
def _accumulate_tile(c_ptr, a_ptr, b_ptr, M, N, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     ADD_AFTER: tl.constexpr):
    rows, row_in, a = _rows_of_a(a_ptr, M, R, BM)
    _accumulate_onto(c_ptr, a, b_ptr, rows, row_in, tl.program_id(1) * BN + tl.arange(0, BN), N, R, ADD_AFTER)


@triton.jit
def _accumulate_rows(c_ptr, a_ptr, b_ptr, M, N, chunk, TILES: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, ADD_AFTER: tl.constexpr, STAGES: tl.constexpr):
    rows, row_in, a = _rows_of_a(a_ptr, M, R, BM)
    first = tl.program_id(1) * chunk
    for i in tl.range(0, TILES, num_stages=STAGES):
        _accumulate_onto(c_ptr, a, b_ptr, rows, row_in, first + i * BN + tl.arange(0, BN), N, R, ADD_AFTER)


def _chunk(width: int, split: int, bn: int) -> int:
    return triton.cdiv(triton.cdiv(width, split), bn) * bn


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


class Results(list):
    """The rows, each also appended to the jsonl file as it comes (a run cut short keeps what it measured)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(row, device=torch.cuda.get_device_name(), torch=torch.__version__,
                                    triton=triton.__version__)) + "\n")


def _time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def _recorder(results: list, family: str, shape: str, mbytes: float):
    """record(name, ms, error): one row of `family` for a kernel that moves `mbytes` MB, printed as it comes."""
    def record(name: str, ms: float, err: float) -> None:
        results.append(dict(family=family, shape=shape, variant=name, us=round(ms * 1e3, 1),
                            tb_s=round(mbytes / ms / 1e3, 2), error=err))
        print(f"{shape:22} {name:58} {ms * 1e3:8.1f} us {mbytes / ms / 1e3:5.2f} TB/s  err {err:.1e}", flush=True)
    return record


def row_forms(quick: bool):
    """(BM, BN, STAGES, split, warps) of the "rows" forms the SwiGLU kernels are swept over."""
    rows, stages_list, splits = [(16, 128), (32, 64), (32, 128), (64, 64)], (1, 2, 3), (1, 4)
    if quick:
        rows, stages_list, splits = rows[2:3], (2,), (4,)
    for bm, bn in rows:
        for stages in stages_list:
            for split in splits:
                for warps in (4, 8):
                    yield bm, bn, stages, split, warps


@contextlib.contextmanager
def lora_mlp_form(bm: int, bn: int, stages: int, split: int, warps: int):
    """lora_mlp.py's kernels in another form for the time of the block (its module constants); yields the form's
    name. The depths lora_mlp remembers after a launch did not fit are per form: kept apart from the other forms'."""
    from studio.training.fast import lora_mlp
    names = ("BLOCK_M", "BLOCK_N", "STAGES", "FORWARD_SPLIT", "BACKWARD_SPLIT", "NUM_WARPS")
    kept = [getattr(lora_mlp, n) for n in names]
    kept_depths = dict(lora_mlp._stages_that_fit)
    for n, v in zip(names, (bm, bn, stages, split, split, warps)):
        setattr(lora_mlp, n, v)
    lora_mlp._stages_that_fit.clear()
    try:
        yield f"rows BM={bm} BN={bn} STAGES={stages} split={split} w{warps}"
    finally:
        for n, v in zip(names, kept):
            setattr(lora_mlp, n, v)
        lora_mlp._stages_that_fit.clear()
        lora_mlp._stages_that_fit.update(kept_depths)


def _rows_grid(tokens: int, width: int, bm: int, bn: int, split: int) -> tuple:
    """(grid, columns a program walks, column tiles a program walks) of a "rows" form."""
    chunk = _chunk(width, split, bn)
    return (triton.cdiv(tokens, bm), triton.cdiv(width, chunk)), chunk, chunk // bn


def _measure(record, shape: str, name: str, launch, check) -> None:
    """Checks `launch` (check(launch) gives its error), times it and records it; a tiling Triton cannot compile
    (shared memory, registers) is reported and skipped."""
    try:
        err = check(launch)
        record(name, _time_ms(launch), err)
    except Exception as exc:
        print(f"{shape:22} {name:58} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


def accumulate_variants(quick: bool):
    tiles = [(32, 128), (64, 128), (64, 64), (128, 64), (32, 256), (16, 128), (16, 256)]
    rows = [(16, 128), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128)]
    if quick:
        tiles, rows = tiles[:2], rows[2:3]
    yield "tile", dict(BM=32, BN=128, ADD_AFTER=True, warps=4)
    for bm, bn in tiles:
        for warps in (4, 8):
            yield "tile", dict(BM=bm, BN=bn, ADD_AFTER=False, warps=warps)
    for bm, bn in rows:
        for stages in (1, 2, 3):
            for split in (1, 4):
                for warps in (4, 8):
                    yield "rows", dict(BM=bm, BN=bn, ADD_AFTER=False, STAGES=stages, split=split, warps=warps)


def run_accumulate(tokens: int, width: int, rank: int, quick: bool, results: list) -> None:
    torch.manual_seed(0)
    a = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(width, rank, device="cuda", dtype=torch.bfloat16) / rank
    c0 = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    want = c0.float() + a.float() @ b.float().t()
    c = c0.clone()
    shape = f"{tokens}x{width} r{rank}"
    mbytes = 2 * c.numel() * c.element_size() / 1e6
    record = _recorder(results, "accumulate", shape, mbytes)

    c.copy_(c0)
    c.addmm_(a, b.t())
    record("cuBLAS addmm_", _time_ms(lambda: c.addmm_(a, b.t())), _error(c.copy_(c0).addmm_(a, b.t()), want))
    record("same bytes: c.mul_(1.0)", _time_ms(lambda: c.mul_(1.0)), 0.0)

    def check(launch):
        c.copy_(c0)
        launch()
        return _error(c, want)

    for form, p in accumulate_variants(quick):
        p = dict(p)
        warps = p.pop("warps")
        name = form + " " + " ".join(f"{k}={v}" for k, v in p.items()) + f" w{warps}"
        if form == "tile":
            grid = (triton.cdiv(tokens, p["BM"]), triton.cdiv(width, p["BN"]))
            launch = lambda: _accumulate_tile[grid](c, a, b, tokens, width, R=rank, num_warps=warps, **p)
        else:
            grid, chunk, tiles = _rows_grid(tokens, width, p["BM"], p["BN"], p.pop("split"))
            launch = lambda: _accumulate_rows[grid](c, a, b, tokens, width, chunk, tiles, R=rank, num_warps=warps, **p)
        _measure(record, shape, name, launch, check)


def run_swiglu(tokens: int, width: int, rank: int, quick: bool, results: list) -> None:
    torch.manual_seed(0)
    g = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(tokens, 2 * rank, device="cuda", dtype=torch.bfloat16)
    bg = torch.randn(width, rank, device="cuda", dtype=torch.bfloat16) / rank
    bu = torch.randn(width, rank, device="cuda", dtype=torch.bfloat16) / rank
    gf = g.float() + a[:, :rank].float() @ bg.float().t()
    want = torch.nn.functional.silu(gf) * (u.float() + a[:, rank:].float() @ bu.float().t())
    h = torch.empty_like(g)
    shape = f"{tokens}x{width} r{rank}"
    mbytes = 3 * g.numel() * g.element_size() / 1e6
    record = _recorder(results, "swiglu", shape, mbytes)

    record("same bytes: torch.mul(g, u, out=h)", _time_ms(lambda: torch.mul(g, u, out=h)), 0.0)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        record("Liger SwiGLU forward (no LoRA terms)", _time_ms(lambda: LigerSiLUMulFunction.apply(g, u)), 0.0)
    except ImportError:
        pass
    from studio.training.fast import lora_mlp
    launch = lambda: lora_mlp.swiglu_forward(g, u, a, bg, bu)
    record("studio lora_mlp.swiglu_forward", _time_ms(launch), _error(launch(), want))
    run_swiglu_backward(g, u, a, bg, bu, quick, results, shape)
    for form in row_forms(quick):
        with lora_mlp_form(*form) as name:
            _measure(record, shape, name, launch, lambda launch: _error(launch(), want))


def run_swiglu_backward(g0, u0, a, bg, bu, quick: bool, results: list, shape: str) -> None:
    tokens, width = g0.shape
    rank = bg.shape[1]
    dh = torch.randn_like(g0)
    gd = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    ad = torch.randn(rank, width, device="cuda", dtype=torch.bfloat16) / rank
    g, u = g0.clone(), u0.clone()
    mbytes = 5 * g.numel() * g.element_size() / 1e6
    dhf = dh.float() + gd.float() @ ad.float()
    gf = g0.float() + a[:, :rank].float() @ bg.float().t()
    uf = u0.float() + a[:, rank:].float() @ bu.float().t()
    sig = torch.sigmoid(gf)
    want_g, want_u = dhf * uf * (sig + gf * sig * (1 - sig)), dhf * gf * sig
    record = _recorder(results, "swiglu-backward", shape, mbytes)

    def check(launch):
        g.copy_(g0), u.copy_(u0)
        launch()
        return max(_error(g, want_g), _error(u, want_u))

    try:
        from liger_kernel.ops.swiglu import swiglu_backward as liger_backward
        record("backward: Liger SwiGLU (no LoRA terms)", _time_ms(lambda: liger_backward(g, u, dh)), 0.0)
    except ImportError:
        pass
    from studio.training.fast import lora_mlp
    launch = lambda: lora_mlp.swiglu_backward(dh, g, u, a, bg, bu, gd, ad)
    err = check(launch)
    record("backward: studio lora_mlp.swiglu_backward", _time_ms(launch), err)
    for form in row_forms(quick):
        with lora_mlp_form(*form) as name:
            _measure(record, shape, "backward " + name, launch, check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few variants only (a smoke run)")
    parser.add_argument("--families", default="accumulate,swiglu", help="which families to run, comma-separated")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = Results(os.path.join(args.out, f"lowrank-check-{time.strftime('%Y%m%d-%H%M')}.jsonl"))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    families = args.families.split(",")
    if "accumulate" in families:
        run_accumulate(8192, 4096, 16, args.quick, results)
        run_accumulate(8192, 4096, 64, True, results)  # q/k/v input gradient: 3 x 16 padded to 64
        run_accumulate(8192, 14336, 16, True, results)
    if "swiglu" in families:
        run_swiglu(8192, 14336, 16, args.quick, results)
    print("results:", results.path)
    for family in ("accumulate", "swiglu", "swiglu-backward"):
        for shape in sorted({r["shape"] for r in results if r["family"] == family}):
            best = sorted((r for r in results if r["family"] == family and r["shape"] == shape
                           and r["error"] < 1e-2), key=lambda r: r["us"])[:6]
            print(f"best {family} {shape}:", *(f"\n  {r['us']:8.1f} us {r['tb_s']:5.2f} TB/s  {r['variant']}"
                                                for r in best))


if __name__ == "__main__":
    main()
