"""GRPO's generation without the host in the way: each decoding step replayed as one CUDA graph.

A GRPO step is mostly generation, and generation writes one token per forward pass: a few hundred small kernels
per token, each launched by Python. On a GPU the host cannot launch them as fast as the GPU runs them
(bench/NOTES.md: 87-97% of a step generating, 44 ms a token at 1B on an H200). A CUDA graph records a forward's
kernels once and launches all of them with one call.

Nothing else changes: transformers' own generate loop runs as TRL calls it (prefill, the sampling and its
processors, stopping, padding after the end token), with a static KV cache (fixed-size buffers, so every decoding
step has the same shapes and addresses) in place of the growing one. transformers already asks the model for a
"compiled" forward for the decoding steps when the cache is static (`get_compiled_call`); here that call returns
`GraphedDecoding` instead of torch.compile (no compilation, and none of its recompiling for new shapes or weights
that moved): the first decoding step of a
generate call runs as usual, its forward is captured as a graph, and every later step copies its inputs (the new
token, its position, the attention mask) into the graph's buffers and replays it. The graph is captured afresh for
each generate call and let go at its end (the cache, the adapters' kept casts and the weights it reads are then
what they are for the whole call), so nothing stale can be replayed after an optimizer step.

Same computation: the same forward, the same kernels, on the same inputs; LoRA dropout (the model is in training
mode while TRL generates) draws new masks at each replay, as each eager step would. With `graphs=False` the same
steps run eagerly through the buffers (the CPU, and tests). What it does not cover falls back to the stock path:
see `unsupported`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

# Attention implementations whose decoding step is plain PyTorch (captured as is) and that take the 4D mask
# transformers builds outside the forward for a static cache.
CAPTURABLE_ATTENTION = ("sdpa", "eager")
# The static cache is allocated for the longest reply up front (the dynamic one grows as replies get longer): the
# fast path is only taken when that fits in this share of the GPU's free memory.
CACHE_SHARE_OF_FREE = 0.5


@dataclass
class DecodeStats:
    calls: int = 0  # generate calls that went through here
    captured: int = 0  # graphs captured (one per generate call)
    replayed: int = 0  # decoding steps replayed from a graph
    eager: int = 0  # decoding steps run as a plain forward (each call's first, and any the graph cannot take)
    failures: list = field(default_factory=list)  # why a capture failed (the call then went on eagerly)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "captured": self.captured, "replayed": self.replayed, "eager": self.eager,
                "failures": self.failures[:5]}


def _static_cache(cache) -> bool:
    """A cache whose every layer is transformers' plain StaticLayer (no sliding window, no offloading), filled."""
    layers = getattr(cache, "layers", None)
    return (type(cache).__name__ == "StaticCache" and bool(layers)
            and all(type(layer).__name__ == "StaticLayer" and layer.is_initialized for layer in layers))


def _cache_name(inputs: dict) -> str:
    """The cache's argument name: `past_key_values` (transformers up to 5.2x), `cache` (later)."""
    return "cache" if "cache" in inputs else "past_key_values"


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None


class _Capture:
    """One decoding step's forward on fixed input buffers: a CUDA graph of it, or (graphs off) the same forward
    run eagerly on the buffers."""

    def __init__(self, model, key, inputs: dict, graphs: bool):
        self.model, self.key, self.cache = model, key, inputs[_cache_name(inputs)]
        self.buffers = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        self.inputs = {**inputs, **self.buffers}
        self.graph = self.fields = self.output_class = None
        if graphs:
            self._capture()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the buffers were filled on the current stream
        # Capturing records the kernels without running them: the cache and its lengths are not moved by it.
        # thread_local: the data loader's pinning thread may call CUDA meanwhile, which is allowed.
        with torch.cuda.stream(stream), _without_autocast_cache():
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = self.model(**self.inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        # The output's tensors are the graph's own: each replay writes the logits there again.
        self.graph, self.fields, self.output_class = graph, dict(out.items()), type(out)

    def run(self, inputs: dict):
        for name, buffer in self.buffers.items():
            if inputs[name] is not buffer:
                buffer.copy_(inputs[name], non_blocking=True)
        if self.graph is None:
            return self.model(**self.inputs)
        self.graph.replay()
        # transformers copies the last position's logits out before the next step (`.to(copy=True)`)
        return self.output_class(**self.fields)


@contextlib.contextmanager
def _without_autocast_cache():
    """Under autocast, casts of the weights are cached for the autocast region and freed at its end: a graph must
    not read such a cast. The weights are cast inside the graph instead (nothing changes without autocast)."""
    if not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


class GraphedDecoding:
    """What transformers calls for each decoding step in place of a compiled forward. The first step of each
    generate call (a new cache) runs the model as usual and captures its graph; the following steps replay it.
    A step the graph cannot take (other shapes, other arguments) runs eagerly."""

    def __init__(self, model, graphs: bool = True, stats: DecodeStats | None = None):
        self.model = model
        self.graphs = graphs
        self.stats = stats if stats is not None else DecodeStats()
        self._capture: _Capture | None = None

    def _key(self, args: tuple, inputs: dict):
        ids, cache = inputs.get("input_ids"), inputs.get(_cache_name(inputs))
        if args or ids is None or ids.dim() != 2 or ids.shape[1] != 1 or inputs.get("inputs_embeds") is not None \
                or not _static_cache(cache):
            return None
        mask = inputs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
            return None
        key = []
        for name, value in sorted(inputs.items()):
            if name == _cache_name(inputs):
                continue
            signature = _signature(value)
            if signature is None:
                return None
            key.append((name, signature))
        return tuple(key)

    def __call__(self, *args, **inputs):
        key = self._key(args, inputs)
        if key is None:
            self.stats.eager += 1
            return self.model(*args, **inputs)
        current = self._capture
        if current is not None and current.key == key and current.cache is inputs[_cache_name(inputs)]:
            self.stats.replayed += 1
            return current.run(inputs)
        self.release()
        out = self.model(**inputs)  # this step as usual; it also warms up what the capture needs
        self.stats.eager += 1
        try:
            self._capture = _Capture(self.model, key, inputs, self.graphs)
            self.stats.captured += int(self.graphs)
        except Exception as err:  # noqa: BLE001 - a capture that fails leaves the call to the eager path
            self.stats.failures.append(f"{type(err).__name__}: {err}"[:300])
            self.graphs = False  # for the rest of this call; the next call tries again
        return out

    def release(self) -> None:
        self._capture = None


def unsupported(trainer, prompt_ids: list[list[int]]) -> str | None:
    """Why this generate call keeps TRL's own path (None: it can take the graphed one)."""
    if trainer.use_vllm or trainer.use_transformers_continuous_batching:
        return "vLLM or continuous batching"
    if getattr(trainer.generation_config, "cache_implementation", None) is not None:
        return "a cache was chosen in the config"
    if trainer.args.generation_kwargs:
        return "generation_kwargs were given"
    model = _inner_model(trainer)
    config = model.config.get_text_config()
    if getattr(model, "hf_quantizer", None) is not None:
        return "a quantized base (not measured)"
    if config._attn_implementation not in CAPTURABLE_ATTENTION:
        return f"{config._attn_implementation} attention"
    if getattr(config, "sliding_window", None) or any(t != "full_attention"
                                                      for t in (getattr(config, "layer_types", None) or ())):
        return "sliding-window attention"
    if model.config.is_encoder_decoder or not hasattr(model, "get_compiled_call"):
        return "not a decoder-only model"
    if model.device.type == "cuda":
        width = max(len(p) for p in prompt_ids) + trainer.max_completion_length
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        size = 2 * config.num_hidden_layers * len(prompt_ids) * width * heads * head_dim * model.dtype.itemsize
        free, _ = torch.cuda.mem_get_info(model.device)
        if size > CACHE_SHARE_OF_FREE * free:
            return "the static cache would not fit"
    return None


def _inner_model(trainer):
    """The transformers model whose generate loop runs (under PEFT's wrapper, if any)."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def graphed_generation(trainer, graphs: bool = True, stats: DecodeStats | None = None):
    """For the generate calls inside: a static cache, and decoding steps through `GraphedDecoding` (as CUDA graphs,
    or with `graphs=False` eagerly through the same buffers), counted in `stats`. The trainer's generation settings
    and the model are as they were afterwards. Yields the decoder."""
    from transformers import CompileConfig
    model = _inner_model(trainer)
    config, kwargs = trainer.generation_config, trainer.generation_kwargs
    saved = (config.cache_implementation, config.disable_compile, config.compile_config)
    saved_kwargs = {k: kwargs[k] for k in ("cache_implementation",) if k in kwargs}
    decoder = GraphedDecoding(model, graphs and model.device.type == "cuda", stats)
    config.cache_implementation = kwargs["cache_implementation"] = "static"
    config.disable_compile = False  # transformers then asks get_compiled_call for the decoding steps' forward
    if model.device.type != "cuda":  # transformers asks for it on accelerators only, unless told otherwise
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True
    model.get_compiled_call = lambda compile_config=None: decoder
    decoder.stats.calls += 1
    try:
        yield decoder
    finally:
        decoder.release()
        del model.get_compiled_call
        config.cache_implementation, config.disable_compile, config.compile_config = saved
        kwargs.pop("cache_implementation", None)
        kwargs.update(saved_kwargs)
        if hasattr(model, "_previous_max_cache_length"):
            # transformers sizes the next static cache at least this long; the stock path must not inherit it
            del model._previous_max_cache_length
