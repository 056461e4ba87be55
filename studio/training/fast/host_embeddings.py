"""The input embedding table in host memory, for small cards: chosen by the planner (plan.py) only where the memory
estimate says a run needs it.

An 8B Llama's input embedding table is 128,256 x 4,096 16-bit values, 0.98 GiB: an eighth of an 8 GiB card, kept
there for a lookup of a few thousand of its rows a step. With LoRA and QLoRA the table is frozen, so it can wait in
host memory: each forward sends the token ids to the host, looks their rows up there and copies them to the GPU
(8 KB a token). That costs a wait on the GPU a forward, which is why it is only for runs whose steps take seconds.
Not for a tied table (it is the LM head's weight too, used on the GPU) nor for a trained one.
"""

from __future__ import annotations

import torch


class HostEmbedding(torch.nn.Module):
    """Wraps a model's own embedding module (its scaling, padding index and all), moved to the host. The wrapped
    module is kept out of this module's children, so that moving the model (`model.to("cuda")`, as the Trainer does
    for 16-bit models) leaves it where it is."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.__dict__["host"] = embedding.to("cpu")

    @property
    def weight(self) -> torch.Tensor:
        return self.host.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.host(input_ids.to("cpu"))
        return rows.to(input_ids.device)


def embeddings_to_host(model) -> bool:
    """Put `model`'s input embedding table in host memory (before PEFT wraps the model); False where it must stay:
    a table that is also the LM head's weight, or one that is trained."""
    embedding = model.get_input_embeddings()
    if embedding is None or isinstance(embedding, HostEmbedding):
        return False
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        return False
    if any(p.requires_grad for p in embedding.parameters()):
        embedding.requires_grad_(False)  # LoRA and QLoRA never train it; PEFT freezes it later anyway
    model.set_input_embeddings(HostEmbedding(embedding))
    return True
