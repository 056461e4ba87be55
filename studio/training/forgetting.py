"""The forgetting check at the end of a training run (training.forgetting_check).

When training ends, the model it started from and the tuned one answer the same general questions (studio/probe.py,
greedy), and the verdict is written to the run folder as forgetting.json: the Train tab shows it, the run's last
message quotes it, and a flagged drop says what to change. The Evaluate tab runs the same check on demand.

Where the base's replies come from: with an adapter, from the trained model with its adapter switched off, at the
end; when the whole model trains there is no "off", so the starting model answers before the first step and its
replies wait in forgetting-base.json (which also carries them across a resume).
"""

from __future__ import annotations

import json
import sys

from transformers import TrainerCallback

from studio.runs import FORGETTING_FILE as RESULT_FILE, Run, write_atomic

# Questions asked, a spread over every topic of the probe; each costs one short greedy reply per model, all asked
# in one batch. On a CPU 'auto' asks fewer: there the replies are most of the check's cost (bench/NOTES.md).
QUESTIONS, CPU_QUESTIONS = 40, 20
# 'auto' checks on a CPU only up to this many parameters: past it the replies take minutes there.
CPU_AUTO_MAX_PARAMS = 600_000_000
BASE_FILE = "forgetting-base.json"


def questions_for(setting: str, device: str, parameters: int) -> tuple[int, str]:
    """How many general questions to ask at the end (0: none), and why not when none."""
    if setting == "off":
        return 0, ""
    if setting == "on" or device != "cpu":
        return QUESTIONS, ""
    if parameters <= CPU_AUTO_MAX_PARAMS:
        return CPU_QUESTIONS, ""
    return 0, (f"The forgetting check was left out: on a CPU a model of {parameters / 1e9:.1f}B parameters takes "
               "minutes to answer its questions. Run it from the Evaluate tab, or set training.forgetting_check "
               "to 'on'.")


class ForgettingCheck(TrainerCallback):
    """Asks the general questions; `answer(model, base)` writes the replies (the sample replies' greedy decoder)."""

    def __init__(self, run: Run, replies, count: int):
        from studio import evaluation
        self.run = run
        self.replies = replies  # a SampleReplies over the questions, used only for its decoder
        self.items = evaluation.probe_items(count)
        self.replies.conversations = [[{"role": "user", "content": item.prompt}] for item in self.items]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or hasattr(model, "disable_adapter") or state.global_step != 0:
            return
        from studio.training.callbacks import _mixed_precision
        replies = self._answer(model, base=True, precision=_mixed_precision(args))
        if replies is not None and self.run.keeps_records:
            write_atomic(self.run.path / BASE_FILE, json.dumps({"ids": [i.id for i in self.items], "replies": replies}))

    def finish(self, model, args) -> dict | None:
        """Ask the tuned model (and, with an adapter, the base) and write the verdict; None when it could not."""
        from studio.training.callbacks import _mixed_precision
        precision = _mixed_precision(args)
        base = self._answer(model, base=True, precision=precision) if hasattr(model, "disable_adapter") \
            else self._stored_base()
        tuned = self._answer(model, base=False, precision=precision)
        if base is None or tuned is None or not self.run.keeps_records:
            return None
        return self._write(base, tuned)

    def _answer(self, model, base: bool, precision) -> list[str] | None:
        try:
            return self.replies.answer(model, base=base, precision=precision)
        except Exception as err:  # noqa: BLE001 - the check is a courtesy: it must never fail a finished run
            from studio.training.loop import is_out_of_memory
            if is_out_of_memory(err):
                _release()
            print(f"The forgetting check was left out: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return None

    def _stored_base(self) -> list[str] | None:
        try:
            stored = json.loads((self.run.path / BASE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # e.g. resumed from a run made before the check existed
        if not isinstance(stored, dict) or stored.get("ids") != [i.id for i in self.items]:
            return None
        return [str(r) for r in stored.get("replies", [])]

    def _write(self, base: list[str], tuned: list[str]) -> dict:
        from studio.probe import passes, verdict
        base_passed = [passes(item, reply) for item, reply in zip(self.items, base)]
        tuned_passed = [passes(item, reply) for item, reply in zip(self.items, tuned)]
        v = verdict(base_passed, tuned_passed, items=self.items)
        result = {"flagged": v.flagged, "message": v.message, "base_right": v.base_right,
                  "tuned_right": v.tuned_right, "total": v.total,
                  "questions": [{"id": item.id, "prompt": item.prompt, "answer": item.answer, "base_reply": b,
                                 "tuned_reply": t, "base_passed": bp, "tuned_passed": tp}
                                for item, b, t, bp, tp in zip(self.items, base, tuned, base_passed, tuned_passed)]}
        write_atomic(self.run.path / RESULT_FILE, json.dumps(result, indent=1))
        return result


def summary(result: dict | None) -> str:
    """The sentence the run's last message ends with."""
    if not result:
        return ""
    return f" Forgetting check: {result['message']}"


def _release() -> None:
    from studio.training.loop import _release_memory
    _release_memory()
