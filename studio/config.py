"""What a run is made of: small dataclasses (model, data, method, training, devices) inside ``RunConfig``.

Every field carries plain-language help (shown next to the setting in the UI and by
``studio train --help-config``) and, where the values are a closed set, its choices. Checks that
span fields live in ``validate()`` so a config read from YAML, built by the UI or sent straight to
the app's API is refused the same way, with a message that names the field.

This module knows nothing about torch: it only describes what the user asked for.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from studio.errors import StudioError

BUNDLED_MODEL = "bundled"
DEMO_DATA = "demo"

METHODS = ("lora", "dora", "rslora", "qlora", "lora8bit", "adalora", "ia3", "full", "prompt_tuning", "prefix_tuning")
LORA_FAMILY = ("lora", "dora", "rslora", "qlora", "lora8bit", "adalora")
TARGET_PRESETS = ("all-linear", "attention")


def setting(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None,
            maximum: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values kept beside it."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = setting(
        BUNDLED_MODEL,
        "Which model to fine-tune: 'bundled' (SmolLM2-135M-Instruct, ships with the studio and works "
        "offline), a Hugging Face id such as 'Qwen/Qwen2.5-0.5B-Instruct', a local model folder, or a .gguf file.")
    chat_template: str = setting(
        "auto",
        "How conversations are turned into text. 'auto' uses the model's own template (or ChatML when it "
        "has none); 'chatml', 'llama3' or 'alpaca' force a built-in one; anything else is used as a Jinja template.")
    revision: str = setting("main", "Which version of a hub model to use (a branch, tag or commit).")
    template_system_prompt: str = setting(
        "leave_out", "Some models' chat templates add a system message of their own to every conversation without "
        "one (SmolLM2: 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'). 'leave_out' keeps it "
        "out of training and out of chats with the run (an empty system message takes its place), so teaching a "
        "new name or persona does not fight it; 'keep' trains and chats with it. A system prompt in the row or set "
        "in data.system_prompt always wins.", choices=("leave_out", "keep"))
    start_from: str = setting(
        "", "A finished run to build on (its run id): this run starts from what that one learned, e.g. supervised "
        "fine-tuning first, then DPO on top. Empty: start from the model above.")


@dataclass
class DataConfig:
    path: str = setting(
        DEMO_DATA,
        "Training data: 'demo' for the bundled pirate demo, or a .jsonl, .json, .csv or .parquet file, "
        "plain text (.txt, .md), a folder saved with datasets' save_to_disk, or a hub data set id (owner/name).")
    eval_path: str = setting(
        "", "Optional separate file of held-out rows. Empty: hold out a fraction of the training file instead.")
    format: str = setting(
        "auto", "Row format. 'auto' detects it from the columns.",
        choices=("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"))
    columns: dict = setting(
        {}, "Rename columns before detection, e.g. {question: instruction, answer: output} when your "
        "file uses other names.")
    system_prompt: str = setting(
        "", "A system message added to every conversation that has none. Empty: see model.template_system_prompt.")
    roles: dict = setting(
        {}, "Rename speaker roles your file uses, e.g. {bot: assistant, customer: user}. Known names (user, "
        "assistant, system, tool, human, gpt, function_call, observation...) need no mapping.")
    placeholders: dict = setting(
        {}, "Values for placeholders such as {{name}} and {{author}} in your examples, e.g. {name: Ada, author: "
        "Acme}. A row with a placeholder that has no value is skipped (and counted) so the model never learns "
        "to say '{{name}}'.")
    keep_placeholders: bool = setting(
        False, "Train placeholders such as {{name}} literally, as written (only if that is really what you want).")
    dedup: str = setting(
        "report", "Repeated examples: 'report' counts and lists them but trains them all; 'exact' removes rows that "
        "are the same once case, spaces and punctuation are ignored; 'near' also removes rows that differ only in "
        "a few words. 'exact' and 'near' also remove held-out rows that repeat a training row (they would make the "
        "held-out loss look better than it is).", choices=("off", "report", "exact", "near"))
    mix: dict = setting(
        {}, "Other data files to mix in, each with the share of the training rows it should make up, e.g. "
        "{general.jsonl: 0.2}: general instructions keep the model from forgetting what it knew. Shares add up "
        "to less than 1; the rest is your file.")
    replay_share: float = setting(
        0.0, "Share of training rows that are the starting model's own answers to general questions (made once "
        "and kept), mixed in so it keeps answering them as before: a guard against forgetting when you have no "
        "general data set. 0 turns it off; 0.1 to 0.2 is typical.", minimum=0.0, maximum=0.5)
    eval_fraction: float = setting(
        0.1, "Share of rows held out to measure progress on data the model does not train on (0 to skip).",
        minimum=0.0, maximum=0.5)
    max_length: int = setting(
        512, "Longest conversation in tokens. Longer ones are cut (or dropped, see 'too_long'); shorter "
        "uses less memory.", minimum=16, maximum=1048576)
    too_long: str = setting(
        "truncate", "What to do with conversations over max_length: 'truncate' keeps the start, 'drop' skips them.",
        choices=("truncate", "drop"))
    train_on: str = setting(
        "assistant", "Which tokens teach the model: 'assistant' (only the replies, usual for chat) or "
        "'all' (the whole conversation).", choices=("assistant", "all"))


@dataclass
class MethodConfig:
    method: str = setting(
        "lora",
        "How to fine-tune. LoRA trains small add-on matrices (fast, little memory); DoRA and rsLoRA are "
        "LoRA variants; QLoRA and 8-bit LoRA load the base model compressed (NVIDIA GPU only); AdaLoRA starts "
        "with a larger rank and moves it to the layers that need it most as training goes; IA3 learns only a "
        "scale per channel (the fewest weights of all); 'full' trains every weight (most memory); prompt/prefix "
        "tuning learn only a few virtual tokens.",
        choices=METHODS)
    rank: int = setting(
        16, "LoRA rank: size of the add-on matrices. Higher learns more but uses more memory; 8-64 is typical.",
        minimum=1, maximum=1024)
    alpha: int = setting(
        32, "LoRA alpha: scales the add-on's effect (effective scale alpha/rank). Twice the rank is a safe default.",
        minimum=1, maximum=4096)
    dropout: float = setting(
        0.05, "LoRA dropout: randomly ignores part of the add-on while training to reduce overfitting.",
        minimum=0.0, maximum=0.9)
    target_modules: list = setting(
        ["all-linear"],
        "Which layers get LoRA add-ons: ['all-linear'] (best quality), ['attention'] (lighter), or a list "
        "of the model's own layer names such as ['q_proj', 'v_proj'].")
    num_virtual_tokens: int = setting(
        20, "Prompt/prefix tuning: how many learned virtual tokens to prepend.", minimum=1, maximum=512)
    last_layers: int = setting(
        0, "LoRA add-ons only in the model's last this many layers; 0 puts them in every layer. Training then "
        "stops each backward pass at the lowest layer with add-ons, so a step costs less (half the layers: about a "
        "third less), while the layers below only read and keep nothing for the backward, so it also needs less "
        "memory (the plan's estimate counts only the layers with add-ons). Enough for a new style, tone or format; "
        "for new knowledge, keep every layer.", minimum=0, maximum=100_000)


@dataclass
class TrainingConfig:
    learning_rate: float = setting(
        2e-4, "How big each update is. LoRA: 1e-4 to 1e-3; full fine-tuning: about 1e-5. Too high and the "
        "loss jumps or becomes NaN.", minimum=1e-8, maximum=1.0)
    epochs: float = setting(
        3.0, "How many passes over the training data (ignored when max_steps is set).", minimum=0.01, maximum=1000)
    max_steps: int = setting(
        -1, "Stop after this many optimizer steps; -1 means use epochs.", minimum=-1, maximum=10_000_000)
    batch_size: int = setting(
        8, "Conversations per step on the device. Lower it if you run out of memory.", minimum=1, maximum=4096)
    grad_accum: int = setting(
        1, "Steps to accumulate before each update: effective batch = batch_size x grad_accum, without the memory.",
        minimum=1, maximum=1024)
    warmup_ratio: float = setting(
        0.05, "Share of training spent ramping the learning rate up from zero, which avoids early instability.",
        minimum=0.0, maximum=0.5)
    weight_decay: float = setting(0.0, "Pulls weights gently towards zero to reduce overfitting.",
                                  minimum=0.0, maximum=1.0)
    scheduler: str = setting(
        "cosine", "How the learning rate changes over training.",
        choices=("cosine", "linear", "constant", "constant_with_warmup"))
    packing: str = setting(
        "auto", "Pack several short conversations into each row of max_length tokens so no compute is spent on "
        "padding (batch_size then counts packed rows). 'auto': on for NVIDIA GPUs, off on the CPU.",
        choices=("auto", "on", "off"))
    attention: str = setting(
        "auto", "Attention kernel. 'auto': for packed rows on a GPU, FlashAttention-2's variable-length kernel "
        "(Ampere or newer NVIDIA GPUs) or else flex attention, both keep conversations apart cheaply; PyTorch's "
        "SDPA otherwise.", choices=("auto", "sdpa", "packed_varlen", "flex_attention", "eager"))
    speed: str = setting(
        "auto", "How the studio trains. 'auto': its speed plan for this machine (packing, attention kernel, fused "
        "kernels, checkpointing only the layers memory needs). 'plain': stock TRL and PEFT with none of the "
        "studio's speed changes (packing, checkpointing and precision as set here), e.g. to compare, or to rule "
        "the speed plan out when something looks wrong.", choices=("auto", "plain"))
    fused_kernels: str = setting(
        "auto", "Fused kernels: the studio's LoRA projections (the add-on folded into the base matmul; 'auto' "
        "uses them on GPUs) and Liger's RMSNorm/RoPE/SwiGLU kernels (NVIDIA GPUs, when liger-kernel is installed). 'off' "
        "runs the plain PEFT and transformers code, e.g. to rule these out when something looks wrong.",
        choices=("auto", "on", "off"))
    time_limit_minutes: float = setting(
        0.0, "Stop the run after this many minutes of training, saving the adapter as Stop does; 0 means no limit. "
        "On a shared link the studio sets one, so no run holds the training slot for ever.", minimum=0,
        maximum=10_000_000)
    seed: int = setting(42, "Random seed: the same seed, data and settings give the same run.", minimum=0,
                        maximum=2**31 - 1)
    logging_steps: int = setting(1, "Record the loss every this many steps.", minimum=1, maximum=100000)
    eval_steps: int = setting(
        0, "Measure held-out loss every this many steps; 0 means about five times per run.", minimum=0,
        maximum=1000000)
    save_steps: int = setting(
        0, "Save a checkpoint every this many steps so a stopped or crashed run can resume; 0 means about "
        "five times per run.", minimum=0, maximum=1000000)
    precision: str = setting(
        "auto", "Number format for training. 'auto': float32 on CPU, bf16 on GPUs that support it, else fp16.",
        choices=("auto", "fp32", "bf16", "fp16"))
    oom_retry: bool = setting(
        True, "If memory runs out, retry automatically with half the batch size and twice the gradient "
        "accumulation (same effective batch), continuing from the last checkpoint.")
    gradient_checkpointing: str = setting(
        "auto", "Recompute activations to save memory at ~30-50% more compute. 'auto': only for as many layers as "
        "the memory estimate says the run needs to fit, none when it fits without.", choices=("auto", "on", "off"))
    memory_limit_gib: float = setting(
        0.0, "Most GPU memory this run may use, in GiB; 0 means whatever the GPU has free. Set it to leave room "
        "for other programs on the same GPU: the studio checkpoints more layers to stay under it, and the run "
        "cannot take more.", minimum=0.0, maximum=4096.0)
    samples: int = setting(
        3, "How many held-out prompts the model answers at the start and at every evaluation, so you can watch "
        "its replies change while it trains (short replies, cheap even on a CPU). 0 turns the sample replies off.",
        minimum=0, maximum=20)
    sample_prompts: list = setting(
        [], "Your own prompts for the sample replies, answered instead of held-out ones (up to 20). Empty: "
        "use the first held-out prompts.")
    early_stopping_patience: int = setting(
        0, "Stop training when the held-out loss has not improved for this many evaluations in a row: the model "
        "has stopped learning what carries over to new examples. 0: off; 2 or 3 is a good start. Needs held-out "
        "rows.", minimum=0, maximum=1000)
    keep_best: bool = setting(
        False, "At the end, keep the adapter from the evaluation with the lowest held-out loss instead of the last "
        "step's (a checkpoint is then saved at every evaluation). Guards against training too long. Needs "
        "held-out rows.")
    forgetting_check: str = setting(
        "auto", "When training ends, ask the starting model and the tuned one the same short general questions "
        "(capitals, sums, plurals...) and say whether fine-tuning made the model forget what it knew. 'auto': 40 "
        "questions on a GPU, 20 on a CPU (seconds for a small model), none for models over 0.6B parameters on a CPU "
        "(minutes there); 'on': 40 questions always; 'off': never. The Evaluate tab runs the same check whenever "
        "you like.", choices=("auto", "on", "off"))


@dataclass
class DevicesConfig:
    gpus: str = setting(
        "", "Which GPUs to train on: empty for one, 'all', a count such as 2, or the GPUs' numbers such as 0,1. With "
        "several, each trains on its share of every batch (batch_size is per GPU, so the effective batch grows with "
        "them). On a machine without GPUs a count starts that many CPU processes, to try a set-up.")
    strategy: str = setting(
        "auto", "How several GPUs share the work. 'ddp': each holds the whole model and they average their "
        "gradients (fastest when the model fits one GPU); 'fsdp': the weights, gradients and optimizer state are "
        "split across them (FSDP2), for models that do not fit one; 'auto' picks by the memory estimate.",
        choices=("auto", "ddp", "fsdp"))
    nodes: int = setting(1, "How many machines train this run together (each runs the same command with its own "
                            "node_rank).", minimum=1, maximum=1024)
    node_rank: int = setting(0, "This machine's number among them, from 0; machine 0 keeps the run's records and "
                                "the adapter.", minimum=0, maximum=1023)
    master: str = setting("", "With several machines: the first machine's address and a free port, e.g. "
                              "10.0.0.1:29500, the same on every machine.")


@dataclass
class RunConfig:
    name: str = setting("", "A name for the run (letters, digits, '.', '_', '-'). Empty: one is made from the time.")
    stage: str = setting("sft", "What the run does: 'sft' (supervised fine-tuning on example conversations) or "
                         "another stage (studio/stages/).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    stage_settings: dict = field(default_factory=dict, metadata={
        "help": "The settings of stages that have their own (studio/stages/), by stage name, e.g. "
                "{dpo: {beta: 0.1}}; written in YAML as a section named after the stage."})

    def settings_of(self, stage: str):
        """The settings of `stage` (its dataclass; defaults when the config names none)."""
        from studio import stages
        if stage not in self.stage_settings:
            cls = stages.get(stage).settings
            self.stage_settings[stage] = cls() if cls else None
        return self.stage_settings[stage]

    def validate(self) -> "RunConfig":
        """Check every field's type, range and choices, then the cross-field rules; raise StudioError."""
        from studio import stages
        stages.get(self.stage if isinstance(self.stage, str) else repr(self.stage))
        self.settings_of(self.stage)
        for section in (self, self.model, self.data, self.method, self.training, self.devices,
                        *(s for s in self.stage_settings.values() if s is not None)):
            _check_fields(section)
        if self.training.max_steps == 0:
            raise StudioError("training.max_steps = 0 would train nothing: use -1 to train for training.epochs, "
                              "or a number of steps from 1.")
        if self.name:
            from studio.paths import check_safe_name
            check_safe_name(self.name, "run name")
        if self.method.method in LORA_FAMILY and not self.method.target_modules:
            raise StudioError("method.target_modules is empty: pick 'all-linear', 'attention' or some layer names.")
        if self.method.last_layers and self.method.method not in LORA_FAMILY:
            raise StudioError(f"method.last_layers = {self.method.last_layers} applies to the LoRA methods only "
                              f"({', '.join(LORA_FAMILY)}); set it to 0 for {self.method.method}.")
        if self.training.packing == "on" and self.method.method in ("prompt_tuning", "prefix_tuning"):
            raise StudioError("training.packing cannot be combined with prompt or prefix tuning; turn packing off.")
        self._check_devices()
        return self

    def _check_devices(self) -> None:
        from studio.distributed import parse_gpus, split_master
        d = self.devices
        parse_gpus(d.gpus)
        if d.node_rank >= d.nodes:
            raise StudioError(f"devices.node_rank = {d.node_rank} with devices.nodes = {d.nodes}: machines are "
                              f"numbered from 0 to {d.nodes - 1}.")
        if d.nodes > 1:
            split_master(d.master)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "training": TrainingConfig,
            "devices": DevicesConfig}


def _check_fields(obj: Any) -> None:
    section = _section_name(obj)
    for f in fields(obj):
        if isinstance(obj, RunConfig) and (f.name in SECTIONS or f.name == "stage_settings"):
            continue
        value = getattr(obj, f.name)
        where = f"{section}.{f.name}" if section else f.name
        expected = _default_of(f)
        meta = f.metadata
        if isinstance(value, bool) and {"on", "off"} <= set(meta.get("choices") or ()):
            value = "on" if value else "off"  # YAML reads a bare on/off as true/false: `packing: off` means "off"
        value = _coerce(value, expected, where)
        setattr(obj, f.name, value)
        if meta.get("choices") and value not in meta["choices"]:
            raise StudioError(f"{where} = {value!r} is not one of: {', '.join(map(str, meta['choices']))}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise StudioError(f"{where} = {value!r} must be a finite number.")
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise StudioError(f"{where} = {value!r} is out of range: use a value from {lo} to {hi}.")


def _section_name(obj: Any) -> str:
    for name, cls in SECTIONS.items():
        if type(obj) is cls:
            return name
    from studio import stages
    for stage in stages.registry().values():
        if stage.settings is not None and type(obj) is stage.settings:
            return stage.name
    return ""


def _default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def _coerce(value: Any, expected: Any, where: str) -> Any:
    """Accept what YAML, a form or a JSON API would naturally send, and refuse the rest by name."""
    try:
        if isinstance(expected, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool):
                return value
            raise TypeError
        if isinstance(expected, int):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if isinstance(expected, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(expected, str):
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if isinstance(expected, list):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if isinstance(expected, dict):
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        kind = type(expected).__name__.replace("str", "text").replace("float", "number").replace("int", "whole number")
        raise StudioError(f"{where} = {value!r} is not valid: expected a {kind}.") from None
    return value


def section_class(section: str) -> type:
    """The dataclass of a section: model, data, method, training, or a stage's own settings."""
    if section in SECTIONS:
        return SECTIONS[section]
    from studio import stages
    stage = stages.registry().get(section)
    if stage is None or stage.settings is None:
        raise KeyError(section)
    return stage.settings


def field_info(section: str, name: str) -> dict:
    """Help text, default, choices and range of one field, for building forms."""
    if section == "":
        cls = RunConfig
    else:
        cls = section_class(section)
    for f in fields(cls):
        if f.name == name:
            return {**f.metadata, "default": _default_of(f)}
    raise KeyError(f"{section}.{name}")


def to_dict(cfg: RunConfig) -> dict:
    out: dict = {"name": cfg.name, "stage": cfg.stage}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        out[section] = {f.name: _copy(getattr(obj, f.name)) for f in fields(obj)}
    for stage, obj in cfg.stage_settings.items():
        if obj is not None:
            out[stage] = {f.name: _copy(getattr(obj, f.name)) for f in fields(obj)}
    return out


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def from_dict(data: dict | None, *, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig; an unknown key is an error naming the key and the file."""
    from studio import stages
    if data is not None and not isinstance(data, dict):
        raise StudioError(f"{source}: the settings must be 'key: value' pairs, not a {type(data).__name__}.")
    data = dict(data or {})
    cfg = RunConfig()
    stage_sections = {name for name, stage in stages.registry().items() if stage.settings is not None}
    for key, value in data.items():
        if key == "name":
            cfg.name = "" if value is None else str(value)
        elif key == "stage":
            cfg.stage = "sft" if value is None else value
        elif key in SECTIONS or key in stage_sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise StudioError(f"{source}: '{key}' must be a section of settings, got {value!r}.")
            if key in SECTIONS:
                section = getattr(cfg, key)
            else:
                section = cfg.stage_settings[key] = stages.get(key).settings()
            known = {f.name for f in fields(section)}
            for sub_key, sub_value in value.items():
                if sub_key not in known:
                    raise StudioError(
                        f"{source}: unknown setting '{key}.{sub_key}'. Known settings in '{key}': "
                        f"{', '.join(sorted(known))}.")
                setattr(section, sub_key, sub_value)
        else:
            raise StudioError(
                f"{source}: unknown key '{key}'. The top level holds 'name', 'stage' and the sections "
                f"{', '.join([*SECTIONS, *sorted(stage_sections)])}.")
    return cfg.validate()


def set_value(data: dict, dotted: str, value: Any) -> None:
    """Apply ``section.field=value`` (or a bare ``field`` that exists in exactly one section) to a dict."""
    if "." in dotted:
        section, name = dotted.split(".", 1)
    elif dotted in ("name", "stage"):
        data[dotted] = value
        return
    else:
        owners = [s for s, cls in SECTIONS.items() if any(f.name == dotted for f in fields(cls))]
        if len(owners) != 1:
            raise StudioError(f"Unknown setting '{dotted}'. Use section.field, e.g. training.learning_rate=1e-4.")
        section, name = owners[0], dotted
    try:
        known = {f.name for f in fields(section_class(section))}
    except KeyError:
        known = set()
    if name not in known:
        raise StudioError(f"Unknown setting '{dotted}'. Use section.field, e.g. training.learning_rate=1e-4.")
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        data[section] = {}
    data[section][name] = value
