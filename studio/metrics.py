"""Task metrics for evaluation: how close is a model's reply to the reference answer, as a number from 0 to 1.

``score`` compares one reply with one reference; ``suggest`` picks the metrics that fit a set of references;
``summarize`` turns per-row scores of a base and a tuned model into means and win/loss/tie counts.

The text-overlap metrics come from well-kept libraries rather than being rewritten here: ROUGE-L from Google's
``rouge-score``, BLEU and chrF from ``sacrebleu``. The simple checks (exact, contains, numeric, JSON, regex) are
small enough to write out, and are written to forgive what models routinely add around a right answer: case,
surrounding spaces, a final full stop, quotes, a code fence around JSON, thousands separators and a dollar sign.

This module knows nothing about models, prompts or files: it only compares strings. It does not judge meaning
(a paraphrase of the right answer scores low on exact and BLEU); pick the metric that fits the task.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import unicodedata

from studio.errors import StudioError

METRICS: dict[str, str] = {
    "exact": "The reply is the reference, ignoring upper/lower case, surrounding spaces and a final full stop.",
    "contains": "The reference appears in the reply as a whole word or phrase (ignoring case).",
    "regex": "The reply matches a pattern you give (a regular expression).",
    "numeric": "The last number in the reply equals the reference's number (1,234 = 1234.0; $ and % ignored).",
    "json": "The reply is valid JSON; if the reference is JSON too, both hold the same data.",
    "rouge_l": "Word overlap with the reference, in order (ROUGE-L F1): 1 is the same words, 0 none shared.",
    "bleu": "Overlap of short word sequences with the reference (sentence BLEU, 0 to 1), as used for translation.",
    "chrf": "Overlap of character sequences with the reference (chrF, 0 to 1); kind to spelling and word forms.",
}

# Patterns run on model output, which can be very long (a model that never stops) and a user's pattern can be
# catastrophic on it, e.g. (a|aa)+$ backtracks exponentially. Two guards: look only at the start of the reply,
# and give the match a time limit (the `regex` library supports one; it comes with sacrebleu).
MAX_CHECKED_CHARS = 20_000
REGEX_SECONDS = 1.0

# Short references (a name, a number, a yes) suit exact/contains; anything longer suits the overlap metrics.
SHORT_REFERENCE_WORDS = 5

# Float answers are compared with room for binary rounding noise such as 0.1 + 0.2 = 0.30000000000000004 (a relative
# error near 1e-16), but not enough to call 1234567 and 1234568 equal.
_REL_TOLERANCE = 1e-12
_ABS_TOLERANCE = 1e-12

_TIE_TOLERANCE = 1e-9


def score(metric: str, prediction: str, reference: str, pattern: str = "") -> float | None:
    """How well `prediction` matches `reference` under `metric`, from 0 to 1; None where the metric cannot apply
    (regex without a pattern, numeric when the reference holds no number, exact, contains and the overlap metrics when
    the reference is empty). A bad or runaway regex pattern raises StudioError."""
    if metric not in METRICS:
        raise StudioError(f"Unknown metric {metric!r}. Use one of: {', '.join(METRICS)}.")
    prediction = prediction or ""
    reference = reference or ""
    return _SCORERS[metric](prediction, reference, pattern)


# --- the simple checks --------------------------------------------------------------------------------------

_QUOTES_AND_EMPHASIS = "\"'`*_“”‘’«»"


def normalize(text: str) -> str:
    """Casefolded, with runs of spaces made one, and without surrounding spaces, quotes or final punctuation:
    models often answer 'Paris.' or '"yes"' or '**Paris**' when the reference is 'Paris'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    text = text.strip(_QUOTES_AND_EMPHASIS + " ")
    text = _strip_final_punctuation(text)
    return text.strip(_QUOTES_AND_EMPHASIS + " ")


def _strip_final_punctuation(text: str) -> str:
    # Only the end: a leading '-' or '.' can be part of the answer (-5, .5).
    end = len(text)
    while end and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[:end]


def _exact(prediction: str, reference: str, pattern: str) -> float | None:
    if not reference.strip():
        return None
    return float(normalize(prediction) == normalize(reference))


def _contains(prediction: str, reference: str, pattern: str) -> float | None:
    wanted = normalize(reference)
    if not wanted:
        return None
    # Whole words only: the reference "4" must not be found inside "14", nor "cat" inside "category".
    found = re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", normalize(prediction[:MAX_CHECKED_CHARS]))
    return float(found is not None)


def _regex(prediction: str, reference: str, pattern: str) -> float | None:
    if not pattern:
        return None
    compiled = compile_pattern(pattern)
    try:
        found = compiled.search(prediction[:MAX_CHECKED_CHARS], timeout=REGEX_SECONDS)
    except TimeoutError:
        raise StudioError(f"The pattern {pattern!r} took over {REGEX_SECONDS:g} s on one reply: it backtracks too "
                          "much. Simplify it, e.g. avoid nested repeats such as (a+)+ or (a|aa)+.") from None
    return float(found is not None)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str):
    """The compiled pattern, or a StudioError naming it when it is not a valid regular expression."""
    import regex  # the `re` module has no time limit; `regex` (a sacrebleu dependency) does
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError) as err:
        raise StudioError(f"The pattern {pattern!r} is not a valid regular expression ({err}). Fix it, or use "
                          "'contains' to look for plain text.") from None


# A number as models write it: -3, 1,234.5, $12, 45%, .5. It must not start inside a word (no number in "H2O";
# the hyphen of "COVID-19" is not a minus sign), and a comma counts as a thousands separator only before exactly
# three digits ("1,2,3" is three numbers).
_NUMBER = re.compile(r"(?<![\w.])([-+−]?)\$?([-+−]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)")

_UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9}
_TEENS = {"ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
          "seventeen": 17, "eighteen": 18, "nineteen": 19}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
_NUMBER_WORDS = {**_UNITS, **_TEENS, **_TENS, "hundred": 100}
# "twenty-one" / "twenty one" as one number; otherwise a single word.
_NUMBER_WORD = re.compile(rf"\b(?:({'|'.join(_TENS)})[-\s]({'|'.join(_UNITS)})|({'|'.join(_NUMBER_WORDS)}))\b",
                          re.IGNORECASE)


def last_number(text: str) -> float | None:
    """The last number written in digits; when there is none, the last number in words up to ninety-nine (and
    'hundred'), so 'There are seven days in a week' reads as 7. Digits win because words like 'one' are often not
    the answer ('7 days make one week')."""
    text = text[:MAX_CHECKED_CHARS]
    matches = list(_NUMBER.finditer(text))
    if matches:
        sign_before, sign_after, digits = matches[-1].groups()
        negative = (sign_before or sign_after) in ("-", "−")
        value = float(digits.replace(",", ""))
        return -value if negative else value
    words = list(_NUMBER_WORD.finditer(text))
    if not words:
        return None
    tens, unit, single = words[-1].groups()
    if single:
        return float(_NUMBER_WORDS[single.lower()])
    return float(_TENS[tens.lower()] + _UNITS[unit.lower()])


def _numeric(prediction: str, reference: str, pattern: str) -> float | None:
    wanted = last_number(reference)
    if wanted is None:
        return None
    got = last_number(prediction)
    if got is None:
        return 0.0
    return float(math.isclose(got, wanted, rel_tol=_REL_TOLERANCE, abs_tol=_ABS_TOLERANCE))


_CODE_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_json(text: str):
    """(True, value) when `text` is JSON, allowing a ```json fence around it; (False, None) otherwise."""
    text = text.strip()
    fenced = _CODE_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        return False, None
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def same_json(a, b) -> bool:
    """Equal as data: key order ignored, 1 and 1.0 equal, but true is not 1 (Python's == says it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=_REL_TOLERANCE, abs_tol=_ABS_TOLERANCE)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _json(prediction: str, reference: str, pattern: str) -> float | None:
    valid, got = parse_json(prediction)
    if not valid:
        return 0.0
    reference_is_json, wanted = parse_json(reference)
    if not reference_is_json:
        return 1.0  # no JSON to compare with: being valid JSON is the whole test
    return float(same_json(got, wanted))


# --- the overlap metrics, from their libraries -----------------------------------------------------------------

class _UnicodeWords:
    """rouge-score's own tokenizer keeps only a-z and 0-9, so any non-Latin text scores 0 against itself;
    this one keeps the words of every script, casefolded."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.casefold())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise StudioError("ROUGE-L needs the rouge-score package: .venv/bin/pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())


@functools.lru_cache(maxsize=1)
def _sacrebleu_metrics():
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise StudioError("BLEU and chrF need the sacrebleu package: .venv/bin/pip install sacrebleu") from None
    # effective_order: a short reply without any 4-word overlap still gets credit for its shorter overlaps.
    return BLEU(effective_order=True), CHRF()


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))  # sacrebleu can return 100.00000000000004


def _rouge_l(prediction: str, reference: str, pattern: str) -> float | None:
    if not reference.strip():
        return None
    return _unit(_rouge_scorer().score(reference, prediction[:MAX_CHECKED_CHARS])["rougeL"].fmeasure)


def _bleu(prediction: str, reference: str, pattern: str) -> float | None:
    if not reference.strip():
        return None
    bleu, _ = _sacrebleu_metrics()
    return _unit(bleu.sentence_score(prediction[:MAX_CHECKED_CHARS], [reference]).score / 100)


def _chrf(prediction: str, reference: str, pattern: str) -> float | None:
    if not reference.strip():
        return None
    _, chrf = _sacrebleu_metrics()
    return _unit(chrf.sentence_score(prediction[:MAX_CHECKED_CHARS], [reference]).score / 100)


_SCORERS = {"exact": _exact, "contains": _contains, "regex": _regex, "numeric": _numeric, "json": _json,
            "rouge_l": _rouge_l, "bleu": _bleu, "chrf": _chrf}


# --- choosing metrics and summing up ----------------------------------------------------------------------------

def is_number(text: str) -> bool:
    """The whole text is one number as people write it: 42, -3.5, 1,234, $12, 45%."""
    match = _NUMBER.fullmatch(text.strip().rstrip("%").strip())
    return match is not None


def _is_json_container(text: str) -> bool:
    # Only objects and arrays: "42", "true" and '"yes"' parse as JSON too, but such references are numbers or words.
    valid, value = parse_json(text)
    return valid and isinstance(value, (dict, list))


def suggest(references: list[str]) -> list[str]:
    """The metrics that fit these reference answers, best first; never empty."""
    filled = [r for r in references if isinstance(r, str) and r.strip()]
    if not filled:
        return ["contains", "exact"]
    if _most(filled, is_number):
        return ["numeric", "exact"]
    if _most(filled, _is_json_container):
        return ["json"]
    if statistics.median(len(r.split()) for r in filled) <= SHORT_REFERENCE_WORDS:
        return ["exact", "contains"]
    return ["rouge_l", "chrf", "bleu"]


def _most(items: list[str], test) -> bool:
    return sum(1 for item in items if test(item)) * 2 > len(items)


def summarize(rows: list[dict], metrics: list[str]) -> dict:
    """Per-metric comparison of the base and the tuned model over an evaluation set.

    Each row holds, under each metric's name, the two scores of one example:
        {"exact": {"base": 0.0, "tuned": 1.0}, "rouge_l": {"base": 0.41, "tuned": 0.73}, "prompt": "..."}
    A score may be None (the metric did not apply to that row) or missing; other keys are ignored.

    Returns, for each metric in `metrics`:
        {"base_mean": float | None, "tuned_mean": float | None,  # mean over the rows that side has a score for
         "change": tuned_mean - base_mean (None when either is None),
         "tuned_wins": int, "base_wins": int, "ties": int,       # over rows where both sides have a score
         "compared": int, "base_scored": int, "tuned_scored": int, "rows": len(rows)}
    """
    return {metric: _summarize_metric(rows, metric) for metric in metrics}


def _summarize_metric(rows: list[dict], metric: str) -> dict:
    base_scores, tuned_scores, pairs = [], [], []
    for position, row in enumerate(rows):
        base, tuned = _pair(row, metric, position)
        if base is not None:
            base_scores.append(base)
        if tuned is not None:
            tuned_scores.append(tuned)
        if base is not None and tuned is not None:
            pairs.append((base, tuned))
    base_mean = statistics.fmean(base_scores) if base_scores else None
    tuned_mean = statistics.fmean(tuned_scores) if tuned_scores else None
    ties = sum(1 for b, t in pairs if abs(t - b) <= _TIE_TOLERANCE)
    tuned_wins = sum(1 for b, t in pairs if t - b > _TIE_TOLERANCE)
    return {"base_mean": base_mean, "tuned_mean": tuned_mean,
            "change": None if base_mean is None or tuned_mean is None else tuned_mean - base_mean,
            "tuned_wins": tuned_wins, "base_wins": len(pairs) - tuned_wins - ties, "ties": ties,
            "compared": len(pairs), "base_scored": len(base_scores), "tuned_scored": len(tuned_scores),
            "rows": len(rows)}


def _pair(row: dict, metric: str, position: int) -> tuple[float | None, float | None]:
    scores = row.get(metric) if isinstance(row, dict) else None
    if scores is None:
        return None, None
    if not isinstance(scores, dict):
        raise StudioError(f"Row {position + 1}: the scores under {metric!r} must look like "
                          f"{{'base': 0.5, 'tuned': 0.8}}, not {scores!r}.")
    return _as_score(scores.get("base"), metric, position), _as_score(scores.get("tuned"), metric, position)


def _as_score(value, metric: str, position: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudioError(f"Row {position + 1}: the {metric!r} score {value!r} is not a number; scores are 0 to 1, "
                          "or None where the metric does not apply.")
    return float(value)
