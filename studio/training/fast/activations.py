"""Two ways to keep less on the GPU for long sequences and small cards, each chosen by the planner (plan.py) only
where the memory estimate says the run needs it, since each costs time.

Offloaded checkpoints. A checkpointed decoder layer keeps only its input for the backward, but at 64k tokens that
input is 512 MiB on an 8B model, 16 GiB over 32 layers: more than the card the user asked for. Here each
checkpointed layer's input is copied to pinned host memory on a side stream while the GPU goes on with the next
layers, and the GPU copy is let go; in the backward it is copied back (the layer before it is fetched ahead, while
this one recomputes) and the layer runs its forward again with gradients. The copies overlap the compute: a
layer's input moves over PCIe in a few percent of the time the layer takes to recompute.

The layer runs through an autograd Function of its own (the reentrant style of checkpointing): the forward runs
without gradients, and the backward recomputes the layer and back-propagates through it at once, the LoRA weights
accumulating their gradients as leaves. So it is for one process only (DDP's and FSDP's hooks expect one graph),
which the planner checks.

Tiled MLP. The recomputed layer holds its full set of activations, and at long lengths the MLP's are most of it
(gate, up and their product: three intermediate widths per token, 14,336 each on an 8B model, against one hidden
width of input). The MLP is run over the sequence in tiles: forward without gradients, backward tile by tile, each
tile recomputed and back-propagated before the next, so one tile's activations live at a time. Token by token the
MLP is independent, so the result is the same as the whole sequence at once.

Both restore the autocast state and the random state the forward ran under, so the recompute computes what the
first forward did (LoRA dropout included).
"""

from __future__ import annotations

import functools
import time

import torch

# Host buffers for offloaded layer inputs, one per checkpointed layer, reused from step to step (pinning memory is
# slow, seconds per 10 GB: bench/NOTES.md); a longer input replaces its slot's buffer.
_host_buffers: dict[int, torch.Tensor] = {}
# Seconds this process has spent pinning them: host time, during which the GPU may go on with work already queued.
pinning_seconds = 0.0


def _pinned(slot: int, like: torch.Tensor) -> torch.Tensor:
    """A pinned host buffer for `like`, exactly its size. torch's pinned allocator rounds every block up to a power
    of two (a 3.3 GB layer input at 400k tokens takes 4 GB of host memory, 32 layers 128 GB); pinning a plain host
    tensor with cudaHostRegister takes exactly what is asked."""
    numel = like.numel()
    kept = _host_buffers.get(slot)
    if kept is not None and kept.numel() >= numel and kept.dtype == like.dtype:
        return kept[:numel].view(like.shape)
    if kept is not None:
        _unpin(kept)
    global pinning_seconds
    started = time.perf_counter()
    buffer = torch.empty(numel, dtype=like.dtype)
    if torch.cuda.is_available():
        result = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
        # No pinned memory to be had: the copies are then made without overlap, still correct.
        if int(getattr(result, "value", result)) != 0:
            buffer = torch.empty(numel, dtype=like.dtype)
        else:
            buffer._studio_registered = True
    pinning_seconds += time.perf_counter() - started
    _host_buffers[slot] = buffer
    return buffer.view(like.shape)


def _unpin(buffer: torch.Tensor) -> None:
    if getattr(buffer, "_studio_registered", False):
        torch.cuda.synchronize()  # no copy may still be reading or writing it
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def pin_host_buffers(model, tokens: int, dtype: torch.dtype) -> int:
    """Pin, now, the host buffers every offloaded layer of `model` will need for `tokens`-token inputs (batch x
    sequence) of `dtype`, instead of in the first step's forward; returns how many bytes are pinned. Pinning is slow,
    so a caller that times steps can keep it out of them; the pinned memory is then held before the trainer starts its
    data loader's processes."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if hidden and isinstance(func, functools.partial) and func.func is offloaded_checkpoint:
            _pinned(func.keywords["slot"], torch.empty((tokens, hidden), dtype=dtype, device="meta"))
    return sum(b.numel() * b.element_size() for b in _host_buffers.values())


def release_host_buffers() -> None:
    """Give the host memory back (a run ended)."""
    for buffer in _host_buffers.values():
        _unpin(buffer)
    _host_buffers.clear()


class _Stream:
    """The side stream the copies run on (one per process), created on first use."""
    stream = None

    @classmethod
    def get(cls):
        if cls.stream is None:
            cls.stream = torch.cuda.Stream()
        return cls.stream


class _Offloaded:
    """One checkpointed layer input, on the host; `fetch` brings it back (from a prefetch when one was started)."""

    def __init__(self, slot: int, hidden: torch.Tensor):
        self.shape, self.dtype, self.device = hidden.shape, hidden.dtype, hidden.device
        self.on_gpu = hidden.device.type == "cuda"
        self.ready = None  # the event after which the host copy is complete
        self.prefetched = None
        self.prefetch_done = None
        if not self.on_gpu:  # CPU runs (the tests): a plain copy, the same arithmetic
            self.host = hidden.detach().clone()
            return
        self.host = _pinned(slot, hidden)
        side = _Stream.get()
        side.wait_stream(torch.cuda.current_stream(hidden.device))  # the layer's input is written by now
        with torch.cuda.stream(side):
            self.host.copy_(hidden.detach(), non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        hidden.record_stream(side)  # the allocator must not hand its memory out until the copy has read it

    def prefetch(self) -> None:
        if not self.on_gpu or self.prefetched is not None:
            return
        side = _Stream.get()
        main = torch.cuda.current_stream(self.device)
        gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            side.wait_event(self.ready)
            gpu.copy_(self.host, non_blocking=True)
            self.prefetch_done = torch.cuda.Event()
            self.prefetch_done.record(side)
        gpu.record_stream(side)
        self.prefetched = gpu

    def fetch(self) -> torch.Tensor:
        if not self.on_gpu:
            return self.host
        self.prefetch()
        main = torch.cuda.current_stream(self.device)
        main.wait_event(self.prefetch_done)
        gpu, self.prefetched = self.prefetched, None
        return gpu


# The offloaded inputs of the forward in flight, in layer order: the backward of one layer prefetches the one
# before it. Cleared as the backward consumes them (and by the next forward's first layer).
_in_flight: list = []


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, slot, grad_anchor, hidden, *args):
        ctx.run, ctx.args = run, args
        ctx.hidden_needs_grad = hidden.requires_grad
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = _rng_state(hidden.device)
        if slot == 0:
            _in_flight.clear()
        ctx.saved = _Offloaded(slot, hidden)
        ctx.before = _in_flight[-1] if _in_flight else None
        _in_flight.append(ctx.saved)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.before is not None:
            ctx.before.prefetch()  # the next layer the backward reaches, copied while this one recomputes
        hidden = ctx.saved.fetch().detach().requires_grad_(ctx.hidden_needs_grad)
        ctx.saved = None
        with torch.enable_grad(), _restored(ctx.autocast, ctx.rng, hidden.device):
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, hidden.grad if ctx.hidden_needs_grad else None) + (None,) * len(ctx.args)


# An input that always needs a gradient, so that the layer's output does too even where its hidden state does not
# (the first layer of a LoRA model, whose embeddings are frozen): the LoRA weights inside are not inputs of the
# Function, and without it autograd would not call the backward at all.
_anchors: dict = {}


def _anchor(device) -> torch.Tensor:
    key = str(device)
    if key not in _anchors:
        _anchors[key] = torch.zeros((), device=device, requires_grad=True)
    return _anchors[key]


def offloaded_checkpoint(run, hidden, *args, slot: int = 0, fallback=None, layer=None):
    """transformers' `_gradient_checkpointing_func` signature: `run` is the layer's forward with its keyword
    arguments bound. Anything other than one differentiable hidden state (a tensor argument that needs a gradient)
    goes to the ordinary checkpoint, `fallback`. A frozen `layer` reached by no gradient (below the adapted layers of
    method.last_layers) runs once without a graph: the anchor would make the backward recompute it for nothing."""
    extra = list(args) + list(getattr(run, "keywords", {}).values())
    if not torch.is_tensor(hidden) or any(torch.is_tensor(a) and a.requires_grad for a in extra):
        return fallback(run, hidden, *args)
    if layer is not None and not hidden.requires_grad and not _trains(layer):
        with torch.no_grad():
            return run(hidden, *args)
    return _OffloadedCheckpoint.apply(run, slot, _anchor(hidden.device), hidden, *args)


def _trains(layer) -> bool:
    """Whether any of the layer's parameters trains, found at its first training forward (PEFT adds and freezes
    parameters after the layers are routed here, and nothing changes them during training)."""
    trains = getattr(layer, "_studio_trains", None)
    if trains is None:
        trains = layer._studio_trains = any(p.requires_grad for p in layer.parameters())
    return trains


def offload_checkpoints(layers, count: int | None = None) -> int:
    """Route the first `count` checkpointed `layers` (transformers' GradientCheckpointingLayer, in order; all when
    None) through the offloaded checkpoint; returns how many. Called after checkpointing was switched on for them."""
    routed = 0
    for slot, layer in enumerate(layers):
        if not getattr(layer, "gradient_checkpointing", False) or (count is not None and routed >= count):
            continue
        fallback = getattr(layer, "_gradient_checkpointing_func", None)
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, slot=slot, fallback=fallback,
                                                               layer=layer)
        routed += 1
    return routed


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, tile_tokens, grad_anchor, x):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp_forward(t) for t in x.split(tile_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        start = 0
        with _restored(ctx.autocast, ctx.rng, x.device):
            for tile, tile_grad in zip(x.split(ctx.tile_tokens, dim=-2), grad.split(ctx.tile_tokens, dim=-2)):
                tile = tile.detach().requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    out = ctx.mlp_forward(tile)
                if out.requires_grad:
                    torch.autograd.backward(out, tile_grad)
                n = tile.shape[-2]
                if grad_x is not None:
                    grad_x.narrow(-2, start, n).copy_(tile.grad)
                start += n
        return None, None, None, grad_x


def tile_mlps(model, tile_tokens: int) -> int:
    """Run every decoder layer's MLP over the sequence in tiles of `tile_tokens`; returns how many. Called once the
    trainer is built, so that it wraps the forward the MLP ends up with (Liger replaces it when the trainer is
    built). Sequences no longer than one tile take the MLP's own forward."""
    tiled = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if mlp is None or not hasattr(module, "self_attn") or getattr(mlp, "_studio_tiled", False):
            continue
        inner = mlp.forward

        def forward(x, inner=inner, mlp=mlp):
            if x.shape[-2] <= tile_tokens:
                return inner(x)
            # A checkpointed layer's first forward, or a frozen layer below the adapted ones (method.last_layers) that
            # no gradient reaches: tiles without a graph, so no tile's peak is whole. (The anchor would pull the
            # frozen layer, and every layer beneath it, into the backward.)
            if not torch.is_grad_enabled() or (not x.requires_grad and not _trains(mlp)):
                return torch.cat([inner(t) for t in x.split(tile_tokens, dim=-2)], dim=-2)
            return _TiledMLP.apply(inner, tile_tokens, _anchor(x.device), x)

        mlp.forward = forward
        mlp._studio_tiled = True
        tiled += 1
    return tiled


def _autocast_state(device_type: str) -> tuple:
    enabled = torch.is_autocast_enabled(device_type)
    return device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None


def _rng_state(device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _restored:
    """Autocast and the random state as they were in the first forward, for the recompute."""

    def __init__(self, autocast, rng, device):
        self.autocast, self.rng, self.device = autocast, rng, device

    def __enter__(self):
        device_type, enabled, dtype = self.autocast
        self.cast = torch.autocast(device_type, dtype=dtype, enabled=enabled) if enabled else None
        self.kept = _rng_state(self.device)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        if self.cast is not None:
            self.cast.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cast is not None:
            self.cast.__exit__(*exc)
        torch.set_rng_state(self.kept[0])
        if self.kept[1] is not None:
            torch.cuda.set_rng_state(self.kept[1], self.device)
        return False
