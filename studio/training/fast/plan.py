"""How a run trains fast on the machine it lands on: the studio picks these for every user.

The plan is worked out here from plain facts about the machine and the model (``Machine``), with no torch
import; ``apply.py`` is the one place where a plan acts on a model, a trainer or the GPU. With
``training.speed: plain`` the plan is empty: stock TRL and PEFT, none of what follows.

- Packing (padding-free, best-fit): on a GPU, short conversations are packed into full rows so no
  compute goes to padding. On the CPU rows are short and the dense masks cost more than padding.
- Attention: packed rows need a kernel that keeps documents apart without a dense mask. flash-attn
  has no wheel for most users, so PyTorch's own kernels are used: FlashAttention-2's variable-length
  kernel on GPUs that run it (varlen_attention.py: one call each way, no mask), else flex attention
  (block-sparse document masks). DPO's rows are padded on the right, so they need no mask either: the same
  kernel runs on them as plain causal attention.
- Fused kernels: LoRA projections with the add-on folded into the base matmul (fused_lora.py, on
  GPUs); with 16-bit LoRA on a GPU with Triton, each SwiGLU MLP as one node whose activation kernels add the
  gate, up and down LoRA terms themselves (lora_mlp.py); and Liger's RMSNorm, RoPE and SwiGLU kernels when the
  package is installed (NVIDIA only);
  without Liger, PyTorch's own fused RMSNorm (kernels.py). Neither for GRPO: its steps are mostly generation,
  where Liger measured no faster (0.88x at 1B, 1.00x at 8B; the fused norm is unmeasured there).
- Generation (GRPO): each decoding step replayed as one CUDA graph with a static KV cache (generation.py), since a
  step writes one token per reply and launching its kernels from Python was the whole cost; not under FSDP2,
  whose per-layer gathers are collectives a graph cannot hold.
  The LM head and loss are computed in chunks by TRL (no full-vocabulary logits in memory), except where
  nothing is checkpointed and the logits fit: then the head keeps them for the backward instead of projecting
  every token through the vocabulary a second time (lm_head.py; supervised fine-tuning).
- Data loading: on a GPU, batches are put together in two worker processes ahead of time; in the main
  process the GPU sat idle while each batch was built.
  On the CPU every core is already training, so batches are built in line.
- Gradient checkpointing: layer by layer, only as many layers as the memory estimate (memory.py) says
  the run needs to fit in the memory it may use (the GPU's free memory, or training.memory_limit_gib). The
  estimate counts the tokens a micro-batch holds from the run's own rows where they are known (the longest row,
  or what the packed rows can hold of the data), else batch_size x max_length.
  Each checkpointed layer runs its forward twice; on a card with room it is all waste.
- Long sequences and small cards (activations.py): where even every layer checkpointed does not fit, the
  checkpointed layers' inputs are offloaded to pinned host memory (copies that overlap the compute; one process
  only, and only where the host has the memory), and then fewer layers may need checkpointing; where that is still
  not enough, the input embedding table waits in host memory (host_embeddings.py; frozen and untied tables only,
  not under generation's graphed decoding), then the MLP runs over the sequence in tiles, as large as fit (8,192
  tokens down to 512). Each only where the estimate says it must, since each costs some time. The LM head and loss
  never build the full logits (TRL's chunked head, above) at any length.
- QLoRA keeps embeddings and the LM head in bf16 (PEFT's kbit preparation upcasts them to float32,
  4 GB more on an 8B model with a 128k vocabulary).
- Several processes (studio/distributed.py): DDP when the model and its training state fit one GPU with every
  layer checkpointed, FSDP2 (weights, gradients and optimizer state split across the GPUs) when they do not.
  Everything above applies per process under both: each process packs its own share of the batch, and the
  fused LoRA and Liger kernels run inside each process's layers (under FSDP2 on the layer's gathered weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from studio.config import RunConfig
from studio.shapes import ModelShape
from studio.training.fast.memory import FILL, adapted_layers, kept_logits_gib, layers_to_checkpoint, peak_gib

LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2")
FUSED_NORM_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")  # their norm is kernels.PLAIN_RMS_NORMS
# Their attention modules hand the packed-sequence boundaries to the attention function unchanged.
VARLEN_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")
# Their MLP is exactly down(silu(gate(x)) * up(x)) (lora_mlp.SWIGLU_MLPS).
LORA_MLP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
VARLEN_ATTENTION = "packed_varlen"  # varlen_attention.NAME (not imported here: that module needs torch)
VARLEN_NEEDS = "an Ampere or newer NVIDIA GPU, bf16 or fp16, and a model without sliding windows"
# Sequences each row of a stage's batch becomes in the forward that keeps activations (memory estimate).
SEQUENCES_PER_ROW = {"dpo": 2, "orpo": 2, "simpo": 2, "reward": 2}
# Stages whose trainer pads every sequence on the right and starts it at position 0 (TRL's DPO collator): causal
# attention there needs no padding mask, since a real token never looks at a later padding position.
UNMASKED_STAGES = ("dpo",)
# Stages whose steps are mostly generation, one token per forward pass (bench/NOTES.md, GRPO on the H200).
GENERATING_STAGES = ("grpo",)
# From this length on, a packed row that is one sequence runs through cuDNN's attention (varlen_attention.py), which
# measured faster than FlashAttention-2's variable-length kernel at 16k and 64k tokens (bench/NOTES.md, session 10);
# below, rows are rarely one sequence and attention is a small part of the step.
LONG_ROW_TOKENS = 8192
# What the plan says of FlashAttention-4 with the variable-length attention, by what the probe found (Machine.flash4).
FLASH4_REASONS = {
    "ok": "attention: FlashAttention-4's variable-length kernels (flash-attn-4 is installed; on the H200 about a fifth "
          "faster than FlashAttention-2 on packed rows: bench/NOTES.md)",
    "missing": "attention: FlashAttention-2; on this GPU `pip install flash-attn-4` makes packed rows' attention "
               "faster (the studio's set-up installs it on NVIDIA machines)",
    "failed": "attention: FlashAttention-2 (the installed flash-attn-4 did not run here, or disagreed with "
              "FlashAttention-2, when tried before training)"}
# With checkpointed layers FlashAttention-4 measured slower than FlashAttention-2 on the H200's 8B QLoRA (7,604 against
# 11,453 tokens/s under 12 GiB, the GPU idle a third of the step; level under 8 GiB with offloaded inputs) and faster
# only without checkpointing (bench/NOTES.md, session 18): where the plan checkpoints, FlashAttention-2 stays.
FLASH4_CHECKPOINTED = ("attention: FlashAttention-2, although flash-attn-4 is installed: with gradient checkpointing "
                       "FlashAttention-4 measured slower (bench/NOTES.md)")
# How the progress line names each attention kernel (the plan keeps transformers' implementation names).
ATTENTION_NAMES = {VARLEN_ATTENTION: "variable-length flash", "flex_attention": "flex", "sdpa": "SDPA",
                   "eager": "eager"}


@dataclass
class Machine:
    """What the plan depends on, found by probe.py (which imports torch) or given by a test or benchmark."""
    device: str  # "cuda", "mps" or "cpu"
    model_type: str = ""
    shape: ModelShape | None = None
    free_gib: float | None = None  # the GPU's free memory
    host_free_gib: float | None = None  # the host's available memory (for offloaded checkpoints); None: unknown
    liger_installed: bool = False
    triton_kernels_ok: bool = False  # the studio's own Triton kernels run here (lora_mlp.py): Triton on an NVIDIA GPU
    fused_rms_norm: bool = False  # this torch has aten::_fused_rms_norm
    varlen_ok: bool = False  # the variable-length flash kernel runs for this model, GPU and precision
    cudnn_attention_ok: bool = False  # SDPA's cuDNN attention runs for this head size and precision (long rows)
    # FlashAttention-4 on a GPU it has kernels for: "ok" (its variable-length kernels ran for this model's heads and
    # agreed with FlashAttention-2), "failed" (installed, but that check failed), "missing" (not installed); "": no such GPU
    flash4: str = ""
    forks: bool = True  # data-loader workers can fork (POSIX)
    processes: int = 1  # the run's processes, on every machine together (one per GPU)


@dataclass
class DataLengths:
    """The lengths of a run's encoded training rows (after truncation to data.max_length), where the data is known
    before the model loads: what the memory estimate reads instead of assuming every row is max_length long."""
    longest: int  # the longest row, in tokens
    total: int  # every row's tokens together
    rows: int


def data_lengths(rows) -> DataLengths | None:
    """The lengths of encoded supervised rows ({"input_ids": [...]}); None where a row has none (pairs, prompts)."""
    lengths = []
    for row in rows:
        ids = row.get("input_ids") if isinstance(row, dict) else None
        if ids is None:
            return None
        lengths.append(len(ids))
    return DataLengths(longest=max(lengths), total=sum(lengths), rows=len(lengths)) if lengths else None


@dataclass
class SpeedPlan:
    packing: bool
    attention: str
    liger: bool
    gradient_checkpointing: bool
    fused_lora: bool = False
    # LoRA MLPs as one node whose SwiGLU kernel adds the gate, up and down LoRA terms (lora_mlp.py)
    fused_lora_mlp: bool = False
    fused_norm: bool = False  # PyTorch's fused RMSNorm (kernels.py), where Liger's is not used
    graphed_decoding: bool = False  # generation's decoding steps as CUDA graphs (generation.py; GRPO on a GPU)
    # With the variable-length kernel: packed rows that are one sequence of at least this many tokens run through
    # cuDNN's causal attention instead (varlen_attention.py); 0: never.
    long_rows_cudnn: int = 0
    # With the variable-length kernel: packed rows through FlashAttention-4's kernels instead of FlashAttention-2's.
    flash_attention_4: bool = False
    data_workers: int = 0
    # With checkpointing on: how many of the last decoder layers keep their activations anyway (0: none,
    # every layer is checkpointed). Set when memory allows some but not all layers to skip recomputation.
    uncheckpointed_layers: int = 0
    # How many of the checkpointed layers (the first ones) keep their inputs in pinned host memory instead of on the
    # GPU (activations.py); 0: none.
    offloaded_layers: int = 0
    # With method.last_layers: how many decoder layers (the last ones) have adapters; the checkpointed and offloaded
    # counts are among them. 0: every layer.
    adapted_layers: int = 0
    # The MLP runs over the sequence in tiles of this many tokens (activations.py); 0: whole.
    mlp_tile_tokens: int = 0
    # The input embedding table waits in host memory (host_embeddings.py).
    host_embeddings: bool = False
    # The LM head keeps its 16-bit logits for the backward instead of projecting them again (lm_head.py).
    head_keeps_logits: bool = False
    layers: int = 0
    # The most tokens a micro-batch puts through the model with gradients, as the memory estimate counted them:
    # from the run's data where it was known (its longest row, or its packed rows), else batch_size x max_length.
    micro_batch_tokens: int = 0
    memory_estimate_gib: float = 0.0
    memory_budget_gib: float = 0.0
    memory_limit_gib: float = 0.0  # enforced on the GPU (training.memory_limit_gib); 0: none
    # The studio's own trainer and set-up, none of which changes what is computed: TRL's SFTTrainer without
    # its per-step GPU waits (sft_trainer.py), the collector kept off set-up objects, 4-bit siblings sharing one
    # dequantisation, LoRA inputs left in 16-bit under autocast, QLoRA without PEFT's float32 upcasts, the
    # allocator's expandable segments, pinned batches copied without waiting.
    studio_trainer: bool = True
    pack_4bit_siblings: bool = True
    plain: bool = False  # training.speed: plain, stock TRL and PEFT
    processes: int = 1
    strategy: str = ""  # with several processes: "ddp" or "fsdp"
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def changed(self, **fields_to_change) -> "SpeedPlan":
        """This plan with some fields set otherwise (the benchmark's A/B arms)."""
        return replace(self, **fields_to_change)

    def summary(self) -> str:
        """How the run trains, in words, as the Train tab and the CLI show it."""
        if self.plain:
            parts = ["stock TRL and PEFT (speed plan off)",
                     "packed rows" if self.packing else "padded rows", self.checkpointing_text()]
            return ", ".join(p for p in parts if p)
        attention = ATTENTION_NAMES.get(self.attention, self.attention)
        parts = ["packed rows" if self.packing else "padded rows",
                 f"{attention} attention" + (" (FlashAttention-4)" if self.flash_attention_4 else "")]
        if self.liger or self.fused_lora or self.fused_norm:
            parts.append("fused kernels (" + ", ".join(
                name for name, used in (("LoRA", self.fused_lora), ("LoRA MLP", self.fused_lora_mlp),
                                        ("Liger", self.liger),
                                        ("RMSNorm", self.fused_norm and not self.liger)) if used) + ")")
        parts.append(self.checkpointing_text())
        if self.head_keeps_logits:
            parts.append("LM head logits kept for the backward")
        text = ", ".join(p for p in parts if p)
        if self.memory_estimate_gib and self.memory_budget_gib:
            text += f"; about {self.memory_estimate_gib:.1f} GiB of the {self.memory_budget_gib:.1f} GiB it may use"
            text += " on each GPU" if self.processes > 1 else ""
        return self.parallel_text() + text

    def parallel_text(self) -> str:
        if self.processes <= 1:
            return ""
        how = {"ddp": "DDP, a whole copy of the model on each", "fsdp": "FSDP2, the model split across them"}
        return f"{self.processes} processes ({how.get(self.strategy, self.strategy)}); "

    def checkpointing_text(self) -> str:
        tiled = f", MLP in tiles of {self.mlp_tile_tokens:,} tokens" if self.mlp_tile_tokens else ""
        tiled += ", input embeddings in host memory" if self.host_embeddings else ""  # with the tiles: the smallest
        if not self.gradient_checkpointing:
            return "no checkpointing" + tiled
        offloaded = f" ({self.offloaded_layers} layers' inputs in host memory)" if self.offloaded_layers else ""
        if self.uncheckpointed_layers and self.layers:
            of = self.adapted_layers or self.layers  # with method.last_layers: among the layers with adapters
            which = f"the {of} layers with adapters" if self.adapted_layers else f"{of} layers"
            return (f"gradient checkpointing on {of - self.uncheckpointed_layers} of {which}"
                    f"{offloaded} (the rest fit without){tiled}")
        return "gradient checkpointing" + offloaded + tiled


def plain_plan(cfg: RunConfig, machine: Machine) -> SpeedPlan:
    """training.speed: plain. TRL and PEFT as their users get them: TRL's SFTTrainer, PEFT's own layers and
    k-bit preparation, SDPA attention; packing and checkpointing only where the config turns them on."""
    t = cfg.training
    packing = t.packing == "on"
    plan = SpeedPlan(packing=packing, attention="sdpa" if t.attention in ("auto", VARLEN_ATTENTION) else t.attention,
                     liger=False, gradient_checkpointing=t.gradient_checkpointing == "on", studio_trainer=False,
                     pack_4bit_siblings=False, plain=True, layers=machine.shape.layers if machine.shape else 0,
                     reasons=["speed: plain (stock TRL and PEFT; the studio's speed plan is off)"])
    _plan_parallel(plan, cfg, machine)
    return plan


def plan_speed(cfg: RunConfig, machine: Machine, data: DataLengths | None = None) -> SpeedPlan:
    """The plan for `cfg` on `machine`; the reasons say why each choice was made. `data`: the lengths of the run's
    training rows where they are known (a run's own set-up knows them; the Model tab's estimate does not)."""
    if cfg.training.speed == "plain":
        return plain_plan(cfg, machine)
    t, method, device = cfg.training, cfg.method.method, machine.device
    reasons = []
    prompt_learning = method in ("prompt_tuning", "prefix_tuning")
    if cfg.stage != "sft":
        packing = False  # pairs, feedback and generated completions are batched by their trainers
        reasons.append(f"packing: off ({cfg.stage} batches its own rows)")
    elif t.packing == "auto":
        packing = device == "cuda" and not prompt_learning
        reasons.append("packing: on for GPUs (no compute on padding)" if packing else
                       "packing: off (CPU rows are short, or prompt/prefix tuning)")
    else:
        packing = t.packing == "on"
    varlen_ok = machine.varlen_ok
    unmasked = cfg.stage in UNMASKED_STAGES and not prompt_learning  # prompt learning puts tokens before the rows
    if t.attention == VARLEN_ATTENTION and not ((packing or unmasked) and varlen_ok):  # varlen_ok: NVIDIA GPUs only
        # Asked for where it cannot run (a CPU, an older GPU, unpacked rows): say so and use what can.
        attention = "flex_attention" if packing and device == "cuda" else "sdpa"
        reasons.append(f"attention: {attention}, not {VARLEN_ATTENTION} "
                       f"(that kernel needs packed rows, {VARLEN_NEEDS})")
    elif t.attention != "auto":
        attention = t.attention
    elif packing and device == "cuda" and varlen_ok and machine.model_type in VARLEN_MODEL_TYPES:
        attention = VARLEN_ATTENTION
        reasons.append("attention: variable-length flash (keeps packed documents apart, one kernel call each way)")
    elif packing and device == "cuda":
        attention = "flex_attention"
        why_not = "it does not cover this model's attention" if varlen_ok else f"it needs {VARLEN_NEEDS}"
        reasons.append("attention: flex (keeps packed documents apart without a dense mask; not the variable-length "
                       f"flash kernel: {why_not})")
    elif unmasked and device == "cuda" and varlen_ok and machine.model_type in VARLEN_MODEL_TYPES:
        # Unpacked rows reach varlen_attention's plain causal path: FlashAttention on the padded batch, where SDPA
        # with the padding mask falls back to a slower kernel (bench/NOTES.md: DPO on the H200).
        attention = VARLEN_ATTENTION
        reasons.append(f"attention: variable-length flash on the real tokens only ({cfg.stage}'s padded rows run as "
                       "one row of their real tokens, each sequence kept apart; no compute on padding)")
    else:
        attention = "sdpa"
    # Liger's kernels are Triton (NVIDIA GPUs) and cover certain architectures: 'on' cannot force them
    # where they cannot run, it says why instead of failing the run.
    liger = t.fused_kernels != "off" and device == "cuda" and machine.liger_installed \
        and machine.model_type in LIGER_MODEL_TYPES
    if t.fused_kernels == "on" and not liger:
        reasons.append("Liger kernels: not used (they need an NVIDIA GPU, pip install liger-kernel, and a "
                       f"supported architecture: {', '.join(LIGER_MODEL_TYPES)})")
    # In generation each forward pass is one token per reply, and its kernels are replayed as a graph: Liger's
    # measured no faster there (bench/NOTES.md, session 9); 'on' still asks for the fused kernels.
    generates = cfg.stage in GENERATING_STAGES and t.fused_kernels != "on"
    if liger and generates:
        liger = False
        reasons.append(f"Liger kernels: off for {cfg.stage} (its steps are mostly generation, one token at a time, "
                       "where they measured no faster)")
    # Fused LoRA removes GPU memory passes; on the CPU it measured no faster (bench/NOTES.md), so 'auto' keeps
    # PEFT's own forward there.
    fused_lora = method in ("lora", "rslora", "qlora") and (
        t.fused_kernels == "on" or (t.fused_kernels == "auto" and device == "cuda"))
    fused_lora_mlp = _lora_mlp_kernel(cfg, machine, fused_lora and not generates, reasons)
    fused_norm = (not liger and not generates and t.fused_kernels != "off" and device == "cuda"
                  and machine.fused_rms_norm and machine.model_type in FUSED_NORM_MODEL_TYPES)  # not measured there
    long_rows_cudnn = 0
    if attention == VARLEN_ATTENTION and packing and machine.cudnn_attention_ok:
        long_rows_cudnn = LONG_ROW_TOKENS
        reasons.append(f"attention: a row that is one sequence of {LONG_ROW_TOKENS:,} tokens or more through cuDNN's "
                       "fused attention (no boundaries to keep, and faster than FlashAttention-2 there: "
                       "bench/NOTES.md)")
    flash_attention_4 = attention == VARLEN_ATTENTION and machine.flash4 == "ok"
    if attention == VARLEN_ATTENTION and machine.flash4:
        reasons.append(FLASH4_REASONS[machine.flash4])
    workers = 2 if device == "cuda" and machine.forks else 0  # workers fork; elsewhere they would re-import
    plan = SpeedPlan(packing, attention, liger, False, fused_lora=fused_lora, fused_lora_mlp=fused_lora_mlp,
                     fused_norm=fused_norm,
                     data_workers=workers, reasons=reasons, layers=machine.shape.layers if machine.shape else 0,
                     memory_limit_gib=t.memory_limit_gib if device == "cuda" else 0.0, long_rows_cudnn=long_rows_cudnn,
                     flash_attention_4=flash_attention_4)
    plan.micro_batch_tokens, why = micro_batch_tokens(cfg, packing, data)
    if device == "cuda" and machine.shape is not None and t.gradient_checkpointing == "auto":
        reasons.append(why)
    _plan_parallel(plan, cfg, machine)
    _plan_checkpointing(plan, cfg, device, machine.shape, machine.free_gib, machine.host_free_gib)
    if plan.flash_attention_4 and plan.gradient_checkpointing:
        plan.flash_attention_4 = False
        reasons[reasons.index(FLASH4_REASONS["ok"])] = FLASH4_CHECKPOINTED
    _plan_kept_logits(plan, cfg, machine)
    if cfg.stage in GENERATING_STAGES and device == "cuda":
        plan.graphed_decoding = plan.strategy != "fsdp"
        reasons.append("generation: each decoding step replayed as a CUDA graph (static cache)" if
                       plan.graphed_decoding else "generation: TRL's own (FSDP2's per-layer gathers cannot be graphed)")
    return plan


def _lora_mlp_kernel(cfg: RunConfig, machine: Machine, candidate: bool, reasons: list) -> bool:
    """Whether each MLP runs as one node whose SwiGLU kernels add the LoRA terms (lora_mlp.py): 16-bit LoRA or rsLoRA
    on an NVIDIA GPU, on the MLP's three projections, without LoRA dropout (each projection would need its own
    mask), for models whose MLP is plain SwiGLU. Generation's one-token steps keep the path they were measured with."""
    m, t = cfg.method, cfg.training
    if not (candidate and m.method in ("lora", "rslora") and machine.device == "cuda" and machine.triton_kernels_ok
            and t.precision != "fp32" and machine.model_type in LORA_MLP_MODEL_TYPES):
        return False
    targets = set(m.target_modules)
    if "all-linear" not in targets and not {"gate_proj", "up_proj", "down_proj"} <= targets:
        return False
    if m.dropout > 0:
        reasons.append(f"LoRA MLP kernel: off (LoRA dropout {m.dropout:g}; with dropout 0 each MLP's SwiGLU kernels add "
                       "its LoRA terms themselves, a step about 1% faster on an 8B model)")
        return False
    return True


def tokens_per_step(cfg: RunConfig) -> int:
    """The most tokens one micro-batch puts through the model with gradients, for the memory estimate. A row of
    supervised fine-tuning is one sequence of up to data.max_length; a preference pair is two, its chosen and its
    rejected reply each after the prompt (DPO, ORPO, SimPO and reward models run both in one batch); a GRPO row is a
    completion, the prompt plus up to max_completion_length generated tokens, in whole groups of num_generations."""
    t = cfg.training
    if cfg.stage == "grpo":
        s = cfg.settings_of("grpo")
        completions = -(-t.batch_size // s.num_generations) * s.num_generations  # as the GRPO stage rounds it
        return completions * (cfg.data.max_length + s.max_completion_length)
    return t.batch_size * cfg.data.max_length * SEQUENCES_PER_ROW.get(cfg.stage, 1)


def micro_batch_tokens(cfg: RunConfig, packing: bool, data: DataLengths | None) -> tuple[int, str]:
    """The most tokens one micro-batch puts through the model with gradients, and where that number comes from.
    From the run's rows where they are known: packed rows hold at most batch_size x max_length tokens and never more
    than the data has; unpacked rows are padded to the longest in their batch, at most the data's longest row. Else
    (and for stages whose rows are pairs or generated completions) `tokens_per_step`'s batch_size x max_length."""
    t = cfg.training
    bound = tokens_per_step(cfg)
    if data is None or not data.rows or cfg.stage != "sft":
        return bound, (f"memory estimate: {bound:,} tokens a micro-batch (batch_size {t.batch_size} x max_length "
                       f"{cfg.data.max_length:,}; the data's lengths are not known here)")
    longest = min(data.longest, cfg.data.max_length)
    if packing:
        tokens = max(1, min(bound, data.total))
        how = (f"packed rows of up to {cfg.data.max_length:,} tokens, {t.batch_size} a micro-batch" if tokens == bound
               else f"all {data.rows:,} rows together are {data.total:,} tokens, less than {t.batch_size} packed "
                    f"row{'s' if t.batch_size != 1 else ''} of {cfg.data.max_length:,}")
    else:
        tokens = t.batch_size * longest
        how = (f"{t.batch_size} rows a micro-batch, padded to the longest; the data's longest row is "
               f"{data.longest:,} tokens" + (f" (max_length {cfg.data.max_length:,})" if longest < cfg.data.max_length
                                            else ""))
    return tokens, f"memory estimate: {tokens:,} tokens a micro-batch from the data ({how})"


def memory_budget_gib(cfg: RunConfig, free_gib: float | None) -> float | None:
    """What the run may use: the GPU's free memory, or less where training.memory_limit_gib says so."""
    limit = cfg.training.memory_limit_gib
    if not limit:
        return free_gib
    return limit if free_gib is None else min(limit, free_gib)


def _plan_parallel(plan: SpeedPlan, cfg: RunConfig, machine: Machine) -> None:
    """With several processes: DDP or FSDP2 (devices.strategy; 'auto' by the memory estimate), and why."""
    plan.processes = machine.processes
    if machine.processes <= 1:
        return
    asked, shape, t = cfg.devices.strategy, machine.shape, cfg.training
    budget = memory_budget_gib(cfg, machine.free_gib)
    if asked != "auto":
        plan.strategy = asked
        plan.reasons.append(f"strategy: {'FSDP2' if asked == 'fsdp' else 'DDP'} (as devices.strategy asks)")
        _fit_to_strategy(plan, cfg)
        return
    if machine.device != "cuda":
        plan.strategy = "ddp"
        plan.reasons.append("strategy: DDP (CPU processes; memory is not the limit there)")
        return
    if shape is None or not shape.layers or not shape.hidden or budget is None:
        plan.strategy = "ddp"
        plan.reasons.append("strategy: DDP (the model's size is unknown, so memory could not be estimated)")
        return
    tokens = plan.micro_batch_tokens or tokens_per_step(cfg)
    adapted = cfg.method.last_layers
    least = peak_gib(shape, cfg.method.method, cfg.method.rank, tokens, shape.layers, plan.liger, adapted=adapted)
    if t.gradient_checkpointing == "off":
        least = peak_gib(shape, cfg.method.method, cfg.method.rank, tokens, 0, plan.liger, adapted=adapted)
    if least <= FILL * budget:
        plan.strategy = "ddp"
        plan.reasons.append(f"strategy: DDP, the model and its training state fit one GPU (at least {least:.1f} GiB "
                            f"of {budget:.1f} GiB), so each GPU keeps a whole copy and only gradients travel")
    else:
        plan.strategy = "fsdp"
        plan.reasons.append(f"strategy: FSDP2, one GPU would need at least {least:.1f} GiB of its {budget:.1f} GiB: "
                            f"weights, gradients and optimizer state are split across the {machine.processes} GPUs")
    _fit_to_strategy(plan, cfg)


def _fit_to_strategy(plan: SpeedPlan, cfg: RunConfig) -> None:
    if plan.strategy == "fsdp" and cfg.method.method in ("qlora", "lora8bit") and (plan.fused_lora or
                                                                                  plan.pack_4bit_siblings):
        # FSDP2 splits 4-bit weights stored in the compute type; the fused path reads bitsandbytes' own packing.
        plan.fused_lora = plan.pack_4bit_siblings = False
        plan.reasons.append("fused LoRA: off (FSDP2 stores the 4-bit weights its own way; not checked with them)")
    if plan.strategy == "fsdp" and plan.fused_lora_mlp:
        plan.fused_lora_mlp = False
        plan.reasons.append("LoRA MLP kernel: off (not checked under FSDP2's sharded weights)")


def _plan_kept_logits(plan: SpeedPlan, cfg: RunConfig, machine: Machine) -> None:
    """Supervised fine-tuning on a GPU where nothing is checkpointed: the LM head keeps its logits for the backward
    (lm_head.py) if they fit on top of the estimate. Where layers are checkpointed, memory is already short, and a
    layer recomputed costs more than the head's second projection saves."""
    shape, budget = machine.shape, memory_budget_gib(cfg, machine.free_gib)
    if (cfg.stage != "sft" or machine.device != "cuda" or not plan.studio_trainer or plan.plain
            or cfg.training.precision == "fp32"  # the head keeps 16-bit logits only (TRL's head runs otherwise)
            or plan.gradient_checkpointing or plan.strategy == "fsdp" or shape is None or not shape.vocab
            or not plan.memory_estimate_gib or budget is None):
        return
    logits = kept_logits_gib(plan.micro_batch_tokens, shape.vocab)
    need = plan.memory_estimate_gib + logits
    if need > FILL * budget:
        plan.reasons.append(f"LM head: projects its logits again in the backward (keeping them, {logits:.1f} GiB, "
                            f"would need {need:.1f} GiB of the {budget:.1f} GiB this run may use)")
        return
    plan.head_keeps_logits = True
    plan.memory_estimate_gib = round(need, 1)
    plan.reasons.append(f"LM head: keeps its 16-bit logits for the backward ({logits:.1f} GiB, counted in the "
                        "estimate) instead of projecting them a second time")


# Tokens per MLP tile, largest first: a large tile keeps each tile's matmuls busy, a small one holds less (a tile's
# activations are 3 x 14,336 values a token on an 8B model, twice over in its backward: 1.3 GiB for 8,192 tokens,
# 84 MiB for 512). The planner takes the largest that fits.
MLP_TILE_TOKENS = (8192, 4096, 2048, 1024, 512)
# Methods whose input embedding table is frozen, so that it can wait in host memory (host_embeddings.py).
FROZEN_EMBEDDING_METHODS = ("lora", "rslora", "dora", "qlora", "lora8bit")
# Of the host's available memory, what offloaded checkpoints may pin (the rest: the data, the loaders, the OS).
HOST_FILL = 0.8


def _plan_checkpointing(plan: SpeedPlan, cfg: RunConfig, device: str, shape: ModelShape | None,
                        free_gib: float | None, host_free_gib: float | None = None) -> None:
    t, method, reasons = cfg.training, cfg.method.method, plan.reasons
    if t.gradient_checkpointing != "auto":
        plan.gradient_checkpointing = t.gradient_checkpointing == "on"
        return
    if device != "cuda":
        reasons.append("checkpointing: off on the CPU (memory is not the limit there)")
        return
    budget = memory_budget_gib(cfg, free_gib)
    if shape is None or not shape.layers or not shape.hidden or budget is None:
        # No estimate possible: the cautious choice only where memory is the point of the method.
        plan.gradient_checkpointing = method in ("full", "qlora", "lora8bit")
        reasons.append("checkpointing: " + ("on" if plan.gradient_checkpointing else "off") +
                       " (the model's size is unknown, so memory could not be estimated)")
        return
    tokens = plan.micro_batch_tokens or tokens_per_step(cfg)
    shards = plan.processes if plan.strategy == "fsdp" else 1
    # Only the layers with adapters keep activations for the backward (method.last_layers): the checkpointed and
    # offloaded counts are among them, the first of them.
    trained = adapted_layers(shape, cfg.method.last_layers)
    plan.adapted_layers = trained if trained < shape.layers else 0
    checkpointed = layers_to_checkpoint(shape, method, cfg.method.rank, tokens, budget, plan.liger, shards,
                                        adapted=trained)
    if checkpointed == trained and peak_gib(shape, method, cfg.method.rank, tokens, checkpointed, plan.liger,
                                            shards=shards, adapted=trained) > FILL * budget:
        checkpointed = _plan_memory_techniques(plan, cfg, shape, tokens, budget, host_free_gib, trained)
    plan.memory_estimate_gib = round(peak_gib(shape, method, cfg.method.rank, tokens, checkpointed, plan.liger,
                                              shards=shards, offloaded=plan.offloaded_layers,
                                              mlp_tile=plan.mlp_tile_tokens, host_embeddings=plan.host_embeddings,
                                              adapted=trained), 1)
    plan.memory_budget_gib = round(budget, 1)
    plan.gradient_checkpointing = checkpointed > 0
    plan.uncheckpointed_layers = trained - checkpointed if checkpointed else 0
    room = f"estimate {plan.memory_estimate_gib:.1f} GiB of the {budget:.1f} GiB this run may use"
    if plan.offloaded_layers:
        room += f", {plan.offloaded_layers} layers' inputs in host memory"
    if plan.mlp_tile_tokens:
        room += f", MLP in tiles of {plan.mlp_tile_tokens:,} tokens"
    if plan.host_embeddings:
        room += ", input embeddings in host memory"
    if not checkpointed:
        reasons.append(f"checkpointing: off, it fits without ({room})")
    elif checkpointed < trained:
        of = f"{shape.layers} layers" if trained == shape.layers else \
            f"the {trained} layers with adapters (method.last_layers; the frozen ones beneath keep nothing)"
        reasons.append(f"checkpointing: {checkpointed} of {of}, the fewest that fit ({room})")
    else:
        over = plan.memory_estimate_gib > FILL * budget  # past what the planner aims for (room for the allocator)
        reasons.append(f"checkpointing: every layer ({room})" + (
            "; even so it may not fit: lower training.batch_size or data.max_length" if over else ""))


def _every_layer(trained: int, shape: ModelShape) -> str:
    """How the plan's reasons name all the layers that keep activations (with method.last_layers: the adapted ones)."""
    return "every layer" if trained == shape.layers else f"each of the {trained} layers with adapters"


def _plan_memory_techniques(plan: SpeedPlan, cfg: RunConfig, shape: ModelShape, tokens: int, budget: float,
                            host_free_gib: float | None, trained: int) -> int:
    """Every layer checkpointed still does not fit: offload the checkpointed inputs to host memory (as many layers'
    as the host has room for), then, if still over, the input embeddings to the host and the MLP in tiles
    (`_plan_smaller_footprint`). Returns the layers to checkpoint with what was chosen (offloading frees the inputs'
    memory, so fewer layers may need checkpointing). `trained`: the layers with adapters, among which those are
    counted. Each step records why."""
    method, rank, reasons = cfg.method.method, cfg.method.rank, plan.reasons
    target = FILL * budget
    offloadable = 0

    def peak(checkpointed: int, mlp_tile: int | None = None, host_embeddings: bool | None = None) -> float:
        return peak_gib(shape, method, rank, tokens, checkpointed, plan.liger, offloaded=offloadable,
                        mlp_tile=plan.mlp_tile_tokens if mlp_tile is None else mlp_tile,
                        host_embeddings=plan.host_embeddings if host_embeddings is None else host_embeddings,
                        adapted=trained)

    def fewest() -> int:
        return layers_to_checkpoint(shape, method, rank, tokens, budget, plan.liger, offloaded=offloadable,
                                    mlp_tile=plan.mlp_tile_tokens, host_embeddings=plan.host_embeddings,
                                    adapted=trained)

    layer_input_gib = tokens * 2 * shape.hidden / 2**30
    every = _every_layer(trained, shape)
    over = f"{every} checkpointed needs {peak(trained):.1f} GiB of the {budget:.1f} GiB this run may use"
    room = trained if host_free_gib is None else int(HOST_FILL * host_free_gib / layer_input_gib)
    if plan.processes > 1:
        reasons.append(f"offloaded checkpoints and MLP tiles: off, {over}, but they run in one process only (their own "
                       "backward pass per layer, which DDP's and FSDP2's hooks do not expect)")
        return trained
    if room < 3:  # two inputs stay on the GPU in any case (the one recomputed, the one fetched ahead)
        reasons.append(f"offloaded checkpoints: off, {over}, but the host's available memory "
                       f"({host_free_gib:.1f} GiB) has no room for the layers' inputs ({layer_input_gib:.1f} GiB each)")
    else:
        offloadable = min(room, trained)
        host = "" if offloadable == trained else \
            f" (as many as {HOST_FILL:.0%} of the host's available memory holds)"
        reasons.append(f"offloaded checkpoints: on, {over}; up to {offloadable} checkpointed layers' inputs "
                       f"({layer_input_gib:.2f} GiB each){host} wait in pinned host memory, copied while the GPU "
                       "computes")
    checkpointed = fewest()
    if peak(checkpointed) > target:
        _plan_smaller_footprint(plan, cfg, shape, tokens, peak, target, trained)
        checkpointed = fewest()
    plan.offloaded_layers = min(offloadable, checkpointed)
    return checkpointed


def _plan_smaller_footprint(plan: SpeedPlan, cfg: RunConfig, shape: ModelShape, tokens: int, peak, target: float,
                            trained: int):
    """Still over with the inputs offloaded: the first of these that fits, else the one that needs least. The input
    embeddings in host memory first (a wait for a lookup each forward), then the MLP in tiles from the largest down
    (each tile's MLP runs once more in the backward, and smaller tiles use the GPU less well).
    `peak(checkpointed, mlp_tile, host_embeddings)`: the estimate with the inputs offloaded. Records why."""
    # Not for generating stages: their decoding steps are captured as CUDA graphs (generation.py), which cannot hold
    # the lookup's copies to and from the host.
    host_ok = (cfg.method.method in FROZEN_EMBEDDING_METHODS and not shape.tied_embeddings
               and cfg.stage not in GENERATING_STAGES)
    tiles = [tile for tile in MLP_TILE_TOKENS if tokens > tile]  # a sequence within one tile runs the MLP whole
    choices = [(host_ok, 0)] + [(host_ok, tile) for tile in tiles]
    needs = [peak(trained, tile, host) for host, tile in choices]
    every = _every_layer(trained, shape)
    fits = [i for i, need in enumerate(needs) if need <= target]
    pick = fits[0] if fits else min(range(len(choices)), key=lambda i: (needs[i], i))
    host, tile = choices[pick]
    if host:
        plan.host_embeddings = True
        table = shape.vocab * shape.hidden * 2 / 2**30
        plan.reasons.append(f"input embeddings in host memory: {every} checkpointed with its input offloaded "
                            f"still needs {peak(trained, 0, False):.1f} GiB; the frozen table ({table:.2f} GiB) "
                            f"waits on the host and each forward looks its rows up there (with it: {needs[0]:.1f} GiB)")
    if tile:
        plan.mlp_tile_tokens = tile
        larger = f"; the next larger choice: {needs[pick - 1]:.1f} GiB" if pick > 1 else ""
        plan.reasons.append(f"MLP in tiles of {tile:,} tokens: a layer's MLP activations for the whole sequence "
                            f"would not fit ({every} checkpointed: {needs[pick]:.1f} GiB with them tiled{larger})")
