"""studio.metrics: each metric on known right and wrong pairs, the edge cases models produce, suggest and summarize."""

import pytest

from studio.errors import StudioError
from studio.metrics import METRICS, last_number, score, suggest, summarize


def test_every_metric_is_described_and_gives_full_marks_to_a_perfect_reply():
    perfect = {"exact": "Paris", "contains": "Paris", "regex": "Paris", "numeric": "42", "json": '{"a": 1}',
               "rouge_l": "the cat sat", "bleu": "the cat sat on the mat", "chrf": "the cat sat"}
    assert set(METRICS) == set(perfect)
    for name, text in perfect.items():
        assert METRICS[name].strip(), name
        assert score(name, text, text, pattern="Paris") == 1.0, name


def test_unknown_metric_is_refused_by_name():
    with pytest.raises(StudioError, match="'accuracy'"):
        score("accuracy", "a", "a")


@pytest.mark.parametrize("reply, reference, expected", [
    ("Paris", "Paris", 1.0),
    ("  paris.  ", "Paris", 1.0),
    ("**Paris!**", "Paris", 1.0),
    ('"Yes"', "yes", 1.0),
    ("Straße", "STRASSE", 1.0),  # casefolding, not just lower()
    ("Paris is the capital.", "Paris", 0.0),
    ("Lyon", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("-5", "5", 0.0),  # a leading sign is part of the answer, not punctuation to strip
])
def test_exact(reply, reference, expected):
    assert score("exact", reply, reference) == expected


@pytest.mark.parametrize("reply, reference, expected", [
    ("The capital of France is Paris.", "Paris", 1.0),
    ("THE CAPITAL IS PARIS", "paris", 1.0),
    ("Die Hauptstadt ist München.", "münchen", 1.0),
    ("It is 14.", "4", 0.0),  # whole words only
    ("A category of animals", "cat", 0.0),
    ("The answer is 4.", "4", 1.0),
    ("", "Paris", 0.0),
    ("It is in the U.S. somewhere", "U.S.", 1.0),
])
def test_contains(reply, reference, expected):
    assert score("contains", reply, reference) == expected


def test_empty_reference_does_not_apply():
    for name in ("exact", "contains", "rouge_l", "bleu", "chrf"):
        assert score(name, "anything", "   ") is None, name


def test_regex_matches_user_pattern():
    assert score("regex", "The answer: HELLO", "", pattern=r"\bHELLO\b") == 1.0
    assert score("regex", "hello", "", pattern=r"\bHELLO\b") == 0.0
    assert score("regex", "hello", "", pattern=r"(?i)\bHELLO\b") == 1.0


def test_regex_without_pattern_does_not_apply():
    assert score("regex", "anything", "ref") is None


def test_bad_regex_is_a_studio_error_naming_it():
    with pytest.raises(StudioError, match=r"\(unclosed"):
        score("regex", "text", "", pattern="(unclosed")


def test_catastrophic_regex_is_stopped_not_hung():
    # (a|aa)+$ backtracks exponentially on a long run of a's with a mismatch at the end.
    with pytest.raises(StudioError, match="took over"):
        score("regex", "a" * 5000 + "!", "", pattern=r"(a|aa)+$")


def test_regex_looks_only_at_the_start_of_a_huge_reply():
    reply = "x" * 30_000 + "needle"
    assert score("regex", reply, "", pattern="needle") == 0.0
    assert score("regex", "needle" + reply, "", pattern="needle") == 1.0


@pytest.mark.parametrize("reply, reference, expected", [
    ("1,234.0", "1234", 1.0),
    ("The total is $1,234.", "1234", 1.0),
    ("45%", "45", 1.0),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),
    ("1234568", "1,234,567", 0.0),  # rounding tolerance is not a loose match
    ("0.33", "0.333", 0.0),
    ("2 + 3 = 5", "5", 1.0),
    ("2 + 3 = 6", "5", 0.0),
    ("I think 5, no wait, 6", "5", 0.0),  # the last number is the answer
    ("There are seven days in a week.", "7", 1.0),  # number words only when there are no digits
    ("7 days make one week.", "7", 1.0),
    ("twenty-one", "21", 1.0),
    ("The result is -3.", "-3", 1.0),
    ("The result is 3.", "-3", 0.0),
    ("I don't know", "5", 0.0),
    ("", "5", 0.0),
    ("1,2,3", "3", 1.0),  # a list, not one thousand-something
    ("H2O is water", "2", 0.0),
])
def test_numeric(reply, reference, expected):
    assert score("numeric", reply, reference) == expected


def test_numeric_does_not_apply_without_a_number_in_the_reference():
    assert score("numeric", "42", "Paris") is None


def test_last_number_reads_signs_and_currency():
    assert last_number("costs -$12.50") == -12.5
    assert last_number("COVID-19") == 19  # the hyphen is not a minus sign
    assert last_number("no numbers here") is None


@pytest.mark.parametrize("reply, reference, expected", [
    ('{"a": 1, "b": [1, 2]}', '{"b": [1, 2], "a": 1}', 1.0),  # key order does not matter
    ('```json\n{"a": 1}\n```', '{"a": 1}', 1.0),
    ('{"a": 1.0}', '{"a": 1}', 1.0),
    ('{"a": true}', '{"a": 1}', 0.0),  # true is not 1, whatever Python's == says
    ('{"a": 2}', '{"a": 1}', 0.0),
    ('[1, 2]', '[2, 1]', 0.0),  # list order does matter
    ('{"a": 1', '{"a": 1}', 0.0),
    ('{"a": 1}', "any valid JSON", 1.0),  # reference not JSON: validity alone
    ("not json", "any valid JSON", 0.0),
    ("", '{"a": 1}', 0.0),
    ('{"name": "Zoë"}', '{"name": "Zo\\u00eb"}', 1.0),
])
def test_json(reply, reference, expected):
    assert score("json", reply, reference) == expected


def test_rouge_l_orders_overlap():
    reference = "the cat sat on the mat"
    assert score("rouge_l", reference, reference) == pytest.approx(1.0)
    partial = score("rouge_l", "the cat sat", reference)
    assert 0.5 < partial < 1.0
    assert score("rouge_l", "dogs run fast", reference) == 0.0
    assert score("rouge_l", "", reference) == 0.0


def test_rouge_l_scores_non_latin_text():
    # rouge-score's own tokenizer drops every non a-z character, which would make this 0.
    assert score("rouge_l", "Привет, мир", "привет мир") == pytest.approx(1.0)
    assert score("rouge_l", "Привет, друг", "привет мир") == pytest.approx(0.5)


def test_bleu_and_chrf_on_a_zero_to_one_scale():
    reference = "The quick brown fox jumps over the lazy dog"
    for name in ("bleu", "chrf"):
        assert score(name, reference, reference) == 1.0, name
        near = score(name, "The quick brown fox jumped over the lazy dog", reference)
        far = score(name, "Completely unrelated words here", reference)
        assert 0.0 <= far < near < 1.0, name
        assert score(name, "", reference) == 0.0, name


def test_chrf_credits_unicode_spelling_closeness():
    assert score("chrf", "naïve café", "naïve café") == 1.0
    assert score("chrf", "naive cafe", "naïve café") < 1.0


@pytest.mark.parametrize("references, expected_first", [
    (["42", "1,234", "$5", "7.5", "Paris"], "numeric"),
    (['{"a": 1}', '[1, 2]', '{"b": {"c": 3}}'], "json"),
    (["Paris", "Rome", "New York", "yes"], "exact"),
    (["The capital of France is Paris, which lies on the Seine river.",
      "Rome has been the capital of Italy since 1871 and is home to the Vatican."], "rouge_l"),
])
def test_suggest(references, expected_first):
    suggestion = suggest(references)
    assert suggestion[0] == expected_first
    assert set(suggestion) <= set(METRICS)


def test_suggest_short_and_long_sets_get_their_families():
    assert set(suggest(["Paris", "Rome"])) == {"exact", "contains"}
    long = ["A long answer that explains something in a full sentence of many words."] * 3
    assert set(suggest(long)) == {"rouge_l", "chrf", "bleu"}


def test_suggest_is_never_empty():
    assert suggest([])
    assert suggest(["", "   "])


def test_suggest_needs_most_not_some_numbers():
    assert suggest(["42", "Paris", "Rome"])[0] != "numeric"


def test_summarize_means_and_counts():
    rows = [
        {"exact": {"base": 0.0, "tuned": 1.0}, "chrf": {"base": 0.2, "tuned": 0.6}, "prompt": "ignored"},
        {"exact": {"base": 1.0, "tuned": 1.0}, "chrf": {"base": 0.8, "tuned": 0.4}},
        {"exact": {"base": 1.0, "tuned": 0.0}, "chrf": {"base": 0.5, "tuned": 0.5}},
        {"exact": {"base": 0.0, "tuned": 1.0}, "chrf": {"base": None, "tuned": None}},
    ]
    summary = summarize(rows, ["exact", "chrf"])
    exact = summary["exact"]
    assert exact["base_mean"] == pytest.approx(0.5) and exact["tuned_mean"] == pytest.approx(0.75)
    assert exact["change"] == pytest.approx(0.25)
    assert (exact["tuned_wins"], exact["base_wins"], exact["ties"]) == (2, 1, 1)
    assert exact["compared"] == exact["rows"] == 4
    chrf = summary["chrf"]
    assert (chrf["tuned_wins"], chrf["base_wins"], chrf["ties"]) == (1, 1, 1)
    assert chrf["compared"] == chrf["base_scored"] == 3 and chrf["rows"] == 4
    assert chrf["base_mean"] == pytest.approx(0.5) and chrf["tuned_mean"] == pytest.approx(0.5)


def test_summarize_a_metric_no_row_has():
    summary = summarize([{"exact": {"base": 1.0, "tuned": 1.0}}], ["bleu"])["bleu"]
    assert summary["base_mean"] is None and summary["change"] is None
    assert summary["compared"] == 0 and summary["rows"] == 1


def test_summarize_one_side_missing_is_not_compared():
    summary = summarize([{"exact": {"base": 1.0}}], ["exact"])["exact"]
    assert summary["base_scored"] == 1 and summary["tuned_scored"] == 0 and summary["compared"] == 0
    assert summary["tuned_mean"] is None


def test_summarize_refuses_malformed_scores():
    with pytest.raises(StudioError, match="Row 2"):
        summarize([{"exact": {"base": 1, "tuned": 1}}, {"exact": 0.5}], ["exact"])
    with pytest.raises(StudioError, match="not a number"):
        summarize([{"exact": {"base": "high", "tuned": 1}}], ["exact"])
