"""Data as found in the wild (issue 17): every common shape read right, nothing dropped without a word.

Each test writes its rows, reads them through the studio's data loading, and where it matters encodes them with a
tiny real tokenizer to assert what is trained (labels) and what is only context (masked).
"""

import json

import pytest

from studio.config import DataConfig
from studio.data import load_report
from studio.errors import StudioError
from studio.rendering import IGNORE, encode, encode_all, ensure_pad_token, set_system_choice, token_preview

# A template with tool and reasoning support, in the shape of Qwen's (tools listed in the system turn, calls as
# <tool_call> JSON, results in <tool_response>), small enough to read.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolLM2's habit: a system prompt of its own when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read(tmp_path, rows, name="d.jsonl", **settings):
    return load_report(DataConfig(path=write_jsonl(tmp_path / name, rows), **settings))


@pytest.fixture()
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_pad_token(tok)
    return tok


def split(tok, example, train_on="assistant"):
    """(trained text, masked text) of one example."""
    ids, labels = encode(tok, example, train_on)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    return trained, masked


# --- content as a list of parts, loss weights -------------------------------------------------------------

def test_content_parts_openai_and_llamafactory_with_loss_weight(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Ahoy"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "hello"}], "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "text", "value": "First"}], "loss_weight": 0.0},
                      {"role": "user", "content": [{"type": "text", "value": "again"}], "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "text", "value": "Second"}], "loss_weight": 1.0}]},
    ]
    report = read(tmp_path, rows)
    assert report.usable == 2 and not report.bad_rows
    first, second = report.examples
    assert first["messages"][0]["content"] == "Hi there"
    trained, masked = split(tokenizer, first)
    assert trained == "Ahoy<|im_end|>\n" and "Hi there" in masked
    trained, masked = split(tokenizer, second)
    # loss_weight 0 on the first reply: shown to the model, not learned.
    assert trained == "Second<|im_end|>\n"
    assert "First" in masked and "hello" in masked


def test_image_and_audio_rows_are_refused_with_a_reason(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                                   {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "<image>Describe it"}, {"role": "assistant", "content": "Red."}],
         "images": ["a.jpg"]},
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Plain"}, {"role": "assistant", "content": "Text."}]},
    ]
    report = read(tmp_path, rows)
    assert report.usable == 1 and len(report.bad_rows) == 3
    reasons = {b.row: b.reason for b in report.bad_rows}
    assert "image_url part" in reasons[1] and "text only" in reasons[1]
    assert "'images' column" in reasons[2]
    assert "<image>" in reasons[3]
    assert report.skipped_by_reason()[0]["rows"] == 1  # grouped, each reason counted


# --- tool calls --------------------------------------------------------------------------------------------

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def glaive_row():
    return {"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"temp": -3})},
        {"from": "gpt", "value": "It is -3 degrees."}], "tools": json.dumps(TOOLS)}


def openai_row():
    return {"messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": -3}'},
        {"role": "assistant", "content": "It is -3 degrees."}],
        "tools": [{"type": "function", "function": TOOLS[0]}]}


def test_sharegpt_and_openai_tool_calls_normalise_to_one_form(tmp_path):
    glaive = read(tmp_path, [glaive_row()], "g.jsonl")
    openai = read(tmp_path, [openai_row()], "o.jsonl")
    assert glaive.usable == openai.usable == 1 and glaive.tool_rows == openai.tool_rows == 1
    g, o = glaive.examples[0], openai.examples[0]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert g["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert g["messages"][2] == {"role": "tool", "content": '{"temp": -3}'}
    assert o["messages"][2]["tool_calls"] == [{**call, "id": "c1"}]
    assert g["tools"] == o["tools"] == [{"type": "function", "function": TOOLS[0]}]


def test_tool_calls_trained_and_results_masked_with_template_tool_support(tmp_path, tokenizer):
    tokenizer.chat_template = TOOL_TEMPLATE
    example = read(tmp_path, [glaive_row()]).examples[0]
    trained, masked = split(tokenizer, example)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in trained
    assert "It is -3 degrees." in trained
    assert "TOOLS:get_weather;" in masked and "<tool_response>" in masked and "temp" not in trained


def test_tool_fallback_for_templates_without_tool_support(tmp_path, tokenizer):
    example = read(tmp_path, [openai_row()]).examples[0]
    trained, masked = split(tokenizer, example)  # the tiny model's template is plain ChatML: no tool support
    assert "<tool_call>\n" in trained and '"name": "get_weather"' in trained and "It is -3 degrees." in trained
    assert "<tools>" in masked and "Use tools." in masked  # the tools joined to the row's own system message
    assert "<tool_response>\n{\"temp\": -3}\n</tool_response>" in masked and "temp" not in trained


def test_reasoning_and_tool_call_parts(tmp_path, tokenizer):
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Area of r=1?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Use pi r^2."},
                                          {"type": "tool_call", "value": '{"name": "area", "arguments": {"r": 1}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "3.14"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "About 3.14."}]}],
        "tools": json.dumps([{"type": "function", "function": {"name": "area", "parameters": {}}}])}
    example = read(tmp_path, [row]).examples[0]
    assert example["messages"][1]["reasoning_content"] == "Use pi r^2."
    tokenizer.chat_template = TOOL_TEMPLATE
    trained, masked = split(tokenizer, example)
    assert "<think>Use pi r^2.</think>" in trained and '"name": "area"' in trained and "About 3.14." in trained
    assert "3.14</tool_response>" in masked


def test_role_mapping_covers_other_role_names(tmp_path):
    rows = [{"messages": [{"role": "customer", "content": "Hi"}, {"role": "agent", "content": "Hello!"}]}]
    with pytest.raises(StudioError, match="data.roles"):
        read(tmp_path, rows)
    report = read(tmp_path, rows, roles={"customer": "user", "Agent": "assistant"})
    assert report.examples[0]["messages"] == [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello!"}]


# --- system prompts ----------------------------------------------------------------------------------------

def test_top_level_system_column_is_used(tmp_path, tokenizer):
    rows = [{"system": "You are Ada.", "conversations": [{"from": "human", "value": "Who?"},
                                                        {"from": "gpt", "value": "Ada."}]}]
    example = read(tmp_path, rows).examples[0]
    assert example["messages"][0] == {"role": "system", "content": "You are Ada."}
    trained, masked = split(tokenizer, example)
    assert trained == "Ada.<|im_end|>\n" and "You are Ada." in masked


def test_template_default_system_prompt_left_out_unless_kept(tmp_path, tokenizer):
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    example = read(tmp_path, [{"instruction": "Who are you?", "output": "I am Ada."}]).examples[0]
    trained, masked = split(tokenizer, example)  # default choice: leave_out
    assert "SmolLM" not in masked and trained == "I am Ada.<|im_end|>\n"
    assert masked.startswith("<|im_start|>system\n<|im_end|>")  # an empty system turn stands in for the default
    set_system_choice(tokenizer, "keep")
    trained, masked = split(tokenizer, example)
    assert "You are SmolLM" in masked and trained == "I am Ada.<|im_end|>\n"
    # A system prompt of the person's own always wins.
    own = read(tmp_path, [{"instruction": "Who?", "output": "Ada."}], "own.jsonl", system_prompt="Be Ada.")
    _, masked = split(tokenizer, own.examples[0])
    assert "Be Ada." in masked and "SmolLM" not in masked


def test_chatml_without_default_gets_no_empty_system_turn(tmp_path, tokenizer):
    example = read(tmp_path, [{"instruction": "Hi", "output": "Hello!"}]).examples[0]
    _, masked = split(tokenizer, example)
    assert "system" not in masked


# --- placeholders -----------------------------------------------------------------------------------------

IDENTITY = [{"instruction": "hi", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}."},
            {"instruction": "Who are you?", "output": "I am {{name}}, trained by {{author}}."},
            {"instruction": "你是谁", "output": "我是 {{name}}。"},
            {"instruction": "Add 2 and 2", "output": "4"}]


def test_placeholders_found_and_rows_skipped_until_given_values(tmp_path, tokenizer):
    report = read(tmp_path, IDENTITY)
    assert report.placeholders == {"name": 3, "author": 2}
    assert report.usable == 1 and len(report.bad_rows) == 3
    assert all("{{name}}" in b.reason and "data.placeholders" in b.reason for b in report.bad_rows)
    filled = read(tmp_path, IDENTITY, placeholders={"name": "Ada", "author": "Acme"})
    assert filled.usable == 4 and not filled.bad_rows
    trained, _ = split(tokenizer, filled.examples[0])
    assert trained == "Hello! I am Ada, an AI assistant developed by Acme.<|im_end|>\n"
    assert "{{" not in json.dumps(filled.examples, ensure_ascii=False)


def test_placeholders_trained_literally_only_when_told(tmp_path, tokenizer):
    report = read(tmp_path, IDENTITY, keep_placeholders=True)
    assert report.usable == 4
    trained, _ = split(tokenizer, report.examples[1])
    assert trained == "I am {{name}}, trained by {{author}}.<|im_end|>\n"


def test_one_off_template_code_is_not_a_placeholder(tmp_path):
    rows = [{"instruction": "Vue hello", "output": "<p>{{ message }}</p>"},
            {"instruction": "Hi", "output": "Hello"}]
    report = read(tmp_path, rows)
    assert report.usable == 2 and report.placeholders == {}


# --- column names, nested formats --------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,reply", [("Questions", "Answers"), ("query", "response"), ("input", "target"),
                                          ("prompt", "response"), ("instruction", "response"), ("Frage", None)])
def test_column_aliases_case_insensitive(tmp_path, prompt, reply):
    path = tmp_path / "qa.csv"
    if reply is None:  # no alias for this column: a clear refusal that names the columns
        path.write_text(f"{prompt},Antwort\nWie?,So.\n", encoding="utf-8")
        with pytest.raises(StudioError, match="could not tell the format"):
            load_report(DataConfig(path=str(path)))
        return
    path.write_text(f"{prompt},{reply}\nHow?,Like this.\n", encoding="utf-8")
    report = load_report(DataConfig(path=str(path)))
    assert report.mapping.get(prompt, prompt) == "instruction" and report.mapping[reply] == "output"
    assert report.examples == [{"messages": [{"role": "user", "content": "How?"},
                                             {"role": "assistant", "content": "Like this."}]}]


def test_context_column_goes_with_the_question(tmp_path):
    report = read(tmp_path, [{"Question": "Capital?", "Context": "About France", "Answer": "Paris"}])
    assert report.examples[0]["messages"][0]["content"] == "Capital?\n\nAbout France"


def oasst_node():
    return {"text": "What is 2+2?", "role": "prompter", "replies": [
        {"text": "5", "role": "assistant", "rank": 1, "replies": []},
        {"text": "4", "role": "assistant", "rank": 0, "replies": [
            {"text": "Why?", "role": "prompter", "replies": [
                {"text": "Because 2+2 is 4.", "role": "assistant", "rank": 0, "replies": []}]}]}]}


def test_open_assistant_trees_follow_the_best_ranked_reply(tmp_path, tokenizer):
    report = read(tmp_path, [oasst_node(), {"message_tree_id": "t2", "prompt": oasst_node()}])
    assert report.format == "oasst" and report.usable == 2
    expected = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because 2+2 is 4."}]
    assert [e["messages"] for e in report.examples] == [expected, expected]
    trained, _ = split(tokenizer, report.examples[0])
    assert trained == "4<|im_end|>\nBecause 2+2 is 4.<|im_end|>\n" and "5" not in trained


def test_open_assistant_flat_message_export(tmp_path):
    rows = [{"message_id": "a", "parent_id": None, "text": "Hi", "role": "prompter"},
            {"message_id": "b", "parent_id": "a", "text": "Worse", "role": "assistant", "rank": 1},
            {"message_id": "c", "parent_id": "a", "text": "Hello!", "role": "assistant", "rank": 0}]
    report = read(tmp_path, rows)
    assert report.examples == [{"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}]


def test_seed_tasks_instances_are_flattened(tmp_path):
    rows = [{"id": "s1", "instruction": "Add.", "instances": [{"input": "1+1", "output": "2"},
                                                               {"input": "2+2", "output": "4"}]}]
    report = read(tmp_path, rows)
    assert report.format == "seed_tasks" and report.usable == 2
    assert report.examples[1]["messages"][-1] == {"role": "assistant", "content": "4"}


def test_nested_data_refused_without_a_mapping_hint(tmp_path):
    with pytest.raises(StudioError) as err:
        read(tmp_path, [{"meta": {"a": 1}, "items": [{"q": "x"}]}])
    assert "nested" in str(err.value) and "data.columns" not in str(err.value)


# --- reporting ---------------------------------------------------------------------------------------------

def test_unused_columns_are_named_and_important_ones_warned(tmp_path):
    report = read(tmp_path, [{"instruction": "Hi", "output": "Hello", "label": "x", "source": "web"}],
                  format="alpaca")
    assert report.unused_columns == ["label", "source"]
    assert len(report.warnings) == 1 and "'label'" in report.warnings[0]


def test_rendered_sample_shows_whole_characters(tmp_path, tokenizer):
    example = {"messages": [{"role": "user", "content": "Grüße über 你好"},
                            {"role": "assistant", "content": "我是 Ada, über alles"}]}
    spans = token_preview(tokenizer, example)
    text = "".join(t for t, _ in spans)
    assert "\ufffd" not in text and "Grüße über 你好" in text
    assert "".join(t for t, trained in spans if trained) == "我是 Ada, über alles<|im_end|>\n"


# --- plain text ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_plain_text_files_split_into_blocks_every_token_trained(tmp_path, tokenizer, suffix):
    long_doc = " ".join(f"word{i}" for i in range(300))
    path = tmp_path / f"wiki{suffix}"
    path.write_text(f"# Title\n\n{long_doc}\n\nA short paragraph.\n", encoding="utf-8")
    report = load_report(DataConfig(path=str(path)))
    assert report.format == "text" and report.usable == 3
    whole = sum(len(encode(tokenizer, e)[0]) for e in report.examples)
    encoded = encode_all(tokenizer, report.examples, max_length=64)
    assert encoded.split_into_blocks == 1 and encoded.truncated == 0
    assert all(len(r["input_ids"]) <= 64 for r in encoded.rows)
    # None lost: every token of every row is in a block, and every one is trained.
    assert sum(len(r["input_ids"]) for r in encoded.rows) == whole == encoded.trained_tokens
    joined = tokenizer.decode([i for r in encoded.rows for i in r["input_ids"]])
    assert long_doc in joined


def test_text_rows_in_jsonl_are_split_not_cut(tmp_path, tokenizer):
    doc = " ".join(f"token{i}" for i in range(200))
    report = read(tmp_path, [{"text": doc}])
    encoded = encode_all(tokenizer, report.examples, max_length=32)
    assert len(encoded.rows) > 1 and encoded.truncated == 0
    assert tokenizer.decode([i for r in encoded.rows for i in r["input_ids"]]).startswith(doc)


def test_hub_dataset_id_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(StudioError, match="is not downloaded and this studio is offline") as err:
        load_report(DataConfig(path="someone/no-such-dataset-17"))
    assert "huggingface-cli download --repo-type dataset someone/no-such-dataset-17" in str(err.value)


def test_bundled_smollm2_default_system_prompt_left_out_in_training_and_chat():
    """The real case of the issue: SmolLM2's template names the model 'SmolLM' in a system prompt of its own."""
    from studio import models
    from studio.config import ModelConfig
    from studio.rendering import render_text
    example = {"messages": [{"role": "user", "content": "Wer bist du?"},
                            {"role": "assistant", "content": "Ich bin Ada, über alles."}]}
    tok = models.load_tokenizer(ModelConfig())
    trained, masked = split(tok, example)
    assert "SmolLM" not in masked and trained == "Ich bin Ada, über alles.<|im_end|>\n"
    # Chat renders through the same tokenizer settings (studio.inference loads it from the run's model section).
    assert "SmolLM" not in render_text(tok, example["messages"][:1], add_generation_prompt=True)
    kept = models.load_tokenizer(ModelConfig(template_system_prompt="keep"))
    assert "named SmolLM" in split(kept, example)[1]


def test_an_empty_images_column_is_not_a_warning(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output,images\nHi,Hello,\nYo,Hey,\n", encoding="utf-8")
    report = load_report(DataConfig(path=str(path)))
    assert report.usable == 2 and report.unused_columns == ["images"] and report.warnings == []


def test_loss_weight_follows_its_turn_when_turns_are_added_and_merged(tmp_path, tokenizer):
    """A default-system template without tool support: a system turn is added in front and two tool results are
    merged into one turn; the weight-0 call must stay unlearned and the final reply learned."""
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    row = {"messages": [
        {"role": "user", "content": "Two cities?"},
        {"role": "assistant", "content": "", "loss_weight": 0, "tool_calls": [
            {"type": "function", "function": {"name": "w", "arguments": {"c": "Oslo"}}},
            {"type": "function", "function": {"name": "w", "arguments": {"c": "Rome"}}}]},
        {"role": "tool", "content": "cold"}, {"role": "tool", "content": "warm"},
        {"role": "assistant", "content": "Oslo is cold, Rome warm."}]}
    example = read(tmp_path, [row]).examples[0]
    trained, masked = split(tokenizer, example)
    assert trained == "Oslo is cold, Rome warm.<|im_end|>\n"
    assert '"c": "Oslo"' in masked and "cold\n</tool_response>\n<tool_response>\nwarm" in masked
