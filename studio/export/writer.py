"""Fill a folder with one export of a run: the model files, the model card, the run's evaluation reports and
export.json (what was written, how long it took, what the check found).

The story of a GGUF export: the merged model (with the training template and end tokens) into a staging folder ->
llama.cpp's converter -> the end-of-turn token written into the metadata -> (4-bit: llama.cpp's quantiser) ->
loaded back and checked -> a Modelfile for Ollama -> the card.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.errors import StudioError
from studio.export import card, llamacpp, ollama, portable
from studio.export.formats import check_format
from studio.runs import Run

FALLBACK_PROMPT = "What is the capital of France?"


@dataclass
class ExportReport:
    format: str
    folder: str
    files: dict = field(default_factory=dict)  # name -> bytes
    seconds: dict = field(default_factory=dict)  # step -> seconds
    checks: list = field(default_factory=list)  # verify.Check.to_json() dicts (GGUF only)
    facts: dict = field(default_factory=dict)

    @property
    def verified(self) -> bool | None:
        """True when every check passed, False when one failed, None when nothing was checked (not a GGUF)."""
        if not self.checks:
            return None
        return all(c["passed"] is not False for c in self.checks)

    def to_json(self) -> dict:
        return {**asdict(self), "verified": self.verified}

    def summary(self) -> str:
        size = sum(self.files.values()) / 2**20
        head = f"{self.format}: {len(self.files)} files, {size:,.1f} MiB in {sum(self.seconds.values()):.0f} s."
        if self.verified is None:
            return head
        lines = [head, ("verified" if self.verified else "NOT verified") + " by loading it back with llama.cpp:"]
        for c in self.checks:
            lines.append(f"  - {c['name']}: {({True: 'ok', False: 'FAILED', None: 'shown'})[c['passed']]}: "
                         f"{c['detail']}")
        return "\n".join(lines)


def held_out_conversations(run: Run) -> list[list[dict]]:
    """Conversations to check an export with, each ending on a user turn: the first held-out row's first request,
    and (where the row has a reply) the same row continued by a second request."""
    try:
        from studio.data import load_splits
        cfg = run.config()
        rows = load_splits(cfg.data, seed=cfg.training.seed).eval or []
        messages = next((r["messages"] for r in rows if r.get("messages")), None)
    except Exception:  # noqa: BLE001 - a data file gone since training: the fallback prompt still checks the file
        messages = None
    if not messages:
        return [[{"role": "user", "content": FALLBACK_PROMPT}]]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return [[{"role": "user", "content": FALLBACK_PROMPT}]]
    found = [messages[:first_user + 1]]
    if first_user + 1 < len(messages) and messages[first_user + 1]["role"] == "assistant":
        found.append(messages[:first_user + 2] + [{"role": "user", "content": "Say it again, in fewer words."}])
    return found


def write_export(run: Run, fmt: str, folder: Path, say: Callable[[str], None] = lambda _: None,
                 seconds: float | None = None) -> ExportReport:
    """Write export `fmt` of `run` into `folder` (created; must not exist). `seconds`: a bound on each llama.cpp
    step (a shared studio's limit)."""
    from studio.inference import check_usable
    spec = check_format(fmt)
    check_usable(run)
    if fmt != "adapter" and run.stored_status().stage == "reward":
        raise StudioError(f"Run {run.id} is a reward model (a score head, not replies): export its adapter.")
    if fmt.startswith("gguf-"):
        llamacpp.require()
    folder.mkdir(parents=True)
    try:
        return _fill(run, spec, folder, say, seconds)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no half-made export left to be mistaken for a whole one
        raise


def _fill(run: Run, spec, folder: Path, say, seconds) -> ExportReport:
    fmt = spec.name
    report = ExportReport(format=fmt, folder=str(folder))
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        report.seconds[step] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    if fmt == "adapter":
        say("Copying the adapter.")
        report.facts.update(portable.write_adapter(run, folder))
        lap("adapter")
    elif fmt == "merged":
        say("Writing the merged model (merging the adapter into the base first, if not done yet).")
        report.facts.update(portable.write_merged(run, folder))
        lap("merged")
    else:
        _write_gguf(run, spec, folder, report, say, lap, seconds)
    _copy_evaluations(run, folder)
    card.write_card(folder, run, fmt, report.facts, report.checks if fmt.startswith("gguf-") else None)
    report.files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "export.json").write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
    return report


def _write_gguf(run: Run, spec, folder: Path, report: ExportReport, say, lap, seconds) -> None:
    from studio.export.verify import verify_gguf
    staging = folder / ".merged"
    say("Writing the merged model for the converter.")
    facts = portable.write_merged(run, staging)
    report.facts.update(facts)
    lap("merged")
    tokenizer = portable.export_tokenizer(run)
    eot_id, eot = portable.end_of_turn(tokenizer)
    # The end-of-sequence id becomes the end of turn too, as chat runtimes stop at it; unless the template writes
    # the eos token's text itself (after a turn), where changing it would change what the template renders.
    uses_eos_text = "eos_token" in portable.training_template(tokenizer)
    eos_id = tokenizer.eos_token_id if uses_eos_text and tokenizer.eos_token_id is not None else eot_id
    name = f"{run.id}-{spec.gguf_type}.gguf"
    converted = folder / ".converted.gguf"
    outtype = spec.gguf_type if spec.by_converter else "f16"
    say(f"Converting to GGUF {outtype} with llama.cpp's converter.")
    llamacpp.convert(staging, outtype, converted, seconds)
    lap("convert")
    ended = folder / (name if spec.by_converter else ".f16.gguf")
    say(f"Writing the end-of-turn token {eot} into the GGUF's metadata.")
    llamacpp.set_end_tokens(converted, ended, eos_id, eot_id, seconds)
    converted.unlink()
    lap("end tokens")
    if not spec.by_converter:
        say(f"Quantising to {spec.gguf_type.upper()} with llama.cpp's quantiser.")
        llamacpp.quantize(ended, folder / name, spec.gguf_type)
        ended.unlink()
        lap("quantize")
    report.facts.update({"gguf_file": name, "eos_id": eos_id, "end_of_turn_id": eot_id})
    conversations = held_out_conversations(run)
    say("Loading the GGUF back with llama.cpp to check it.")
    checks = verify_gguf(folder / name, tokenizer, eot_id, conversations,
                         merged_dir=staging if spec.compare_reply else None, compare=spec.compare_reply)
    report.checks = [c.to_json() for c in checks]
    lap("verify")
    shutil.rmtree(staging)
    report.facts["ollama"] = ollama.write_modelfile(folder, name, run.id, spec.name, tokenizer, eot, conversations)


def _copy_evaluations(run: Run, folder: Path) -> None:
    source = run.path / "evaluations"
    if source.is_dir() and any(source.iterdir()):
        shutil.copytree(source, folder / "evaluations", dirs_exist_ok=True)
