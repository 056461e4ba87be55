"""Evaluate tab: does the tuned model beat the one it started from, and what did it forget? Starts an evaluation
run (stages/evaluate.py), follows it, shows its summary, every row and the readable report; then a blind
comparison of the answers, A against B, for a person to judge without knowing which model wrote which.

Run it alone with ``python -m studio.ui.evaluate_tab``.
"""

from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.ui.common import Form, bind, friendly, run_alone, run_picker, visitor

AGAINST_BASE = ("The model it started from (its base)", "")
HELD_OUT, DATA_TAB_FILE = "The run's held-out rows", "The file chosen on the Data tab"
JUDGE_OFF = ("No judge", "")
TIMER_S = 2.0


def finished_runs(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    return run_picker(studio.finished_runs(visitor(request), writes_replies=True), current)


def against_choices(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    runs = studio.finished_runs(visitor(request), writes_replies=True)
    return gr.Dropdown(choices=[AGAINST_BASE, *[(r, r) for r in runs]], value=current if current in runs else "")


def evaluations(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    found = studio.evaluations(visitor(request))
    return gr.Dropdown(choices=found, value=current if current in found else (found[0] if found else None))


@friendly
def start(studio, run_id: str, against: str, data_choice: str, data_path: str, settings: dict,
          request: gr.Request = None) -> tuple:
    """Start an evaluation; the status line, the evaluation to follow and the timer on."""
    if not run_id:
        raise gr.Error("Pick a finished run to evaluate (train one first).")
    chosen = {**settings, "run": run_id, "against": against or "",
              "data": data_path if data_choice == DATA_TAB_FILE else ""}
    if chosen["data"] in ("demo", "demo-dpo", "demo-grpo"):
        chosen["data"] = ""  # the demo sets' held-out rows are the run's own
    result = studio.start_evaluation(chosen, visitor(request))
    return f"**{result['run_id']}**: starting.", result["run_id"], gr.Timer(active=True)


@friendly
def tick(studio, eval_id: str | None, request: gr.Request = None) -> tuple:
    """The followed evaluation's status; with its report once it is done."""
    if not eval_id:
        return ("", *_empty(), gr.Timer(active=False))
    snap = studio.snapshot(eval_id, visitor(request))
    st = snap["status"]
    line = f"**{eval_id}**: {st.get('state')}. {html.escape(st.get('message', ''))}"
    if snap.get("active"):
        return (line, *_empty(), gr.Timer(active=True))
    return (line, *show_report(studio, eval_id, request), gr.Timer(active=False))


def _empty() -> tuple:
    return "", None, "", None


def show_report(studio, eval_id: str | None, request: gr.Request = None) -> tuple:
    """(summary, the rows as a table, the forgetting check, the report page to download) of an evaluation."""
    if not eval_id:
        return _empty()
    report = studio.evaluation_report(eval_id, visitor(request))
    if not report:
        return _empty()
    return (summary_markdown(report), rows_frame(report), forgetting_markdown(report),
            studio.evaluation_page(eval_id, visitor(request)))


def summary_markdown(report: dict) -> str:
    labels = report["labels"]
    lines = [f"**{html.escape(report['headline'])}**", "",
             f"| measure | what it checks | {html.escape(labels['base'])} | {html.escape(labels['tuned'])} | "
             "rows better / worse / same |", "|---|---|---|---|---|"]
    for metric in report["metrics"]:
        found = report["summary"].get(metric, {})
        lines.append(f"| {metric} | {html.escape(report['descriptions'].get(metric, ''))} | {_num(found.get('base_mean'))} "
                     f"| {_num(found.get('tuned_mean'))} | {found.get('tuned_wins', 0)} / {found.get('base_wins', 0)} / "
                     f"{found.get('ties', 0)} |")
    loss = report["loss"]
    lines.append(f"| loss on the reference answers (lower is better) | how surprised each model is by the data's "
                 f"answers | {_num(loss.get('base', {}).get('loss'))} | {_num(loss.get('tuned', {}).get('loss'))} | |")
    judge = report.get("judge")
    if judge:
        wins = judge["wins"]
        lines += ["", f"Judge ({html.escape(str(judge['judge']))}): {labels['tuned']} better on {wins.get('tuned', 0)}, "
                      f"{labels['base']} on {wins.get('base', 0)}, ties {wins.get('tie', 0)}, unclear "
                      f"{wins.get('unclear', 0)} of {judge['judged']} rows."]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def rows_frame(report: dict) -> pd.DataFrame:
    labels = report["labels"]
    rows = []
    for row in report["rows"]:
        entry = {"#": row["row"], "prompt": row["prompt"], "reference": row["reference"],
                 labels["base"]: row["base"], labels["tuned"]: row["tuned"]}
        for metric in report["metrics"]:
            entry[metric] = f"{_num(row[metric]['base'])} -> {_num(row[metric]['tuned'])}"
        rows.append(entry)
    return pd.DataFrame(rows)


def forgetting_markdown(report: dict) -> str:
    found = report.get("forgetting")
    if not found:
        return ""
    mark = "⚠️ " if found["flagged"] else "✅ "
    return mark + html.escape(found["message"])


# --- blind comparison ---
@friendly
def blind_next(studio, eval_id: str | None, request: gr.Request = None) -> tuple:
    """The next pair: (prompt, answer A, answer B, its token, the tally so far)."""
    if not eval_id:
        raise gr.Error("Pick a finished evaluation first.")
    pair = studio.blind_next(eval_id, visitor(request))
    return (f"**Prompt** ({pair['left']} left to compare): {html.escape(pair['prompt'])}", pair["a"], pair["b"],
            pair["token"], tally_markdown(pair["tally"]))


def blind_vote(studio, token: str | None, choice: str, eval_id: str | None, request: gr.Request = None) -> tuple:
    """Record a vote, then show the next pair (or say that every row is done)."""
    if not token:
        raise gr.Error("Show a pair first.")
    tally = studio.blind_vote(token, choice, visitor(request))
    try:
        return blind_next(studio, eval_id, request)
    except gr.Error as done:
        return (str(done.message), "", "", None, tally_markdown(tally))


def _voter(studio, choice: str):
    """The click handler of one vote button."""
    def vote(token: str | None, eval_id: str | None, request: gr.Request):
        return friendly(blind_vote)(studio, token, choice, eval_id, request)
    return vote


def tally_markdown(tally: dict) -> str:
    if not tally["votes"]:
        return "No votes yet."
    return (f"Votes so far: the tuned run's answer won {tally['tuned_wins']}, lost {tally['base_wins']}, tied "
            f"{tally['ties']} of {tally['votes']}: a win rate of {100 * tally['win_rate']:.0f}% (ties count half).")


def build(studio) -> SimpleNamespace:
    from studio.stages.evaluate import EvaluateSettings  # noqa: F401 - its fields are the form's (config.field_info)
    gr.Markdown("### 6. Evaluate\nDoes the tuned model beat the one it started from? Both answer the same prompts "
                "(greedy, so results repeat); answers are scored against the reference answers, and a check of "
                "general questions says whether it forgot what it knew.")
    form = Form()
    with gr.Row():
        run_pick = gr.Dropdown([], label="Run to evaluate", scale=2, elem_id="eval-run")
        against = gr.Dropdown([AGAINST_BASE], value="", label="Compare with", scale=2, elem_id="eval-against")
        data_choice = gr.Radio([HELD_OUT, DATA_TAB_FILE], value=HELD_OUT, label="Rows to answer", scale=2,
                               elem_id="eval-data")
        refresh = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        form.field("evaluate", "metrics", label="Measures")
        form.field("evaluate", "regex", label="Pattern (for the regex measure)")
        form.field("evaluate", "max_rows", label="Most rows")
        form.field("evaluate", "max_new_tokens", label="Longest answer (tokens)")
        form.field("evaluate", "forgetting", label="Check what it forgot")
    judge_allowed = not studio.policy.share or studio.policy.allow_judge
    with gr.Accordion("A judge model (optional)", open=False, visible=judge_allowed):
        with gr.Row():
            form.field("evaluate", "judge", label="Judge")
            form.field("evaluate", "rubric", label="Rubric")
    start_button = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    status = gr.Markdown("", elem_id="eval-status")
    summary = gr.Markdown("", elem_id="eval-summary")
    forgetting = gr.Markdown("", elem_id="eval-forgetting")
    table = gr.Dataframe(label="Every row", interactive=False, wrap=True, elem_id="eval-rows")
    page = gr.File(label="The report (a page to open in a browser)", interactive=False, elem_id="eval-report")
    with gr.Accordion("Past evaluations", open=False):
        past = gr.Dropdown([], label="Evaluation", elem_id="eval-past")
    with gr.Accordion("Blind comparison", open=True, elem_id="eval-blind-box"):
        gr.Markdown("Two answers to the same prompt, in a random order: say which is better before you know which "
                    "model wrote it. Votes are kept with the run.")
        show_pair = gr.Button("Show a pair", elem_id="eval-blind-next")
        prompt = gr.Markdown("", elem_id="eval-blind-prompt")
        with gr.Row():
            answer_a = gr.Textbox(label="Answer A", interactive=False, lines=6, elem_id="eval-blind-a")
            answer_b = gr.Textbox(label="Answer B", interactive=False, lines=6, elem_id="eval-blind-b")
        with gr.Row():
            vote_a = gr.Button("A is better", elem_id="eval-vote-a")
            vote_tie = gr.Button("About the same", elem_id="eval-vote-tie")
            vote_b = gr.Button("B is better", elem_id="eval-vote-b")
        tally = gr.Markdown("", elem_id="eval-blind-tally")
    following = gr.State(None)
    token = gr.State(None)
    timer = gr.Timer(TIMER_S, active=False)

    report_outputs = [summary, table, forgetting, page]
    timer.tick(bind(tick, studio), following, [status, *report_outputs, timer], show_progress="hidden")
    refresh.click(bind(finished_runs, studio), run_pick, run_pick).then(
        bind(against_choices, studio), against, against).then(bind(evaluations, studio), past, past)
    def open_past(eval_id: str | None, request: gr.Request):
        return (eval_id, *friendly(show_report)(studio, eval_id, request))
    past.change(open_past, past, [following, *report_outputs])
    blind_outputs = [prompt, answer_a, answer_b, token, tally]
    show_pair.click(bind(blind_next, studio), following, blind_outputs)
    for button, choice in ((vote_a, "A"), (vote_b, "B"), (vote_tie, "tie")):
        button.click(_voter(studio, choice), [token, following], blind_outputs)
    return SimpleNamespace(run_pick=run_pick, against=against, data_choice=data_choice, form=form,
                           start=start_button, status=status, summary=summary, table=table, forgetting=forgetting,
                           page=page, past=past, following=following, timer=timer, refresh=refresh,
                           show_pair=show_pair, prompt=prompt, answer_a=answer_a, answer_b=answer_b, tally=tally)


def wire_start(studio, tab: SimpleNamespace, data_path) -> None:
    """Evaluate reads this tab's settings and the Data tab's file (`data_path`, a component of that tab)."""
    inputs = {tab.run_pick, tab.against, tab.data_choice, data_path, *tab.form.fields.values()}

    def on_start(values: dict, request: gr.Request):
        settings = tab.form.to_dict(values).get("evaluate", {})
        return start(studio, values[tab.run_pick], values[tab.against], values[tab.data_choice], values[data_path],
                     settings, request)
    tab.start.click(on_start, inputs, [tab.status, tab.following, tab.timer], concurrency_limit=None)


if __name__ == "__main__":
    def _alone(studio):
        tab = build(studio)
        wire_start(studio, tab, gr.State(""))
    run_alone(_alone, "Evaluate")
