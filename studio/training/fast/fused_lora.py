"""LoRA projections without the full-size elementwise passes PEFT spends around the matmuls.

PEFT computes a LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the three matmuls,
then a scale and an add over the whole (tokens x out_features) output, and in the backward the same
scale plus an add of the two input gradients; for a 4-bit base it also copies the output defensively.
On a GPU those passes are a large share of a step's memory traffic (bench/NOTES.md has the profiles).

Here the scale is folded into the small B matrix (out_features x rank) and both adds are folded into the
last matmul (``addmm_`` accumulates into the base result), so what remains per projection is the matmuls.
The computation and the saved tensors are the same as PEFT's (the layer input and the rank-sized
``x @ A^T``); the adapters, their checkpoints and merging are untouched, only ``forward`` is routed here.

Projections that read the same input (q/k/v, gate/up) and have no dropout go one step further and run as
one node: one stacked matmul for their A matrices, and an input gradient that the matmuls accumulate
themselves instead of autograd adding up three full-size gradients.

Two things are computed once and kept, because QLoRA is bound by the host (every small op costs the
Python and launch overhead of a full one): the adapter weights cast to the compute dtype with the scale
folded in (until the optimizer changes them), and, while a checkpointed layer is recomputed in the
backward, the dequantised base weight (the backward then uses it instead of dequantising again).

Anything this path does not cover (DoRA and the other variants, merged or disabled adapters, several
active adapters, per-request adapter names, LoRA bias, 8-bit bases) falls back to PEFT's own forward.
"""

from __future__ import annotations

import functools
import types
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook


def _dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a (out_features x in_features) matrix in `dtype`; 4-bit weights are dequantised
    here, for the forward and again in the backward, as bitsandbytes itself does."""
    if quant_state is None:
        return weight.to(dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, _block_scales(quant_state), quant_state.blocksize, quant_state.quant_type, quant_state.shape,
        quant_state.dtype).to(dtype)


def _block_scales(quant_state) -> torch.Tensor:
    """The per-block scales of a 4-bit weight, in float32. With double quantisation they are themselves
    quantised, and bitsandbytes unpacks them on every call (two more kernels and their Python each time, three
    times per step with checkpointing: QLoRA is bound by the host, not the GPU). They are unpacked once and
    kept: 4 bytes per 64 weights, ~0.4 GB on an 8B model, well inside the QLoRA memory goal."""
    cached = getattr(quant_state, "_studio_scales", None)
    if cached is None:
        if quant_state.nested:
            import bitsandbytes.functional as bnb_functional
            cached = (bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
                      + quant_state.offset).float()
        else:
            cached = quant_state.absmax.float()
        quant_state._studio_scales = cached
    return cached


class _OptimizerSteps:
    """Counts optimizer steps, of every optimizer in the process. The fused AdamW that the Trainer picks
    updates parameters without moving their version counters, so the kept casts below are keyed on this.
    Counting starts when the first layers are fused (`install`), not at import."""
    count = 0
    _handle = None

    @classmethod
    def hook(cls, optimizer, args, kwargs) -> None:
        cls.count += 1

    @classmethod
    def install(cls) -> None:
        if cls._handle is None:
            cls._handle = register_optimizer_step_post_hook(cls.hook)


def _weight_key(param: torch.Tensor) -> tuple:
    """What must be unchanged for a kept copy of `param` to be current: no optimizer step since (any
    optimizer), no other in-place change (the version counter: a checkpoint loaded with copy_, a test's
    add_), and the same storage (a replaced `.data`)."""
    return _OptimizerSteps.count, param._version, param.data_ptr()


def _cast_key(sources: list, dtype: torch.dtype, scale: float) -> tuple:
    return _weight_key(sources[0]), dtype, scale


def _stack_key(sources: list, dtype: torch.dtype) -> tuple:
    return tuple(_weight_key(p) for p in sources), dtype


class _KeptCasts:
    """Every kept cast, so that after an optimizer step they are all refreshed at once, in place, by a few
    foreach kernels, instead of one by one at their first use: two kernels and their Python each, hundreds of
    casts a step on an 8B model with LoRA on every projection.
    Entries hold weak references: a model that is let go takes its entries with it."""
    entries: dict = {}  # (id(holder), name) -> (holder ref, name, kept tensor, parts, source refs, scales, rekey)
    refreshed_at = 0  # _OptimizerSteps.count at the last refresh

    @classmethod
    def remember(cls, holder, name, tensor, parts, sources, scales, rekey) -> None:
        slot = (id(holder), name)
        let_go = functools.partial(cls._forget, slot)  # the kept tensors go when the holder does
        cls.entries[slot] = (weakref.ref(holder, let_go), name, tensor, parts, [weakref.ref(p) for p in sources],
                             scales, rekey)

    @classmethod
    def _forget(cls, slot, holder_ref) -> None:
        entry = cls.entries.get(slot)
        if entry is not None and entry[0] is holder_ref:
            del cls.entries[slot]

    @classmethod
    def refresh(cls) -> None:
        """Recompute every live entry from its sources (parts[i] <- sources[i] x scales[i], cast on copy) and
        key it again, so the next `_kept` lookups find it current."""
        cls.refreshed_at = _OptimizerSteps.count
        by_device: dict = {}
        live = []
        for slot, (holder_ref, name, tensor, parts, source_refs, scales, rekey) in list(cls.entries.items()):
            holder, sources = holder_ref(), [r() for r in source_refs]
            cached = getattr(holder, name, None) if holder is not None else None
            if cached is None or cached[1] is not tensor or any(p is None for p in sources):
                del cls.entries[slot]  # let go, or replaced since by a cast made on its own
                continue
            live.append((holder, name, tensor, sources, rekey))
            lists = by_device.setdefault(tensor.device, ([], [], [], [], []))
            for part, source, scale in zip(parts, sources, scales):
                if scale == 1.0:
                    lists[0].append(part), lists[1].append(source)
                else:
                    lists[2].append(part), lists[3].append(source), lists[4].append(scale)
        with torch.no_grad():
            for plain_parts, plain_sources, scaled_parts, scaled_sources, scales in by_device.values():
                if scaled_sources:  # scaled in the parameters' precision, then cast once, as on the first make
                    plain_parts += scaled_parts
                    plain_sources += torch._foreach_mul(scaled_sources, scales)
                if plain_parts:
                    torch._foreach_copy_(plain_parts, plain_sources)
        for holder, name, tensor, sources, rekey in live:
            setattr(holder, name, (rekey(sources), tensor))


def _kept(holder: torch.Tensor, name: str, sources: list, scales: list, rekey, make) -> torch.Tensor:
    """`make()` (a tensor and its parts, one per source), kept on `holder` under `name` for as long as its key
    (`rekey(sources)`) stays the same; after an optimizer step every kept tensor is refreshed in place."""
    if _KeptCasts.refreshed_at != _OptimizerSteps.count:
        _KeptCasts.refresh()
    key = rekey(sources)
    cached = getattr(holder, name, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            tensor, parts = make()
        cached = (key, tensor)
        setattr(holder, name, cached)
        _KeptCasts.remember(holder, name, tensor, parts, sources, scales, rekey)
    return cached[1]


def _adapter_weight(param: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`param` x `scale` in `dtype`, made once per optimizer step instead of on every forward (fwd, the
    recompute, every micro-batch of an accumulated step): two kernels and their host cost per projection."""
    def make():  # in the parameter's own dtype and unscaled, this is the parameter (a refresh copies it onto itself)
        cast = (param.detach() * scale if scale != 1.0 else param.detach()).to(dtype)
        return cast, [cast]
    return _kept(param, "_studio_cast", [param], [scale], functools.partial(_cast_key, dtype=dtype, scale=scale), make)


def _stacked_adapters(params: list, dtype: torch.dtype) -> torch.Tensor:
    """The A matrices of sibling projections stacked into one, in `dtype`; kept like `_adapter_weight`."""
    def make():
        stack = torch.cat([p.detach() for p in params]).to(dtype)
        return stack, list(stack.split_with_sizes([p.shape[0] for p in params]))
    return _kept(params[0], "_studio_stack", params, [1.0] * len(params), functools.partial(_stack_key, dtype=dtype),
                 make)


def _recomputing() -> bool:
    """True inside the backward pass, which is where checkpointing re-runs a layer's forward. The weight
    dequantised there is kept for that layer's backward, which follows at once, instead of dequantising
    the same weight again (one layer's 16-bit weights live meanwhile; memory.py counts them).

    Non-reentrant checkpointing hands the backward what the recompute saved, in the places of what the
    first forward saved: the packed weight's place then holds the dense one. The backward tells them
    apart by shape (`_saved_weight`), and the checkpoint's check that both saved the same shapes is off
    for these layers (trainer.enable_checkpointing)."""
    return torch._C._current_graph_task_id() != -1


def _saved_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight for the backward from what was saved: packed 4-bit bytes, or the recompute's
    already dequantised matrix."""
    if quant_state is not None and tuple(weight.shape) == tuple(quant_state.shape):
        return weight.to(dtype)
    return _dense_weight(weight, quant_state, dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, quant_state, lora_a, lora_b, scaling: float, dropout_p: float, dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # every operand is already in `dtype`
            dense = _dense_weight(weight, quant_state, dtype)
            out = F.linear(x2, dense, None if bias is None else bias.to(dtype))
            mask = None
            x_lora = x2
            if dropout_p > 0:
                x_lora, mask = torch.ops.aten.native_dropout(x2, dropout_p, True)
            a = _adapter_weight(lora_a, dtype)
            b_scaled = _adapter_weight(lora_b, dtype, scaling)  # (out x rank): far smaller than scaling the output
            xa = x_lora @ a.t()
            out.addmm_(xa, b_scaled.t())  # the LoRA term lands in the base result, no separate add
        keep_dense = quant_state is not None and _recomputing()
        ctx.save_for_backward(x2, xa, mask, a, b_scaled, dense if keep_dense else weight)
        ctx.quant_state, ctx.scaling, ctx.dropout_p, ctx.dtype = quant_state, scaling, dropout_p, dtype
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = x.shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, mask, a, b_scaled, weight = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        keep = 1.0 / (1.0 - ctx.dropout_p) if mask is not None else 1.0
        with torch.autocast(g.device.type, enabled=False):
            g_xa = g @ b_scaled  # (tokens x rank)
            if ctx.needs_input_grad[0]:
                grad_x = g @ _saved_weight(weight, ctx.quant_state, dtype)
                if mask is None:
                    grad_x.addmm_(g_xa, a)  # the LoRA path's input gradient, accumulated in the same matmul
                else:
                    grad_x.add_(torch.ops.aten.native_dropout_backward(g_xa @ a, mask, keep))
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[4]:
                x_lora = x2 if mask is None else torch.ops.aten.native_dropout_backward(x2, mask, keep)
                grad_a = (g_xa.t() @ x_lora).to(ctx.param_dtypes[0])
            if ctx.needs_input_grad[5]:
                grad_b = (g.t() @ xa).mul_(ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, None, None, None, grad_a, grad_b, None, None, None


class _LoraLinearGroup(torch.autograd.Function):
    """Sibling projections that read the same input (q/k/v, gate/up), without dropout, in one node: their
    LoRA A matrices are one stacked matmul, and the input gradient is accumulated by the matmuls themselves
    (addmm_) instead of autograd adding up three separate (tokens x hidden) gradients."""

    @staticmethod
    def forward(ctx, x, dtype, specs, packed, *tensors):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(dtype)
        members = [tensors[i:i + 4] for i in range(0, len(tensors), 4)]  # (weight, bias, lora_a, lora_b) each
        ranks = [m[2].shape[0] for m in members]
        keep_dense = specs[0][0] is not None and _recomputing()  # siblings are all 4-bit or none (fuse_lora_layers)
        with torch.autocast(x.device.type, enabled=False):
            a_stack = _stacked_adapters([m[2] for m in members], dtype)
            xa = x2 @ a_stack.t()  # (tokens x sum of ranks): the input is read once for every adapter
            xa_parts = xa.split_with_sizes(ranks, dim=1)
            b_scaled = [_adapter_weight(m[3], dtype, scaling) for m, (_, scaling) in zip(members, specs)]
            if packed is not None:  # one dequantisation for the whole group; each member a block of rows
                dense_all = _dense_weight(packed.weight, packed.state, dtype)
                denses = iter(dense_all.split_with_sizes(packed.rows))
                kept = [dense_all if keep_dense else packed.weight]
            else:
                denses = (_dense_weight(m[0], spec[0], dtype) for m, spec in zip(members, specs))
                kept = []
            outs = []
            for (weight, bias, _, _), part, b, dense in zip(members, xa_parts, b_scaled, denses):
                out = F.linear(x2, dense, None if bias is None else bias.to(dtype))
                out.addmm_(part, b.t())
                outs.append(out.view(*x.shape[:-1], out.shape[-1]))
                if packed is None:
                    kept.append(dense if keep_dense else weight)
        ctx.save_for_backward(x2, xa, a_stack, *b_scaled, *kept)
        ctx.specs, ctx.packed, ctx.ranks, ctx.dtype = specs, packed, ranks, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.param_dtypes = [(m[2].dtype, m[3].dtype) for m in members]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.specs)
        saved = ctx.saved_tensors  # read once: checkpointing allows each saved tensor to be unpacked only once
        x2, xa, a_stack = saved[:3]
        b_scaled, weights = saved[3:3 + n], saved[3 + n:]
        dtype = ctx.dtype
        gs = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]
        param_grads = []
        denses = ()
        if ctx.needs_input_grad[0] and ctx.packed is not None:
            denses = _saved_weight(weights[0], ctx.packed.state, dtype).split_with_sizes(ctx.packed.rows)
        elif ctx.needs_input_grad[0]:  # one at a time: only one member's dense weight lives at once
            denses = (_saved_weight(w, spec[0], dtype) for w, spec in zip(weights, ctx.specs))
        with torch.autocast(x2.device.type, enabled=False):
            grad_x, grad_a, grad_b = siblings_backward(gs, denses, x2, xa, a_stack, b_scaled, ctx.ranks,
                                                       [spec[1] for spec in ctx.specs], ctx.needs_input_grad[0])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        for i, (a, b) in enumerate(zip(grad_a, grad_b)):
            param_grads += [None, None, a.to(ctx.param_dtypes[i][0]), b.to(ctx.param_dtypes[i][1])]
        return (grad_x, None, None, None, *param_grads)


def siblings_backward(gs, denses, x2, xa, a_stack, b_scaled, ranks, scalings, input_grad: bool):
    """The backward of sibling LoRA projections that read one input `x2` (q/k/v, gate/up), given their output
    gradients `gs`: the input gradient (tokens x in_features, or None without `input_grad`), accumulated by the matmuls
    themselves, and each member's A and B gradients. `denses`: the members' dense base weights, in order (read only
    for the input gradient); `xa`: x2 @ a_stack^T from the forward; `b_scaled`: each B x its scale."""
    g_xa = torch.cat([g @ b for g, b in zip(gs, b_scaled)], dim=1)  # (tokens x sum of ranks)
    grad_x = None
    if input_grad:
        for g, dense in zip(gs, denses):
            grad_x = g @ dense if grad_x is None else grad_x.addmm_(g, dense)
        grad_x.addmm_(g_xa, a_stack)
    grad_a = (g_xa.t() @ x2).split_with_sizes(ranks, dim=0)
    grad_b = [(g.t() @ part).mul_(scale) for g, part, scale in zip(gs, xa.split_with_sizes(ranks, dim=1), scalings)]
    return grad_x, grad_a, grad_b


class _PackedState:
    """What `_dense_weight` needs to dequantise a packed group: the members' layout, one block of rows each.
    Its block scales are the members' unpacked scales, one after the other, already in the place
    `_block_scales` keeps them (`_studio_scales`)."""

    def __init__(self, first, rows: list[int], scales: torch.Tensor):
        self.blocksize, self.quant_type, self.dtype = first.blocksize, first.quant_type, first.dtype
        self.shape = torch.Size((sum(rows), first.shape[1]))
        self._studio_scales = scales


class _PackedSiblings:
    """The 4-bit weights of sibling projections (q/k/v, gate/up) in one buffer, so that one dequantisation
    (and its host cost: QLoRA is bound by the host) serves the group instead of one per projection.

    bitsandbytes quantises a weight as its flattened values in blocks; when every member's size is a whole
    number of blocks, the members' packed bytes and block scales one after the other are exactly the
    quantisation of their weights stacked by rows. Each member's packed weight and kept scales become views
    into the shared buffers, so nothing is stored twice. If a member's weight is later replaced (moved,
    reloaded), `current` is False and the group dequantises member by member again."""

    def __init__(self, weights: list, states: list):
        self.rows = [int(state.shape[0]) for state in states]
        self.weight = torch.cat([w.data.reshape(-1) for w in weights])
        member_scales = [_block_scales(state) for state in states]
        scales = torch.cat(member_scales)
        self.state = _PackedState(states[0], self.rows, scales)
        weight_parts = self.weight.split_with_sizes([w.data.numel() for w in weights])
        scale_parts = scales.split_with_sizes([m.numel() for m in member_scales])
        for weight, state, weight_part, scale_part in zip(weights, states, weight_parts, scale_parts):
            weight.data = weight_part.view(weight.data.shape)
            state._studio_scales = scale_part
        self.pointers = tuple(w.data_ptr() for w in weights)

    @classmethod
    def build(cls, members: list):
        """Packed siblings for 4-bit members that bitsandbytes laid out alike, else None."""
        parts = [_base_parts(m) for m in members]
        states = [p[2] if p else None for p in parts]
        if any(s is None for s in states):
            return None
        first = states[0]
        layout = (first.blocksize, first.quant_type, first.dtype, int(first.shape[1]))
        if any((s.blocksize, s.quant_type, s.dtype, int(s.shape[1])) != layout or
               int(s.shape[0]) * int(s.shape[1]) % s.blocksize for s in states):
            return None
        weights = [m.get_base_layer().weight for m in members]
        if len({w.device for w in weights}) != 1 or any(w.data.dtype != torch.uint8 for w in weights):
            return None
        with torch.no_grad():
            return cls(weights, states)

    def current(self, weights: list) -> bool:
        return tuple(w.data_ptr() for w in weights) == self.pointers


class _SiblingGroup:
    """Projections of one block that read the same input. The first one called computes all of them and
    holds the others' outputs until they are called with that same input tensor."""

    def __init__(self, members: list, packed: _PackedSiblings | None = None):
        self.members = members
        self.packed = packed
        self.source = None
        self.pending: dict = {}  # member module -> its output for `source`

    def take(self, layer, x: torch.Tensor):
        if self.source is x and layer in self.pending:
            out = self.pending.pop(layer)
            if not self.pending:
                self.source = None
            return out
        return None

    def run(self, layer, x: torch.Tensor):
        """All members' outputs for `x` when every member can take the grouped path now, else None."""
        parts = [_runnable(m, allow_dropout=False) for m in self.members]
        if any(p is None for p in parts):
            return None
        specs, tensors = [], []
        for member, (adapter, weight, bias, quant_state) in zip(self.members, parts):
            specs.append((quant_state, float(member.scaling[adapter])))
            tensors += [weight, bias, member.lora_A[adapter].weight, member.lora_B[adapter].weight]
        packed = self.packed if self.packed is not None and self.packed.current(tensors[0::4]) else None
        outs = _LoraLinearGroup.apply(x, _compute_dtype(x), tuple(specs), packed, *tensors)
        self.pending = {m: o for m, o in zip(self.members, outs) if m is not layer}
        self.source = x
        return outs[self.members.index(layer)]


SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _base_parts(layer):
    """(weight, bias, quant_state) of a frozen base layer this path handles, or None."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if isinstance(base, torch.nn.Linear) and type(weight) is torch.nn.Parameter and weight.dim() == 2:
        return weight, base.bias, None
    quant_state = getattr(weight, "quant_state", None)
    if type(base).__name__ == "Linear4bit" and quant_state is not None:
        # The packed bytes as a plain tensor: bitsandbytes' parameter subclass routes every op through Python.
        return weight.data, base.bias, quant_state
    return None


def _runnable(layer, allow_dropout: bool = True):
    """(adapter, weight, bias, quant_state) when this call can take the fused path, else None."""
    active = layer.active_adapters
    adapter = active[0] if len(active) == 1 else None
    if (layer.disable_adapters or layer.merged or adapter is None or adapter not in layer.lora_A
            or adapter in layer.lora_variant or layer.lora_B[adapter].bias is not None):
        return None
    if not allow_dropout and _dropout_p(layer, adapter) > 0:
        return None
    parts = _base_parts(layer)
    return None if parts is None else (adapter, *parts)


def _dropout_p(layer, adapter) -> float:
    dropout = layer.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0


def _fused_forward(self, x: torch.Tensor, *args, **kwargs):
    group = getattr(self, "_studio_siblings", None)
    if group is not None and not (args or kwargs):
        out = group.take(self, x)
        if out is None:
            out = group.run(self, x)
        if out is not None:
            return out
    parts = None if (args or kwargs) else _runnable(self)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    adapter, weight, bias, quant_state = parts
    return _LoraLinear.apply(x, weight, bias, quant_state, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             float(self.scaling[adapter]), _dropout_p(self, adapter), _compute_dtype(x))


def fuse_lora_layers(model, pack_4bit: bool = True) -> int:
    """Route every LoRA projection of `model` that this path covers through it; returns how many. With
    `pack_4bit`, the 4-bit weights of sibling projections share one buffer (`_PackedSiblings`)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    _OptimizerSteps.install()
    classes: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        classes += (LoraLinear4bit,)
    except ImportError:  # bitsandbytes is not installed: there are no 4-bit layers either
        pass
    fused = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        for module in children.values():
            if isinstance(module, classes) and not getattr(module, "fan_in_fan_out", False) \
                    and not getattr(module, "lora_variant", None) and _base_parts(module):
                module.forward = types.MethodType(_fused_forward, module)
                fused.add(module)
        for names in SIBLING_NAMES:
            members = [children.get(n) for n in names]
            # Decided here, not per call: with dropout (PEFT draws one mask per projection) the group could
            # never run, and each call would check every sibling before falling back.
            if all(m in fused and not _has_dropout(m) for m in members) \
                    and len({m.in_features for m in members}) == 1 \
                    and len({_base_parts(m)[2] is None for m in members}) == 1:
                group = _SiblingGroup(members, _PackedSiblings.build(members) if pack_4bit else None)
                for m in members:
                    m._studio_siblings = group
    return len(fused)


def _has_dropout(layer) -> bool:
    return any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in layer.lora_dropout.values())
