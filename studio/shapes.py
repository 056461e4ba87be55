"""The sizes of a decoder-only model, read from its config: what memory estimates and kernels depend on.

Pure arithmetic over a transformers config object (or anything with the same attributes); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def head_dim_of(text_config) -> int:
    """The width of one attention head: the config's head_dim, else the hidden size over the head count."""
    heads = getattr(text_config, "num_attention_heads", 0) or 1
    return getattr(text_config, "head_dim", None) or (getattr(text_config, "hidden_size", 0) or 0) // heads


@dataclass
class ModelShape:
    """The sizes of a decoder-only model that memory depends on, read from its config."""
    hidden: int
    layers: int
    intermediate: int
    attention_width: int  # heads x head_dim
    kv_width: int  # key/value heads x head_dim
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, text_config) -> "ModelShape":
        hidden = getattr(text_config, "hidden_size", 0) or 0
        heads = getattr(text_config, "num_attention_heads", 0) or 1
        head_dim = head_dim_of(text_config)
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        return cls(hidden=hidden, layers=getattr(text_config, "num_hidden_layers", 0) or 0,
                   intermediate=getattr(text_config, "intermediate_size", None) or 4 * hidden,
                   attention_width=heads * head_dim, kv_width=kv_heads * head_dim,
                   vocab=getattr(text_config, "vocab_size", 0) or 0,
                   tied_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))

    @property
    def layer_parameters(self) -> int:
        h = self.hidden
        return self.layers * (2 * h * self.attention_width + 2 * h * self.kv_width + 3 * h * self.intermediate)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def lora_parameters(self, rank: int) -> int:
        h, a, kv, i = self.hidden, self.attention_width, self.kv_width, self.intermediate
        per_layer = rank * ((h + a) + 2 * (h + kv) + (a + h) + 2 * (h + i) + (i + h))
        return self.layers * per_layer
