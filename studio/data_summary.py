"""What a run read from its data, in a few plain lines: for the terminal (``studio train``), the Train tab's run
status and the Data tab. Made from the run folder's data.json (or the same keys from a data check).

Pure formatting: no files are read here, nothing is imported from the engine.
"""

from __future__ import annotations

from pathlib import Path

MAX_REASONS = 5
# Plain text is its own kind of run: supervised fine-tuning's code path (studio.rendering splits the text into
# max-length blocks and trains every token), named for what it does to the model. Other formats are named by
# their stage.
CONTINUED_PRETRAINING = "continued pretraining"
RUN_KINDS = {"text": (CONTINUED_PRETRAINING, "teach the model the style and facts of your text: every word is "
                                             "trained")}


def run_kind(fmt: str | None) -> tuple[str, str] | None:
    """(name, plain-language explanation) of the kind of run data of format `fmt` makes, where it has one."""
    return RUN_KINDS.get(fmt or "")


def run_kind_line(fmt: str | None) -> str:
    """'Kind of run: continued pretraining (teach the model ...).' for plain text; '' for other formats."""
    kind = run_kind(fmt)
    return f"Kind of run: {kind[0]} ({kind[1]})." if kind else ""


def lines(d: dict) -> list[str]:
    """data.json (as written by the stages) -> lines that say what was read, used, skipped, cut and ignored."""
    if not d:
        return []
    # The kind of run goes first: the Train tab's run status shows the first line before it is unfolded.
    out = [run_kind_line(d.get("format"))] if run_kind(d.get("format")) else []
    name = Path(str(d.get("file", ""))).name or "data"
    used = d.get("train_rows")
    head = f"Data: {name}, {d.get('format', '?')} format, {d.get('usable', '?')} usable of {d.get('rows', '?')} rows"
    if used is not None:
        head += f" ({used} training, {d.get('eval_rows', 0)} held out)"
    out.append(head + ".")
    if d.get("mapping"):
        out.append("Columns mapped automatically: " + ", ".join(f"{k} -> {v}" for k, v in d["mapping"].items()) + ".")
    skipped = d.get("skipped") or []
    if skipped:
        total = sum(s["rows"] for s in skipped)
        out.append(f"Skipped {total} rows:")
        for s in skipped[:MAX_REASONS]:
            rows = ", ".join(map(str, s.get("first_rows", [])))
            out.append(f"  {s['rows']} x {s['reason']} (rows {rows}{'...' if s['rows'] > len(s.get('first_rows', [])) else ''})")
        if len(skipped) > MAX_REASONS:
            out.append(f"  ... and {len(skipped) - MAX_REASONS} other reasons (see data.json)")
    if d.get("blank_rows"):
        out.append(f"{d['blank_rows']} blank rows ignored.")
    cut = []
    if d.get("truncated"):
        cut.append(f"{d['truncated']} rows cut to max length")
    if d.get("dropped_too_long"):
        cut.append(f"{d['dropped_too_long']} dropped as too long")
    if d.get("dropped_nothing_to_learn"):
        cut.append(f"{d['dropped_nothing_to_learn']} dropped: max length left no reply to learn")
    if d.get("split_into_blocks"):
        cut.append(f"{d['split_into_blocks']} plain-text rows split into max-length blocks (nothing lost)")
    if cut:
        out.append("Length: " + "; ".join(cut) + ".")
    if d.get("duplicates"):
        dup = d["duplicates"]
        if dup.get("mode") == "report":
            out.append(f"Duplicates: {dup.get('exact', 0)} repeated rows and {dup.get('held_out_repeats', 0)} held-out "
                       "rows repeating training rows, all kept (data.dedup: report; 'exact' or 'near' removes them).")
        else:
            out.append(f"Duplicates: {dup.get('exact', 0)} exact, {dup.get('near', 0)} near; "
                       f"{dup.get('removed', 0)} removed from training, {dup.get('held_out_removed', 0)} held-out "
                       "rows removed because they repeat training rows.")
    if d.get("mixed"):
        out.append("Mixed in: " + ", ".join(f"{m['rows']} rows from {m['source']}" for m in d["mixed"]) + ".")
    if d.get("placeholders"):
        out.append("Placeholders found: " + ", ".join("{{" + k + "}}" for k in d["placeholders"]) + ".")
    if d.get("unused_columns"):
        out.append("Columns not used: " + ", ".join(d["unused_columns"]) + ".")
    for warning in d.get("warnings") or []:
        out.append(f"Warning: {warning}.")
    return out
