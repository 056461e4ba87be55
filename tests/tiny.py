"""Build a tiny random causal LM with a real (small) tokenizer, entirely offline, in about a second.

The model is a 2-layer Llama with hidden size 64; the tokenizer is a byte-level BPE trained on the
demo data, with ChatML special tokens and a chat template. Tests load it through the studio's real
loading code, exactly like a user's local model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.data import DEMO_EVAL, DEMO_TRAIN
from studio.rendering import BUILTIN_TEMPLATES


def _corpus() -> list[str]:
    texts = []
    for path in (DEMO_TRAIN, DEMO_EVAL):
        for line in path.read_text(encoding="utf-8").splitlines():
            for msg in json.loads(line)["messages"]:
                texts.append(msg["content"])
    return texts + ["system user assistant", "You are a helpful assistant."]


def build_tokenizer(folder: Path, with_pad: bool = False, with_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    if with_pad:
        fast.pad_token = "<|endoftext|>"
    if with_template:
        fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, seed: int = 0, **tokenizer_kwargs) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, **tokenizer_kwargs)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    # initializer_range 0.2 (default 0.02): with the default, the normed hidden state times a tiny head gives
    # near-uniform logits that LoRA can barely move in a few steps, so "loss fell" would test nothing useful.
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
