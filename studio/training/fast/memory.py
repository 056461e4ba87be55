"""How much GPU memory a run needs, and how many layers must be checkpointed for it to fit.

Gradient checkpointing is decided per decoder layer, not for the whole model: a layer that is
checkpointed keeps only its input and runs its forward a second time in the backward (about a third
more work for that layer); a layer that is not keeps every activation its backward needs. The plan
checkpoints the fewest layers that bring the estimate under the memory the run may use, so a card with
room to spare trains at full speed and a small one still fits.

The estimate counts, in bytes:
- base weights: 2 per parameter in 16-bit (4 in float32, as on the CPU, where every 16-bit figure below
  doubles); 4-bit NF4 ~0.5 plus the block scales (the fused LoRA path keeps them unpacked: 4 bytes per
  64 weights); 8-bit ~1.1. Embeddings and LM head stay 16-bit.
- what training adds per trainable parameter: the fp32 weight, gradient and two Adam moments (16) for
  LoRA adapters; for full fine-tuning the gradient and two fp32 moments (2 + 8 on top of a 16-bit weight).
- activations of a Llama-style layer without checkpointing, per token, in 16-bit: the inputs the
  projections keep (norm outputs for q/k/v and gate/up, the attention output for o, the SwiGLU product
  for down), both norm inputs, attention's q/k/v/out, and SwiGLU's gate and up outputs:
  2 x (4 hidden + 2 attention width + 2 kv width + 3 intermediate). Without Liger's kernels the norms
  and SwiGLU keep fp32 and extra copies: x1.3.
- a checkpointed layer keeps its 16-bit input; the layer being recomputed holds its full set meanwhile,
  and for QLoRA also its weights dequantised to 16-bit (fused_lora.py keeps them for that layer's backward).
- the LM head and loss run in chunks (TRL): the last hidden states plus ~0.5 GiB of chunk buffers.
- with offloaded checkpoints (activations.py) the offloaded layers' inputs wait in host memory: of those, on the
  GPU only the input being recomputed and the one fetched ahead of it.
- with the MLP in tiles (activations.py) a layer keeps the MLP's input but not its three intermediate-wide
  activations; one tile's of those live at a time, twice over in its backward (values and their gradients).
- with the input embeddings in host memory (host_embeddings.py) their table leaves the GPU (untied models only:
  a tied table is the LM head's weight too).
Checked against the peaks the benchmark measured (bench/NOTES.md; tests/test_training.py keeps them).
"""

from __future__ import annotations

from studio.shapes import ModelShape

GIB = 2**30
CHUNK_BUFFERS = 0.5 * GIB
# Of the memory the run may use, what the estimate may fill; the rest is for the allocator's cached blocks
# and the kernels' workspaces. With the allocator's expandable segments (apply._use_expandable_segments) the
# allocator makes no retries at this fill (bench/NOTES.md).
FILL = 0.92


def layer_activation_bytes(shape: ModelShape, liger: bool, value_bytes: int = 2, mlp_tiled: bool = False) -> float:
    """Bytes per token one decoder layer keeps for its backward when it is not checkpointed."""
    mlp = 0 if mlp_tiled else 3 * shape.intermediate
    values = 4 * shape.hidden + 2 * shape.attention_width + 2 * shape.kv_width + mlp
    return value_bytes * values * (1.0 if liger else 1.3)


def mlp_tile_bytes(shape: ModelShape, tokens: int, tile_tokens: int, liger: bool, value_bytes: int = 2) -> float:
    """What one MLP tile holds in its backward: its intermediate activations and their gradients."""
    if not tile_tokens:
        return 0.0
    return 2 * min(tokens, tile_tokens) * 3 * shape.intermediate * value_bytes * (1.0 if liger else 1.3)


def fixed_bytes(shape: ModelShape, method: str, rank: int, tokens: int, value_bytes: int = 2, shards: int = 1,
                host_embeddings: bool = False, adapted: int = 0) -> float:
    """Everything except the activations: weights, trainable state, the last hidden states. `shards`: the GPUs
    FSDP splits the weights and the trainable state across (each holds its share between layers; the one layer
    gathered at a time is small next to the rest and left out). `host_embeddings`: the input embedding table is in
    host memory (only an untied one leaves the GPU). `adapted`: the layers with adapters (0: all)."""
    per_weight = {"qlora": 0.5 + 4 / 64, "lora8bit": 1.1, "full": 2 * value_bytes + 8}.get(method, value_bytes)
    embedding_parameters = shape.embedding_parameters
    if host_embeddings and not shape.tied_embeddings:
        embedding_parameters -= shape.vocab * shape.hidden
    embeddings = embedding_parameters * (per_weight if method == "full" else value_bytes)
    trainable = 16 * shape.lora_parameters(rank) if method not in ("full", "prompt_tuning", "prefix_tuning") else 0
    trainable *= adapted_layers(shape, adapted) / max(1, shape.layers)
    held = shape.layer_parameters * per_weight + embeddings + trainable
    return held / max(1, shards) + tokens * 4 * value_bytes * shape.hidden


def peak_gib(shape: ModelShape, method: str, rank: int, tokens: int, checkpointed: int, liger: bool,
             value_bytes: int = 2, shards: int = 1, offloaded: int = 0, mlp_tile: int = 0,
             host_embeddings: bool = False, adapted: int = 0) -> float:
    """Estimated peak with `checkpointed` of the layers checkpointed (the first ones; see trainer.py).

    Two moments compete: the end of the forward (every layer's saved tensors, the LM head's chunk buffers)
    and the recomputation of a checkpointed layer in the backward (by then the layers that were not
    checkpointed and the chunk buffers are freed, one layer's full set is back). `offloaded`: how many of the
    checkpointed layers keep their inputs in host memory; `mlp_tile`: the MLP runs in tiles of this many tokens
    (0: whole); `host_embeddings`: the input embedding table is in host memory. `adapted`: only the last this many
    layers have adapters (method.last_layers; 0: all): the frozen layers beneath are reached by no gradient and keep
    nothing for the backward, so `checkpointed` and `offloaded` count among the adapted layers."""
    adapted = adapted_layers(shape, adapted)
    checkpointed = min(checkpointed, adapted)
    mlp_tile = mlp_tile if tokens > mlp_tile else 0  # sequences no longer than a tile run the MLP whole
    full_layer = tokens * layer_activation_bytes(shape, liger, value_bytes, mlp_tiled=bool(mlp_tile))
    tile = mlp_tile_bytes(shape, tokens, mlp_tile, liger, value_bytes)
    offloaded = min(offloaded, checkpointed)
    inputs = (checkpointed - offloaded + min(offloaded, 2)) * tokens * value_bytes * shape.hidden
    end_of_forward = (adapted - checkpointed) * full_layer + CHUNK_BUFFERS + tile
    dequantised = shape.layer_parameters / max(1, shape.layers) * value_bytes if method == "qlora" else 0.0
    recompute = full_layer + tile + dequantised if checkpointed else 0.0
    fixed = fixed_bytes(shape, method, rank, tokens, value_bytes, shards, host_embeddings, adapted)
    return (fixed + inputs + max(end_of_forward, recompute)) / GIB


def kept_logits_gib(tokens: int, vocab: int, value_bytes: int = 2) -> float:
    """What the LM head's kept logits of `tokens` labelled positions hold (lm_head.py, plan.head_keeps_logits)."""
    return value_bytes * tokens * vocab / GIB


def layers_to_checkpoint(shape: ModelShape, method: str, rank: int, tokens: int, budget_gib: float,
                         liger: bool, shards: int = 1, offloaded: int = 0, mlp_tile: int = 0,
                         host_embeddings: bool = False, adapted: int = 0) -> int:
    """The fewest layers to checkpoint so the estimate fits in FILL x budget; all of them when even that
    does not fit (the run then relies on the out-of-memory retry with smaller batches). With `adapted`, of those."""
    target = FILL * budget_gib
    adapted = adapted_layers(shape, adapted)
    for checkpointed in range(adapted + 1):
        if peak_gib(shape, method, rank, tokens, checkpointed, liger, shards=shards, offloaded=offloaded,
                    mlp_tile=mlp_tile, host_embeddings=host_embeddings, adapted=adapted) <= target:
            return checkpointed
    return adapted


def adapted_layers(shape: ModelShape, last_layers: int) -> int:
    """How many decoder layers train: method.last_layers where it names fewer than the model has, else all."""
    return last_layers if 0 < last_layers < shape.layers else shape.layers
