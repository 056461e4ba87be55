import pytest

from studio.rendering import IGNORE, BUILTIN_TEMPLATES, encode, encode_all, ensure_pad_token, token_preview

CONVO = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Ahoy, matey!"}, {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "Arr!"}]}


@pytest.fixture()
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_pad_token(tok)
    return tok


def trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_only_assistant_replies_and_their_end_marker_are_trained(tokenizer):
    ids, labels = encode(tokenizer, CONVO)
    assert len(ids) == len(labels)
    assert trained_text(tokenizer, ids, labels) == "Ahoy, matey!<|im_end|>\nArr!<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVO["messages"], tokenize=False)


def test_train_on_all_trains_everything(tokenizer):
    ids, labels = encode(tokenizer, CONVO, train_on="all")
    assert labels == ids


def test_end_of_sequence_is_trained_when_pad_is_eos(tmp_path):
    from tests.tiny import build_tokenizer
    tok = build_tokenizer(tmp_path, with_pad=False)
    assert tok.pad_token is None
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id
    ids, labels = encode(tok, CONVO)
    assert tok.eos_token_id in [lab for lab in labels if lab != IGNORE]


def test_fallback_template_when_model_has_none(tmp_path):
    from studio.rendering import apply_template_choice
    from tests.tiny import build_tokenizer
    tok = build_tokenizer(tmp_path, with_template=False)
    assert apply_template_choice(tok, "auto") == "chatml (the model has none)"
    ids, labels = encode(tok, CONVO)
    assert "Arr!" in trained_text(tok, ids, labels)
    assert apply_template_choice(tok, "alpaca") == "alpaca"
    assert tok.chat_template == BUILTIN_TEMPLATES["alpaca"]


def test_too_long_rows_are_counted_and_policy_applied(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": CONVO["messages"][:3]}
    cut = encode_all(tokenizer, [short, long_prompt], max_length=64, too_long="truncate")
    # The long row's reply falls beyond max_length: truncation leaves nothing to learn, so it is dropped.
    assert len(cut.rows) == 1 and cut.truncated == 1 and cut.dropped_nothing_to_learn == 1
    dropped = encode_all(tokenizer, [short, long_prompt], max_length=64, too_long="drop")
    assert len(dropped.rows) == 1 and dropped.dropped_too_long == 1
    assert all(len(r["input_ids"]) <= 64 for r in cut.rows)


def test_token_preview_marks_trained_tokens(tokenizer):
    pieces = token_preview(tokenizer, CONVO)
    assert "".join(t for t, _ in pieces).startswith("<|im_start|>system")
    assert "".join(t for t, trained in pieces if trained) == "Ahoy, matey!<|im_end|>\nArr!<|im_end|>\n"
