"""What the stages built on TRL's preference and RL trainers share: reading their kind of rows into the
conversational form TRL tokenises itself, and building a TRL trainer from the arguments every stage shares.

Not a stage itself (it has no STAGE). Imported only inside a stage's run(), in the worker.
"""

from __future__ import annotations

from studio.errors import StudioError
from studio.rendering import EncodedSet
from studio.stages import Job


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


TO_TRL = {  # by the kind of rows a stage reads (stages.DATA_KINDS)
    "preference_pairs": lambda e: {"prompt": e["prompt"], "chosen": _reply(e["chosen"]),
                                   "rejected": _reply(e["rejected"])},
    "feedback": lambda e: {"prompt": e["prompt"], "completion": _reply(e["completion"]), "label": e["label"]},
    "prompts": lambda e: {"prompt": e["prompt"], "answer": e["answer"]},
}


def encode(job: Job, tokenizer, kind: str) -> tuple[EncodedSet, EncodedSet]:
    """The training and held-out rows of `kind` (stages.DATA_KINDS), in TRL's conversational form; data.json
    says what was found. The trainers tokenise them through the tokenizer's chat template."""
    from studio.data import load_splits
    cfg = job.config
    splits = load_splits(cfg.data, seed=cfg.training.seed, kind=kind)
    report = splits.train_report
    convert = TO_TRL[kind]
    train = EncodedSet(rows=[convert(e) for e in splits.train])
    held_out = EncodedSet(rows=[convert(e) for e in splits.eval])
    if not train.rows:
        raise StudioError(f"No training rows are left in {report.path}; it needs at least one usable row.")
    job.run.write_json("data.json", {
        **splits.details(),  # what studio.data_summary reads: skipped rows by reason, unused columns...
        "file": report.path, "format": report.format, "rows": report.total_rows, "usable": report.usable,
        "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
        "blank_rows": report.blank_rows, "train_rows": len(train.rows), "eval_rows": len(held_out.rows)})
    return train, held_out


def build(trainer_cls, config_cls, prep, arguments: dict, callbacks: list, settings: dict, **extra):
    """A TRL trainer on the prepared model (PEFT-wrapped: its reference model is the same weights with the
    adapter switched off, never a second copy, nor a copy of the adapter) and rows."""
    import datasets
    from transformers.trainer_callback import PrinterCallback
    datasets.disable_progress_bars()
    args = config_cls(**arguments, **settings)
    train_ds = datasets.Dataset.from_list(prep.train.rows)
    eval_ds = datasets.Dataset.from_list(prep.eval.rows) if prep.eval.rows else None
    trainer = trainer_cls(model=prep.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=prep.tokenizer, callbacks=callbacks, **extra)
    trainer.remove_callback(PrinterCallback)  # progress goes to metrics.jsonl; the CLI and the page show it
    peft_configs = getattr(trainer.model, "peft_config", {})
    if "ref" in peft_configs and "default" in peft_configs:
        # Given a model that has its adapter already, TRL keeps a frozen copy of it as the reference. The adapter
        # is new (it changes nothing yet), so the reference is simply the model with its adapter off: without the
        # copy TRL switches the adapter off for the reference pass, and nothing extra is kept or computed.
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer


def run_with(job: Job, kind: str, build_fn, live: tuple, head: str = "causal_lm", row_factor: int = 1):
    """Train `job` through loop.train with this stage's rows, trainer and live metrics."""
    from studio.training import loop
    keys = tuple(metric.key for metric in live if metric.key not in ("loss", "eval_loss"))
    return loop.train(job, loop.Recipe(encode=lambda j, tok: encode(j, tok, kind), build=build_fn,
                                       live_metric_keys=keys, head=head, row_factor=row_factor))
