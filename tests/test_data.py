import json

import pytest

from studio.config import DataConfig
from studio.data import load_report, load_splits
from studio.errors import StudioError

CONVO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row,expected", [
    ({"instruction": "Add", "input": "2 and 3", "output": "5"},
     [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    ({"instruction": "Hi", "output": "Hello!", "system": "Be nice"},
     [{"role": "system", "content": "Be nice"}, *CONVO]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}, CONVO),
    ({"messages": CONVO}, CONVO),
    ({"prompt": "Hi", "completion": "Hello!"}, CONVO),
])
def test_each_format_normalises_to_messages(tmp_path, row, expected):
    report = load_report(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", [row]))))
    assert report.examples == [{"messages": expected}]


def test_text_format_and_detected_name(tmp_path):
    report = load_report(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", [{"text": "Once upon a time"}]))))
    assert report.format == "text" and report.examples == [{"text": "Once upon a time"}]


def test_column_mapping_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Hi", "answer": "Hello!", "hint": "Hello!"}])
    # question/answer are common aliases: mapped automatically, and the mapping is reported (to be edited).
    auto = load_report(DataConfig(path=str(path)))
    assert auto.mapping == {"question": "instruction", "answer": "output"} and auto.examples == [{"messages": CONVO}]
    report = load_report(DataConfig(path=str(path), columns={"question": "instruction", "hint": "output"}))
    assert report.format == "alpaca" and report.examples == [{"messages": CONVO}] and report.mapping == {}


def test_bad_rows_are_reported_with_reasons_and_not_trained(tmp_path):
    rows = [
        {"messages": CONVO},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
        {"messages": [*CONVO, {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "v"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["a", "list"]}]},
    ]
    report = load_report(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert report.usable == 1
    reasons = {b.row: b.reason for b in report.bad_rows}
    assert "ends on a user turn" in reasons[2]
    assert "unknown role 'bot'" in reasons[3]
    assert "two user turns in a row" in reasons[4]
    assert "system message in the middle" in reasons[5]
    assert "empty" in reasons[6]
    assert "expected text" in reasons[7]


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CONVO}) + "\n{not json\n\n" + json.dumps({"messages": CONVO}) + "\n")
    report = load_report(DataConfig(path=str(path)))
    assert report.usable == 2 and report.blank_rows == 1
    assert report.bad_rows[0].row == 2 and "line 2 is not valid JSON" in report.bad_rows[0].reason


@pytest.mark.parametrize("content,suffix,pattern", [
    (b"", ".jsonl", "is empty"),
    (b"\n\n  \n", ".jsonl", "no rows"),
    (b'{"a": 1}', ".json", "list of records"),
    (b"[1, 2]", ".json", "list of records"),
    (b"hello", ".docx", "not supported"),
    (b"PAR1garbage", ".parquet", "could not be read as Parquet"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(), ".jsonl",
     "no usable rows"),
])
def test_whole_file_problems_raise_clear_errors(tmp_path, content, suffix, pattern):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(StudioError, match=pattern) as err:
        load_report(DataConfig(path=str(path)))
    assert path.name in str(err.value)


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16"])
def test_csv_in_other_encodings(tmp_path, encoding):
    path = tmp_path / "d.csv"
    path.write_bytes("instruction,output\nSay café,Café!\n".encode(encoding))
    report = load_report(DataConfig(path=str(path)))
    assert report.examples[0]["messages"][1]["content"] == "Café!"


def test_parquet_json_and_saved_dataset_read(tmp_path):
    import datasets
    import pandas as pd
    rows = [{"instruction": "Hi", "output": "Hello!"}] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.parquet", "d.json", "saved"):
        assert load_report(DataConfig(path=str(tmp_path / name))).usable == 3


def test_numbers_become_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "6 times 7?", "output": 42}])
    assert load_report(DataConfig(path=str(path))).examples[0]["messages"][1]["content"] == "42"


def test_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.2)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert a.train == b.train and len(a.eval) == 10 and len(a.train) == 40
    assert not {json.dumps(x) for x in a.train} & {json.dumps(x) for x in a.eval}


def test_demo_data_has_held_out_file():
    splits = load_splits(DataConfig(), seed=0)
    assert len(splits.train) == 95 and len(splits.eval) == 20


def test_nested_parquet_conversations(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"messages": [CONVO, [{"role": "user", "content": "Hi"}]]})
    frame.to_parquet(tmp_path / "nested.parquet")
    report = load_report(DataConfig(path=str(tmp_path / "nested.parquet")))
    assert report.examples == [{"messages": CONVO}] and "ends on a user turn" in report.bad_rows[0].reason


def test_missing_columns_error_lists_what_was_found(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"colour": "a", "shape": "b"}])
    with pytest.raises(StudioError, match=r"columns found \(colour, shape\)"):
        load_report(DataConfig(path=str(path)))
