"""Blind comparison: a person sees an evaluation's two answers to a prompt as A and B, in an order drawn at random
and kept on the server, and says which is better (or a tie). Votes are kept per evaluated run in its folder
(votes.jsonl, one line each), so the win rate and its count can be shown to anyone judging the run later.

For demos to non-engineers and for an honest human comparison: nobody sees which model wrote which answer until
the vote is in.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from studio.errors import StudioError
from studio.runs import Run

CHOICES = ("A", "B", "tie")


@dataclass(frozen=True)
class Pair:
    token: str  # names this showing of the pair (what the page sends back with the vote)
    row: int  # the evaluation's row number
    prompt: str
    a: str
    b: str
    tuned_is: str  # "A" or "B": where the evaluated run's answer was shown
    left: int  # rows this visitor has not voted on yet, this one included


def next_pair(report: dict, voted: set[int]) -> Pair:
    """A random row of the report that this visitor has not voted on, its answers in a random order."""
    rows = [r for r in report["rows"] if r["row"] not in voted and (r.get("base") or r.get("tuned"))]
    if not rows:
        raise StudioError("You have compared every row of this evaluation. Run another evaluation (more rows, other "
                          "data) to compare more.")
    row = rows[secrets.randbelow(len(rows))]
    tuned_first = secrets.randbelow(2) == 0
    a, b = (row["tuned"], row["base"]) if tuned_first else (row["base"], row["tuned"])
    return Pair(secrets.token_urlsafe(16), row["row"], row["prompt"], a, b, "A" if tuned_first else "B", len(rows))


class Book:
    """The votes on one evaluated run, from its votes.jsonl."""

    def __init__(self, run: Run, evaluation: str):
        self.run, self.evaluation = run, evaluation
        self.path = run.path / "votes.jsonl"

    def entries(self) -> list[dict]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("choice") in ("tuned", "base", "tie"):
                found.append(entry)
        return found

    def rows_voted(self, voter: str) -> set[int]:
        return {e["row"] for e in self.entries() if e.get("evaluation") == self.evaluation and e.get("voter") == voter}

    def add(self, pair: Pair, choice: str, voter: str) -> None:
        if choice not in CHOICES:
            raise StudioError(f"A vote is one of {', '.join(CHOICES)}.")
        winner = "tie" if choice == "tie" else ("tuned" if choice == pair.tuned_is else "base")
        entry = {"evaluation": self.evaluation, "row": pair.row, "shown_as": {"tuned": pair.tuned_is},
                 "choice": winner, "voter": voter, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def tally(self) -> dict:
        """Over every vote on this run: how often its answer won, lost or tied, and its win rate (ties half)."""
        entries = self.entries()
        count = len(entries)
        tuned = sum(1 for e in entries if e["choice"] == "tuned")
        base = sum(1 for e in entries if e["choice"] == "base")
        ties = count - tuned - base
        return {"votes": count, "tuned_wins": tuned, "base_wins": base, "ties": ties,
                "win_rate": None if not count else round((tuned + 0.5 * ties) / count, 3)}
