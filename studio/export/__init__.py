"""Exports of a finished run, in the forms people run models in, each written to a folder and checked.

    adapter       the PEFT adapter; adapter_config.json names the base by its hub id, so it loads anywhere
    merged        the base with the adapter folded in, with the tokenizer, the chat template used in training and a
                  generation config that stops at the end of a turn
    gguf-*        the merged model through llama.cpp's own converter (f16, bf16, q8_0) or quantiser (q4_k_m), with
                  the end-of-turn token in its metadata, a Modelfile for Ollama, and a check that loads it back

Every export holds a model card (README.md) and the run's evaluation reports when it has any. This package knows
nothing about the page or zips: ``write_export`` fills a folder; studio/service.py decides where and packs it.
"""

from __future__ import annotations

from studio.export.formats import FORMATS, GGUF_FORMATS, describe_formats, check_format  # noqa: F401
from studio.export.writer import ExportReport, write_export  # noqa: F401
