"""Padding-free preference batches: the decoder runs on a batch's real tokens only.

TRL's DPO collator pads every chosen and rejected sequence on the right to the longest in the batch; on the
bench's pairs about a third of each batch was padding, computed and thrown away. Here the model's backbone
(the decoder stack under the LM head) takes the real tokens of the whole batch as one row, with each sequence's
own positions and its boundaries for the variable-length attention kernel (varlen_attention.py), so sequences
never see each other. Its hidden states are then put back in the padded layout TRL's loss expects, zeros at the
padding positions, which the loss never scores (their labels are ignored).

Only for stages whose batches are padded on the right with positions from 0 (plan.UNMASKED_STAGES), and only
when the plan picked the variable-length kernel; apply.adapt_for_stage decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def run_on_real_tokens(model) -> None:
    """Make `model`'s backbone (a PEFT model's too) skip padding in every forward that has a padding mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.model
    padded_forward = backbone.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if (input_ids is None or attention_mask is None or input_ids.dim() != 2
                or kwargs.get("past_key_values") is not None):  # generation, embeddings given: as it was
            return padded_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  **kwargs)
        real = attention_mask.bool()
        lengths = real.sum(1, dtype=torch.int32)
        bounds = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        positions = (real.long().cumsum(1) - 1)[real].unsqueeze(0)  # each sequence counts from 0
        longest = int(lengths.max())
        out = padded_forward(input_ids=input_ids[real].unsqueeze(0), attention_mask=None, position_ids=positions,
                             cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest,
                             max_length_k=longest, **kwargs)
        hidden = out.last_hidden_state
        out.last_hidden_state = hidden.new_zeros(*real.shape, hidden.shape[-1]).masked_scatter(
            real.unsqueeze(-1), hidden[0])
        return out

    backbone.forward = forward
