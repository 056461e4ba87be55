"""Evaluation, a run of its own kind: a finished run against the model it started from (or another run), on the
run's held-out rows or a file, with greedy decoding so the report repeats. Writes report.json and a readable
report.html into its own folder and into the evaluated run's evaluations/ folder (so the report travels with the
run and its exports). Started from the Evaluate tab or `studio eval RUN`; studio/evaluation.py does the work.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, Outcome, Stage


@dataclass
class EvaluateSettings:
    run: str = setting("", "The finished run to evaluate (its run id).")
    against: str = setting("", "What to compare it with: empty for the model it started from (its base), or another "
                               "finished run's id.")
    data: str = setting("", "Rows to evaluate on: empty for the run's own held-out rows, or a file of conversations "
                            "(each one's last assistant reply is the reference answer).")
    metrics: str = setting("auto", "Measures besides loss: 'auto' picks from the reference answers (numbers, JSON, short "
                                   "or long answers), or a comma-separated list of exact, contains, regex, numeric, "
                                   "json, rouge_l, bleu, chrf.")
    regex: str = setting("", "A pattern good answers match, for the 'regex' measure, e.g. ^Ahoy.")
    max_rows: int = setting(100, "Most rows to answer; each takes an answer from both models.", minimum=1,
                            maximum=100000)
    max_new_tokens: int = setting(128, "Longest answer written per row, in tokens.", minimum=1, maximum=8192)
    forgetting: bool = setting(True, "Also ask both models the studio's general questions (assets/probe/) and say "
                                     "whether fine-tuning made the model forget what it knew.")
    forgetting_questions: int = setting(40, "How many of the general questions to ask (0: all of them). Fewer is "
                                            "quicker (on a CPU each takes a second or two per model) and less sure.",
                                        minimum=0, maximum=10000)
    forgetting_threshold: float = setting(0.1, "How large a drop in general questions answered right is flagged.",
                                          minimum=0.0, maximum=1.0)
    judge: str = setting("", "Optional: a model that grades the two answers against your rubric: 'bundled', a model id, "
                             "or a run id. Empty: no judge.")
    rubric: str = setting("", "What the judge looks for, in plain words, e.g. 'answers like a pirate and stays "
                              "correct'.")
    benchmark: str = setting("", "Optional: an lm-eval task to run on both models (needs pip install lm-eval and the "
                                 "task's data on this machine). Empty: none.")


def config_for(run_ref: str, **settings):
    """The config of an evaluation of run `run_ref` (the page and `studio eval` both start it from this): named
    after the run, on the run's own model, with `settings` (EvaluateSettings' fields)."""
    from studio.config import RunConfig
    from studio.runs import open_run
    target = open_run(run_ref)
    model = target.config().model
    cfg = RunConfig(name=f"eval-{target.id}"[:60], stage="evaluate")
    cfg.model = model
    cfg.stage_settings["evaluate"] = EvaluateSettings(run=target.id, **settings)
    return cfg.validate()


def run(job: Job) -> Outcome:
    from studio import evaluation, report_page
    from studio.evaluation import StopEvaluation
    from studio.inference import ChatModelCache, check_usable
    from studio.runs import open_run
    s = job.config.settings_of("evaluate")
    if not s.run:
        from studio.errors import StudioError
        raise StudioError("evaluate.run is empty: name the finished run to evaluate.")
    target = open_run(s.run)
    check_usable(target)
    against = open_run(s.against) if s.against else None
    if against is not None:
        check_usable(against)
    progress = _Progress(job)
    rows = _rows(job, target, s)
    labels = {"base": "base" if against is None else against.id, "tuned": target.id}
    cache = ChatModelCache(size=1)
    answers, losses = {}, {}
    total = 2 * len(rows)
    try:
        for i, (side, source, ref) in enumerate((("base", "base" if against is None else "adapter",
                                                  target.id if against is None else against.id),
                                                 ("tuned", "adapter", target.id))):
            label = "base" if against is None and side == "base" else f"run {labels[side]}"
            progress.say(f"Loading the {label} model.")
            chat = cache.get(source, ref)
            answers[side] = evaluation.generate_answers(
                chat, [r.conversation for r in rows], s.max_new_tokens, should_stop=job.stop_requested,
                on_batch=lambda done, i=i, label=label: progress.step(i * len(rows) + done, total,
                                                                      f"The {label} model answered {done} of "
                                                                      f"{len(rows)} prompts."))
            progress.say(f"Measuring the {label} model's loss on the reference answers.")
            losses[side] = evaluation.reference_loss(chat, rows)
            if s.forgetting:
                probe = evaluation.forgetting_check(
                    lambda prompts, chat=chat: evaluation.generate_answers(
                        chat, [[{"role": "user", "content": p}] for p in prompts], evaluation.PROBE_TOKENS,
                        should_stop=job.stop_requested),
                    label, progress.say, s.forgetting_questions)
                job.notes.setdefault("probe", {})[side] = probe
        report = _report(job, s, target, labels, rows, answers, losses)
        if s.judge and s.rubric.strip():
            report["judge"] = _judge(s, report["rows"], progress)
        if s.benchmark:
            progress.say(f"Running the lm-eval task {s.benchmark}.")
            report["benchmark"] = evaluation.lm_eval_benchmark(s.benchmark, _locations(target, against))
    except StopEvaluation:
        return Outcome("Stopped before the evaluation finished; no report was written.", True, progress.done)
    _save(job.run, target, report, report_page.render(report))
    return Outcome(report["headline"], False, progress.done)


class _Progress:
    def __init__(self, job: Job):
        self.job, self.done = job, 0

    def say(self, message: str) -> None:
        self.job.run.update_status(message=message)

    def step(self, done: int, total: int, message: str) -> None:
        self.done = done
        self.job.run.update_status(step=done, total_steps=total, message=message)


def _rows(job: Job, target, s):
    from studio.data import load_report, load_splits
    from studio.evaluation import rows_from_conversations
    from studio.errors import StudioError
    cfg = target.config()
    if s.data:
        report = load_report(cfg.data, path=_data_path(s.data))
        examples, where = report.examples, f"{report.path}"
    else:
        splits = load_splits(cfg.data, seed=cfg.training.seed)
        examples, where = splits.eval, "the run's held-out rows"
    rows = rows_from_conversations(examples)[:s.max_rows]
    if not rows:
        raise StudioError(f"There is nothing to evaluate in {where}: no conversation with a user prompt and an "
                          "assistant reply. Give evaluate.data a file of conversations, or train with held-out rows "
                          "(data.eval_fraction above 0).")
    job.notes["data"] = where
    return rows


def _data_path(path: str) -> str:
    from studio.data import resolve_data_path
    return str(resolve_data_path(path))


def _report(job, s, target, labels, rows, answers, losses) -> dict:
    from studio import evaluation, metrics
    from studio.probe import verdict
    chosen = metrics.suggest([r.reference for r in rows]) if s.metrics.strip() in ("", "auto") else \
        evaluation.check_metrics([m.strip() for m in s.metrics.split(",") if m.strip()])
    if s.regex and "regex" not in chosen:
        chosen = [*chosen, "regex"]
    table = evaluation.score_rows(rows, answers, chosen, s.regex)
    summary = metrics.summarize(table, chosen)
    report = {"kind": "studio-evaluation", "created": evaluation.timestamp(), "evaluation_run": job.run.id,
              "run": target.id, "against": labels["base"], "labels": labels, "data": job.notes.get("data", ""),
              "settings": {k: getattr(s, k) for k in ("metrics", "regex", "max_rows", "max_new_tokens")},
              "decoding": "greedy", "metrics": chosen, "descriptions": {m: metrics.METRICS[m] for m in chosen},
              "loss": losses, "summary": summary, "rows": table}
    probe = job.notes.get("probe")
    if probe:
        from studio.evaluation import probe_items
        v = verdict([p["passed"] for p in probe["base"]], [p["passed"] for p in probe["tuned"]],
                    s.forgetting_threshold, probe_items(s.forgetting_questions))
        report["forgetting"] = {"flagged": v.flagged, "message": v.message, "base_rate": v.base_rate,
                                "tuned_rate": v.tuned_rate, "base_right": v.base_right, "tuned_right": v.tuned_right,
                                "total": v.total,
                                "questions": [{"id": b["id"], "prompt": b["prompt"], "answer": b["answer"],
                                               "base_reply": b["reply"], "tuned_reply": t["reply"],
                                               "base_passed": b["passed"], "tuned_passed": t["passed"]}
                                              for b, t in zip(probe["base"], probe["tuned"])]}
    report["headline"] = headline(report)
    return report


def headline(report: dict) -> str:
    """One plain sentence: what the evaluation found."""
    labels = report["labels"]
    parts = []
    for metric in report["metrics"][:2]:
        found = report["summary"].get(metric, {})
        if found.get("base_mean") is not None and found.get("tuned_mean") is not None:
            parts.append(f"{metric} {found['base_mean']:.2f} -> {found['tuned_mean']:.2f} ({found['tuned_wins']} rows "
                         f"better, {found['base_wins']} worse)")
    loss = report["loss"]
    if loss.get("base", {}).get("loss") is not None and loss.get("tuned", {}).get("loss") is not None:
        parts.append(f"loss on the reference answers {loss['base']['loss']:.3f} -> {loss['tuned']['loss']:.3f}")
    text = f"Evaluated {len(report['rows'])} rows, {labels['base']} -> {labels['tuned']}: " + "; ".join(parts) + "."
    forgetting = report.get("forgetting")
    if forgetting:
        text += (" Forgetting check: flagged, " if forgetting["flagged"] else " Forgetting check: fine, ") + \
            f"{forgetting['base_rate']:.0%} -> {forgetting['tuned_rate']:.0%} of general questions right."
    return text


def _judge(s, rows, progress) -> dict:
    from studio import evaluation
    from studio.config import BUNDLED_MODEL, ModelConfig
    from studio.inference import ChatModelCache
    from studio.runs import open_run
    progress.say("The judge is grading the answers.")
    cache = ChatModelCache(size=1)
    try:
        judge_run = open_run(s.judge) if s.judge not in (BUNDLED_MODEL,) and "/" not in s.judge else None
    except Exception:  # noqa: BLE001 - not a run id: a model name
        judge_run = None
    judge = cache.get("adapter", judge_run.id) if judge_run else cache.get("base", None,
                                                                            ModelConfig(name_or_path=s.judge))
    result = evaluation.judge_answers(judge, rows, s.rubric)
    result["judge"] = s.judge
    return result


def _locations(target, against) -> dict:
    from studio.inference import base_location, merge_run
    if not target.is_full_model() and not (target.merged_dir / "config.json").is_file():
        merge_run(target)
    tuned = str(target.adapter_dir if target.is_full_model() else target.merged_dir)
    if against is None:
        return {"base": base_location(target.config().model), "tuned": tuned}
    if not against.is_full_model() and not (against.merged_dir / "config.json").is_file():
        merge_run(against)
    return {"base": str(against.adapter_dir if against.is_full_model() else against.merged_dir), "tuned": tuned}


def _save(run, target, report: dict, page: str) -> None:
    """The report in this evaluation's folder and, under evaluations/<this id>/, in the evaluated run's."""
    run.write_json("report.json", report)
    (run.path / "report.html").write_text(page, encoding="utf-8")
    folder = target.path / "evaluations" / run.id
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (tmp / "report.html").write_text(page, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


STAGE = Stage(
    name="evaluate", label="Evaluation", data_kind="none", run=run, settings=EvaluateSettings, trains=False,
    produces=("report",), picker=False,
    help="Compare a finished run with the model it started from (or another run): both answer the same prompts, "
         "scored against the reference answers, with a check for what fine-tuning made the model forget.")
