"""Map a MethodConfig onto PEFT: one small function per library boundary.

Knows the model only through its Linear layer names; returns a PEFT config (or None for full
fine-tuning) and whether the base must be loaded quantised.
"""

from __future__ import annotations

from studio.config import MethodConfig
from studio.errors import StudioError

# Attention projections across common architectures (llama/qwen/mistral, gpt2, falcon, phi, gpt-neox).
ATTENTION_LAYER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value",
                         "Wqkv", "out_proj", "query", "key", "value", "dense")


def quantization_for(method: str) -> str | None:
    return {"qlora": "4bit", "lora8bit": "8bit"}.get(method)


def resolve_targets(targets: list[str], layer_names: list[str]) -> str | list[str]:
    """'all-linear' is handed to PEFT as is; 'attention' and custom names are checked against the model."""
    if targets == ["all-linear"]:
        return "all-linear"
    if targets == ["attention"]:
        chosen = [n for n in layer_names if n in ATTENTION_LAYER_NAMES]
        if not chosen:
            raise StudioError(f"No attention layers found by name in this model (its layers: {', '.join(layer_names)}). "
                              "Pick target modules from that list, or use 'all-linear'.")
        return chosen
    unknown = [t for t in targets if t not in layer_names and t not in ("all-linear", "attention")]
    if unknown:
        raise StudioError(f"method.target_modules names layers this model does not have: {', '.join(unknown)}. "
                          f"Its layers are: {', '.join(layer_names)}.")
    return list(targets)


def peft_config_for(cfg: MethodConfig, layer_names: list[str], head: str = "causal_lm", total_steps: int = 0,
                    layer_count: int = 0):
    """The PEFT config for a method, or None for full fine-tuning. head='score': a reward model, whose new score
    head trains in full beside the adapters. total_steps: AdaLoRA spreads its rank budget over them. layer_count:
    the model's decoder layers, for method.last_layers."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
    task = TaskType.SEQ_CLS if head == "score" else TaskType.CAUSAL_LM
    extra = {"modules_to_save": ["score"]} if head == "score" else {}
    if cfg.method == "full":
        return None
    if cfg.method in ("prompt_tuning", "prefix_tuning") and head == "score":
        raise StudioError("Prompt and prefix tuning cannot train a reward model; use LoRA.")
    if cfg.method == "prompt_tuning":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    targets = resolve_targets(cfg.target_modules, layer_names)
    if 0 < cfg.last_layers < layer_count:
        # PEFT takes a layer list only with named targets: 'all-linear' becomes the model's own Linear names.
        extra["layers_to_transform"] = list(range(layer_count - cfg.last_layers, layer_count))
        targets = list(layer_names) if targets == "all-linear" else targets
    if cfg.method == "ia3":
        mlp = [n for n in layer_names if n in ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")]
        chosen = layer_names if targets == "all-linear" else targets
        return IA3Config(task_type=task, target_modules=chosen,
                         feedforward_modules=[n for n in chosen if n in mlp], **extra)
    if cfg.method == "adalora":
        steps = max(total_steps, 10)
        # The rank budget shrinks from rank*1.5 to rank between the first and last tenth of training.
        return AdaLoraConfig(task_type=task, init_r=max(cfg.rank * 3 // 2, cfg.rank + 1), target_r=cfg.rank,
                             lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             total_step=steps, tinit=steps // 10, tfinal=steps // 10, deltaT=max(1, steps // 20),
                             **extra)
    return LoraConfig(
        task_type=task, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=targets, use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora", bias="none",
        **extra)
