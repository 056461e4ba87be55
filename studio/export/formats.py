"""The export formats by name, and what each one is (plain data: the page, the CLI and the API read it)."""

from __future__ import annotations

from dataclasses import dataclass

from studio.errors import StudioError


@dataclass(frozen=True)
class Format:
    name: str
    label: str
    gguf_type: str = ""  # llama.cpp's name for the weight type ('' for the transformers formats)
    by_converter: bool = True  # False: written by llama.cpp's quantiser from an f16 file
    bytes_per_weight: float = 4.0  # for the size estimate a shared studio bounds exports by
    # How the check compares the GGUF's reply with the merged model's: 'exact' (token for token), 'agreement'
    # (fed the merged model's reply, the GGUF picks the same next token at >= 90% of its positions: rounding to 8 bits
    # moves a small model's greedy path after a few tokens) or '' (4-bit: shown, not compared).
    compare_reply: str = ""


FORMATS = {f.name: f for f in (
    Format("adapter", "Adapter (PEFT, small; needs the base model)", bytes_per_weight=0.0),
    Format("merged", "Merged model (transformers, safetensors)", bytes_per_weight=4.0),
    Format("gguf-f16", "GGUF f16 (llama.cpp, Ollama; full quality)", "f16", bytes_per_weight=2.0,
           compare_reply="exact"),
    Format("gguf-bf16", "GGUF bf16 (llama.cpp, Ollama)", "bf16", bytes_per_weight=2.0,
           compare_reply="agreement"),
    Format("gguf-q8_0", "GGUF q8_0 (about half the size of f16, near-lossless)", "q8_0", bytes_per_weight=1.07,
           compare_reply="agreement"),
    Format("gguf-q4_k_m", "GGUF Q4_K_M (about a quarter of f16; for laptops)", "q4_k_m", by_converter=False,
           bytes_per_weight=0.6),
)}
GGUF_FORMATS = tuple(name for name in FORMATS if name.startswith("gguf-"))


def check_format(name: str) -> Format:
    if name not in FORMATS:
        raise StudioError(f"Unknown export format {name!r}; use one of: {', '.join(FORMATS)}.")
    return FORMATS[name]


def describe_formats() -> list[tuple[str, str]]:
    """(label, name) pairs for a dropdown."""
    return [(f.label, f.name) for f in FORMATS.values()]
