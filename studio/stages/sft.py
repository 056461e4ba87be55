"""Supervised fine-tuning: the model learns to reply like the example conversations (TRL's SFTTrainer).

Reads conversations (or plain text), learns the assistant's replies (``data.train_on``), and writes an
adapter. Its settings are the run's data, method and training sections; it has no section of its own.
"""

from __future__ import annotations

from studio.stages import Job, LiveMetric, Stage


def encode(job: Job, tokenizer):
    """The training and held-out rows, read, checked and tokenised; data.json says what was found."""
    from studio.data import load_splits
    from studio.errors import StudioError
    from studio.rendering import encode_all
    cfg = job.config
    splits = load_splits(cfg.data, seed=cfg.training.seed, model=cfg.model)  # model: self-replay answers
    options = dict(max_length=cfg.data.max_length, train_on=cfg.data.train_on, too_long=cfg.data.too_long,
                   should_stop=job.stop_requested)
    train = encode_all(tokenizer, splits.train, **options)
    evaluation = encode_all(tokenizer, splits.eval, **options)
    if not train.rows and not job.stop_requested():
        raise StudioError(f"No training rows are left after applying max_length={cfg.data.max_length} "
                          f"({train.summary()}). Raise data.max_length or shorten the prompts.")
    job.run.write_json("data.json", _data_summary(splits, train, evaluation))
    # The sample replies answer the first held-out prompts (loop.sample_conversations): the rows as read, since the
    # encoded ones are only token ids.
    job.notes["held_out_examples"] = splits.eval
    return train, evaluation


def _data_summary(splits, train, evaluation) -> dict:
    lengths = sorted(train.lengths) or [0]
    report = splits.train_report
    return {**splits.details(), "split_into_blocks": train.split_into_blocks,  # studio.data_summary reads these
            "file": report.path, "format": report.format, "rows": report.total_rows, "usable": report.usable,
            "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
            "blank_rows": report.blank_rows, "train_rows": len(train.rows), "eval_rows": len(evaluation.rows),
            "truncated": train.truncated, "dropped_too_long": train.dropped_too_long,
            "dropped_nothing_to_learn": train.dropped_nothing_to_learn, "trained_tokens": train.trained_tokens,
            "length_min": lengths[0], "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1]}


def build(prep, job: Job, arguments: dict, callbacks: list):
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig

    from studio.training.fast import apply
    args = SFTConfig(**arguments, max_length=prep.cfg.data.max_length)
    datasets.disable_progress_bars()
    train_ds = datasets.Dataset.from_list(prep.train.rows)
    eval_ds = datasets.Dataset.from_list(prep.eval.rows) if prep.eval.rows else None
    trainer = apply.trainer_class(prep.plan)(model=prep.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                             processing_class=prep.tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # progress goes to metrics.jsonl; the CLI and the page show it
    return trainer


def run(job: Job):
    from studio.training import loop
    return loop.train(job, loop.Recipe(encode=encode, build=build))


STAGE = Stage(
    name="sft", label="Supervised fine-tuning",
    help="Teach the model to reply like your example conversations. The usual first step, and all most people need.",
    data_kind="conversations", run=run,
    live_metrics=(LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss")),
    demo_preset="demo")
