"""The model card (README.md) every export carries: what the model is, what it was taught and how, how well it
did when it was evaluated, how it was checked, and how to load it with each of the tools people use.

Plain Markdown built from the run folder; it never names a path on the machine that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.config import to_dict
from studio.runs import Run


def evaluation_reports(run: Run) -> list[dict]:
    """The reports of this run's finished evaluations (copied into the run by studio/stages/evaluate.py)."""
    found = []
    for file in sorted((run.path / "evaluations").glob("*/report.json")):
        try:
            found.append(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _evaluation_section(reports: list[dict]) -> list[str]:
    if not reports:
        return ["No evaluation of this run was made before export (the studio's Evaluate tab or "
                "`studio eval RUN` makes one; the next export then includes it)."]
    lines = []
    for report in reports:
        labels = report.get("labels", {})
        lines += [f"**{report.get('evaluation_run', 'evaluation')}**: {labels.get('tuned', 'tuned')} against "
                  f"{labels.get('base', 'base')}. {report.get('headline', '')}", "",
                  "| measure | base | tuned | tuned better / worse / tie |", "|---|---|---|---|"]
        for metric, found in (report.get("summary") or {}).items():
            if isinstance(found, dict):
                wins = f"{found.get('tuned_wins', '–')} / {found.get('base_wins', '–')} / {found.get('ties', '–')}"
                lines.append(f"| {metric} | {_number(found.get('base_mean'))} | {_number(found.get('tuned_mean'))} | "
                             f"{wins} |")
        loss = report.get("loss") or {}
        if loss.get("base") and loss.get("tuned"):
            lines.append(f"| held-out loss | {_number(loss['base'].get('loss'))} | "
                         f"{_number(loss['tuned'].get('loss'))} | lower is better |")
        lines += ["", f"The whole report is in `evaluations/{report.get('evaluation_run', '')}/` (report.html opens "
                  "in a browser).", ""]
    return lines


def _settings(run: Run) -> list[str]:
    config = to_dict(run.config())
    lines = [f"- stage: `{config.get('stage', 'sft')}`"]
    for section in ("method", "training"):
        values = config.get(section) or {}
        shown = ", ".join(f"{k}={v}" for k, v in values.items() if v not in (None, "", [], {}))
        lines.append(f"- {section}: {shown}")
    model = config.get("model") or {}
    lines.append(f"- chat template: `{model.get('chat_template', 'auto')}`, its default system prompt: "
                 f"`{model.get('template_system_prompt', 'keep')}`")
    return lines


def _data(run: Run) -> list[str]:
    data = run.read_json("data.json")
    if not data:
        return ["- (no data summary was saved)"]
    name = Path(str(data.get("file", ""))).name
    if "demo" in str(data.get("file", "")) and "assets" in str(data.get("file", "")):
        name = f"the studio's demo set ({name})"
    return [f"- file: {name}, format: {data.get('format', '?')}",
            f"- rows: {data.get('rows', '?')} read, {data.get('usable', '?')} usable; {data.get('train_rows', '?')} "
            f"trained on, {data.get('eval_rows', '?')} held out"]


def _how_to_load(fmt: str, folder: str, facts: dict) -> list[str]:
    base = facts.get("base") or "THE-BASE-MODEL"
    if fmt == "adapter":
        return ["```python", "from peft import AutoPeftModelForCausalLM   # the base: adapter_config.json's hub id",
                "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")', "```", "",
                "Or with the base loaded yourself:", "", "```python",
                "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{folder}")',
                "```", "", "For llama.cpp or Ollama, export the merged model as GGUF instead."]
    if fmt == "merged":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
                'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], '
                'add_generation_prompt=True, return_tensors="pt", return_dict=True)',
                "out = model.generate(**inputs, max_new_tokens=100)   # stops at the end of its turn "
                "(generation_config.json)",
                'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
                "For llama.cpp: `python convert_hf_to_gguf.py . --outtype f16` (or export a GGUF from the studio)."]
    gguf = facts.get("gguf_file", "model.gguf")
    ollama = facts.get("ollama") or {}
    lines = ["llama.cpp:", "", "```bash", f"llama-cli -m {gguf} -cnv   # or: llama-server -m {gguf} --jinja", "```",
             "", "llama-cpp-python:", "", "```python", "from llama_cpp import Llama", "",
             f'llm = Llama(model_path="{gguf}")',
             'print(llm.create_chat_completion([{"role": "user", "content": "Hello!"}])["choices"][0]["message"]'
             '["content"])', "```", "", "Ollama (the Modelfile is in this folder):", "", "```bash"]
    lines += ollama.get("commands", ["ollama create MODEL -f Modelfile", "ollama run MODEL"])
    lines += ["```"]
    return lines


def write_card(folder: Path, run: Run, fmt: str, facts: dict, checks: list[dict] | None = None) -> Path:
    """README.md in `folder`; `facts`: what the export found (base, end tokens, files); `checks`: the GGUF's."""
    status = run.stored_status()
    base = facts.get("base") or "(no hub id; see below)"
    lines = [f"# {run.id}", "", f"A fine-tuned model made with the Fine-tuning Studio: **{fmt}** export of run "
             f"`{run.id}` ({status.stage or 'sft'}).", "", "## Base model", "", f"- {base}",
             f"- {facts.get('base_note', '')}", "", "## Data", "", *_data(run), "", "## Method and settings", "",
             *_settings(run)]
    if facts.get("end_of_turn"):
        lines.append(f"- a reply ends with `{facts['end_of_turn']}` (end tokens: {facts.get('end_tokens')})")
    lines += ["", "## Evaluation", "", *_evaluation_section(evaluation_reports(run)), ""]
    if checks is not None:
        lines += ["## Checked after export", "", "This file was loaded back with llama.cpp (llama-cpp-python) on the "
                  "machine that wrote it:", ""]
        for check in checks:
            mark = {True: "passed", False: "FAILED", None: "shown"}[check["passed"]]
            lines.append(f"- {check['name']}: {mark}: {check['detail']}")
        lines.append("")
    lines += ["## How to load it", "", *_how_to_load(fmt, ".", facts), ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
